"""A local cluster in the background: ``cogenesis up`` / ``cogenesis status`` / ``cogenesis down``.

``up`` starts this module as a detached process (its own session) that runs a ``LocalCluster``
(Redis + Ray head + the Serve app), writes ``state.json`` once the app is healthy and then waits
for SIGTERM, on which it shuts everything down and removes the state file. Its log is
``cluster.log`` beside it. The state directory is ``$COGENESIS_HOME/cluster`` (or ``--state-dir``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from cogenesis.cluster.bus import connect
from cogenesis.core import metrics
from cogenesis.core.auth import bearer_header
from cogenesis.core.config import CloudConfig
from cogenesis.core.errors import ClusterError, CoGenesisError
from cogenesis.core.secrets import ENV_DIR

log = logging.getLogger(__name__)


def default_state_dir() -> Path:
    from cogenesis.core.models import cogenesis_home

    return cogenesis_home() / "cluster"


@dataclass
class ClusterState:
    pid: int
    redis_url: str
    http_url: str
    ray_address: str
    started_at: float
    config: dict
    secrets_dir: str | None = None  # the cluster's secrets (a path; clients read their Redis password there)
    gateway_url: str | None = None  # where devices connect (None: no gateway deployed)
    nodes: int = 1  # Ray nodes started on this machine (``cogenesis up --nodes``)

    @classmethod
    def read(cls, state_dir: Path) -> ClusterState | None:
        path = Path(state_dir) / "state.json"
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ClusterError(f"{path} is damaged ({exc})", hint=f"run `cogenesis down` or delete {path}") from None

    def write(self, state_dir: Path) -> None:
        tmp = Path(state_dir) / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(Path(state_dir) / "state.json")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _log_tail(state_dir: Path, lines: int = 8) -> str:
    path = Path(state_dir) / "cluster.log"
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def running(state_dir: Path | None = None) -> ClusterState | None:
    """The running cluster's state, or None (a stale state file, left by a killed daemon, is removed)."""
    state_dir = Path(state_dir or default_state_dir())
    state = ClusterState.read(state_dir)
    if state is None:
        return None
    if not _alive(state.pid):
        (state_dir / "state.json").unlink(missing_ok=True)
        return None
    return state


def up(
    cloud: CloudConfig,
    state_dir: Path | None = None,
    timeout_s: float = 600.0,
    progress=lambda msg: None,
    nodes: int = 1,
) -> tuple[ClusterState, bool]:
    """Start the background cluster unless one runs; returns (state, started_now). ``nodes > 1``: that many Ray
    nodes on this machine (``cogenesis.cluster.nodes``), their logs in ``state_dir/ray-nodes``."""
    state_dir = Path(state_dir or default_state_dir())
    state_dir.mkdir(parents=True, exist_ok=True)
    if (state := running(state_dir)) is not None:
        return state, False
    if not cloud.secrets_dir:  # kept across restarts, so device tokens handed out stay valid
        cloud = cloud.model_copy(update={"secrets_dir": str(state_dir / "secrets")})
    (state_dir / "failed").unlink(missing_ok=True)
    logf = open(state_dir / "cluster.log", "ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cogenesis.cluster.daemon",
            "--state-dir",
            str(state_dir),
            "--config",
            cloud.model_dump_json(),
            "--nodes",
            str(nodes),
        ],
        stdin=subprocess.DEVNULL,
        stdout=logf,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    logf.close()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = ClusterState.read(state_dir)
        if state is not None and state.pid == proc.pid:
            return state, True
        if proc.poll() is not None:
            reason = (state_dir / "failed").read_text() if (state_dir / "failed").is_file() else _log_tail(state_dir)
            raise ClusterError(
                f"the cluster did not start: {reason.strip() or f'exit code {proc.returncode}'}",
                hint=f"full log: {state_dir / 'cluster.log'}",
            )
        progress(_last_progress(state_dir))
        time.sleep(0.5)
    _stop_pid(proc.pid, 30.0)
    raise ClusterError(
        f"the cluster was not up within {timeout_s:.0f} s (stopped it)",
        hint=f"see {state_dir / 'cluster.log'}; the first start converts the models (minutes)",
    )


def _last_progress(state_dir: Path) -> str:
    for line in reversed(_log_tail(state_dir, 20).splitlines()):
        if "cluster: " in line:
            return line.split("cluster: ", 1)[1]
    return "starting"


def down(state_dir: Path | None = None, timeout_s: float = 60.0) -> ClusterState | None:
    """Stop the background cluster (SIGTERM, then SIGKILL of its process group after ``timeout_s``)."""
    state_dir = Path(state_dir or default_state_dir())
    state = running(state_dir)
    if state is None:
        return None
    _stop_pid(state.pid, timeout_s)
    (state_dir / "state.json").unlink(missing_ok=True)
    return state


def _stop_pid(pid: int, timeout_s: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    if _alive(pid):
        log.warning("cluster process %d did not stop within %.0f s; killing its process group", pid, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def status(state_dir: Path | None = None, timeout_s: float = 5.0) -> dict:
    """What runs: the background cluster's process, then what ``cluster_status`` sees of it."""
    state = running(state_dir)
    if state is None:
        return {"running": False}
    out = {
        "running": True,
        "pid": state.pid,
        "uptime_s": round(time.time() - state.started_at, 1),
        "ray_address": state.ray_address,
        "large_model": state.config.get("large_model"),
        "replicas": state.config.get("num_replicas"),
        "autoscaling": state.config.get("autoscaling"),
    }
    ray_nodes = _read_nodes(Path(state_dir or default_state_dir()))
    seen = cluster_status(state.redis_url, state.http_url, state.secrets_dir, state.gateway_url, timeout_s, ray_nodes)
    return {**out, **seen}


def cluster_status(
    redis_url: str,
    http_url: str | None,
    secrets_dir: str | None,
    gateway_url: str | None = None,
    timeout_s: float = 5.0,
    ray_nodes: list[dict] | None = None,
) -> dict:
    """What any deployed cluster shows through its URLs (as its admin: the secrets directory's admin token and
    Redis password): the cloud app's health and one replica's stats (HTTP), and from the replicas' heartbeats on
    the bus every live replica, grouped by the Ray node it runs on (``nodes``: each node with its ``replicas`` and
    the sessions each holds). ``ray_nodes`` (``cogenesis up`` records them) adds nodes that host no replica."""
    from cogenesis.cluster.bus import live_replicas

    out: dict = {
        "redis_url": redis_url,
        "http_url": http_url,
        "gateway_url": gateway_url,
        "secrets_dir": secrets_dir,
    }
    if http_url:
        headers = _admin_headers(secrets_dir)
        try:
            out["healthy"] = httpx.get(f"{http_url}/healthz", timeout=timeout_s).status_code == 200
            reply = httpx.get(f"{http_url}/v1/stats", headers=headers, timeout=timeout_s)
            reply.raise_for_status()
            out["stats"] = reply.json()
        except (httpx.HTTPError, ValueError) as exc:
            out["healthy"], out["error"] = False, f"{type(exc).__name__}: {exc}"
    try:
        client = connect(redis_url, timeout_s, role="admin", secrets=secrets_dir)
        try:
            out["redis_keys"] = client.dbsize()
            out["nodes"] = group_by_node(live_replicas(client), ray_nodes or [])
        finally:
            client.close()
    except CoGenesisError as exc:  # unreachable, or refused (wrong secrets): said, not raised
        out["redis_error"] = exc.message
    return out


def group_by_node(beats: dict[str, dict], ray_nodes: list[dict]) -> list[dict]:
    """Live replicas (their heartbeats, by name) grouped by Ray node: ``[{"node", "address", "replicas": [{"replica",
    "pid", "sessions", "outlines", "requests"}]}]`` (what each holds now, and the bus requests it served since it
    started). Nodes in ``ray_nodes`` order come first (those without replicas too), then any other node a replica
    names; a replica that names none (outside Ray) is under node ``"?"``."""
    nodes: dict[str, dict] = {
        n["node"]: {"node": n["node"], "address": n.get("address"), "replicas": []} for n in ray_nodes
    }
    for name, beat in sorted(beats.items()):
        node = str(beat.get("node") or "?")
        entry = nodes.setdefault(node, {"node": node, "address": beat.get("node_ip"), "replicas": []})
        entry["address"] = entry["address"] or beat.get("node_ip")
        entry["replicas"].append(
            {
                "replica": name,
                "pid": beat.get("pid"),
                "sessions": beat.get("sessions"),
                "outlines": beat.get("outlines"),
                "requests": beat.get("requests"),
            }
        )
    return list(nodes.values())


NODES_FILE = "nodes.json"


def _read_nodes(state_dir: Path) -> list[dict]:
    """The Ray nodes the daemon last saw alive (``nodes.json``; empty when unreadable)."""
    try:
        found = json.loads((state_dir / NODES_FILE).read_text())
        return [n for n in found if isinstance(n, dict) and "node" in n]
    except (OSError, ValueError, TypeError):
        return []


def _write_nodes(state_dir: Path) -> None:
    """Ray's alive nodes (id, address, CPUs) to ``nodes.json``, for ``cogenesis status``."""
    import ray

    nodes = [
        {"node": n["NodeID"], "address": n.get("NodeManagerAddress"), "cpus": (n.get("Resources") or {}).get("CPU")}
        for n in ray.nodes()
        if n.get("Alive")
    ]
    tmp = state_dir / (NODES_FILE + ".tmp")
    tmp.write_text(json.dumps(nodes, indent=1))
    tmp.replace(state_dir / NODES_FILE)


def _serve(state_dir: Path, cloud: CloudConfig, nodes: int = 1) -> int:
    import ray

    from cogenesis.cluster.local import LocalCluster

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cluster = LocalCluster(cloud, nodes=nodes, log_dir=state_dir / "ray-nodes")
    try:
        info = cluster.start(progress=lambda msg: log.info("cluster: %s", msg))
        ClusterState(
            os.getpid(),
            info.redis_url,
            info.http_url,
            ray.get_runtime_context().gcs_address,
            time.time(),
            cloud.model_dump(),
            _secrets_path(info, cloud),
            info.gateway_url,
            nodes,
        ).write(state_dir)
        log.info("cluster: up (redis %s, http %s)", info.redis_url, info.http_url)
        write_prometheus_config(state_dir)
        bus = connect(info.redis_url, role="admin", secrets=_secrets_path(info, cloud))
        _refresh(state_dir, bus)
        while not stop.wait(5.0):  # keep Prometheus' file discovery and the node list current
            _refresh(state_dir, bus)
        log.info("cluster: stopping")
        return 0
    except Exception as exc:
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        (state_dir / "failed").write_text(message)
        log.error("cluster: failed: %s", message)
        return 1
    finally:
        cluster.stop()
        (state_dir / "state.json").unlink(missing_ok=True)
        (state_dir / NODES_FILE).unlink(missing_ok=True)
        log.info("cluster: stopped")


def _refresh(state_dir: Path, bus) -> None:
    """Prometheus' discovery file (what announces itself on the bus) and the Ray node list; a failure is logged,
    never fatal."""
    for what, refresh in (
        (TARGETS_FILE, lambda: metrics.write_file_sd(state_dir / TARGETS_FILE, metrics.targets(bus))),
        (NODES_FILE, lambda: _write_nodes(state_dir)),
    ):
        try:
            refresh()
        except Exception as exc:  # discovery must not take the cluster down
            log.warning("cluster: could not refresh %s: %s", what, exc)


def _admin_headers(secrets_dir: str | None) -> dict[str, str]:
    """The admin bearer header from the cluster's secrets directory (none: a cluster without secrets)."""
    from cogenesis.core.secrets import stored_token

    try:
        token = stored_token("admin", secrets_dir) if secrets_dir else None
        return bearer_header(token)
    except CoGenesisError:  # unreadable: status says the stats were refused
        return {}


def _secrets_path(info: object, cloud: CloudConfig) -> str | None:
    """The started cluster's secrets directory (``ClusterInfo.secrets_dir``), else the configured one."""
    found = getattr(info, "secrets_dir", None) or cloud.secrets_dir or os.environ.get(ENV_DIR)
    return str(found) if found else None


TARGETS_FILE = "prometheus-targets.json"
PROMETHEUS_TEMPLATE = Path(__file__).resolve().parent.parent / "configs" / "prometheus.yml"


def write_prometheus_config(state_dir: Path) -> Path:
    """``configs/prometheus.yml`` with its discovery file pointed at this cluster's targets."""
    text = PROMETHEUS_TEMPLATE.read_text().replace("prometheus-targets.json", str(Path(state_dir) / TARGETS_FILE))
    out = Path(state_dir) / "prometheus.yml"
    out.write_text(text)
    metrics.write_file_sd(Path(state_dir) / TARGETS_FILE, {})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the background cluster process (started by `cogenesis up`)")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--config", required=True, help="CloudConfig as JSON")
    parser.add_argument("--nodes", type=int, default=1, help="Ray nodes to start on this machine")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cloud = CloudConfig.model_validate_json(args.config)
    if args.nodes > 1 and cloud.secrets_dir:  # Ray reads its authentication mode when first imported: set it now
        from cogenesis.cluster.local import use_ray_env
        from cogenesis.cluster.nodes import node_env
        from cogenesis.core.secrets import SecretsDir

        use_ray_env(node_env(SecretsDir.create(cloud.secrets_dir).ray_auth_env()))
    return _serve(Path(args.state_dir), cloud, args.nodes)


if __name__ == "__main__":
    sys.exit(main())
