"""One edge pool of ``cogenesis edge``: a process (``python -m cogenesis.edge_sim.fleet``) of simulated clients.

The launcher (``cogenesis.apps.fleet``) starts ``--pools`` of these processes, or Ray tasks that run
them. A pool runs its clients as greenlets (gevent, in this process only: never in Serve or Ray
workers): each client thinks, runs a session, thinks again. The pool's small model is one
``SharedDevice`` that batches whatever its clients' sessions need (or a ``ProfileDevice``). Each
client holds its own record (cycled from the dataset by client index), gate and session state;
nothing private leaves the pool process.

A pool publishes typed messages (msgspec JSON) to Redis: its ``PoolProgress`` every second
(``cg:fleet:{run}:pool:{i}``, with a TTL) and once at the end its ``PoolSummary``, or ``PoolFailed``
if it could not run (pushed to ``cg:fleet:{run}:done``). The launcher reads nothing else. They hold
numbers and error codes (``cogenesis.core.protocol.ErrorCode``) only: no text of the pool leaves it
(an error's message stays in the pool's own log).

The small model, httpx and redis are imported inside the pool's functions: the process imports
them only after gevent has patched it.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from cogenesis.core.errors import ConfigError
from cogenesis.core.protocol import ErrorCode, error_code
from cogenesis.core.secrets import ENV_DIR

if TYPE_CHECKING:
    import redis

    from cogenesis.core.config import EdgeConfig
    from cogenesis.core.data import Record
    from cogenesis.edge_sim.client import SessionResult
    from cogenesis.edge_sim.device import Device, DeviceProfile
    from cogenesis.edge_sim.engine import EdgeEngine
    from cogenesis.edge_sim.session import Cloud

log = logging.getLogger(__name__)

RUN_TTL_S = 3600
LATENCY_SAMPLES = 20_000  # per pool and kind: a uniform reservoir keeps memory flat however long it runs
PROGRESS_EVERY_S = 1.0


@dataclass
class FleetOptions:
    clients: int = 100
    mode: str = "logits"  # sketch | logits | mixed
    duration_s: float | None = 60.0
    sessions_per_client: int | None = None
    think_s: tuple[float, float] = (5.0, 15.0)
    pools: int = 1
    device: str = "real"
    max_active: int | None = (
        None  # sessions at once per pool (None: device.REAL_MAX_ACTIVE on the real device; no cap for a profile)
    )
    data: str | None = None
    launcher: str = "local"  # local | ray
    grace_s: float = 120.0  # after the duration, running sessions get this long to finish
    transport: str = "ws"  # ws: devices through the gateway (a token each) | redis: trusted workers on the bus
    gateway_url: str = ""  # where devices connect (ws; "": beside the cloud app's URL, ``session.gateway_of``)
    edge: dict = field(default_factory=dict)  # EdgeConfig fields

    def validate(self) -> None:
        if self.clients < 1 or self.pools < 1 or (self.max_active is not None and self.max_active < 1):
            raise ConfigError("--clients, --pools and --max-active must be >= 1")
        if self.mode not in ("sketch", "logits", "mixed"):
            raise ConfigError(f"unknown --mode {self.mode!r}", hint="use sketch, logits or mixed")
        if (self.duration_s is None) == (self.sessions_per_client is None):
            raise ConfigError("give exactly one of --duration and --sessions-per-client")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ConfigError(f"--duration must be > 0, got {self.duration_s}")
        if self.sessions_per_client is not None and self.sessions_per_client < 1:
            raise ConfigError(f"--sessions-per-client must be >= 1, got {self.sessions_per_client}")
        a, b = self.think_s
        if not 0 <= a <= b:
            raise ConfigError(f"--think-time {a}..{b} needs 0 <= A <= B", hint="e.g. --think-time 5..15")
        if self.launcher not in ("local", "ray"):
            raise ConfigError(f"unknown --launcher {self.launcher!r}", hint="use local or ray")
        if self.transport not in ("ws", "redis"):
            raise ConfigError(f"unknown --transport {self.transport!r}", hint="use ws (the gateway) or redis")


def parse_think(text: str) -> tuple[float, float]:
    try:
        a, _, b = text.partition("..")
        lo, hi = float(a), float(b or a)
    except ValueError:
        raise ConfigError(f"--think-time {text!r} is not A..B seconds", hint="e.g. --think-time 5..15") from None
    if not 0 <= lo <= hi:
        raise ConfigError(f"--think-time {lo:g}..{hi:g} needs 0 <= A <= B", hint="e.g. --think-time 5..15")
    return lo, hi


def mode_of(mode: str, client: int, session: int) -> str:
    """``mixed`` alternates modes by client and session, so both run all the time."""
    return mode if mode != "mixed" else ("sketch", "logits")[(client + session) % 2]


# ---- the messages a pool publishes ---------------------------------------------------------------


class PoolCounts(msgspec.Struct):
    """A pool's running counters."""

    connected: int = 0  # clients started and not yet ended
    active: int = 0  # clients in a session now
    max_active: int = 0  # the most in a session at once so far
    ok: int = 0
    failed: int = 0
    cut: int = 0  # ended early by the duration's grace period, with what they wrote
    tokens: int = 0
    resumes: int = 0  # re-opens by replay (a replica died or was scaled down, Redis lost the exchange)


class PoolProgress(msgspec.Struct, frozen=True):
    """Published every second while the pool runs, and once more at the end."""

    pool: int
    clients: int
    counts: PoolCounts
    rss_mb: float


class RssMb(msgspec.Struct, frozen=True):
    start: float
    end: float
    peak: float


class LatencySamples(msgspec.Struct, frozen=True):
    """Uniform samples of each latency (seconds): time to first token, inter-token gaps, whole sessions."""

    ttft: list[float]
    itl: list[float]
    session: list[float]


class PoolSummary(msgspec.Struct, frozen=True, tag="summary"):
    """A pool's result once its clients have ended."""

    pool: int
    clients: int
    seconds: float
    counts: PoolCounts
    errors: dict[ErrorCode, int]  # failed sessions by error code ("stuck": did not finish within the
    # duration + grace + step timeout)
    rss_mb: RssMb
    samples: LatencySamples
    device_passes: int | None  # the shared device's batched passes (None: a profile)
    device_rows: int | None  # sessions served by those passes


class PoolFailed(msgspec.Struct, frozen=True, tag="failed"):
    """A pool that could not run its clients (e.g. its model did not load: ``setup``); the why is in its log."""

    pool: int
    code: ErrorCode


_progress_decoder = msgspec.json.Decoder(PoolProgress)
_done_decoder: msgspec.json.Decoder[PoolSummary | PoolFailed] = msgspec.json.Decoder(PoolSummary | PoolFailed)


def progress_key(run_id: str, pool: int) -> str:
    return f"cg:fleet:{run_id}:pool:{pool}"


def done_key(run_id: str) -> str:
    return f"cg:fleet:{run_id}:done"


def decode_progress(raw: bytes | str) -> PoolProgress:
    return _progress_decoder.decode(raw)


def decode_done(raw: bytes | str) -> PoolSummary | PoolFailed:
    return _done_decoder.decode(raw)


def publish_done(rdb: redis.Redis, run_id: str, done: PoolSummary | PoolFailed) -> None:
    rdb.rpush(done_key(run_id), msgspec.json.encode(done))
    rdb.expire(done_key(run_id), RUN_TTL_S)


# ---- statistics -------------------------------------------------------------------------------


class Reservoir:
    """A bounded uniform sample of a stream (Vitter's algorithm R)."""

    def __init__(self, size: int = LATENCY_SAMPLES, seed: int = 0) -> None:
        self.size, self.seen = size, 0
        self.items: list[float] = []
        self.rng = random.Random(seed)

    def add(self, x: float) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(x)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = x


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


# ---- the pool process ------------------------------------------------------------------------


def pool_main(run_id: str, pool: int, opts: FleetOptions, redis_url: str, http_url: str) -> PoolSummary:
    """Run this pool's clients (indices pool, pool + P, ...) to the end; publishes and returns its summary.
    Call only in a process that gevent has monkey-patched (``python -m cogenesis.edge_sim.fleet`` does)."""
    import gevent
    import httpx

    from cogenesis.cluster.bus import connect
    from cogenesis.core import metrics
    from cogenesis.core.config import EdgeConfig
    from cogenesis.core.data import load_records, sample_data_path
    from cogenesis.edge_sim.device import default_max_active
    from cogenesis.edge_sim.session import Cloud, gateway_of, token_source

    cfg = EdgeConfig(**opts.edge)
    # each simulated device its own token (minted with the cluster's key), or the one of $COGENESIS_TOKEN
    tokens = token_source(opts.transport, subject=f"edge-{run_id}")
    records = load_records(opts.data or sample_data_path())  # a bad file fails before the model loads
    profile, engine, device = open_pool_device(cfg, opts.device)
    clients = PoolClients(pool, opts, cfg, records, engine, device, default_max_active(profile))
    rdb = connect(redis_url, role="edge")  # a trusted worker; secrets: $COGENESIS_SECRETS_DIR (--secrets-dir)
    progress = ProgressPublisher(rdb, run_id, clients, metrics.serve(metrics.EDGE))
    reporter = gevent.spawn(progress.every_second)
    with httpx.Client(limits=httpx.Limits(max_connections=256)) as http:
        gateway_url = opts.gateway_url or gateway_of(http_url)
        clients.run(Cloud(redis_url, http_url, http, opts.transport, gateway_url, tokens))
        reporter.kill()
        progress.publish()
        clients.close()
    summary = clients.summary()
    publish_done(rdb, run_id, summary)
    rdb.close()
    return summary


def open_pool_device(cfg: EdgeConfig, name: str) -> tuple[DeviceProfile | None, EdgeEngine, Device]:
    """The small model (or profile) this pool's clients share; slow work runs in gevent's native threads, through
    ``native.offload``: loading the model there leaves a stopped executor thread that interpreter exit would wait
    on forever, and ``offload`` joins it (see ``cogenesis.edge_sim.native``), so the pool exits by itself."""
    import gevent

    from cogenesis.edge_sim.device import open_device, resolve_device
    from cogenesis.edge_sim.native import offload

    profile = resolve_device(name)
    engine, device = open_device(cfg, profile, offload, gevent.sleep)
    return profile, engine, device


class PoolClients:
    """This pool's clients on its shared small model (or profile): their sessions, counters and latencies."""

    def __init__(
        self,
        pool: int,
        opts: FleetOptions,
        cfg: EdgeConfig,
        records: list[Record],
        engine: EdgeEngine,
        device: Device,
        max_active: int | None,
    ) -> None:
        from gevent.event import Event
        from gevent.lock import BoundedSemaphore

        self.pool, self.opts, self.cfg = pool, opts, cfg
        self.records, self.engine, self.device = records, engine, device
        self.mine = list(range(pool, opts.clients, opts.pools))
        self.counts = PoolCounts()
        self.latency = {k: Reservoir(seed=pool * 7 + i) for i, k in enumerate(LatencySamples.__struct_fields__)}
        self.errors: dict[ErrorCode, int] = {}
        self.rss_start, self.rss_peak = _rss_mb(), 0.0
        self.slots = BoundedSemaphore(opts.max_active or max_active or len(self.mine))  # sessions at once
        self.over = Event()  # set when the duration ends: thinking clients stop at once
        self.t_start = time.perf_counter()
        self.end = None if opts.duration_s is None else self.t_start + opts.duration_s
        self.hard_stop = None if self.end is None else self.end + opts.grace_s

    def run(self, cloud: Cloud) -> None:
        """Every client until the duration or its sessions end. Clients still running after the grace and
        one step timeout are stopped and counted as failed."""
        import gevent

        if self.end is not None:
            gevent.spawn_later(max(0.0, self.end - time.perf_counter()), self.over.set)
        greenlets = [gevent.spawn(self.client, i, cloud) for i in self.mine]
        timeout = (
            None if self.hard_stop is None else self.hard_stop - time.perf_counter() + self.cfg.step_timeout_s + 30
        )
        gevent.joinall(greenlets, timeout=timeout)
        stuck = [g for g in greenlets if not g.dead]
        gevent.killall(stuck, timeout=10)
        if stuck:
            log.warning("pool %d: %d client(s) did not finish within the duration + grace", self.pool, len(stuck))
            self.counts.failed += len(stuck)
            self.errors["stuck"] = len(stuck)

    def client(self, index: int, cloud: Cloud) -> None:
        """One device: a first wait (devices do not all start at once), then session, think, session, ..."""
        rng = random.Random(index)
        self.counts.connected += 1
        try:
            if self.over.wait(rng.uniform(0, self.opts.think_s[1])):
                return
            n = 0
            while self._time_left() and self._sessions_left(n):
                self.count(self.session(index, n, cloud))
                n += 1
                if self._sessions_left(n) and self.over.wait(rng.uniform(*self.opts.think_s)):
                    return
        finally:
            self.counts.connected -= 1

    def session(self, index: int, n: int, cloud: Cloud) -> SessionResult:
        """Client ``index``'s ``n``-th session, once a slot on the device is free."""
        from cogenesis.edge_sim.client import EdgeClient, SessionResult
        from cogenesis.edge_sim.session import run_session

        record = self.records[index % len(self.records)]  # the dataset's, not a copy
        mode = mode_of(self.opts.mode, index, n)
        with self.slots:
            self.counts.active += 1
            self.counts.max_active = max(self.counts.max_active, self.counts.active)
            t0 = time.perf_counter()
            try:
                client = EdgeClient(index, record, self.engine, self.cfg)  # gate and state live for one session
                return run_session(client, mode, self.engine, self.device, cloud, self.cfg, self.hard_stop)
            except Exception as exc:  # a bug, not a session error: counted by its code, told only to the local log
                log.exception("client %d %s session crashed", index, mode)
                seconds = time.perf_counter() - t0
                return SessionResult(
                    index, record.tid, mode, "", 0, seconds, error=type(exc).__name__, error_code=error_code(exc)
                )
            finally:
                self.counts.active -= 1

    def count(self, r: SessionResult) -> None:
        if r.error_code is not None:  # its message stays here
            self.counts.failed += 1
            self.errors[r.error_code] = self.errors.get(r.error_code, 0) + 1
            return
        if r.stopped:
            self.counts.cut += 1
        else:
            self.counts.ok += 1
        self.counts.tokens += r.tokens
        self.counts.resumes += r.resumes
        self.latency["session"].add(r.seconds)
        if r.ttft_s is not None:
            self.latency["ttft"].add(r.ttft_s)
        for gap in r.itl_s:
            self.latency["itl"].add(gap)

    def progress(self) -> PoolProgress:
        self.rss_peak = max(self.rss_peak, _rss_mb())
        return PoolProgress(self.pool, len(self.mine), self.counts, round(_rss_mb(), 1))

    def close(self) -> None:
        """Stop the shared device's worker (a profile has none)."""
        close = getattr(self.device, "close", None)
        if close is not None:
            close()

    def summary(self) -> PoolSummary:
        return PoolSummary(
            pool=self.pool,
            clients=len(self.mine),
            seconds=time.perf_counter() - self.t_start,
            counts=self.counts,
            errors=self.errors,
            rss_mb=RssMb(start=round(self.rss_start, 1), end=round(_rss_mb(), 1), peak=round(self.rss_peak, 1)),
            samples=LatencySamples(**{k: r.items for k, r in self.latency.items()}),
            device_passes=getattr(self.device, "passes", None),
            device_rows=getattr(self.device, "rows", None),
        )

    def _time_left(self) -> bool:
        return self.end is None or time.perf_counter() < self.end

    def _sessions_left(self, done: int) -> bool:
        return self.opts.sessions_per_client is None or done < self.opts.sessions_per_client


class ProgressPublisher:
    """Publishes a pool's progress (and announces its metrics) on Redis."""

    def __init__(self, rdb: redis.Redis, run_id: str, clients: PoolClients, metrics_address: str) -> None:
        self.rdb, self.run_id, self.clients, self.metrics_address = rdb, run_id, clients, metrics_address

    def publish(self) -> None:
        from cogenesis.core import metrics

        key = progress_key(self.run_id, self.clients.pool)
        self.rdb.set(key, msgspec.json.encode(self.clients.progress()), ex=RUN_TTL_S)
        metrics.announce(self.rdb, "edge", f"fleet-{self.run_id}-{self.clients.pool}", self.metrics_address)

    def every_second(self) -> None:
        """Publish until killed; a Redis error is logged and tried again a second later."""
        import gevent
        import redis

        while True:
            try:
                self.publish()
            except redis.RedisError as exc:
                log.warning("pool %d could not publish progress: %s", self.clients.pool, exc)
            gevent.sleep(PROGRESS_EVERY_S)


def _pool_entry(argv: list[str]) -> int:
    from gevent import monkey

    monkey.patch_all()
    import argparse

    p = argparse.ArgumentParser(description="one edge pool process (started by `cogenesis edge`)")
    p.add_argument("--run-id", required=True)
    p.add_argument("--pool", type=int, required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--http-url", required=True)
    p.add_argument("--options", required=True, help="FleetOptions as JSON")
    p.add_argument("--secrets-dir", default=None, help="the cluster's secrets directory (its Redis password)")
    args = p.parse_args(argv)
    if args.secrets_dir:  # every Redis client of this process (the pool's EdgeBus too) connects as `edge`
        os.environ[ENV_DIR] = args.secrets_dir
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s pool{args.pool} %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    opts = msgspec.json.decode(args.options, type=FleetOptions)
    try:
        pool_main(args.run_id, args.pool, opts, args.redis_url, args.http_url)
    except Exception as exc:  # tell the launcher, which is waiting on the done list
        from cogenesis.cluster.bus import connect

        rdb = connect(args.redis_url, role="edge")
        report_failure(rdb, args.run_id, args.pool, exc)
        rdb.close()
        return 1
    return 0


def report_failure(rdb: redis.Redis, run_id: str, pool: int, exc: BaseException) -> PoolFailed:
    """A pool that could not run: its error's message goes to the local log, its code to the launcher."""
    message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
    log.error("pool %d failed: %s", pool, message)
    failed = PoolFailed(pool, error_code(exc))
    publish_done(rdb, run_id, failed)
    return failed


if __name__ == "__main__":
    sys.exit(_pool_entry(sys.argv[1:]))
