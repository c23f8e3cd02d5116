"""A local cluster on this machine: Redis + a Ray instance + the Serve app hosting the large model."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from cogenesis.cluster.redis_server import RedisServer, free_port
from cogenesis.core.config import CloudConfig
from cogenesis.core.errors import ClusterError

if TYPE_CHECKING:
    from cogenesis.deployments.engine import EngineFactory

log = logging.getLogger(__name__)

APP_NAME = "cogenesis"

# Stay on loopback; run Ray's workers at normal priority (load generators at nice 0 starve them).
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_worker_niceness": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
}


LOG_HINT = "replica logs: /tmp/ray/session_latest/logs/serve/ (rerun with -v for more)"


def _last_error_line(error) -> str:
    """The most telling line of a Serve deployment error (its innermost exception)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln.split(":")[0] or ln.startswith("cogenesis.core.errors")]
    return (errors[-1] if errors else lines[-1] if lines else "unknown error")[:500]


@dataclass
class ClusterInfo:
    redis_url: str
    http_url: str
    redis_version: str
    ray_version: str


class LocalCluster:
    """Start (or attach to) Redis, start Ray and Serve, deploy the cloud app; stop all of it.

    ``engine_factory`` replaces ``cloud.engine_factory`` (a callable Ray can pickle, e.g. a test's fake engine)."""

    def __init__(
        self,
        cloud: CloudConfig,
        redis_url: str | None = None,
        start_timeout_s: float = 300.0,
        ray_temp_dir: str | None = None,
        engine_factory: EngineFactory | None = None,
    ) -> None:
        self.cloud = cloud
        self.engine_factory = engine_factory
        self.ray_temp_dir = ray_temp_dir
        self.external_redis = redis_url
        self.start_timeout_s = start_timeout_s
        self.redis: RedisServer | None = None
        self._ray_started = False
        self.info: ClusterInfo | None = None

    def start(self, progress=lambda msg: None) -> ClusterInfo:
        import ray
        from ray import serve

        from cogenesis.cluster.bus import connect
        from cogenesis.deployments.server import build_app

        os.environ.update(RAY_ENV)
        if self.external_redis:
            redis_url = self.external_redis
            client = connect(redis_url)
            redis_version = str(client.info("server")["redis_version"])
            client.close()
        else:
            progress("starting Redis")
            self.redis = RedisServer().start()
            redis_url, redis_version = self.redis.url, self.redis.version()
        http_port = self.cloud.http_port if _port_free(self.cloud.http_port) else free_port()
        cfg = self.cloud.model_copy(update={"redis_url": redis_url, "http_port": http_port})

        progress("starting Ray")
        # ray.init() installs a native SIGTERM handler that dumps a stack and aborts, so nothing started
        # here would be stopped; keep the owner's Python handler (the CLI's turns `kill` into Ctrl-C).
        on_term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        ray.init(
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=True,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": RAY_ENV},
            _temp_dir=self.ray_temp_dir,
        )
        self._ray_started = True
        if callable(on_term):
            signal.signal(signal.SIGTERM, on_term)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        progress(f"deploying the large model on Ray Serve ({cfg.num_replicas} replica(s))")
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        try:
            serve.run(build_app(cfg, self.engine_factory), name=APP_NAME, route_prefix=cfg.route_prefix, blocking=False)
        except RuntimeError as exc:
            raise ClusterError(f"the cloud app failed to deploy: {_last_error_line(exc)}", hint=LOG_HINT) from None
        http_url = f"http://127.0.0.1:{http_port}{cfg.route_prefix.rstrip('/')}"
        self._wait_healthy(http_url)
        self.info = ClusterInfo(redis_url, http_url, redis_version, ray.__version__)
        return self.info

    def _wait_healthy(self, http_url: str) -> None:
        from ray import serve

        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            status = serve.status().applications.get(APP_NAME)
            if status is not None and status.status == "RUNNING":
                try:
                    if httpx.get(f"{http_url}/healthz", timeout=5.0).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise ClusterError(f"the cloud app failed to deploy: {_last_error_line(status.message)}", hint=LOG_HINT)
            time.sleep(0.5)
        raise ClusterError(f"the cloud app was not healthy within {self.start_timeout_s:.0f} s", hint=LOG_HINT)

    def replica_pids(self) -> dict[str, int | None]:
        """The live replicas (a heartbeat on the bus, ``cg:alive:{replica}``) and their process ids, so a chaos
        run can kill one. A heartbeat without a pid (an older replica) is looked up in Ray's actor table."""
        from cogenesis.cluster.bus import alive_key, connect, read_alive

        if self.info is None:
            raise ClusterError("the cluster is not started", hint="call start() first")
        r = connect(self.info.redis_url)
        try:
            prefix = alive_key("")
            names = sorted(k.decode()[len(prefix) :] for k in r.scan_iter(match=prefix + "*", count=1000))
            alive = read_alive(r, names)
        finally:
            r.close()
        pids = {name: beat.get("pid") for name, beat in alive.items() if beat is not None}
        if any(pid is None for pid in pids.values()):
            actors = _replica_actor_pids()
            pids = {name: pid if pid is not None else actors.get(name) for name, pid in pids.items()}
        return pids

    def stop(self) -> None:
        if self._ray_started:
            import ray
            from ray import serve

            try:
                serve.shutdown()
            except Exception as exc:  # shutting down must go on
                log.warning("serve.shutdown failed: %s", exc)
            ray.shutdown()
            self._ray_started = False
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _replica_actor_pids() -> dict[str, int]:
    """Live Serve replicas of the app by replica id (the last part of the actor's name), from Ray's actor table."""
    from ray._private import state

    out: dict[str, int] = {}
    for actor in state.actors().values():
        name = str(actor.get("Name") or "")
        if actor.get("State") == "ALIVE" and name.startswith("SERVE_REPLICA::") and actor.get("Pid"):
            out[name.rsplit("#", 1)[-1]] = int(actor["Pid"])
    return out


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
