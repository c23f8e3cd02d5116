"""``cogenesis fuzz``: hostile traffic at the gateway, the HTTP routes and the bus while legitimate sessions run.

The issue's promise (design 15) is that a device can only drive its own sessions and that nothing a client sends
crashes the cluster, leaves work stuck on the bus or changes another session's output. This harness measures it:
it starts a local cluster (Redis locked with its ACL users, Ray, Serve: the cloud app and the gateway, embedded
models, as ``cogenesis chaos`` does, whose harness it extends), runs the legitimate workload once undisturbed (the
reference: greedy logits sessions through the gateway's WebSocket, greedy outlines through ``/v1/sketch`` and
``/v1/chat/completions``), then runs it again while ``--count`` fuzz cases (``cogenesis.apps.fuzz_cases``) go at
the three surfaces from worker threads, and compares every legitimate output with the reference.

Findings: a crash (a Serve replica of the cloud or the gateway died or was replaced, or a health check failed),
a 5xx (or its WebSocket/bus equivalent: ``ErrorReply`` ``internal``/``unavailable``/``replica_lost``, close 1011),
a stuck bus entry (pending or unread after a grace, ``chaos.wait_bus_clean``), a hung answer (owed, not given within
its timeout), a breach (a case that must be refused was served), a changed or failed legitimate output. The run
passes when there are none.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

import httpx
import msgspec
import redis

from cogenesis.apps.chaos import MAIN, ChaosOptions, Harness, wait_bus_clean
from cogenesis.apps.chaos_pool import failed_outcomes, outcome_of
from cogenesis.apps.fuzz_cases import Fuzzer, Targets, Tokens, split_count
from cogenesis.apps.fuzz_report import LegitRun, Tally, legit_report, passed, totals
from cogenesis.apps.fuzz_send import BusSender, HttpSender, Result, WsSender
from cogenesis.core.errors import ClusterError, CoGenesisError, ConfigError, ProtocolError
from cogenesis.core.protocol import OpenSession, decode_request

if TYPE_CHECKING:
    from cogenesis.cluster.local import LocalCluster

LEGIT_SUBJECT = "legit-device"
ROUND_LOG_S = 20.0  # fuzzed rounds are logged at most this often


@dataclass(frozen=True)
class FuzzOptions:
    count: int = 10_000
    sessions: int = 4  # legitimate greedy logits sessions (through the gateway's WebSocket)
    outlines: int = 2  # legitimate greedy outlines: each one a /v1/sketch and a /v1/chat/completions request
    max_new_tokens: int = 16
    outline_tokens: int = 8
    seed: int = 0
    ws_workers: int = 2
    http_workers: int = 2
    bus_chunk: int = 20
    answer_timeout_s: float = 30.0  # an owed answer that takes longer is "hung"
    grace_s: float = 60.0  # after the run: how long the bus may take to be clean
    data: str | None = None
    large_model: str = "embedded:large"
    small_model: str = "embedded:small"
    max_prompt_tokens: int = 384
    top_k: int = 10
    step_timeout_s: float = 60.0
    timeout_s: float = 1800.0  # the reference, and the fuzzed run
    threads: int | None = None

    def validate(self) -> None:
        if self.count < 0 or self.sessions < 1 or self.outlines < 0 or self.max_new_tokens < 1:
            raise ConfigError("--count must be >= 0, --sessions and --max-new-tokens >= 1, --outlines >= 0")
        if self.ws_workers < 1 or self.http_workers < 1 or self.bus_chunk < 1:
            raise ConfigError("--ws-workers, --http-workers and --bus-chunk must be >= 1")
        if self.answer_timeout_s <= 0 or self.grace_s < 0 or self.timeout_s <= 0:
            raise ConfigError("--answer-timeout and --timeout must be > 0, --grace >= 0")

    def chaos(self) -> ChaosOptions:
        """The chaos harness's options for the same cluster, models and sessions (its ``poison`` scenario only:
        one replica, nothing killed)."""
        return ChaosOptions(
            sessions=self.sessions,
            max_new_tokens=self.max_new_tokens,
            scenarios=("poison",),
            data=self.data,
            large_model=self.large_model,
            small_model=self.small_model,
            max_prompt_tokens=self.max_prompt_tokens,
            top_k=self.top_k,
            step_timeout_s=self.step_timeout_s,
            session_idle_s=300.0,
            timeout_s=self.timeout_s,
            threads=self.threads,
        )


# ---- the legitimate workload ----------------------------------------------------------------------------


def outline_requests(instructions: Sequence[str], tokens: int) -> list[tuple[str, dict]]:
    """The legitimate outline requests: for each public instruction a greedy /v1/sketch and a greedy chat
    completion (same seed every run, so the reference and the fuzzed run must write the same text)."""
    out: list[tuple[str, dict]] = []
    for i, text in enumerate(instructions):
        sketch = {"request_id": f"legit-{i}", "instruction": text, "max_tokens": tokens, "temperature": 0.0, "seed": 0}
        out.append(("/v1/sketch", sketch))
        chat = {"messages": [{"role": "user", "content": text}], "max_tokens": tokens, "temperature": 0.0, "seed": 0}
        out.append(("/v1/chat/completions", chat))
    return out


def outline_text(path: str, body: bytes) -> str:
    """The outline of a /v1/sketch (``SketchReply.sketch``) or chat completion (the assistant message) answer."""
    data = msgspec.json.decode(body)
    if path == "/v1/sketch":
        return str(data["sketch"])
    return str(data["choices"][0]["message"]["content"])


# ---- watching the bus: the legitimate sessions, for the cross-session cases ---------------------------------


class LegitWatcher:
    """Learns the legitimate sessions (ids, and the gateway's reply lists) from the opens the gateway relays on
    ``cg:open`` (a plain XREAD as the admin user, which takes nothing from the replicas' group); the fuzzer's own
    sessions (``fz-``) are skipped. Appends to ``sessions`` and ``lists``, which the generators read."""

    def __init__(self, r: redis.Redis, sessions: list[str], lists: list[str]) -> None:
        self.r, self.sessions, self.lists = r, sessions, lists
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzz-watch", daemon=True)
        self.seen: set[str] = set()

    def __enter__(self) -> LegitWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.r.close()

    def _run(self) -> None:
        cursor: str | bytes = "$"
        while not self._stop.is_set():
            try:
                resp = self.r.xread({"cg:open": cursor}, count=200, block=500)
            except redis.RedisError:
                self._stop.wait(0.5)
                continue
            for _, entries in cast(list, resp or []):
                for entry_id, fields in entries:
                    cursor = entry_id
                    self.learn(fields.get(b"m", b""))

    def learn(self, payload: bytes) -> None:
        try:
            msg = decode_request(payload)
        except ProtocolError:
            return
        if not isinstance(msg, OpenSession) or msg.session_id.startswith("fz-") or msg.session_id in self.seen:
            return
        self.seen.add(msg.session_id)
        self.sessions.append(msg.session_id)
        if msg.reply_to.startswith("gw-") and msg.reply_to not in self.lists:
            self.lists.append(msg.reply_to)


# ---- crashes --------------------------------------------------------------------------------------------


def serve_replicas() -> dict[str, int]:
    """Live Serve replica actors of this Ray instance (the cloud's and the gateway's), by actor name: their pid."""
    from ray._private import state

    out: dict[str, int] = {}
    for actor in state.actors().values():
        name = str(actor.get("Name") or "")
        if actor.get("State") == "ALIVE" and name.startswith("SERVE_REPLICA::") and actor.get("Pid"):
            out[name] = int(actor["Pid"])
    return out


def replica_changes(before: dict[str, int], after: dict[str, int]) -> list[dict]:
    """Replicas that died, were replaced or restarted between two ``serve_replicas`` snapshots."""
    out = []
    for name, pid in sorted(before.items()):
        if name not in after:
            out.append({"replica": name, "event": "gone", "pid": pid})
        elif after[name] != pid:
            out.append({"replica": name, "event": "restarted", "pid": pid, "new_pid": after[name]})
    out += [{"replica": name, "event": "new", "pid": pid} for name, pid in sorted(after.items()) if name not in before]
    return out


class HealthWatch:
    """Polls the gateway's and the cloud's ``/healthz`` (no token) every ``every_s`` while the fuzz runs; a check
    that fails twice in a row (not 200 with ``ok``) is a failure, with when and what."""

    def __init__(self, urls: dict[str, str], every_s: float = 2.0, timeout_s: float = 15.0) -> None:
        self.urls, self.every_s, self.timeout_s = urls, every_s, timeout_s
        self.failures: list[dict] = []
        self.checks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fuzz-health", daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def check(self, http: httpx.Client, url: str) -> str | None:
        """None when healthy, else what was wrong."""
        try:
            resp = http.get(f"{url}/healthz")
            ok = resp.status_code == 200 and bool(resp.json().get("ok"))
            return None if ok else f"HTTP {resp.status_code}"
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            return type(exc).__name__

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as http:
            while not self._stop.wait(self.every_s):
                for name, url in self.urls.items():
                    self.checks += 1
                    if self.check(http, url) is None:
                        continue
                    time.sleep(1.0)
                    again = self.check(http, url)
                    if again is not None:
                        self.failures.append(
                            {"app": name, "at_s": round(time.monotonic() - self._t0, 1), "error": again}
                        )


# ---- the fuzz itself ----------------------------------------------------------------------------------------


def _worker(name: str, run: Callable[[], None], errors: list[str]) -> threading.Thread:
    def guarded() -> None:
        try:
            run()
        except Exception as exc:  # the worker itself failed: reported, the other workers go on
            errors.append(f"{name}: {type(exc).__name__}: {getattr(exc, 'message', None) or exc}")

    return threading.Thread(target=guarded, name=f"fuzz-{name}", daemon=True)


class FuzzHarness(Harness):
    """The chaos harness (cluster, edge model, clients) with the gateway's legitimate workload and the fuzzers."""

    def __init__(self, opts: FuzzOptions, say: Callable[[str], None], progress: Callable[[int, int], None]) -> None:
        opts.validate()
        super().__init__(opts.chaos(), say)
        self.fopts = opts
        self.progress = progress
        self.nonce = uuid.uuid4().hex[:6]
        self.tokens: Tokens | None = None
        self.legit_token = ""

    # ---- the cluster's addresses and credentials ------------------------------------------------------

    @property
    def main(self) -> LocalCluster:
        return self.cluster(MAIN)

    def urls(self) -> tuple[str, str, str, str | None]:
        info = self.main.info
        assert info is not None
        if not info.gateway_url:
            raise ClusterError(
                "the cluster has no gateway (ClusterInfo.gateway_url is empty)",
                hint="the fuzz needs the device gateway (cogenesis.deployments.gateway, gateway.enabled)",
            )
        return info.gateway_url, info.http_url, info.redis_url, info.secrets_dir

    def admin_redis(self) -> redis.Redis:
        from cogenesis.cluster.bus import connect

        _, _, redis_url, secrets = self.urls()
        return connect(redis_url, role="admin", secrets=secrets)

    def make_tokens(self) -> None:
        from cogenesis.core.auth import mint
        from cogenesis.core.secrets import SecretsDir

        secrets = self.urls()[3]
        if secrets is None:
            raise ClusterError("the cluster has no secrets directory: no tokens can be made")
        key = SecretsDir(secrets).cluster_key()
        self.tokens = Tokens(key, subject=f"fuzz-{self.nonce}")
        self.legit_token = mint(key, LEGIT_SUBJECT, "device", 6 * 3600)

    # ---- the legitimate workload ------------------------------------------------------------------------

    def legit(self, label: str, quiet: bool = False) -> LegitRun:
        """Every legitimate session and outline, through the gateway, together (logits in this thread)."""
        from cogenesis.edge_sim.gateway_link import GatewayLink
        from cogenesis.edge_sim.logits import run_logits_sessions

        assert self.engine is not None and self.edge is not None
        gateway_url = self.urls()[0]
        run = LegitRun()
        instructions = [c.record.public_instruction for c in self.clients[: self.fopts.outlines]]
        requests = outline_requests(instructions, self.fopts.outline_tokens)
        outlines: list[str | None] = [None] * len(requests)

        def ask_outlines() -> None:
            with httpx.Client(timeout=self.fopts.step_timeout_s * 4) as http:
                for i, (path, body) in enumerate(requests):
                    try:
                        resp = http.post(
                            f"{gateway_url}{path}", json=body, headers={"authorization": f"Bearer {self.legit_token}"}
                        )
                        if resp.status_code != 200:
                            run.outline_errors.append(f"{path}: HTTP {resp.status_code}")
                            continue
                        outlines[i] = outline_text(path, resp.content)
                    except (httpx.HTTPError, ValueError, KeyError, IndexError, msgspec.DecodeError) as exc:
                        run.outline_errors.append(f"{path}: {type(exc).__name__}")

        t0 = time.perf_counter()
        asker = threading.Thread(target=ask_outlines, name="fuzz-outlines", daemon=True)
        asker.start()
        started = time.time()
        try:
            link = GatewayLink(gateway_url, self.legit_token, limits=self.main.cloud.limits)
        except CoGenesisError as exc:
            run.outcomes = failed_outcomes(self.clients, exc.message, "setup", started)
        else:
            try:
                results = run_logits_sessions(
                    list(self.clients), self.engine, link, self.edge, stop_at=time.perf_counter() + self.opts.timeout_s
                )
                run.outcomes = [outcome_of(r, started) for r in results]
            except CoGenesisError as exc:
                run.outcomes = failed_outcomes(self.clients, exc.message, "internal", started)
            finally:
                link.shutdown()
        asker.join(timeout=self.opts.timeout_s)
        run.outlines = outlines
        run.seconds = time.perf_counter() - t0
        failed = sum(not o.ok for o in run.outcomes)
        if quiet and not failed and None not in outlines:
            return run
        self.say(
            f"{label}: {sum(len(o.ids) for o in run.outcomes)} tokens, {failed} failed session(s), "
            f"{sum(x is not None for x in outlines)}/{len(outlines)} outlines in {run.seconds:.1f} s"
        )
        return run

    # ---- the fuzz ----------------------------------------------------------------------------------------

    def fuzz(self, tally: Tally, legit_sessions: list[str], legit_lists: list[str]) -> dict:
        """Set up the senders (their victim sessions), then send every case from the workers' threads; the
        senders' own checks at the end (A's victim still A's). ``legit_*``: what the watcher learns."""
        assert self.tokens is not None and self.engine is not None
        o = self.fopts
        gateway_url, http_url, redis_url, secrets = self.urls()
        from cogenesis.edge_sim.gateway_link import ws_url

        limits = self.main.cloud.limits
        replicas = sorted(self.main.replica_pids())
        counts = split_count(o.count)

        def targets(worker: str) -> Targets:
            return Targets(
                limits=limits,
                vocab=self.engine.vocab,  # type: ignore[union-attr]
                nonce=f"{self.nonce}{worker}",
                replicas=replicas,
                reply_to=f"fz-{self.nonce}-{worker}",
                stranger=f"fz-{self.nonce}-{worker}-stranger",
                legit_sessions=legit_sessions,
                legit_reply_to=legit_lists,
            )

        errors: list[str] = []
        threads: list[threading.Thread] = []
        ws_senders: list[WsSender] = []
        for i in range(o.ws_workers):
            t = targets(f"w{i}")
            sender = WsSender(ws_url(gateway_url), self.tokens, t, o.answer_timeout_s)
            sender.setup()
            ws_senders.append(sender)
            fuzzer = Fuzzer(o.seed, t, f"ws{i}")
            numbers = range(i, counts["ws"], o.ws_workers)

            def run_ws(s: WsSender = sender, f: Fuzzer = fuzzer, ns: range = numbers) -> None:
                for n in ns:
                    tally.add([s.send(f.ws(n))])

            threads.append(_worker(f"ws{i}", run_ws, errors))
        for i in range(o.http_workers):
            t = targets(f"h{i}")
            hsender = HttpSender(gateway_url, http_url, self.tokens, o.answer_timeout_s * 2)
            fuzzer = Fuzzer(o.seed, t, f"http{i}")
            numbers = range(counts["ws"] + i, counts["ws"] + counts["http"], o.http_workers)

            def run_http(s: HttpSender = hsender, f: Fuzzer = fuzzer, ns: range = numbers) -> None:
                try:
                    for n in ns:
                        tally.add([s.send(f.http(n))])
                finally:
                    s.close()

            threads.append(_worker(f"http{i}", run_http, errors))
        bt = targets("b")
        bus = BusSender(redis_url, secrets, bt, o.answer_timeout_s)
        bus.setup()
        bus_fuzzer = Fuzzer(o.seed, bt, "bus")
        first = counts["ws"] + counts["http"]

        def run_bus() -> None:
            numbers = list(range(first, first + counts["bus"]))
            for at in range(0, len(numbers), o.bus_chunk):
                tally.add(bus.send_chunk([bus_fuzzer.bus(n) for n in numbers[at : at + o.bus_chunk]]))

        threads.append(_worker("bus", run_bus, errors))
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        deadline = time.monotonic() + o.timeout_s
        for th in threads:
            th.join(timeout=max(1.0, deadline - time.monotonic()))
        seconds = time.perf_counter() - t0
        cut = [th.name for th in threads if th.is_alive()]
        ends = [s.finish() for s in ws_senders]
        bus.finish()
        for verdict, detail in ends:
            tally.add([Result(-1, "ws", "ws.victim_kept", verdict, detail, "A's session after the fuzz")])
        return {
            "count": o.count,
            "planned": counts,
            "sent": tally.done - len(ends),
            "seconds": round(seconds, 1),
            "rate_per_s": round((tally.done - len(ends)) / seconds, 1) if seconds else None,
            "legit_sessions_seen": len(legit_sessions),
            "worker_errors": errors,
            "workers_cut": cut,
        }

    def fuzzed(self, tally: Tally) -> tuple[list[LegitRun], dict]:
        """The legitimate workload, round after round, while the fuzz runs (at least one round; the last one
        started before the fuzz ended runs to its end)."""
        rounds: list[LegitRun] = []
        done = threading.Event()
        result: dict[str, Any] = {}
        sessions: list[str] = []
        lists: list[str] = []

        def fuzz() -> None:
            try:
                result.update(self.fuzz(tally, sessions, lists))
            except Exception as exc:
                result["error"] = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
            finally:
                done.set()

        thread = threading.Thread(target=fuzz, name="fuzz", daemon=True)
        logged = 0.0
        with LegitWatcher(self.admin_redis(), sessions, lists):
            thread.start()
            while True:
                quiet = time.monotonic() - logged < ROUND_LOG_S
                logged = logged if quiet else time.monotonic()
                rounds.append(self.legit(f"fuzzed round {len(rounds) + 1} ({tally.done} cases sent)", quiet))
                if done.is_set():
                    break
            thread.join(timeout=self.opts.timeout_s)
        return rounds, result


def run_fuzz(
    opts: FuzzOptions,
    say: Callable[[str], None] = lambda m: None,
    progress: Callable[[int, int], None] = lambda d, t: None,
) -> dict:
    """Start the cluster, run the reference, then the fuzzed rounds; check crashes and the bus; the report."""
    from cogenesis.apps.chaos import bus_backlog

    harness = FuzzHarness(opts, say, progress)
    report: dict[str, Any] = {"settings": asdict(opts)}
    try:
        harness.prepare()
        cluster = harness.main
        report["cluster"] = harness.describe(MAIN)
        harness.make_tokens()
        gateway_url, http_url, _, _ = harness.urls()
        say(f"reference: {opts.sessions} greedy logits sessions and {2 * opts.outlines} outlines, no fuzz")
        reference = harness.legit("reference")
        failed = [o for o in reference.outcomes if not o.ok]
        if failed or None in reference.outlines:
            what = failed[0].error if failed else (reference.outline_errors or ["an outline failed"])[0]
            raise ClusterError(
                f"the undisturbed reference run failed: {what}",
                hint="nothing can be compared without it; check the cluster with `cogenesis demo` (-v for logs)",
            )
        report["reference"] = {
            "seconds": round(reference.seconds, 1),
            "tokens": sum(len(o.ids) for o in reference.outcomes),
            "outlines": len(reference.outlines),
        }
        before = serve_replicas()
        pids_before = cluster.replica_pids()
        say(f"fuzz: {opts.count} cases over {', '.join(f'{k} {v}' for k, v in split_count(opts.count).items())}")
        tally = Tally(lambda done: progress(done, opts.count))
        with HealthWatch({"gateway": gateway_url, "cloud": http_url}) as health:
            rounds, fz = harness.fuzzed(tally)
        report["fuzz"] = {**fz, **tally.to_json()}
        report["legit"] = legit_report(reference, rounds)
        say(f"fuzz done; waiting up to {opts.grace_s:g} s for the bus to be clean")
        r = harness.admin_redis()
        try:
            backlog = wait_bus_clean(r, opts.grace_s)
            dirty = {s: b for s, b in backlog.items() if b["pending"] or b["length"]}
            report["stuck"] = {"entries": sum(b["pending"] + b["length"] for b in dirty.values()), "streams": dirty}
            report["bus"] = {"streams": len(bus_backlog(r))}
        finally:
            r.close()
        after = serve_replicas()
        pids_after = cluster.replica_pids()
        crashes = replica_changes(before, after)
        if set(pids_before.items()) != set(pids_after.items()):
            crashes.append({"event": "heartbeats changed", "before": pids_before, "after": pids_after})
        crashes += [{"event": "health check failed", **f} for f in health.failures]
        report["crashes"] = crashes
        report["health_checks"] = health.checks
        report["findings"] = [asdict(f) for f in tally.findings]
    finally:
        harness.close()
    report["totals"] = totals(report)
    report["passed"] = passed(report)
    return report
