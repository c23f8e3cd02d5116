"""``cogenesis edge``: thousands of simulated clients against a running cluster.

The launcher starts ``--pools`` pool processes (``python -m cogenesis.edge_sim.fleet``), or Ray tasks
that run them, spread over the Ray cluster's nodes. It follows the pools' progress on Redis (one
line, wherever the pools run) and merges their summaries into the report. What a pool does, and
the typed messages it publishes (numbers and error codes, never a pool's text), are in
``cogenesis.edge_sim.fleet``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np
import redis

from cogenesis.cluster.bus import connect
from cogenesis.core.errors import ClusterError
from cogenesis.core.secrets import ENV_DIR, ENV_TOKEN
from cogenesis.edge_sim.fleet import (
    FleetOptions,
    LatencySamples,
    PoolCounts,
    PoolFailed,
    PoolSummary,
    decode_done,
    decode_progress,
    done_key,
    progress_key,
)

if TYPE_CHECKING:
    from cogenesis.edge_sim.device import DeviceProfile

ROOT = Path(__file__).resolve().parents[2]  # the pools run from the checkout, as this process does
LAUNCH_MARGIN_S = 600  # pools start (models load) within this, beyond the duration and grace

Progress = Callable[[dict], None]


def _no_progress(counts: dict) -> None:
    pass


def run_fleet(
    opts: FleetOptions,
    redis_url: str,
    http_url: str,
    ray_address: str | None = None,
    progress: Progress = _no_progress,
    secrets_dir: str | None = None,
    ray_env: dict[str, str] | None = None,
) -> dict:
    """Start the pools, follow their progress, merge their summaries; returns the report.
    ``progress`` gets the pools' summed counters about every second; ``ray_env``: what a driver of the cluster's Ray
    needs in its environment (``--launcher ray`` on a multi-node cluster: ``Where.ray_env``)."""
    from cogenesis.edge_sim.device import resolve_device  # torch: not in the module a Ray task imports

    opts.validate()
    profile = resolve_device(opts.device)  # a bad name fails here, before any process starts
    opts.pools = min(opts.pools, opts.clients)
    run_id = uuid.uuid4().hex[:12]
    secrets_dir = secrets_dir or os.environ.get(ENV_DIR)  # a path, not a secret: the pools read the password there
    cmds = [pool_command(run_id, i, opts, redis_url, http_url, secrets_dir) for i in range(opts.pools)]
    rdb = connect(redis_url, role="edge", secrets=secrets_dir)
    t0 = time.perf_counter()
    pools = _start_on_ray(cmds, ray_address, ray_env) if opts.launcher == "ray" else _start_local(cmds)
    try:
        followed = _follow(rdb, run_id, opts, pools, t0, progress)
    finally:
        pools.stop()
        rdb.close()
    return merge(followed.done, opts, profile, time.perf_counter() - t0, followed.peak_active, followed.peak_connected)


def pool_command(
    run_id: str, pool: int, opts: FleetOptions, redis_url: str, http_url: str, secrets_dir: str | None = None
) -> list[str]:
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
        msgspec.json.encode(opts).decode(),
        *(["--secrets-dir", secrets_dir] if secrets_dir else []),
    ]


# ---- starting and stopping the pools ------------------------------------------------------------


@dataclass
class _Pools:
    """The started pools: local processes, or Ray tasks (each runs one pool process on its node)."""

    procs: list[subprocess.Popen] = field(default_factory=list)
    ray_tasks: list = field(default_factory=list)

    def failed_to_start(self) -> list[subprocess.Popen]:
        """Local pool processes that already exited with an error."""
        return [p for p in self.procs if p.poll() is not None and p.returncode != 0]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.ray_tasks:
            import ray

            ray.wait(self.ray_tasks, num_returns=len(self.ray_tasks), timeout=30)


def _start_local(cmds: list[list[str]]) -> _Pools:
    return _Pools(procs=[subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.DEVNULL) for cmd in cmds])


def _start_on_ray(cmds: list[list[str]], ray_address: str | None, ray_env: dict[str, str] | None = None) -> _Pools:
    from cogenesis.cluster.local import RAY_ENV

    os.environ.update(RAY_ENV)
    # Ray 2.60 authenticates every driver with the cluster's token, sent only in token mode, which Ray reads when
    # first imported: ``ray_env`` names a multi-node cluster's (its secrets directory's ray.token: ``Where.ray_env``);
    # a one-node local cluster's is the one ray.init wrote (~/.ray/auth_token)
    if ray_env:
        os.environ.update(ray_env)
    elif (Path.home() / ".ray" / "auth_token").is_file() or os.environ.get("RAY_AUTH_TOKEN"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_address, logging_level=logging.WARNING, log_to_driver=False)
    task = ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(_run_pool_on_ray)
    # an explicit device token (--token) reaches the pools in their environment, as it does local ones: never
    # on a command line (a pool without one mints its devices' tokens from the secrets directory)
    env = {ENV_TOKEN: os.environ[ENV_TOKEN]} if os.environ.get(ENV_TOKEN) else {}
    return _Pools(ray_tasks=[task.remote(cmd, str(ROOT), env) for cmd in cmds])


def _run_pool_on_ray(cmd: list[str], cwd: str, env: dict[str, str]) -> int:
    return subprocess.call(cmd, cwd=cwd, env={**os.environ, **env})


# ---- following their progress -------------------------------------------------------------------


@dataclass
class _Followed:
    done: list[PoolSummary | PoolFailed] = field(default_factory=list)
    peak_active: int = 0
    peak_connected: int = 0


def _follow(
    rdb: redis.Redis, run_id: str, opts: FleetOptions, pools: _Pools, t0: float, progress: Progress
) -> _Followed:
    """Wait for every pool's result, passing the summed progress on about every second."""
    limit = (opts.duration_s + opts.grace_s + LAUNCH_MARGIN_S) if opts.duration_s is not None else None
    followed = _Followed()
    while len(followed.done) < opts.pools:
        got = rdb.blpop([done_key(run_id)], timeout=1)
        if got:
            followed.done.append(decode_done(got[1]))
        counts = sum_progress(rdb, run_id, opts.pools)
        followed.peak_active = max(followed.peak_active, counts["active"])
        followed.peak_connected = max(followed.peak_connected, counts["connected"])
        progress({**counts, "elapsed_s": time.perf_counter() - t0, "pools_done": len(followed.done)})
        dead = pools.failed_to_start()
        if dead and len(followed.done) < opts.pools and not rdb.llen(done_key(run_id)):
            raise ClusterError(
                f"{len(dead)} edge pool process(es) exited with code {dead[0].returncode} before reporting",
                hint="rerun with -v; the pool's error is printed above",
            )
        if limit is not None and time.perf_counter() - t0 > limit:
            raise ClusterError(f"edge pools did not finish within {limit:.0f} s")
    return followed


def sum_progress(rdb: redis.Redis, run_id: str, pools: int) -> dict:
    """The pools' latest progress, summed (a pool that has not published yet counts nothing)."""
    raw = rdb.mget([progress_key(run_id, i) for i in range(pools)])
    latest = [decode_progress(r) for r in raw if r is not None]
    total: dict = {name: sum(getattr(p.counts, name) for p in latest) for name in PoolCounts.__struct_fields__}
    total["clients"] = sum(p.clients for p in latest)
    total["rss_mb"] = round(sum(p.rss_mb for p in latest), 1)
    return total


# ---- the report ---------------------------------------------------------------------------------


def percentiles(xs: Sequence[float], qs: Sequence[int] = (50, 99)) -> dict[str, float | None]:
    """Percentiles of seconds, in milliseconds."""
    if not len(xs):
        return {f"p{q}": None for q in qs}
    arr = np.asarray(xs, dtype=float)
    return {f"p{q}": round(float(np.percentile(arr, q)) * 1000, 2) for q in qs}


def merge(
    done: Sequence[PoolSummary | PoolFailed],
    opts: FleetOptions,
    profile: DeviceProfile | None,
    seconds: float,
    peak_active: int,
    peak_connected: int,
) -> dict:
    """The fleet's report from its pools' results (a pool that failed counts as one failed session).
    ``errors``: failed sessions by error code, and ``pool N failed: <code>`` for a pool that could not run."""
    from cogenesis.edge_sim.device import describe

    ok = [d for d in done if isinstance(d, PoolSummary)]
    fatal = [d for d in done if isinstance(d, PoolFailed)]
    errors: dict[str, int] = {}
    for d in ok:
        for k, v in d.errors.items():
            errors[k] = errors.get(k, 0) + v
    for f in fatal:
        errors[f"pool {f.pool} failed: {f.code}"] = 1
    samples = {k: [x for d in ok for x in getattr(d.samples, k)] for k in LatencySamples.__struct_fields__}
    tokens = sum(d.counts.tokens for d in ok)
    return {
        "clients": opts.clients,
        "pools": opts.pools,
        "mode": opts.mode,
        "transport": opts.transport,
        "device": describe(profile, "pool"),
        "think_s": list(opts.think_s),
        "duration_s": opts.duration_s,
        "sessions_per_client": opts.sessions_per_client,
        "max_active_per_pool": opts.max_active,
        "seconds": round(seconds, 1),
        "sessions": {
            "ok": sum(d.counts.ok for d in ok),
            "failed": sum(d.counts.failed for d in ok) + len(fatal),
            "cut": sum(d.counts.cut for d in ok),
        },
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
        "resumes": sum(d.counts.resumes for d in ok),
        "peak_connected": peak_connected,
        "peak_active": peak_active,
        "ttft_ms": percentiles(samples["ttft"]),
        "itl_ms": percentiles(samples["itl"]),
        "session_ms": percentiles(samples["session"]),
        "pool_rss_mb": [msgspec.structs.asdict(d.rss_mb) for d in ok],
        "errors": errors,
        "edge": opts.edge,
    }
