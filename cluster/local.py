"""A local cluster on this machine: Redis + a Ray instance + the Serve apps: the cloud (the large model, for
trusted workers, at ``CloudConfig.route_prefix``, ``/cloud``) and the gateway (where devices connect, at
``GatewayConfig.route_prefix``, ``/``), with the cluster's secrets directory (token key, Redis passwords)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from cogenesis.cluster.redis_server import RedisServer, find_tls_redis_server, free_port
from cogenesis.core.config import CloudConfig
from cogenesis.core.errors import ClusterError
from cogenesis.core.secrets import ENV_DIR, RedisRole, SecretsDir

if TYPE_CHECKING:
    from cogenesis.cluster.nodes import RayNodes
    from cogenesis.deployments.engine import EngineFactory

log = logging.getLogger(__name__)

APP_NAME = "cogenesis"
GATEWAY_APP = "gateway"

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
    """Where the cluster answers. ``http_url``: the cloud app (trusted workers: ``f"{http_url}/v1/sketch"``, a
    worker token); ``gateway_url``: where devices connect (None: no gateway deployed); ``secrets_dir``: the
    cluster's secrets directory (``admin.token``, ``worker.token``, the key ``cogenesis token create`` signs with)."""

    redis_url: str
    http_url: str
    redis_version: str
    ray_version: str
    gateway_url: str | None = None
    secrets_dir: str | None = None
    ray_address: str | None = None
    nodes: int = 1


def _connect(url: str, role: RedisRole | None, secrets: SecretsDir | None):
    """A Redis client as ``role`` with the cluster's credentials."""
    from cogenesis.cluster.bus import connect

    return connect(url, role=role, secrets=secrets)


class LocalCluster:
    """Start (or attach to) Redis, start Ray and Serve, deploy the cloud app and the gateway; stop all of it.

    Secrets: ``cloud.secrets_dir`` (created where missing, kept at stop: ``cogenesis up`` keeps its tokens across
    restarts), or else a fresh one in a private temporary directory, removed at stop. Its path (not a secret) is
    ``$COGENESIS_SECRETS_DIR`` in this process and in Ray's workers while the cluster runs, so every process of
    the cluster finds its credentials; the bundled Redis is locked with its ACL users.

    ``engine_factory`` replaces ``cloud.engine_factory`` (a callable Ray can pickle, e.g. a test's fake engine).

    Ray: ``nodes == 1`` starts it in this process (``ray.init``); ``nodes > 1`` runs the documented multi-node
    sequence on this machine (``cogenesis.cluster.nodes``: a ``ray start --head`` and ``nodes - 1`` ``ray start
    --address`` processes, their logs in ``log_dir``) and connects to it; Serve's replicas spread over the nodes.
    A multi-node cluster authenticates with the token of the cluster's secrets directory (``ray.token``); a
    one-node one with Ray's default (``~/.ray/auth_token``, which ``ray.init`` makes where missing)."""

    def __init__(
        self,
        cloud: CloudConfig,
        redis_url: str | None = None,
        start_timeout_s: float = 300.0,
        ray_temp_dir: str | None = None,
        engine_factory: EngineFactory | None = None,
        nodes: int = 1,
        log_dir: str | Path | None = None,
    ) -> None:
        self.cloud = cloud
        self.nodes = nodes
        self.log_dir = Path(log_dir) if log_dir else None
        self.ray_nodes: RayNodes | None = None
        self.engine_factory = engine_factory
        self.ray_temp_dir = ray_temp_dir
        self.external_redis = redis_url
        self.start_timeout_s = start_timeout_s
        self.redis: RedisServer | None = None
        self.secrets: SecretsDir | None = None
        self._own_secrets: str | None = None  # the temporary directory made for them (removed at stop)
        self._env_before: str | None = None
        self._env_set = False
        self._ray_started = False
        self._installed_users: str | None = None  # an external Redis this cluster added its users to
        self.info: ClusterInfo | None = None

    def _make_secrets(self) -> SecretsDir:
        if self.cloud.secrets_dir:
            return SecretsDir.create(self.cloud.secrets_dir)
        self._own_secrets = tempfile.mkdtemp(prefix="cogenesis-secrets-")  # mode 0700
        return SecretsDir.create(Path(self._own_secrets) / "secrets")

    def start(self, progress=lambda msg: None) -> ClusterInfo:
        """Start everything; a start that fails (or is interrupted) stops what it had started before raising."""
        try:
            return self._start(progress)
        except BaseException:
            self.stop()
            raise

    def _start(self, progress) -> ClusterInfo:
        import ray
        from ray import serve

        from cogenesis.deployments.server import build_app

        os.environ.update(RAY_ENV)
        self.secrets = secrets = self._make_secrets()
        self._env_before, self._env_set = os.environ.get(ENV_DIR), True
        os.environ[ENV_DIR] = str(secrets.path)
        if self.external_redis:
            redis_url = self.external_redis
            client = self._attach(redis_url, secrets)
            redis_version = str(client.info("server")["redis_version"])
            client.close()
        else:
            progress("starting Redis")
            binary = find_tls_redis_server() if self.cloud.redis_tls else None  # None: RedisServer says what to do
            self.redis = RedisServer(binary=binary, secrets=secrets, tls=self.cloud.redis_tls).start()
            redis_url, redis_version = self.redis.url, self.redis.version()
        http_port = self.cloud.http_port if _port_free(self.cloud.http_port) else free_port()
        cfg = self.cloud.model_copy(
            update={"redis_url": redis_url, "http_port": http_port, "secrets_dir": str(secrets.path)}
        )

        if self.nodes > 1:
            from cogenesis.cluster.nodes import RayNodes, node_env

            # Ray caches the token a process first loads: a multi-node cluster is one per process (the daemon's)
            auth_env = secrets.ray_auth_env()
            log_dir = self.log_dir or Path(self._own_secrets or secrets.path.parent) / "ray-nodes"
            self.ray_nodes = RayNodes(self.nodes, auth_env, log_dir, temp_dir=self.ray_temp_dir)
            address: str | None = self.ray_nodes.start(self.start_timeout_s, progress)
            ray_env = node_env(auth_env)
            use_ray_env(ray_env)
        else:  # Ray's own default: ray.init() makes (or reuses) ~/.ray/auth_token
            address, ray_env = None, dict(RAY_ENV)
        progress("starting Ray" if address is None else f"connecting to the {self.nodes}-node Ray cluster")
        # ray.init() installs a native SIGTERM handler that dumps a stack and aborts, so nothing started
        # here would be stopped; keep the owner's Python handler (the CLI's turns `kill` into Ctrl-C).
        on_term = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        runtime_env = {"env_vars": {**ray_env, ENV_DIR: str(secrets.path)}}  # paths, not secrets
        if address is None:
            ray.init(
                address="local",  # a Ray of its own: never one a `ray start` left on this machine (Ray's default)
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
                configure_logging=True,
                _node_ip_address="127.0.0.1",
                runtime_env=runtime_env,
                _temp_dir=self.ray_temp_dir,
            )
        else:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False, runtime_env=runtime_env)
        self._ray_started = True
        if callable(on_term):
            signal.signal(signal.SIGTERM, on_term)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        progress(f"deploying the large model on Ray Serve ({cfg.num_replicas} replica(s))")
        # one HTTP proxy, on the head: on one machine, one per node would contend for the same port
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
        base = f"http://127.0.0.1:{http_port}"
        apps = {APP_NAME: f"{base}{cfg.route_prefix.rstrip('/')}"}
        try:
            serve.run(build_app(cfg, self.engine_factory), name=APP_NAME, route_prefix=cfg.route_prefix, blocking=False)
            if cfg.gateway.enabled:
                from cogenesis.deployments.gateway import build_gateway_app

                progress("deploying the device gateway")
                gateway = build_gateway_app(cfg)
                serve.run(gateway, name=GATEWAY_APP, route_prefix=cfg.gateway.route_prefix, blocking=False)
                apps[GATEWAY_APP] = f"{base}{cfg.gateway.route_prefix.rstrip('/')}"
        except RuntimeError as exc:
            raise ClusterError(f"the app failed to deploy: {_last_error_line(exc)}", hint=LOG_HINT) from None
        self._wait_healthy(apps)
        self.info = ClusterInfo(
            redis_url,
            apps[APP_NAME],
            redis_version,
            ray.__version__,
            gateway_url=apps.get(GATEWAY_APP),
            secrets_dir=str(secrets.path),
            ray_address=ray.get_runtime_context().gcs_address,
            nodes=self.nodes,
        )
        return self.info

    def _wait_healthy(self, apps: dict[str, str]) -> None:
        """Every app (name -> its URL) RUNNING and answering ``/healthz`` 200 (its token-free ``{"ok": true}``)."""
        from ray import serve

        deadline = time.monotonic() + self.start_timeout_s
        waiting = dict(apps)
        while time.monotonic() < deadline:
            statuses = serve.status().applications
            for name, url in list(waiting.items()):
                status = statuses.get(name)
                if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                    what = "cloud app" if name == APP_NAME else f"{name} app"
                    raise ClusterError(
                        f"the {what} failed to deploy: {_last_error_line(status.message)}", hint=LOG_HINT
                    )
                if status is not None and status.status == "RUNNING":
                    try:
                        if httpx.get(f"{url}/healthz", timeout=5.0).status_code == 200:
                            del waiting[name]
                    except httpx.HTTPError:
                        pass
            if not waiting:
                return
            time.sleep(0.5)
        names = " and ".join(f"the {'cloud' if n == APP_NAME else n} app" for n in waiting)
        raise ClusterError(
            f"{names} {'were' if len(waiting) > 1 else 'was'} not healthy within {self.start_timeout_s:.0f} s",
            hint=LOG_HINT,
        )

    def _attach(self, url: str, secrets: SecretsDir):
        """An admin client of an external Redis. One without the cluster's users but open to clients without
        credentials (a test's or a developer's own) gets them (``ACL SETUSER``, removed at stop); its ``default``
        user stays as its owner set it, so such a Redis is not locked: lock it with the cluster's aclfile."""
        from cogenesis.cluster.acl import install_users
        from cogenesis.cluster.bus import safe_url

        try:
            return _connect(url, "admin", secrets)
        except ClusterError as refused:
            if "WRONGPASS" not in refused.message:
                raise
            try:
                open_client = _connect(url, None, None)
            except ClusterError:
                raise refused from None
        try:
            major = int(str(open_client.info("server")["redis_version"]).split(".")[0])
            install_users(open_client, secrets, major)
        finally:
            open_client.close()
        self._installed_users = url
        log.warning(
            "the external Redis at %s had no users of this cluster's roles: added them; it still admits clients "
            "without credentials (its default user is its owner's to lock)",
            safe_url(url),
        )
        return _connect(url, "admin", secrets)

    def replica_pids(self) -> dict[str, int | None]:
        """The live replicas (a heartbeat on the bus, ``cg:alive:{replica}``) and their process ids, so a chaos
        run can kill one. A heartbeat without a pid (an older replica) is looked up in Ray's actor table."""
        from cogenesis.cluster.bus import live_replicas

        if self.info is None:
            raise ClusterError("the cluster is not started", hint="call start() first")
        r = _connect(self.info.redis_url, "admin", self.secrets)
        try:
            alive = live_replicas(r)
        finally:
            r.close()
        pids = {name: beat.get("pid") for name, beat in alive.items()}
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
        if self.ray_nodes is not None:
            self.ray_nodes.stop()
            self.ray_nodes = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        if self._installed_users is not None:
            from cogenesis.cluster.acl import remove_users

            try:
                client = _connect(self._installed_users, None, None)
                remove_users(client)
                client.close()
            except Exception as exc:  # stopping must go on
                log.warning("could not remove this cluster's users from %s: %s", self._installed_users, exc)
            self._installed_users = None
        if self._env_set:
            if self._env_before is None:
                os.environ.pop(ENV_DIR, None)
            else:
                os.environ[ENV_DIR] = self._env_before
            self._env_set = False
        if self._own_secrets is not None:
            shutil.rmtree(self._own_secrets, ignore_errors=True)
            self._own_secrets = None
        self.secrets = None

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def use_ray_env(env: dict[str, str]) -> None:
    """Put Ray's settings in this process's environment, where Ray reads them. Ray reads its authentication mode
    when first imported: set them before, or (a process that imported Ray already) have Ray read them again."""
    os.environ.update(env)
    if "ray" in sys.modules:
        try:  # what Ray's own `_enable_token_auth` does; private, hence guarded (the env then suffices)
            from ray._raylet import Config  # type: ignore[attr-defined]

            Config.initialize("")
        except (ImportError, AttributeError) as exc:
            log.debug("could not refresh Ray's config: %s", exc)


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
