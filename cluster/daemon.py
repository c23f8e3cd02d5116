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
    cloud: CloudConfig, state_dir: Path | None = None, timeout_s: float = 600.0, progress=lambda msg: None
) -> tuple[ClusterState, bool]:
    """Start the background cluster unless one runs; returns (state, started_now)."""
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
    """What runs: process, Redis, the Serve app's health and its replicas' stats."""
    state = running(state_dir)
    if state is None:
        return {"running": False}
    out = {
        "running": True,
        "pid": state.pid,
        "uptime_s": round(time.time() - state.started_at, 1),
        "redis_url": state.redis_url,
        "http_url": state.http_url,
        "ray_address": state.ray_address,
        "large_model": state.config.get("large_model"),
        "replicas": state.config.get("num_replicas"),
        "gateway_url": state.gateway_url,
        "secrets_dir": state.secrets_dir,
    }
    headers = _admin_headers(state.secrets_dir)
    try:
        out["healthy"] = httpx.get(f"{state.http_url}/healthz", timeout=timeout_s).status_code == 200
        reply = httpx.get(f"{state.http_url}/v1/stats", headers=headers, timeout=timeout_s)
        reply.raise_for_status()
        out["stats"] = reply.json()
    except (httpx.HTTPError, ValueError) as exc:
        out["healthy"], out["error"] = False, f"{type(exc).__name__}: {exc}"
    try:
        from cogenesis.cluster.bus import connect

        client = connect(state.redis_url, timeout_s, role="admin", secrets=state.secrets_dir)
        out["redis_keys"] = client.dbsize()
        client.close()
    except ClusterError as exc:
        out["redis_error"] = exc.message
    return out


def _serve(state_dir: Path, cloud: CloudConfig) -> int:
    import ray

    from cogenesis.cluster.local import LocalCluster

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cluster = LocalCluster(cloud)
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
        ).write(state_dir)
        log.info("cluster: up (redis %s, http %s)", info.redis_url, info.http_url)
        write_prometheus_config(state_dir)
        bus = connect(info.redis_url, role="admin", secrets=_secrets_path(info, cloud))
        while not stop.wait(5.0):  # keep Prometheus' file discovery current with what announces itself
            try:
                metrics.write_file_sd(state_dir / TARGETS_FILE, metrics.targets(bus))
            except Exception as exc:  # discovery must not take the cluster down
                log.warning("cluster: could not refresh %s: %s", TARGETS_FILE, exc)
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
        log.info("cluster: stopped")


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return _serve(Path(args.state_dir), CloudConfig.model_validate_json(args.config))


if __name__ == "__main__":
    sys.exit(main())
