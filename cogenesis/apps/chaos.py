"""``cogenesis chaos``: fault scenarios against a local cluster, every output checked against an undisturbed run.

The system's promise under faults (ARCHITECTURE.md, "Failure behaviour") is that the edge is the source of
truth of a session: a dead replica, a restarted Redis, a vanished edge pool, malformed traffic or overload
cost time, never a token. This harness measures that promise instead of asserting it in prose: it starts a
local cluster (Redis + Ray + Serve, embedded models, as ``cogenesis demo`` does), runs N concurrent greedy
logits sessions once undisturbed (the reference), then runs the same sessions again under each fault and
compares every session's token ids with the reference. Greedy decoding makes the comparison exact: any
token lost, duplicated or changed by a failover shows up in an alignment of the two id sequences.

Scenarios share one cluster where that is safe: ``poison``, ``restart-redis``, ``kill-edge-pool`` and
``kill-replica`` run on the "main" cluster (2 replicas when kill-replica is asked for, short idle sweep);
``overload`` needs a replica that admits only N/4 sessions, so it gets a cluster of its own. They run in
the fixed order of ``SCENARIOS`` whatever order they were asked in (kill-replica late: Serve replaces the
killed replica, which loads its model while the next scenario would run).

The harness is a test client, not an edge: to poison the bus it writes to Redis directly (msgspec structs
of the protocol, or raw bytes); it never seals anything with an edge's outbound gate.
"""

from __future__ import annotations

import difflib
import os
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx
import msgspec
import redis

from cogenesis.apps.chaos_pool import (
    Outcome,
    PoolSpec,
    failed_outcomes,
    pool_command,
    read_outcomes,
    read_progress,
    run_sessions,
)
from cogenesis.cluster.bus import FIELD, GROUP, OPEN_STREAM, in_stream, redis_auth, reply_key
from cogenesis.core.errors import ClusterError, ConfigError, ProtocolError
from cogenesis.core.protocol import (
    MAX_TOP_K,
    PROTOCOL_VERSION,
    CloseSession,
    ErrorReply,
    OpenSession,
    StepBatch,
    StepReply,
    StepRequest,
    decode_replies,
    decode_request,
    encode,
    pack_ids,
)

if TYPE_CHECKING:
    from cogenesis.cluster.local import LocalCluster
    from cogenesis.core.config import CloudConfig, EdgeConfig
    from cogenesis.edge_sim.client import EdgeClient
    from cogenesis.edge_sim.engine import EdgeEngine

# What each scenario does and promises (``--help`` prints these); the order is the order they run in.
SCENARIOS: dict[str, str] = {
    "poison": "mix malformed entries into real traffic while the sessions run: raw garbage on cg:open, on every "
    "replica's cg:in stream and on the edges' reply lists, a wrong protocol version, a step whose tokens are not "
    "int32, a StepBatch with one bad item, out-of-range token ids, an unknown session, an oversize top_k. Each one "
    "that names a session must be answered (its error code; the batch's good item served), every real session "
    "stays identical, and afterwards nothing is pending on the bus (XPENDING 0, stream lengths 0).",
    "restart-redis": "stop the bundled Redis mid-run and start it again on the same port (empty: no persistence). "
    "Replicas and edges reconnect; sessions resume by replay, identical.",
    "kill-edge-pool": "the sessions run in edge pool subprocesses (--pools); one is SIGKILLed mid-run and started "
    "again (the device came back): its sessions run again from the start and must match the reference. The "
    "killed pool's orphaned sessions must be freed on the replicas by the idle sweeper (KV and active sessions "
    "from /v1/stats, before and after).",
    "kill-replica": "2 replicas; once the sessions are mid-run, SIGKILL the replica process that holds sessions "
    "(its pid is on its heartbeat, cg:alive:{replica}). Edges notice within seconds, resume on a live replica "
    "by replay, identical; Serve replaces the dead replica.",
    "overload": "a cluster whose replica admits N/4 sessions (max_sessions); all N start at once. The replica "
    "refuses the excess busy, edges retry with backoff, every session completes identical.",
}
ALL = "all"
MAIN, OVERLOAD = "main", "overload"


def parse_scenarios(names: Sequence[str] | None) -> list[str]:
    """The scenarios to run, in run order: ``all`` (or nothing) is every one; unknown names are an error."""
    asked = list(names or [ALL])
    unknown = [n for n in asked if n != ALL and n not in SCENARIOS]
    if unknown:
        raise ConfigError(
            f"unknown scenario(s): {', '.join(unknown)}", hint=f"use {', '.join(SCENARIOS)} or {ALL} (repeatable)"
        )
    return list(SCENARIOS) if ALL in asked else [n for n in SCENARIOS if n in asked]


@dataclass(frozen=True)
class ChaosOptions:
    sessions: int = 16
    max_new_tokens: int = 24
    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    data: str | None = None
    large_model: str = "embedded:large"
    small_model: str = "embedded:small"
    max_prompt_tokens: int = 384
    top_k: int = 10
    step_timeout_s: float = 30.0
    pools: int = 2  # kill-edge-pool: edge pool subprocesses
    # main cluster: its idle sweeper frees a killed pool's sessions after this; longer than the edge's prefill of
    # all its sessions' private prompts (~20 s for 16 on 2 busy cores), during which their cloud sessions are idle
    session_idle_s: float = 60.0
    sweep_interval_s: float = 1.0
    redis_down_s: float = 1.0  # restart-redis: how long Redis stays down
    fault_after: float = 0.33  # the fault comes once this share of the run's tokens is written
    timeout_s: float = 600.0  # per scenario (and the reference): sessions still running then are cut
    threads: int | None = None  # torch threads of the edge and of each replica (None: split the cores)

    def validate(self) -> None:
        if self.sessions < 1 or self.max_new_tokens < 1 or self.pools < 1:
            raise ConfigError("--sessions, --max-new-tokens and --pools must be >= 1")
        if "overload" in self.scenarios and self.sessions < 4:
            raise ConfigError(
                f"overload needs at least 4 sessions (the replica admits N/4), got {self.sessions}",
                hint="pass --sessions 4 or more",
            )
        if "kill-edge-pool" in self.scenarios and self.sessions < 2:
            raise ConfigError("kill-edge-pool needs at least 2 sessions (one pool is killed, another runs on)")
        if not 0.0 < self.fault_after < 1.0:
            raise ConfigError(f"--fault-after must be in (0, 1), got {self.fault_after}")
        if self.timeout_s <= 0:
            raise ConfigError(f"--timeout must be > 0, got {self.timeout_s}")


# ---- comparing outputs (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Alignment:
    """How an output differs from its reference: ids missing (lost), extra (duplicated), or replaced (changed);
    ``first_diff``: the reference position where they part (None: identical)."""

    lost: int = 0
    duplicated: int = 0
    changed: int = 0
    first_diff: int | None = None

    @property
    def identical(self) -> bool:
        return self.first_diff is None


def align(reference: Sequence[int], got: Sequence[int]) -> Alignment:
    """Align two id sequences (difflib opcodes): a deletion is lost ids, an insertion duplicated ids, a replacement
    changed ids (and lost or duplicated ones where its two sides differ in length)."""
    lost = duplicated = changed = 0
    first: int | None = None
    ops = difflib.SequenceMatcher(None, list(reference), list(got), autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            continue
        first = i1 if first is None else first
        a, b = i2 - i1, j2 - j1
        if tag == "delete":
            lost += a
        elif tag == "insert":
            duplicated += b
        else:  # replace
            changed += min(a, b)
            lost += max(0, a - b)
            duplicated += max(0, b - a)
    return Alignment(lost, duplicated, changed, first)


@dataclass(frozen=True)
class SessionCheck:
    client: int
    tid: str
    ok: bool
    identical: bool
    tokens: int
    reference_tokens: int
    lost: int = 0
    duplicated: int = 0
    changed: int = 0
    first_diff: int | None = None
    max_gap_s: float | None = None
    resumes: int | None = None
    busy_retries: int | None = None
    error: str | None = None
    near_diff: dict | None = None  # around the first difference: the reference's ids and this run's


def check_sessions(reference: dict[int, Outcome], outcomes: Sequence[Outcome]) -> list[SessionCheck]:
    """Each outcome against its reference session (by client index). A failed session is not aligned: it is a
    failure, whatever it wrote before."""
    out = []
    for o in sorted(outcomes, key=lambda o: o.client):
        ref = reference.get(o.client)
        ref_ids = ref.ids if ref is not None else []
        gap = round(max(o.itl_s), 3) if o.itl_s else None
        common = dict(
            client=o.client,
            tid=o.tid,
            tokens=len(o.ids),
            reference_tokens=len(ref_ids),
            max_gap_s=gap,
            resumes=o.resumes,
            busy_retries=o.busy_retries,
        )
        if not o.ok or ref is None:
            error = o.error if not o.ok else "no reference session"
            out.append(SessionCheck(ok=o.ok, identical=False, error=error, **common))  # type: ignore[arg-type]
            continue
        a = align(ref_ids, o.ids)
        near = None
        if a.first_diff is not None:
            lo = max(0, a.first_diff - 2)
            near = {
                "at": a.first_diff,
                "reference": ref_ids[lo : a.first_diff + 4],
                "got": o.ids[lo : a.first_diff + 4],
            }
        out.append(
            SessionCheck(
                ok=True,
                identical=a.identical,
                lost=a.lost,
                duplicated=a.duplicated,
                changed=a.changed,
                first_diff=a.first_diff,
                near_diff=near,
                **common,  # type: ignore[arg-type]
            )
        )
    return out


def max_gap(outcomes: Sequence[Outcome]) -> float | None:
    """The longest gap between consecutive tokens of any session (None: no session wrote two tokens)."""
    gaps = [g for o in outcomes for g in o.itl_s]
    return round(max(gaps), 3) if gaps else None


def recovery_s(outcomes: Sequence[Outcome], fault_at: float | None) -> float | None:
    """Time to recover from a fault at ``fault_at`` (unix s): the longest stall of any session across or after it,
    i.e. the largest gap between consecutive tokens that ends after the fault (None: no fault, or no token after
    it)."""
    if fault_at is None:
        return None
    stalls = []
    for o in outcomes:
        times = o.token_times()
        stalls += [b - a for a, b in zip(times, times[1:]) if b >= fault_at]
    return round(max(stalls), 3) if stalls else None


def _sum(values: Sequence[int | None]) -> int | None:
    """A total over sessions of a count the edge may not keep (None everywhere: not counted)."""
    known = [v for v in values if v is not None]
    return sum(known) if known else None


@dataclass
class Check:
    """One of a scenario's own pass/fail conditions beyond identical outputs (the bus is clean, the KV was freed)."""

    name: str
    ok: bool
    detail: str = ""


def scenario_report(
    name: str,
    cluster: str,
    reference: dict[int, Outcome],
    outcomes: Sequence[Outcome],
    seconds: float,
    fault: dict | None = None,
    checks: Sequence[Check] = (),
    extra: dict | None = None,
) -> dict:
    """A scenario's report (JSON-ready): sessions ok/failed, identical, tokens lost/duplicated/changed, the fault
    and the time to recover, resumes and busy retries, its own checks; ``passed`` when all of it holds."""
    sessions = check_sessions(reference, outcomes)
    fault_at = fault.get("at") if fault else None
    errors = Counter(s.error for s in sessions if s.error)
    ok = sum(s.ok for s in sessions)
    identical = sum(s.identical for s in sessions)
    passed = bool(sessions) and identical == len(sessions) == len(reference) and all(c.ok for c in checks)
    started = min((o.started_at for o in outcomes), default=None)
    fault_out = None
    if fault is not None:
        fault_out = {k: v for k, v in fault.items() if k != "at"}
        if fault_at is not None and started is not None:
            fault_out["at_s"] = round(fault_at - started, 3)  # after the sessions started
    return {
        "scenario": name,
        "cluster": cluster,
        "passed": passed,
        "sessions": len(sessions),
        "ok": ok,
        "failed": len(sessions) - ok,
        "identical": identical,
        "tokens": {
            "reference": sum(len(r.ids) for r in reference.values()),
            "written": sum(s.tokens for s in sessions if s.ok),
            "lost": sum(s.lost for s in sessions),
            "duplicated": sum(s.duplicated for s in sessions),
            "changed": sum(s.changed for s in sessions),
        },
        "fault": fault_out,
        "recover_s": recovery_s(outcomes, fault_at),
        "max_gap_s": max_gap(outcomes),
        "reference_max_gap_s": max_gap(list(reference.values())),
        "resumes": _sum([s.resumes for s in sessions]),
        "busy_retries": _sum([s.busy_retries for s in sessions]),
        "checks": [asdict(c) for c in checks],
        "errors": dict(errors),
        "seconds": round(seconds, 2),
        "session_checks": [asdict(s) for s in sessions],
        **(extra or {}),
    }


TABLE_COLUMNS = (
    "scenario",
    "ok/failed",
    "identical",
    "lost",
    "dup",
    "changed",
    "fault at s",
    "recover s",
    "max gap s",
    "resumes",
    "busy retries",
    "checks",
    "result",
)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table_rows(scenarios: Sequence[dict]) -> list[list[str]]:
    """One row per scenario report, in ``TABLE_COLUMNS`` order."""
    rows = []
    for s in scenarios:
        checks = s.get("checks", [])
        t = s.get("tokens", {})
        rows.append(
            [
                s["scenario"],
                f"{s['ok']}/{s['failed']}",
                f"{s['identical']}/{s['sessions']}",
                _fmt(t.get("lost")),
                _fmt(t.get("duplicated")),
                _fmt(t.get("changed")),
                _fmt((s.get("fault") or {}).get("at_s")),
                _fmt(s.get("recover_s")),
                _fmt(s.get("max_gap_s")),
                _fmt(s.get("resumes")),
                _fmt(s.get("busy_retries")),
                f"{sum(c['ok'] for c in checks)}/{len(checks)}" if checks else "-",
                "PASS" if s["passed"] else "FAIL",
            ]
        )
    return rows


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def notes(s: dict) -> str:
    """The scenario's own figures in a few words (printed under the table)."""
    fault = s.get("fault") or {}
    name = s["scenario"]
    if s.get("crash"):
        return f"harness: {s['crash']}"[:80]
    if name == "kill-replica" and fault.get("killed"):
        return f"killed replica {fault['killed']}; claimed entries {_fmt(s.get('claimed_entries'))}"
    if name == "restart-redis" and "down_s" in fault:
        return f"Redis down {fault['down_s']:g} s"
    if name == "kill-edge-pool" and s.get("kv"):
        kv = s["kv"]
        at, after = kv.get("at_kill") or {}, kv.get("after_sweep") or {}
        return (
            f"KV {_mib(at.get('kv_bytes'))} ({at.get('active_sessions', '-')} sessions) at the kill -> "
            f"{_mib(after.get('kv_bytes'))}; {_fmt(kv.get('swept'))} session(s) swept (the kill orphaned "
            f"{kv['orphaned_sessions']}; the sweeper also closes any other idle one), the orphans' count reached "
            f"{_fmt(kv.get('orphans_swept_after_s'))} s after the kill"
        )
    if name == "poison" and s.get("poison") is not None:
        answered = sum(p["ok"] for p in s["poison"])
        pending = sum(b["pending"] + b["length"] for b in (s.get("bus") or {}).values())
        return f"{answered}/{len(s['poison'])} as expected; {pending} entries left on the bus"
    if name == "overload":
        return f"max_sessions {s.get('max_sessions', '-')}; {_fmt(s.get('busy_refusals'))} busy refusals"
    return ""


def render_table(report: dict):
    """The summary table (rich) of a chaos report."""
    from rich.table import Table

    table = Table(title=f"cogenesis chaos: {report['settings']['sessions']} greedy sessions per scenario")
    for col in TABLE_COLUMNS:
        table.add_column(col, justify="left" if col in ("scenario", "result") else "right")
    for row in table_rows(report["scenarios"]):
        table.add_row(*row, style=None if row[-1] == "PASS" else "red")
    return table


def failure_lines(report: dict) -> list[str]:
    """What went wrong, one line each: failed checks, session errors, differing sessions."""
    lines = []
    for s in report["scenarios"]:
        name = s["scenario"]
        if s.get("crash"):
            lines.append(f"{name}: {s['crash']}")
        for c in s.get("checks", []):
            if not c["ok"]:
                lines.append(f"{name}: check {c['name']} failed: {c['detail']}")
        for err, n in s.get("errors", {}).items():
            lines.append(f"{name}: {n} session(s) failed: {err}")
        for sc in s.get("session_checks", []):
            if sc["ok"] and not sc["identical"]:
                lines.append(
                    f"{name}: client {sc['client']} differs from the reference at token {sc['first_diff']} "
                    f"(lost {sc['lost']}, duplicated {sc['duplicated']}, changed {sc['changed']}): {sc['near_diff']}"
                )
    return lines


# ---- poison: malformed entries (pure builders) -----------------------------------------------------------

REPLY = "reply"  # a Poison whose answer must be a StepReply (the good item of a batch with a bad one)


@dataclass(frozen=True)
class Poison:
    """One malformed (or hostile) bus entry: where it goes, its bytes, and the answer it must get.

    ``answer``: the ErrorReply code a replica must answer with, ``REPLY`` for a StepReply, or None where no answer
    is possible (bytes that name no session) or not required (a wrong protocol version may be dropped). ``stream``:
    a stream name, or ``replies`` for the edges' reply lists."""

    name: str
    stream: str
    payload: bytes
    answer: str | None = None
    session_id: str = ""
    step: int = 0


GARBAGE = b"\xc1\xff chaos: not a message \x00"  # 0xc1 is never valid msgpack


def poison_messages(
    probes: dict[str, tuple[str, str]], replicas: Sequence[str], vocab: int, reply_to: str, nonce: str
) -> list[Poison]:
    """The poison of the ``poison`` scenario. ``probes``: the harness's own sessions, opened beforehand
    ({"batch" | "short" | "range": (session_id, replica)}), which the bad steps target so that no real session is
    touched; ``replicas``: every live replica (each gets garbage and an unknown session on its stream)."""
    items = [
        Poison("garbage on cg:open", OPEN_STREAM, GARBAGE),
        Poison("msgpack that is no message, on cg:open", OPEN_STREAM, msgspec.msgpack.encode({"type": "nope", "v": 3})),
        Poison(
            f"wrong protocol version (v{PROTOCOL_VERSION - 1})",
            OPEN_STREAM,
            encode(
                OpenSession(
                    v=PROTOCOL_VERSION - 1,
                    session_id=f"chaos-{nonce}-oldv",
                    instruction="Write a haiku about the sea.",
                    top_k=5,
                    budget_ms=30_000,
                    reply_to=reply_to,
                )
            ),
            None,
            f"chaos-{nonce}-oldv",
        ),
        Poison(
            f"oversize top_k ({MAX_TOP_K * 100})",
            OPEN_STREAM,
            encode(
                OpenSession(
                    session_id=f"chaos-{nonce}-topk",
                    instruction="Write a haiku about the sea.",
                    top_k=MAX_TOP_K * 100,
                    budget_ms=30_000,
                    reply_to=reply_to,
                )
            ),
            "bad_request",
            f"chaos-{nonce}-topk",
        ),
        Poison("garbage on the edges' reply lists", "replies", GARBAGE),
    ]
    for replica in replicas:
        items.append(Poison(f"garbage on cg:in:{replica}", in_stream(replica), GARBAGE))
        sid = f"chaos-{nonce}-unknown-{replica}"
        unknown = StepRequest(session_id=sid, step=1, tokens=pack_ids([42]), budget_ms=30_000, reply_to=reply_to)
        items.append(
            Poison(
                f"unknown session on cg:in:{replica}", in_stream(replica), encode(unknown), "unknown_session", sid, 1
            )
        )
    if "short" in probes:
        sid, replica = probes["short"]
        bad = StepRequest(session_id=sid, step=1, tokens=b"\x01\x00\x00\x00\x02", budget_ms=30_000, reply_to=reply_to)
        items.append(
            Poison("step tokens of 5 bytes (not int32)", in_stream(replica), encode(bad), "bad_request", sid, 1)
        )
    if "range" in probes:
        sid, replica = probes["range"]
        bad = StepRequest(
            session_id=sid, step=1, tokens=pack_ids([vocab + 1000, -3]), budget_ms=30_000, reply_to=reply_to
        )
        items.append(Poison("out-of-range token ids", in_stream(replica), encode(bad), "bad_request", sid, 1))
    if "batch" in probes:
        sid, replica = probes["batch"]
        good = StepRequest(session_id=sid, step=1, tokens=pack_ids([1000]), budget_ms=30_000, reply_to=reply_to)
        batch = StepBatch(items=[GARBAGE, encode(good)])
        items.append(
            Poison(
                "StepBatch with one bad item (the good one served)", in_stream(replica), encode(batch), REPLY, sid, 1
            )
        )
    return items


def answer_of(reply: StepReply | ErrorReply | None) -> str | None:
    """What a poison item got back: ``REPLY``, an error code, or None (nothing)."""
    if reply is None:
        return None
    return REPLY if isinstance(reply, StepReply) else reply.code


# ---- the bus and the replicas, seen from outside -------------------------------------------------------


def _streams(r: redis.Redis) -> list[str]:
    return [OPEN_STREAM] + sorted(k.decode() for k in r.scan_iter(match=in_stream("*"), count=1000))


def bus_backlog(r: redis.Redis) -> dict[str, dict[str, int]]:
    """Every bus stream's pending entries (read by a replica, never acknowledged) and length (not yet deleted)."""
    out = {}
    for stream in _streams(r):
        try:
            pending = int(r.xpending(stream, GROUP)["pending"])
        except redis.ResponseError:  # no such stream or group: nothing pending
            pending = 0
        out[stream] = {"pending": pending, "length": int(r.xlen(stream))}
    return out


def busiest_replica(r: redis.Redis, replicas: Sequence[str]) -> str:
    """The replica most likely to hold sessions now: the one whose input stream got an entry last (the streams'
    entries are deleted once served, but a stream remembers its last id, whose first part is Redis's ms)."""

    def last_ms(replica: str) -> int:
        try:
            last = r.xinfo_stream(in_stream(replica))["last-generated-id"]
        except redis.ResponseError:
            return 0
        last = last.decode() if isinstance(last, bytes) else str(last)
        return int(last.split("-", 1)[0])

    return max(replicas, key=last_ms)


def replica_stats(http_url: str, replicas: Sequence[str], tries: int = 40) -> dict[str, dict]:
    """``/v1/stats`` of each replica in ``replicas``. The Serve proxy picks the replica that answers, so ask until
    each has answered (or ``tries`` requests); returns what was seen, by replica."""
    from cogenesis.core.auth import bearer_header
    from cogenesis.core.secrets import stored_token

    admin = stored_token("admin")  # the running cluster's ($COGENESIS_SECRETS_DIR, set by LocalCluster)
    seen: dict[str, dict] = {}
    with httpx.Client(timeout=10.0, headers=bearer_header(admin)) as http:
        for _ in range(tries):
            try:
                stats = http.get(f"{http_url}/v1/stats").raise_for_status().json()
            except (httpx.HTTPError, ValueError):
                time.sleep(0.2)
                continue
            seen[str(stats.get("replica"))] = stats
            if set(replicas) <= set(seen):
                break
    return {k: v for k, v in seen.items() if not replicas or k in replicas}


def kv_totals(stats: dict[str, dict]) -> dict[str, int]:
    return {
        "replicas": len(stats),
        "active_sessions": sum(int(s.get("active_sessions", 0)) for s in stats.values()),
        "kv_bytes": sum(int(s.get("kv_bytes", 0)) for s in stats.values()),
    }


def cloud_counters(r: redis.Redis, name: str, **labels: str) -> dict[str, float]:
    """A counter of every replica's announced metrics endpoint that answers, by endpoint."""
    from cogenesis.apps.top import scrape
    from cogenesis.core import metrics

    out = {}
    for address in metrics.targets(r).get("cloud", []):
        snap = scrape([address])
        if not snap.errors:
            out[address] = snap.get(name, **labels)
    return out


def counter_delta(before: dict[str, float], after: dict[str, float]) -> int | None:
    """How much a counter grew between two ``cloud_counters`` snapshots, over the replicas that answered the second
    time (one that died took its counts with it; a new one counts from 0). None: no replica answered."""
    if not after:
        return None
    return int(sum(v - before.get(addr, 0.0) for addr, v in after.items()))


# ---- the harness ------------------------------------------------------------------------------------------


class _Watch:
    """Counts the tokens the sessions write, fires the fault once at ``threshold``, and prints a progress line every
    few seconds (from a thread of its own).

    The fault fires in the session loop's own thread, inside the device's step (``on_tokens``): the loop waits for
    it, so the fault always lands mid-run however fast the models are (it may take the loop's time: opening the
    poison's probe sessions, stopping Redis; anything that must overlap the run, such as Redis staying down, the
    fault starts in a thread of its own)."""

    def __init__(
        self,
        label: str,
        total: int,
        threshold: int | None,
        fault: Callable[[], dict] | None,
        say: Callable[[str], None],
        every_s: float = 5.0,
    ) -> None:
        self.label, self.total, self.threshold, self.fault, self.say = label, total, threshold, fault, say
        self.every_s = every_s
        self.tokens = 0
        self.fired: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"chaos-{label}", daemon=True)

    def __enter__(self) -> _Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def on_tokens(self, n: int) -> None:
        self.tokens = n
        if self.fault is None or self.fired is not None or self.threshold is None or n < self.threshold:
            return
        self.say(f"{self.label}: fault at {n}/{self.total} tokens")
        at = time.time()
        try:
            self.fired = {"at": at, **self.fault()}
        except Exception as exc:  # the fault itself failed: the scenario reports it
            self.fired = {"at": at, "error": f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"}
        self.say(f"{self.label}: {', '.join(f'{k} {v}' for k, v in self.fired.items() if k != 'at')}")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.say(f"{self.label}: {self.tokens}/{self.total} tokens")


def _half_cores() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


class Harness:
    """The clusters, the edge's small model, the reference run; one method per scenario."""

    def __init__(self, opts: ChaosOptions, say: Callable[[str], None]) -> None:
        opts.validate()
        self.opts = opts
        self.say = say
        self.t0 = time.monotonic()
        self.clusters: dict[str, LocalCluster] = {}
        self.pools: list[subprocess.Popen] = []
        self.reference: dict[int, Outcome] = {}
        self.reference_report: dict = {}
        self.engine: EdgeEngine | None = None
        self.clients: list[EdgeClient] = []
        self.edge: EdgeConfig | None = None
        self.large_path = ""

    # ---- set-up ---------------------------------------------------------------------------------------

    def prepare(self) -> None:
        import torch

        from cogenesis.apps.demo import pick_records
        from cogenesis.core.config import EdgeConfig
        from cogenesis.core.models import load_causal_lm, resolve_model
        from cogenesis.edge_sim.client import EdgeClient
        from cogenesis.edge_sim.engine import EdgeEngine

        o = self.opts
        self.say("preparing models (the first run converts the embedded GGUF, ~30 s)")
        self.large_path = resolve_model(o.large_model)
        small_path = resolve_model(o.small_model)
        threads = o.threads or _half_cores()
        self.edge = EdgeConfig(
            small_model=small_path,
            max_new_tokens=o.max_new_tokens,
            ignore_eos=True,  # every session writes max_new_tokens: every scenario checks as many tokens
            max_prompt_tokens=o.max_prompt_tokens,
            top_k=o.top_k,
            torch_threads=threads,
            prefill_threads=o.threads or (os.cpu_count() or 2),
            step_timeout_s=o.step_timeout_s,
            sampling={"temperature": 0.0, "top_p": 1.0, "seed": 0},  # greedy: outputs are comparable exactly
        )
        torch.set_num_threads(self.edge.torch_threads)
        model, tok = load_causal_lm(small_path)
        self.engine = EdgeEngine(model, tok, self.edge.max_prompt_tokens)
        records = pick_records(o.data, o.sessions)
        self.clients = [EdgeClient(i, rec, self.engine, self.edge) for i, rec in enumerate(records)]

    def cloud_config(self, kind: str) -> CloudConfig:
        from cogenesis.core.config import CloudConfig

        o = self.opts
        replicas = 2 if kind == MAIN and "kill-replica" in o.scenarios else 1
        threads = o.threads or max(1, _half_cores() // replicas)
        settings: dict[str, Any] = {
            "large_model": self.large_path,
            "num_replicas": replicas,
            "torch_threads": threads,
            "replica_cpus": 0.5,
            "session_idle_s": o.session_idle_s,
            "sweep_interval_s": o.sweep_interval_s,
        }
        if kind == OVERLOAD:
            settings["max_sessions"] = max(1, o.sessions // 4)
        return CloudConfig(**settings)

    def describe(self, kind: str) -> str:
        c = self.cloud_config(kind)
        extra = f", max_sessions {c.max_sessions}" if kind == OVERLOAD else ""
        return (
            f"{kind}: {c.num_replicas} replica(s){extra}, session_idle_s {c.session_idle_s:g}, "
            f"sweep_interval_s {c.sweep_interval_s:g}"
        )

    def cluster(self, kind: str) -> LocalCluster:
        """The cluster of ``kind``, started if needed (stopping another: Ray runs once per process)."""
        from cogenesis.cluster.local import LocalCluster

        if kind in self.clusters:
            return self.clusters[kind]
        for other in list(self.clusters):
            self.say(f"stopping the {other} cluster")
            self.clusters.pop(other).stop()
        cluster = LocalCluster(self.cloud_config(kind))
        self.clusters[kind] = cluster
        self.say(f"starting the {self.describe(kind)} cluster")
        info = cluster.start(lambda m: self.say(f"  {m}"))
        self.say(f"cluster up: Redis {info.redis_version} at {info.redis_url}, Serve at {info.http_url}")
        return cluster

    def close(self) -> None:
        for p in self.pools:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for kind in list(self.clusters):
            self.say(f"stopping the {kind} cluster (Serve, Ray, Redis)")
            self.clusters.pop(kind).stop()

    # ---- running sessions -----------------------------------------------------------------------------

    @property
    def total_tokens(self) -> int:
        return self.opts.sessions * self.opts.max_new_tokens

    def run_in_process(
        self, label: str, cluster: LocalCluster, fault: Callable[[], dict] | None = None
    ) -> tuple[list[Outcome], dict | None, float]:
        """Every session in this process, with ``fault`` fired mid-run; (outcomes, the fault, seconds)."""
        assert self.engine is not None and self.edge is not None and cluster.info is not None
        threshold = int(self.total_tokens * self.opts.fault_after) if fault is not None else None
        t0 = time.perf_counter()
        with _Watch(label, self.total_tokens, threshold, fault, self.say) as watch:
            outcomes = run_sessions(
                self.clients,
                self.engine,
                cluster.info.redis_url,
                self.edge,
                watch.on_tokens,
                time.perf_counter() + self.opts.timeout_s,
            )
        return outcomes, watch.fired, time.perf_counter() - t0

    def run_reference(self) -> dict:
        cluster = self.cluster(MAIN)
        self.say(f"reference: {self.opts.sessions} undisturbed greedy sessions")
        outcomes, _, seconds = self.run_in_process("reference", cluster)
        failed = [o for o in outcomes if not o.ok]
        self.reference = {o.client: o for o in outcomes}
        self.reference_report = {
            "cluster": self.describe(MAIN),
            "sessions": len(outcomes),
            "failed": len(failed),
            "tokens": sum(len(o.ids) for o in outcomes),
            "seconds": round(seconds, 2),
            "max_gap_s": max_gap(outcomes),
            "resumes": _sum([o.resumes for o in outcomes]),
            "busy_retries": _sum([o.busy_retries for o in outcomes]),
            "errors": dict(Counter(o.error for o in failed)),
        }
        self.say(f"reference: {self.reference_report['tokens']} tokens in {seconds:.1f} s")
        if self.reference_report["resumes"]:
            self.say(
                f"warning: the reference run was disturbed ({self.reference_report['resumes']} resumes): is "
                "--session-idle shorter than the edge's prefill?"
            )
        if failed:
            raise ClusterError(
                f"the undisturbed reference run failed ({len(failed)} of {len(outcomes)} sessions): {failed[0].error}",
                hint="nothing can be compared without it; rerun with -v, or check the cluster with `cogenesis demo`",
            )
        return self.reference_report

    def run(self, name: str) -> dict:
        """One scenario's report; an exception in the harness itself is reported as the scenario's crash."""
        handler = {
            "poison": self.poison,
            "restart-redis": self.restart_redis,
            "kill-edge-pool": self.kill_edge_pool,
            "kill-replica": self.kill_replica,
            "overload": self.overload,
        }[name]
        self.say(f"scenario {name}")
        t0 = time.perf_counter()
        try:
            report = handler()
        except Exception as exc:  # the harness failed (a cluster that would not start, ...): this scenario's crash
            report = scenario_report(name, "", self.reference, [], time.perf_counter() - t0)
            report["crash"] = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
        self.say(
            f"scenario {name}: {'PASS' if report['passed'] else 'FAIL'} ({report['identical']}/{report['sessions']} "
            f"identical, {report['failed']} failed)"
        )
        return report

    def _report(self, name: str, kind: str, outcomes, seconds, fault, checks=(), extra=None) -> dict:
        if fault is None and name != "overload":
            checks = [*checks, Check("fault injected", False, "the sessions ended before the fault's threshold")]
        elif fault is not None and "error" in fault:
            checks = [*checks, Check("fault injected", False, fault["error"])]
        return scenario_report(name, self.describe(kind), self.reference, outcomes, seconds, fault, checks, extra)

    def _redis(self, cluster: LocalCluster) -> redis.Redis:
        assert cluster.info is not None
        secrets = getattr(cluster.info, "secrets_dir", None)  # an operator's tool: the admin user
        return redis.Redis.from_url(
            cluster.info.redis_url,
            socket_timeout=10,
            socket_connect_timeout=5,
            **redis_auth(cluster.info.redis_url, "admin", secrets),
        )

    def _wait_replicas(self, cluster: LocalCluster, n: int, timeout_s: float = 240.0) -> float:
        """Seconds until ``n`` replicas heartbeat again (a replaced replica loads its model); ClusterError after
        ``timeout_s``."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            try:
                if len(cluster.replica_pids()) >= n:
                    return time.monotonic() - t0
            except (redis.RedisError, ClusterError):
                pass
            time.sleep(1.0)
        raise ClusterError(f"the cluster did not get back to {n} live replica(s) within {timeout_s:.0f} s")

    # ---- scenarios -------------------------------------------------------------------------------------

    def kill_replica(self) -> dict:
        cluster = self.cluster(MAIN)
        replicas = cluster.cloud.num_replicas
        r = self._redis(cluster)
        claimed_before = cloud_counters(r, "cogenesis_cloud_claimed_entries_total")

        def fault() -> dict:
            pids = cluster.replica_pids()
            if len(pids) < 2:
                raise ClusterError(f"kill-replica needs 2 live replicas, found {len(pids)}")
            target = busiest_replica(r, sorted(pids))
            pid = pids[target]
            if pid is None:
                raise ClusterError(f"replica {target} has no pid on its heartbeat")
            os.kill(pid, signal.SIGKILL)
            return {"killed": target, "pid": pid, "replicas": sorted(pids)}

        outcomes, fired, seconds = self.run_in_process("kill-replica", cluster, fault)
        checks = []
        extra: dict[str, Any] = {}
        try:
            back = self._wait_replicas(cluster, replicas)
            checks.append(Check("replica replaced", True, f"{replicas} live replicas again {back:.0f} s after the run"))
        except ClusterError as exc:
            checks.append(Check("replica replaced", False, exc.message))
        extra["claimed_entries"] = counter_delta(
            claimed_before, cloud_counters(r, "cogenesis_cloud_claimed_entries_total")
        )
        r.close()
        return self._report("kill-replica", MAIN, outcomes, seconds, fired, checks, extra)

    def restart_redis(self) -> dict:
        cluster = self.cluster(MAIN)
        if cluster.redis is None:
            raise ConfigError("restart-redis needs the bundled Redis (the chaos cluster starts its own)")
        down = self.opts.redis_down_s
        restarts: list[tuple[threading.Thread, dict[str, Any]]] = []

        def fault() -> dict:
            """Restart Redis in a thread (``RedisServer.restart``: stop, ``down`` seconds, start on the same port);
            return once it is down, so the sessions meet a Redis that is gone, then an empty one."""
            server = cluster.redis
            assert server is not None
            old_pid = server.pid
            done: dict[str, Any] = {}

            def restart() -> None:
                t = time.monotonic()
                try:
                    server.restart(down_s=down)
                    done["restarted_in_s"] = round(time.monotonic() - t, 2)
                except Exception as exc:
                    done["error"] = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"

            thread = threading.Thread(target=restart, name="chaos-redis-restart", daemon=True)
            thread.start()
            restarts.append((thread, done))
            deadline = time.monotonic() + 10
            while old_pid is not None and server.pid == old_pid and time.monotonic() < deadline:
                time.sleep(0.01)
            return {"down_s": down}

        outcomes, fired, seconds = self.run_in_process("restart-redis", cluster, fault)
        for thread, done in restarts:
            thread.join(timeout=60)
            if fired is not None and "error" in done:
                fired["error"] = f"the restart failed: {done['error']}"
            elif fired is not None:
                fired.update(done)
        checks = []
        try:
            back = self._wait_replicas(cluster, cluster.cloud.num_replicas, timeout_s=60)
            checks.append(Check("replicas heartbeat again", True, f"within {back:.0f} s after the run"))
        except ClusterError as exc:
            checks.append(Check("replicas heartbeat again", False, exc.message))
        return self._report("restart-redis", MAIN, outcomes, seconds, fired, checks)

    def overload(self) -> dict:
        cluster = self.cluster(OVERLOAD)
        r = self._redis(cluster)
        busy_before = cloud_counters(r, "cogenesis_cloud_refusals_total", reason="busy")
        outcomes, _, seconds = self.run_in_process("overload", cluster)
        refused = counter_delta(busy_before, cloud_counters(r, "cogenesis_cloud_refusals_total", reason="busy"))
        r.close()
        checks = []
        if refused is not None:
            checks.append(Check("the replica refused busy", refused > 0, f"{refused} busy refusal(s)"))
        retries = _sum([o.busy_retries for o in outcomes])
        if retries is not None:
            checks.append(Check("edges retried busy opens", retries > 0, f"{retries} busy retries"))
        return self._report(
            "overload",
            OVERLOAD,
            outcomes,
            seconds,
            None,
            checks,
            {"max_sessions": cluster.cloud.max_sessions, "busy_refusals": refused},
        )

    def poison(self) -> dict:
        cluster = self.cluster(MAIN)
        assert self.engine is not None
        r = self._redis(cluster)
        nonce = uuid.uuid4().hex[:8]
        reply_to = f"chaos-{nonce}"
        sent: list[Poison] = []
        probes: dict[str, tuple[str, str]] = {}
        replicas = sorted(cluster.replica_pids())
        assert cluster.info is not None
        watcher = ReplyListWatcher(cluster.info.redis_url, [OPEN_STREAM] + [in_stream(x) for x in replicas], reply_to)

        def fault() -> dict:
            """Open the probe sessions (the session loop waits meanwhile: this stall is the harness's), then write
            every poison at once."""
            assert self.engine is not None
            t = time.monotonic()
            probes.update(open_probes(r, nonce, reply_to))
            items = poison_messages(probes, sorted(cluster.replica_pids()), self.engine.vocab, reply_to, nonce)
            lists = watcher.found
            inject(r, items, lists)
            sent.extend(items)
            took = round(time.monotonic() - t, 2)
            return {"injected": len(items), "probes": len(probes), "edge_reply_lists": len(lists), "took_s": took}

        with watcher:
            outcomes, fired, seconds = self.run_in_process("poison", cluster, fault)
        answers = collect_replies(r, reply_to, {(p.session_id, p.step) for p in sent if p.answer}, timeout_s=60.0)
        for sid, replica in probes.values():  # the probes end like any session
            r.xadd(in_stream(replica), {FIELD: encode(CloseSession(session_id=sid))})
        items, checks = [], []
        for p in sent:
            got = answer_of(answers.get((p.session_id, p.step))) if p.session_id else None
            ok = p.answer is None or got == p.answer
            items.append({"name": p.name, "expected": p.answer, "got": got, "ok": ok})
        missing = [i for i in items if not i["ok"]]
        checks.append(
            Check(
                "every poison naming a session answered",
                bool(sent) and not missing,
                f"{len(items) - len(missing)}/{len(items)} as expected"
                + "".join(f"; {i['name']}: expected {i['expected']}, got {i['got']}" for i in missing),
            )
        )
        backlog = wait_bus_clean(r, timeout_s=30.0)
        dirty = {s: b for s, b in backlog.items() if b["pending"] or b["length"]}
        checks.append(Check("nothing pending on the bus", not dirty, str(dirty or f"{len(backlog)} streams clean")))
        r.delete(reply_key(reply_to))
        r.close()
        return self._report("poison", MAIN, outcomes, seconds, fired, checks, {"poison": items, "bus": backlog})

    def kill_edge_pool(self) -> dict:
        cluster = self.cluster(MAIN)
        assert cluster.info is not None and self.edge is not None
        o = self.opts
        n_pools = max(2, min(o.pools, o.sessions))
        shares = [[i for i in range(o.sessions) if i % n_pools == p] for p in range(n_pools)]
        replicas = sorted(cluster.replica_pids())
        r = self._redis(cluster)
        swept_before = cloud_counters(r, "cogenesis_cloud_swept_sessions_total")
        sampler = _KvSampler(cluster.info.http_url, replicas, r, swept_before)
        with tempfile.TemporaryDirectory(prefix="cogenesis-chaos-") as tmp:
            run = _PoolRun(self, cluster.info.redis_url, Path(tmp), shares)
            t0 = time.perf_counter()
            fired, at_kill = run.kill_and_restart(replicas=replicas, http_url=cluster.info.http_url)
            if fired is not None:
                sampler.start(fired["at"])
            try:
                run.wait_all(deadline=time.monotonic() + o.timeout_s)
                outcomes = run.outcomes()
                seconds = time.perf_counter() - t0
                done_stats = kv_totals(replica_stats(cluster.info.http_url, replicas))
                freed_in, final = wait_freed(
                    cluster.info.http_url, replicas, o.session_idle_s + 10 * o.sweep_interval_s + 30
                )
            finally:
                sampler.stop()
        swept = counter_delta(swept_before, cloud_counters(r, "cogenesis_cloud_swept_sessions_total"))
        r.close()
        orphaned = len(shares[0])
        kv = {
            "orphaned_sessions": orphaned,
            "at_kill": at_kill,
            "after_pools_done": done_stats,
            "after_sweep": final,
            "freed_after_s": None if freed_in is None or fired is None else round(freed_in - fired["at"], 2),
            "swept": swept,
            "orphans_swept_after_s": sampler.swept_after(orphaned),
            "timeline": sampler.samples,
        }
        checks = [
            Check(
                "every session's KV freed",
                freed_in is not None,
                f"KV {final['kv_bytes']} bytes, {final['active_sessions']} active session(s) left"
                + (f", all freed {kv['freed_after_s']} s after the kill" if kv["freed_after_s"] is not None else ""),
            ),
            Check(
                "the killed pool's sessions swept",
                swept is not None and swept >= orphaned,
                f"the replicas' sweepers closed {swept} idle session(s) of {orphaned} orphaned"
                + (f", {kv['orphans_swept_after_s']} s after the kill" if kv["orphans_swept_after_s"] else ""),
            ),
        ]
        rerun = [x for x in outcomes if x.client in shares[0]]
        firsts = [t[0] for t in (x.token_times() for x in rerun) if t]
        if fired is not None and firsts:
            kv["restarted_pool_first_token_s"] = round(min(firsts) - fired["at"], 2)
        extra = {"pools": n_pools, "kv": kv, "pool_logs": run.failed_logs()}
        return self._report("kill-edge-pool", MAIN, outcomes, seconds, fired, checks, extra)


class _KvSampler:
    """Samples the replicas' active sessions, KV bytes and swept-session count every second from the kill of an
    edge pool on: when its orphaned sessions were freed."""

    def __init__(self, http_url: str, replicas: Sequence[str], r: redis.Redis, swept_before: dict[str, float]) -> None:
        self.http_url, self.replicas, self.r, self.swept_before = http_url, replicas, r, swept_before
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def start(self, t0: float) -> None:
        self._t0 = t0
        self._thread = threading.Thread(target=self._run, name="chaos-kv", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling, with one last sample (what the sweeper did since the last one)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._sample()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._sample()

    def _sample(self) -> None:
        totals = kv_totals(replica_stats(self.http_url, self.replicas, tries=10))
        swept = counter_delta(self.swept_before, cloud_counters(self.r, "cogenesis_cloud_swept_sessions_total"))
        self.samples.append(
            {
                "t_s": round(time.time() - self._t0, 1),
                "active_sessions": totals["active_sessions"],
                "kv_bytes": totals["kv_bytes"],
                "swept": swept,
            }
        )

    def swept_after(self, n: int) -> float | None:
        """Seconds from the kill to the first sample where ``n`` sessions had been swept."""
        return next((s["t_s"] for s in self.samples if s["swept"] is not None and s["swept"] >= n), None)


class _PoolRun:
    """The edge pool subprocesses of kill-edge-pool: start them, kill one mid-run and start it again, collect."""

    def __init__(self, harness: Harness, redis_url: str, tmp: Path, shares: list[list[int]]) -> None:
        self.h = harness
        self.redis_url = redis_url
        self.tmp = tmp
        self.shares = shares
        self.dirs: list[Path] = []
        self.procs: list[subprocess.Popen] = []
        o = harness.opts
        self.hold_at = max(1, int(len(shares[0]) * o.max_new_tokens * o.fault_after))  # pool 0 is the victim
        for p in range(len(shares)):
            self.start(p, f"pool{p}", self.hold_at if p == 0 else None)

    def start(self, p: int, name: str, hold_at: int | None = None) -> None:
        assert self.h.edge is not None
        out = self.tmp / name
        out.mkdir()
        edge = self.h.edge.model_dump()
        edge["torch_threads"] = 1  # pools share the cores with each other and the replicas
        spec = PoolSpec(
            clients=self.shares[p],
            sessions=self.h.opts.sessions,
            data=self.h.opts.data,
            edge=edge,
            stop_after_s=self.h.opts.timeout_s,
            hold_at=hold_at,
        )
        log = (out / "pool.log").open("wb")
        proc = subprocess.Popen(
            pool_command(self.redis_url, spec, out), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.h.pools.append(proc)
        if p < len(self.procs):
            self.procs[p], self.dirs[p] = proc, out
        else:
            self.procs.append(proc)
            self.dirs.append(out)

    def tokens(self) -> list[int]:
        return [int((read_progress(d) or {}).get("tokens", 0)) for d in self.dirs]

    def kill_and_restart(self, replicas: list[str], http_url: str) -> tuple[dict | None, dict]:
        """Wait until pool 0 (the victim) has written its share of tokens before the fault (it then waits to be
        killed), SIGKILL it, start it again; returns (the fault, KV totals just before the kill)."""
        o = self.h.opts
        victim = 0
        deadline, last = time.monotonic() + o.timeout_s, time.monotonic()
        proc = self.procs[victim]
        while time.monotonic() < deadline and proc.poll() is None:
            if self.tokens()[victim] >= self.hold_at:
                break
            if time.monotonic() - last >= 5.0:
                last = time.monotonic()
                self.h.say(f"kill-edge-pool: pools' tokens {self.tokens()}")
            time.sleep(0.2)
        else:
            return None, {}  # it ended (or never began) before the fault: reported as not injected
        at_kill = kv_totals(replica_stats(http_url, replicas))
        written = self.tokens()[victim]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        fault = {"at": time.time(), "killed_pool": victim, "sessions": len(self.shares[victim]), "tokens": written}
        self.h.say(f"kill-edge-pool: SIGKILLed pool {victim} (pid {proc.pid}) at {written} tokens; starting it again")
        self.start(victim, f"pool{victim}-again")
        return fault, at_kill

    def wait_all(self, deadline: float) -> None:
        last = time.monotonic()
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            if time.monotonic() - last >= 5.0:
                last = time.monotonic()
                self.h.say(f"kill-edge-pool: pools' tokens {self.tokens()}")
            time.sleep(0.5)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)

    def outcomes(self) -> list[Outcome]:
        out: list[Outcome] = []
        for p, d in enumerate(self.dirs):
            got = read_outcomes(d)
            if got is None:
                clients = [c for c in self.h.clients if c.index in self.shares[p]]
                code = self.procs[p].returncode
                got = failed_outcomes(clients, f"pool {p} wrote no outcomes (exit code {code})", "internal", 0.0)
            out += got
        return out

    def failed_logs(self) -> dict[str, str]:
        """The last lines of the log of every pool that did not end well (for the report)."""
        logs = {}
        for d, p in zip(self.dirs, self.procs):
            if p.returncode not in (0, None):
                text = (d / "pool.log").read_text(errors="replace") if (d / "pool.log").exists() else ""
                logs[d.name] = "\n".join(text.strip().splitlines()[-5:])
        return logs


def wait_freed(http_url: str, replicas: Sequence[str], timeout_s: float) -> tuple[float | None, dict]:
    """Poll the replicas' stats until no session is active and no KV is held; (when, unix s, or None; the last
    totals)."""
    deadline = time.monotonic() + timeout_s
    totals = kv_totals(replica_stats(http_url, replicas))
    while time.monotonic() < deadline:
        if totals["replicas"] and not totals["active_sessions"] and not totals["kv_bytes"]:
            return time.time(), totals
        time.sleep(1.0)
        totals = kv_totals(replica_stats(http_url, replicas))
    return None, totals


def wait_bus_clean(r: redis.Redis, timeout_s: float) -> dict[str, dict[str, int]]:
    """The bus's backlog once nothing is pending and every stream is empty, or as it is after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    backlog = bus_backlog(r)
    while any(b["pending"] or b["length"] for b in backlog.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
        backlog = bus_backlog(r)
    return backlog


PROBE_INSTRUCTION = "Write a short note about the weather."


def open_probes(r: redis.Redis, nonce: str, reply_to: str, timeout_s: float = 60.0) -> dict[str, tuple[str, str]]:
    """Open the harness's own sessions for the poisoned steps; {name: (session_id, replica)} of those that opened."""
    sids = {name: f"chaos-{nonce}-{name}" for name in ("batch", "short", "range")}
    pipe = r.pipeline(transaction=False)
    for sid in sids.values():
        msg = OpenSession(session_id=sid, instruction=PROBE_INSTRUCTION, top_k=5, budget_ms=60_000, reply_to=reply_to)
        pipe.xadd(OPEN_STREAM, {FIELD: encode(msg)})
    pipe.execute()
    got = collect_replies(r, reply_to, {(sid, 0) for sid in sids.values()}, timeout_s)
    out = {}
    for name, sid in sids.items():
        reply = got.get((sid, 0))
        if isinstance(reply, StepReply):
            out[name] = (sid, reply.replica)
    return out


class ReplyListWatcher:
    """Learns the reply lists real edges are waiting on by watching the requests they send (a plain XREAD in a
    thread of its own, which takes nothing from the replicas' group): a reply list exists in Redis only while a
    reply sits on it, and its name is random per edge link. Watch from before the sessions start."""

    def __init__(self, url: str, streams: Sequence[str], exclude: str = "") -> None:
        self.url, self.streams, self.exclude = url, list(streams), exclude
        self._found: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-reply-lists", daemon=True)

    def __enter__(self) -> ReplyListWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def found(self) -> list[str]:
        with self._lock:
            return sorted(self._found - {self.exclude})

    def _run(self) -> None:
        r = redis.Redis.from_url(
            self.url, socket_timeout=5, socket_connect_timeout=2, **redis_auth(self.url, "admin")
        )  # secrets: $COGENESIS_SECRETS_DIR (the cluster this process started)
        try:
            # from each stream's last id now (not "$", which would skip what comes to one stream while a read
            # returns with another's)
            cursor: dict[str, str | bytes] = {s: _last_id(r, s) for s in self.streams}
            while not self._stop.is_set():
                try:
                    resp = r.xread(cursor, count=100, block=500)  # type: ignore[arg-type]
                except redis.RedisError:  # Redis restarting: watch again once it is back
                    self._stop.wait(0.5)
                    continue
                for stream, entries in cast(list, resp or []):
                    name = stream.decode() if isinstance(stream, bytes) else str(stream)
                    for entry_id, fields in entries:
                        cursor[name] = entry_id
                        names = _reply_tos(fields.get(FIELD, b""))
                        with self._lock:
                            self._found |= names
        finally:
            r.close()


def _last_id(r: redis.Redis, stream: str) -> str:
    try:
        last = r.xinfo_stream(stream)["last-generated-id"]
    except redis.ResponseError:  # no such stream yet
        return "0-0"
    return last.decode() if isinstance(last, bytes) else str(last)


def _reply_tos(payload: bytes) -> set[str]:
    """The reply lists a request names (a StepBatch's items each name theirs)."""
    try:
        msg = decode_request(payload)
    except ProtocolError:
        return set()
    if isinstance(msg, StepBatch):
        return set().union(*(_reply_tos(item) for item in msg.items)) if msg.items else set()
    return {msg.reply_to or msg.session_id} if isinstance(msg, OpenSession | StepRequest) else set()


def inject(r: redis.Redis, items: Sequence[Poison], reply_lists: Sequence[str] = ()) -> None:
    """Write the poison to the bus in one pipeline; what goes to ``replies`` is pushed on every list of
    ``reply_lists`` (real edges' reply lists, by their ``reply_to``)."""
    pipe = r.pipeline(transaction=False)
    for p in items:
        if p.stream == "replies":
            for name in reply_lists:
                pipe.lpush(reply_key(name), p.payload)
        else:
            pipe.xadd(p.stream, {FIELD: p.payload})
    pipe.execute()


def collect_replies(
    r: redis.Redis, reply_to: str, wanted: set[tuple[str, int]], timeout_s: float
) -> dict[tuple[str, int], StepReply | ErrorReply]:
    """Replies on the harness's reply list by (session, step), until every wanted one came or ``timeout_s``."""
    got: dict[tuple[str, int], StepReply | ErrorReply] = {}
    deadline = time.monotonic() + timeout_s
    while not wanted <= set(got) and time.monotonic() < deadline:
        item = r.brpop([reply_key(reply_to)], timeout=max(1, min(5, int(deadline - time.monotonic()))))
        if item is None:
            continue
        payload = item[1] if isinstance(item[1], bytes) else str(item[1]).encode()
        try:
            replies = decode_replies(payload)
        except ProtocolError:  # a reply the harness cannot read: counted as no answer
            continue
        for reply in replies:
            got.setdefault((reply.session_id, reply.step), reply)
    return got


# ---- the whole run ------------------------------------------------------------------------------------------


@dataclass
class ChaosReport:
    settings: dict
    reference: dict = field(default_factory=dict)
    scenarios: list[dict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.scenarios) and all(s["passed"] for s in self.scenarios)

    def to_json(self) -> dict:
        return {
            "settings": self.settings,
            "reference": self.reference,
            "scenarios": self.scenarios,
            "passed": self.passed,
        }


def run_chaos(opts: ChaosOptions, say: Callable[[str], None] = lambda m: None) -> dict:
    """Start the cluster(s), run the reference and every scenario of ``opts``, stop everything; the report."""
    harness = Harness(opts, say)
    report = ChaosReport(settings={**asdict(opts), "scenarios": list(opts.scenarios)})
    try:
        harness.prepare()
        report.settings["clusters"] = {
            kind: harness.describe(kind) for kind in (MAIN, OVERLOAD) if kind == MAIN or "overload" in opts.scenarios
        }
        report.reference = harness.run_reference()
        for name in opts.scenarios:
            report.scenarios.append(harness.run(name))
    finally:
        harness.close()
    return report.to_json()
