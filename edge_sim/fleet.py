"""``cogenesis edge``: thousands of simulated clients against a running cluster.

The parent starts ``--pools`` pool processes (``python -m edge_sim.fleet``, or Ray tasks that run
it, spread over the Ray cluster's nodes). A pool process runs its clients as greenlets (gevent,
in that process only: never in Serve or Ray workers): each client thinks, runs a session, thinks
again. The pool's small model is one ``SharedDevice`` that batches whatever its clients' sessions
need (or a ``ProfileDevice``). Each client holds its own record (cycled from the dataset by
client index), gate and session state; nothing private leaves the pool process.

Pools publish their counters to Redis (``cg:fleet:{run}:pool:{i}``, a hash with a TTL) every
second and their summary once at the end (``cg:fleet:{run}:done``), so the parent shows one
progress line and merges the pools' summaries, wherever the pools run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

log = logging.getLogger(__name__)

RUN_TTL_S = 3600
LATENCY_SAMPLES = 20_000  # per pool and kind: a uniform reservoir keeps memory flat however long it runs


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
    edge: dict = field(default_factory=dict)  # EdgeConfig fields

    def validate(self) -> None:
        from cogenesis.core.errors import ConfigError

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


def parse_think(text: str) -> tuple[float, float]:
    from cogenesis.core.errors import ConfigError

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


# ---- statistics -------------------------------------------------------------------------------


class Reservoir:
    """A bounded uniform sample of a stream (Vitter's algorithm R)."""

    def __init__(self, size: int = LATENCY_SAMPLES, seed: int = 0) -> None:
        self.size, self.seen, self.items = size, 0, []
        self.rng = random.Random(seed)

    def add(self, x: float) -> None:
        self.seen += 1
        if len(self.items) < self.size:
            self.items.append(x)
        else:
            j = self.rng.randrange(self.seen)
            if j < self.size:
                self.items[j] = x


def percentiles(xs, qs=(50, 99)) -> dict:
    if not len(xs):
        return {f"p{q}": None for q in qs}
    arr = np.asarray(xs, dtype=float)
    return {f"p{q}": round(float(np.percentile(arr, q)) * 1000, 2) for q in qs}  # milliseconds


# ---- the pool process ------------------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pool_main(run_id: str, pool: int, opts: FleetOptions, redis_url: str, http_url: str) -> dict:
    """Run this pool's clients (indices pool, pool + P, ...) to the end; returns the pool's summary.
    Call only in a process that gevent has monkey-patched (``python -m edge_sim.fleet`` does)."""
    import gevent
    import httpx
    import redis
    from gevent.event import Event
    from gevent.lock import BoundedSemaphore

    from cogenesis.core import metrics
    from cogenesis.core.config import EdgeConfig
    from cogenesis.core.data import load_records, sample_data_path
    from cogenesis.edge_sim.client import EdgeClient
    from cogenesis.edge_sim.device import SharedDevice, default_max_active, open_device, resolve_device
    from cogenesis.edge_sim.session import Cloud, run_session

    cfg = EdgeConfig(**opts.edge)
    profile = resolve_device(opts.device)
    records = load_records(opts.data or sample_data_path())
    engine, device = open_device(cfg, profile, lambda fn: gevent.get_hub().threadpool.apply(fn), gevent.sleep)
    mine = list(range(pool, opts.clients, opts.pools))
    counts = {"connected": 0, "active": 0, "ok": 0, "failed": 0, "cut": 0, "tokens": 0, "max_active": 0}
    lat = {k: Reservoir(seed=pool * 7 + i) for i, k in enumerate(("ttft", "itl", "session"))}
    errors: dict[str, int] = {}
    rss = {"start": _rss_mb(), "peak": 0.0}
    slots = BoundedSemaphore(opts.max_active or default_max_active(profile) or len(mine))
    t_start = time.perf_counter()
    end = None if opts.duration_s is None else t_start + opts.duration_s
    hard_stop = None if end is None else end + opts.grace_s
    http = httpx.Client(limits=httpx.Limits(max_connections=256))
    cloud = Cloud(redis_url, http_url, http)

    def client_loop(index: int) -> None:
        record = records[index % len(records)]  # the dataset's, not a copy; the session's state is built per session
        rng = random.Random(index)
        counts["connected"] += 1
        try:
            if over.wait(rng.uniform(0, opts.think_s[1])):  # devices do not all start at once
                return
            n = 0
            while (end is None or time.perf_counter() < end) and (
                opts.sessions_per_client is None or n < opts.sessions_per_client
            ):
                with slots:
                    counts["active"] += 1
                    counts["max_active"] = max(counts["max_active"], counts["active"])
                    try:
                        client = EdgeClient(index, record, engine, cfg)  # gate and state live for one session
                        r = run_session(client, mode_of(opts.mode, index, n), engine, device, cloud, cfg, hard_stop)
                    finally:
                        counts["active"] -= 1
                n += 1
                _record(r)
                if (opts.sessions_per_client is None or n < opts.sessions_per_client) and over.wait(
                    rng.uniform(*opts.think_s)
                ):
                    return
        finally:
            counts["connected"] -= 1

    def _record(r) -> None:
        if r.error:
            counts["failed"] += 1
            key = r.error[:120]
            errors[key] = errors.get(key, 0) + 1
            return
        counts["cut" if r.extra.get("stopped") else "ok"] += 1
        counts["tokens"] += r.tokens
        lat["session"].add(r.seconds)
        if r.ttft_s is not None:
            lat["ttft"].add(r.ttft_s)
        for gap in r.extra.get("itl_s", ()):
            lat["itl"].add(gap)

    rdb = redis.Redis.from_url(redis_url, socket_timeout=10)
    key = f"cg:fleet:{run_id}:pool:{pool}"
    metrics_address = metrics.serve(metrics.EDGE)

    def publish() -> None:
        rss["peak"] = max(rss["peak"], _rss_mb())
        rdb.hset(key, mapping={**counts, "rss_mb": round(_rss_mb(), 1), "clients": len(mine)})
        rdb.expire(key, RUN_TTL_S)
        metrics.announce(rdb, "edge", f"fleet-{run_id}-{pool}", metrics_address)

    def reporter() -> None:
        while True:
            try:
                publish()
            except redis.RedisError as exc:
                log.warning("pool %d could not publish progress: %s", pool, exc)
            gevent.sleep(1.0)

    over = Event()  # set when the duration ends: thinking clients stop at once
    if end is not None:
        gevent.spawn_later(max(0.0, end - time.perf_counter()), over.set)
    rep = gevent.spawn(reporter)
    greenlets = [gevent.spawn(client_loop, i) for i in mine]
    timeout = None if hard_stop is None else hard_stop - time.perf_counter() + cfg.step_timeout_s + 30
    gevent.joinall(greenlets, timeout=timeout)
    stuck = sum(not g.dead for g in greenlets)
    gevent.killall([g for g in greenlets if not g.dead], timeout=10)
    rep.kill()
    if stuck:
        counts["failed"] += stuck
        errors["did not finish within the duration + grace + step timeout"] = stuck
    publish()
    if isinstance(device, SharedDevice):
        device.close()
    http.close()
    summary = {
        "pool": pool,
        "clients": len(mine),
        "seconds": time.perf_counter() - t_start,
        **counts,
        "errors": errors,
        "rss_mb": {"start": round(rss["start"], 1), "end": round(_rss_mb(), 1), "peak": round(rss["peak"], 1)},
        "samples": {k: v.items for k, v in lat.items()},
        "device_passes": getattr(device, "passes", None),
        "device_rows": getattr(device, "rows", None),
    }
    rdb.rpush(f"cg:fleet:{run_id}:done", json.dumps(summary))
    rdb.expire(f"cg:fleet:{run_id}:done", RUN_TTL_S)
    rdb.close()
    return summary


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
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s pool{args.pool} %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("edge_sim").setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raw = json.loads(args.options)
    raw["think_s"] = tuple(raw["think_s"])
    try:
        pool_main(args.run_id, args.pool, FleetOptions(**raw), args.redis_url, args.http_url)
    except Exception as exc:  # tell the parent, which is waiting on the done list
        import redis

        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        log.error("pool %d failed: %s", args.pool, message)
        rdb = redis.Redis.from_url(args.redis_url, socket_timeout=10)
        rdb.rpush(f"cg:fleet:{args.run_id}:done", json.dumps({"pool": args.pool, "fatal": message}))
        rdb.expire(f"cg:fleet:{args.run_id}:done", RUN_TTL_S)
        return 1
    return 0


# ---- the parent ------------------------------------------------------------------------------


def pool_command(run_id: str, pool: int, opts: FleetOptions, redis_url: str, http_url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cogenesis.edge_sim.fleet",
        "--run-id",
        run_id,
        "--pool",
        str(pool),
        "--redis-url",
        redis_url,
        "--http-url",
        http_url,
        "--options",
        json.dumps(asdict(opts)),
    ]


def _run_pool_on_ray(cmd: list[str], cwd: str) -> int:
    import subprocess

    return subprocess.call(cmd, cwd=cwd)


def run_fleet(
    opts: FleetOptions, redis_url: str, http_url: str, ray_address: str | None = None, progress=lambda counts: None
) -> dict:
    """Start the pools, follow their counters, merge their summaries; returns the report."""
    import subprocess
    import uuid
    from pathlib import Path

    import redis

    from cogenesis.core.errors import ClusterError
    from cogenesis.edge_sim.device import resolve_device

    opts.validate()
    profile = resolve_device(opts.device)  # a bad name fails here, before any process starts
    run_id = uuid.uuid4().hex[:12]
    root = str(Path(__file__).resolve().parent.parent)
    pools = min(opts.pools, opts.clients)
    opts.pools = pools
    cmds = [pool_command(run_id, i, opts, redis_url, http_url) for i in range(pools)]
    rdb = redis.Redis.from_url(redis_url, socket_timeout=10)
    t0 = time.perf_counter()
    procs, refs = [], []
    if opts.launcher == "ray":
        from cogenesis.cluster.local import RAY_ENV

        os.environ.update(RAY_ENV)
        # Ray 2.60's local clusters authenticate with the token ray.init wrote (~/.ray/auth_token); a driver
        # sends it only in token mode, which Ray reads when first imported
        if (Path.home() / ".ray" / "auth_token").is_file() or os.environ.get("RAY_AUTH_TOKEN"):
            os.environ.setdefault("RAY_AUTH_MODE", "token")
        import ray

        if not ray.is_initialized():
            ray.init(address=ray_address, logging_level=logging.WARNING, log_to_driver=False)
        task = ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(_run_pool_on_ray)
        refs = [task.remote(cmd, root) for cmd in cmds]
    else:
        procs = [subprocess.Popen(cmd, cwd=root, stdin=subprocess.DEVNULL) for cmd in cmds]
    limit = (opts.duration_s + opts.grace_s + 600) if opts.duration_s is not None else None
    done: list[dict] = []
    peak_active = peak_connected = 0
    try:
        while len(done) < pools:
            got = rdb.blpop([f"cg:fleet:{run_id}:done"], timeout=1)
            if got:
                done.append(json.loads(got[1]))
            counts = _sum_counts(rdb, run_id, pools)
            peak_active = max(peak_active, counts.get("active", 0))
            peak_connected = max(peak_connected, counts.get("connected", 0))
            progress({**counts, "elapsed_s": time.perf_counter() - t0, "pools_done": len(done)})
            dead = [p for p in procs if p.poll() is not None and p.returncode != 0]
            if dead and len(done) < pools and not rdb.llen(f"cg:fleet:{run_id}:done"):
                raise ClusterError(
                    f"{len(dead)} edge pool process(es) exited with code {dead[0].returncode} before reporting",
                    hint="rerun with -v; the pool's error is printed above",
                )
            if limit is not None and time.perf_counter() - t0 > limit:
                raise ClusterError(f"edge pools did not finish within {limit:.0f} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if refs:
            import ray

            ray.wait(refs, num_returns=len(refs), timeout=30)
        rdb.close()
    return merge(done, opts, profile, time.perf_counter() - t0, peak_active, peak_connected)


def _sum_counts(rdb, run_id: str, pools: int) -> dict:
    pipe = rdb.pipeline()
    for i in range(pools):
        pipe.hgetall(f"cg:fleet:{run_id}:pool:{i}")
    total: dict[str, float] = {}
    for h in pipe.execute():
        for k, v in h.items():
            k = k.decode()
            total[k] = total.get(k, 0) + float(v)
    return {k: (int(v) if k != "rss_mb" else round(v, 1)) for k, v in total.items()}


def merge(done: list[dict], opts: FleetOptions, profile, seconds: float, peak_active: int, peak_connected: int) -> dict:
    from cogenesis.edge_sim.device import describe

    fatal = [d for d in done if "fatal" in d]
    ok = [d for d in done if "fatal" not in d]
    errors: dict[str, int] = {}
    for d in ok:
        for k, v in d["errors"].items():
            errors[k] = errors.get(k, 0) + v
    for d in fatal:
        errors[f"pool {d['pool']} failed: {d['fatal']}"] = 1
    samples = {k: [x for d in ok for x in d["samples"][k]] for k in ("ttft", "itl", "session")}
    tokens = sum(d["tokens"] for d in ok)
    return {
        "clients": opts.clients,
        "pools": opts.pools,
        "mode": opts.mode,
        "device": describe(profile, "pool"),
        "think_s": list(opts.think_s),
        "duration_s": opts.duration_s,
        "sessions_per_client": opts.sessions_per_client,
        "max_active_per_pool": opts.max_active,
        "seconds": round(seconds, 1),
        "sessions": {
            "ok": sum(d["ok"] for d in ok),
            "failed": sum(d["failed"] for d in ok) + len(fatal),
            "cut": sum(d["cut"] for d in ok),
        },
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
        "peak_connected": peak_connected,
        "peak_active": peak_active,
        "ttft_ms": percentiles(samples["ttft"]),
        "itl_ms": percentiles(samples["itl"]),
        "session_ms": percentiles(samples["session"]),
        "pool_rss_mb": [d["rss_mb"] for d in ok],
        "errors": errors,
        "edge": opts.edge,
    }


if __name__ == "__main__":
    sys.exit(_pool_entry(sys.argv[1:]))
