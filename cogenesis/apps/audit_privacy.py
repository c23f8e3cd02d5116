"""``cogenesis audit-privacy``: does anything private leave the device, whatever the device tries?

On a real local cluster (Redis + Ray Serve, the real models), records with canaries planted in every
private field (``cogenesis.apps.canaries``) run through the real edge, driven by an adversarial device
(``cogenesis.apps.adversary``):
- sketch mode: each record's own outline request, and one per canary kind whose instruction carries a
  canary of the record (the outbound gate must refuse it);
- logits mode: one session per record whose small model copies a canary of each kind verbatim into its
  output (the token stream must not carry it to the cloud).

Every channel the cloud side can see is captured (``cogenesis.apps.audit_channels``) and searched for every
canary, and, in text a device sent, for the sending record's private spans. The report counts attempts
per mode and canary kind, and leaks per channel and canary kind; it names kinds, channels, sources and
record ids, never a canary's or a record's private text.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cogenesis.apps import adversary, audit_channels
from cogenesis.apps.adversary import CopyingDevice, Plan
from cogenesis.apps.audit_channels import CHANNELS, Doc, Leak, SpanHit, SpanSearch
from cogenesis.apps.canaries import KINDS, Canary, by_kind, per_record, plant
from cogenesis.core.config import CloudConfig, EdgeConfig
from cogenesis.core.data import Record
from cogenesis.core.errors import CoGenesisError, ConfigError, PrivacyViolation
from cogenesis.core.models import check_same_tokenizer, load_causal_lm, resolve_model
from cogenesis.core.privacy import PrivateSpans
from cogenesis.core.protocol import error_code
from cogenesis.edge_sim.client import EdgeClient, SessionResult
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.links import Arrival, Closing, CloudLink, Opening, Step
from cogenesis.edge_sim.sketch import Outline, OutlineRequest, OutlineSource

log = logging.getLogger(__name__)

MODES = ("sketch", "logits")
OUTLINE_TOKENS = 8  # the outline's content does not matter to the audit: the cloud writes the fewest it may
Progress = Callable[[str, int, int], None]


def _quiet(stage: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class AuditOptions:
    data: str | None = None  # None: the records shipped with the package
    limit: int | None = None
    modes: tuple[str, ...] = MODES
    batch: int = 8  # sessions (or outline requests) sent together
    seed: int = 0  # canaries planted (the same data and seed plant the same)
    gap: int = adversary.GAP

    def validate(self) -> None:
        """Check the options before anything starts."""
        if self.limit is not None and self.limit < 1:
            raise ConfigError(
                f"--limit must be at least 1, got {self.limit}", hint="omit --limit to audit every record"
            )
        if self.batch < 1:
            raise ConfigError(f"--batch must be at least 1, got {self.batch}", hint="e.g. --batch 8")
        if self.gap < 0:
            raise ConfigError(f"the gap before each canary must be 0 or more tokens, got {self.gap}", hint="e.g. 3")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ConfigError(f"unknown mode(s) {', '.join(bad) or '(none)'}", hint="use sketch, logits or both")


# ---- attribution: which record sent each session / request --------------------------------------------------


class RecordingLink:
    """A ``CloudLink`` that remembers which client opened each session, then hands everything to ``inner``."""

    def __init__(self, inner: CloudLink) -> None:
        self.inner = inner
        self.opened: dict[str, int] = {}  # session id -> client index

    def open(self, sessions: Sequence[Opening], cfg: EdgeConfig) -> None:
        self.opened.update((o.session_id, o.client) for o in sessions)
        self.inner.open(sessions, cfg)

    def request(self, steps: Sequence[Step], cfg: EdgeConfig) -> None:
        self.inner.request(steps, cfg)

    def collect(self, session_ids: Sequence[str], cfg: EdgeConfig) -> list[Arrival]:
        return self.inner.collect(session_ids, cfg)

    def close(self, sessions: Sequence[Closing]) -> None:
        self.inner.close(sessions)


class RecordingOutlines:
    """An ``OutlineSource`` that remembers which client sent each request, then asks ``inner``."""

    def __init__(self, inner: OutlineSource) -> None:
        self.inner = inner
        self.asked: dict[str, int] = {}  # request id -> client index

    def outlines(self, requests: Sequence[OutlineRequest]) -> list[Outline | Exception]:
        self.asked.update((r.request.request_id, r.client) for r in requests)
        return self.inner.outlines(requests)


# ---- the run --------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One audit's state: the planted records, what was tried, who sent what."""

    opts: AuditOptions
    records: list[Record]
    canaries: list[Canary]
    progress: Progress
    sketch_tries: list[tuple[Canary | None, Outline | Exception]]  # (the canary carried, the answer)
    logits: list[SessionResult]
    plans: list[Plan]
    owner: dict[str, str]  # session / request id -> tid


def run_audit(opts: AuditOptions, cloud: CloudConfig, edge: EdgeConfig, progress: Progress = _quiet) -> dict:
    """Plant, run both modes adversarially on a local cluster, capture every channel, search, report."""
    opts.validate()
    t0 = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="cogenesis-audit-"))
    ray_dir = Path(tempfile.mkdtemp(prefix="cgray"))  # short: Ray's socket paths must fit
    try:
        progress("planting canaries", 0, 1)
        records, canaries = plant(opts.data, opts.limit, workdir, opts.seed)
        progress("loading the models", 0, 1)
        large_path, small_path = resolve_model(cloud.large_model), resolve_model(edge.small_model)
        small, tok = load_causal_lm(small_path)
        from transformers import AutoTokenizer

        check_same_tokenizer(AutoTokenizer.from_pretrained(large_path), tok)
        engine = EdgeEngine(small, tok, edge.max_prompt_tokens)
        run = _Run(opts, records, canaries, progress, [], [], [], {})
        cloud = cloud.model_copy(
            update={
                "large_model": large_path,
                "audit_log": str(workdir / "audit.jsonl"),
                "capture_http": str(workdir / "http.jsonl"),
            }
        )
        docs, capture_errors = _on_cluster(run, engine, cloud, edge, workdir, ray_dir)
        progress("searching every channel", 0, 1)
        leaks = audit_channels.find_canaries(docs, canaries)
        spans = audit_channels.find_spans(docs, SpanSearch(run.owner, _span_matchers(records, edge)))
        return _report(run, edge, docs, leaks, spans, capture_errors, time.perf_counter() - t0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # planted records, audit log, captured bodies
        shutil.rmtree(ray_dir, ignore_errors=True)


def _on_cluster(
    run: _Run, engine: EdgeEngine, cloud: CloudConfig, edge: EdgeConfig, workdir: Path, ray_dir: Path
) -> tuple[list[Doc], list[str]]:
    """Start Redis (watched by MONITOR from its first command) and the cluster, run the modes, capture."""
    from cogenesis.cluster.local import LocalCluster
    from cogenesis.cluster.redis_server import RedisServer

    run.progress("starting Redis, Ray and Serve", 0, 1)
    server = RedisServer().start()
    capture = audit_channels.LogCapture().attach()
    monitor = audit_channels.RedisMonitor(server.url)
    cluster = LocalCluster(cloud, redis_url=server.url, ray_temp_dir=str(ray_dir))
    errors: list[str] = []
    try:
        monitor.start()
        monitor.ready.wait(10)
        info = cluster.start(lambda msg: run.progress(msg, 0, 1))
        if "sketch" in run.opts.modes:
            _sketch(run, engine, edge, info.http_url)
        if "logits" in run.opts.modes:
            _logits(run, engine, edge, info.redis_url)
        run.progress("scraping metrics", 0, 1)
        metric_docs, failed = audit_channels.metrics_docs(info.redis_url, info.http_url)
        errors += [f"metrics: {f} could not be read" for f in failed]
    finally:
        run.progress("stopping the cluster", 0, 1)
        cluster.stop()
        audit_channels.wait_quiet(ray_dir)  # the last log lines, written as Ray's processes exit
        monitor.stop()
        capture.detach()
        logs = audit_channels.cluster_log_docs(capture.lines, server.log_path)
        server.stop()
    if monitor.error:
        errors.append(f"redis: the MONITOR connection failed ({monitor.error})")
    tok = engine.tok
    docs = [
        *audit_channels.audit_docs(Path(str(cloud.audit_log))),
        *audit_channels.redis_docs(monitor.lines, tok),
        *audit_channels.http_docs(Path(str(cloud.capture_http)), tok),
        *audit_channels.ray_log_docs(ray_dir),
        *logs,
        *metric_docs,
    ]
    return docs, errors


def _sketch(run: _Run, engine: EdgeEngine, edge: EdgeConfig, http_url: str) -> None:
    """Each record's own outline request, then one per canary kind carrying a canary of the record."""
    import httpx

    from cogenesis.core.secrets import stored_token
    from cogenesis.edge_sim.sketch import HttpOutlines, ask_outlines

    cfg = edge.model_copy(update={"sketch_max_tokens": OUTLINE_TOKENS})
    tries: list[tuple[EdgeClient, Canary | None]] = [
        (EdgeClient(i, r, engine, cfg), None) for i, r in enumerate(run.records)
    ]
    for kind in KINDS:
        mine = dict(per_record(run.canaries, kind))
        for i, r in enumerate(run.records):
            if r.tid in mine:
                canary = mine[r.tid][i % len(mine[r.tid])]  # a different private field from record to record
                tries.append((adversary.crafted_client(i, r, canary, engine, cfg), canary))
    with httpx.Client() as http:
        worker = stored_token("worker")  # the cluster's (LocalCluster points $COGENESIS_SECRETS_DIR at it)
        source = RecordingOutlines(HttpOutlines(http, http_url, cfg.step_timeout_s, token=worker))
        for start in range(0, len(tries), run.opts.batch):
            group = tries[start : start + run.opts.batch]
            answers = ask_outlines([c for c, _ in group], source, cfg)
            run.sketch_tries += [(canary, a) for (_, canary), a in zip(group, answers)]
            run.progress("sketch mode: outline requests", start + len(group), len(tries))
    run.owner.update((rid, run.records[i].tid) for rid, i in source.asked.items())


def _logits(run: _Run, engine: EdgeEngine, edge: EdgeConfig, redis_url: str) -> None:
    """One session per record; its small model copies a canary of each kind into what it writes."""
    from cogenesis.cluster.bus import EdgeBus
    from cogenesis.edge_sim.device import PackedDevice
    from cogenesis.edge_sim.links import BusLink
    from cogenesis.edge_sim.logits import run_logits_sessions

    per_kind = {kind: dict(per_record(run.canaries, kind)) for kind in KINDS}
    for i, r in enumerate(run.records):
        chosen = [m[r.tid][(i + 1) % len(m[r.tid])] for m in per_kind.values() if r.tid in m]
        run.plans.append(adversary.plan(chosen, engine.tok, run.opts.gap))
    longest = max(p.length for p in run.plans)
    cfg = edge.model_copy(update={"max_new_tokens": longest + run.opts.gap, "ignore_eos": True})
    bus = EdgeBus(redis_url)
    try:
        link = RecordingLink(BusLink(bus))
        for start in range(0, len(run.records), run.opts.batch):
            idx = range(start, min(start + run.opts.batch, len(run.records)))
            clients = [EdgeClient(i, run.records[i], engine, cfg) for i in idx]
            device = CopyingDevice(
                PackedDevice(engine.model, engine.pad_id, cfg.prefill_threads), [run.plans[i] for i in idx]
            )
            try:
                run.logits += run_logits_sessions(clients, engine, link, cfg, device=device)
            except CoGenesisError as exc:  # the whole group failed (e.g. the cloud went away): say so per session
                code = error_code(exc)
                run.logits += [
                    SessionResult(c.index, c.record.tid, "logits", "", 0, 0.0, error=exc.message, error_code=code)
                    for c in clients
                ]
            run.progress("logits mode: adversarial sessions", idx.stop, len(run.records))
    finally:
        bus.close()
    run.owner.update((sid, run.records[i].tid) for sid, i in link.opened.items())


def _span_matchers(records: list[Record], edge: EdgeConfig) -> dict[str, Callable[[str], Sequence[Any]]]:
    """Each record's private spans (entities and n-grams of its private fields), as a matcher. The public
    instruction exempts what it shows only where the user split it off the task (declared it public)."""
    return {
        r.tid: PrivateSpans.of(
            r.public_instruction,
            r.private_fields(),
            declared_public=r.public_instruction != r.task,
            ngram=edge.privacy.ngram,
        ).find
        for r in records
    }


# ---- the report ---------------------------------------------------------------------------------------------


def _attempts(run: _Run) -> dict[str, dict[str, dict[str, int]]]:
    out: dict[str, dict[str, dict[str, int]]] = {}
    if "sketch" in run.opts.modes:
        sketch = {k: {"attempts": 0, "refused": 0, "failed": 0} for k in KINDS}
        for canary, answer in run.sketch_tries:
            if canary is None:
                continue
            row = sketch[canary.kind]
            row["attempts"] += 1
            row["refused"] += isinstance(answer, PrivacyViolation)
            row["failed"] += isinstance(answer, Exception) and not isinstance(answer, PrivacyViolation)
        out["sketch"] = sketch
    if "logits" in run.opts.modes:
        logits = {k: {"attempts": 0, "complete": 0} for k in KINDS}
        for a in (a for p in run.plans for a in p.attempts):
            logits[a.canary.kind]["attempts"] += a.started
            logits[a.canary.kind]["complete"] += a.started and a.written == len(a.ids)
        out["logits"] = logits
    return out


def _sessions(run: _Run) -> dict[str, dict[str, int]]:
    out = {}
    if "sketch" in run.opts.modes:
        honest = [a for c, a in run.sketch_tries if c is None]
        out["sketch"] = {
            "requests": len(run.sketch_tries),
            "own_requests_refused": sum(isinstance(a, PrivacyViolation) for a in honest),
            "own_requests_failed": sum(
                isinstance(a, Exception) and not isinstance(a, PrivacyViolation) for a in honest
            ),
            "answered": sum(isinstance(a, Outline) for _, a in run.sketch_tries),
        }
    if "logits" in run.opts.modes:
        out["logits"] = {
            "sessions": len(run.logits),
            "refused": sum(r.error_code == "privacy" for r in run.logits),  # ended by the gate (policy refuse)
            "failed": sum(r.error is not None and r.error_code != "privacy" for r in run.logits),
            "tokens": sum(r.tokens for r in run.logits),
        }
    return out


def _channels(docs: list[Doc], leaks: list[Leak], spans: list[SpanHit]) -> dict[str, dict]:
    return {
        ch: {
            "items": sum(d.channel == ch for d in docs),
            "leaks": {k: sum(lk.channel == ch and lk.kind == k for lk in leaks) for k in KINDS},
            "private_spans": sum(h.spans for h in spans if h.channel == ch),
        }
        for ch in CHANNELS
    }


def _report(
    run: _Run,
    edge: EdgeConfig,
    docs: list[Doc],
    leaks: list[Leak],
    spans: list[SpanHit],
    capture_errors: list[str],
    seconds: float,
) -> dict:
    channels = _channels(docs, leaks, spans)
    expected = {"audit_log", "redis", "ray_logs", "cluster_log", "metrics"} | (
        {"http"} if "sketch" in run.opts.modes else set()
    )
    capture_errors += [f"{ch}: nothing was captured" for ch in sorted(expected) if not channels[ch]["items"]]
    leaked = len(leaks) + sum(h.spans for h in spans)
    sessions = _sessions(run)
    run_errors = [  # what did not run says nothing about leaks: the audit is not passed
        f"{mode}: {n} {what} failed (not by the privacy gate)"
        for mode, what, n in (
            (
                "sketch",
                "of the records' own outline requests",
                sessions.get("sketch", {}).get("own_requests_failed", 0),
            ),
            ("logits", "session(s)", sessions.get("logits", {}).get("failed", 0)),
        )
        if n
    ]
    return {
        "data": run.opts.data or "(the records shipped with the package)",
        "records": len(run.records),
        "modes": list(run.opts.modes),
        "span_policy": edge.privacy.span_policy,
        "seconds": round(seconds, 1),
        "canaries": by_kind(run.canaries),
        "attempts": _attempts(run),
        "sessions": sessions,
        "channels": channels,
        "leaks": [asdict(lk) for lk in leaks],
        "private_spans": [asdict(h) for h in spans],
        "capture_errors": capture_errors,
        "run_errors": run_errors,
        "leaked": leaked,
        "ok": leaked == 0 and not capture_errors and not run_errors,
    }


def tables(report: dict) -> list[Any]:
    """The report as rich tables: attempts per mode and canary kind, then leaks per channel and kind."""
    from rich.table import Table

    attempts = Table(title="attempts per canary kind (what the adversarial device tried to send)")
    attempts.add_column("mode")
    for k in KINDS:
        attempts.add_column(k, justify="right")
    for mode, rows in report["attempts"].items():
        cells = [
            f"{r['attempts']}" + (f" ({r['refused']} refused)" if "refused" in r else f" ({r['complete']} whole)")
            for r in (rows[k] for k in KINDS)
        ]
        attempts.add_row(mode, *cells)
    leaks = Table(title="leaks per channel (canaries found, by kind; private spans of the sender)")
    leaks.add_column("channel")
    leaks.add_column("items", justify="right")
    for k in KINDS:
        leaks.add_column(k, justify="right")
    leaks.add_column("private spans", justify="right")
    for ch, row in report["channels"].items():
        cells = [str(row["leaks"][k]) for k in KINDS] + [str(row["private_spans"])]
        style = "red" if any(c != "0" for c in cells) else None
        leaks.add_row(ch, str(row["items"]), *cells, style=style)
    return [attempts, leaks]
