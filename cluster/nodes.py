"""Several Ray nodes on this machine: the documented multi-node sequence, run for tests and demos.

A real cluster starts one head (``ray start --head``) and joins every other machine to it
(``ray start --address HEAD:PORT``); this does exactly that, on one machine, each node a ``ray start --block``
process of its own (its own process group: stopping it stops that node's raylet and workers, and nothing else
of any other Ray on the machine, unlike ``ray stop``). Every node and every driver runs with Ray's token
authentication (``SecretsDir.ray_auth_env``: the token lives in the cluster's secrets directory).

On one machine the nodes share the host's network address: Ray refuses worker nodes unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``, and then names every node by the address it routes out on (not
loopback), so a multi-node cluster is reachable on that address; token authentication guards it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cogenesis.core.errors import ClusterError

log = logging.getLogger(__name__)

MAX_NODES = 16
JOIN_ATTEMPTS = 3  # a worker that could not reach the head yet (it was still starting) is started again


def ray_cli() -> str:
    """The ``ray`` command of this interpreter's environment."""
    found = Path(sys.executable).with_name("ray")
    return str(found) if found.is_file() else "ray"


def head_command(gcs_port: int, cpus: float, dashboard_port: int, temp_dir: str | None) -> list[str]:
    """``ray start --head`` of the documented sequence (dashboard on: ``serve deploy`` needs it)."""
    cmd = [ray_cli(), "start", "--head", "--block", f"--port={gcs_port}", f"--num-cpus={cpus:g}"]
    cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    cmd += ["--disable-usage-stats"]
    return cmd + ([f"--temp-dir={temp_dir}"] if temp_dir else [])


def worker_command(address: str, cpus: float) -> list[str]:
    """``ray start --address`` of the documented sequence: one more node joins the head at ``address``."""
    return [ray_cli(), "start", "--block", f"--address={address}", f"--num-cpus={cpus:g}", "--disable-usage-stats"]


def node_ip_of(log_text: str) -> str | None:
    """The address a ``ray start`` names its node by, from its output (``Local node IP: ...``); None: not yet."""
    for line in log_text.splitlines():
        if "Local node IP" in line:
            return _strip_ansi(line.rsplit(":", 1)[1]).strip()
    return None


def node_env(auth_env: dict[str, str]) -> dict[str, str]:
    """What every node and driver of a multi-node cluster on one machine needs in its environment."""
    from cogenesis.cluster.local import RAY_ENV

    return {**RAY_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", **auth_env}


@dataclass
class RayNodes:
    """``count`` Ray nodes (a head and ``count - 1`` workers) of ``cpus`` logical CPUs each.

    ``start`` returns the head's address once every node is alive in the cluster; ``stop`` ends them, workers
    first (SIGTERM to each ``ray start --block``, which stops its node's processes; SIGKILL to the node's process
    group after ``stop_timeout_s``). A start that fails stops
    what it started and says which node failed, with the tail of its log (``log_dir/node-I.log``)."""

    count: int
    auth_env: dict[str, str]
    log_dir: Path
    cpus: float = 1.0
    temp_dir: str | None = None
    stop_timeout_s: float = 30.0
    procs: list[subprocess.Popen] = field(default_factory=list)
    address: str | None = None
    dashboard_url: str | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.count <= MAX_NODES:
            raise ClusterError(
                f"a multi-node cluster has 2 to {MAX_NODES} nodes, not {self.count}",
                hint="--nodes 1 (the default) runs Ray in the cluster's own process",
            )

    def start(self, timeout_s: float = 180.0, progress=lambda msg: None) -> str:
        try:
            return self._start(timeout_s, progress)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float, progress) -> str:
        from cogenesis.cluster.redis_server import free_port

        self.log_dir.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout_s
        gcs_port, dashboard_port = free_port(), free_port()
        progress(f"starting Ray's head node (1 of {self.count})")
        self._spawn(0, head_command(gcs_port, self.cpus, dashboard_port, self.temp_dir))
        self.address = self._head_address(gcs_port, deadline)
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self._wait_nodes(1, deadline, 0)
        for i in range(1, self.count):
            progress(f"starting Ray worker node {i + 1} of {self.count}")
            for attempt in range(JOIN_ATTEMPTS):
                self._spawn(i, worker_command(self.address, self.cpus), replace=attempt > 0)
                if self._wait_nodes(i + 1, deadline, i):
                    break
            else:
                raise self._failed(i, f"did not join the head at {self.address}")
        return self.address

    def _spawn(self, index: int, cmd: list[str], replace: bool = False) -> None:
        env = {**os.environ, **node_env(self.auth_env)}
        with open(self.log_dir / f"node-{index}.log", "ab") as logf:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        if replace:
            self.procs[index] = proc
        else:
            self.procs.append(proc)

    def _head_address(self, gcs_port: int, deadline: float) -> str:
        """The head's GCS address, as the head itself reports it (the host's address: see the module doc)."""
        head_log = self.log_dir / "node-0.log"
        while time.monotonic() < deadline:
            if self.procs[0].poll() is not None:
                raise self._failed(0, f"exited with code {self.procs[0].returncode}")
            ip = node_ip_of(head_log.read_text(errors="replace"))
            if ip is not None:
                return f"{ip}:{gcs_port}"
            time.sleep(0.5)
        raise self._failed(0, "did not come up in time")

    def _wait_nodes(self, alive: int, deadline: float, index: int) -> bool:
        """True once ``alive`` nodes are alive in the cluster; False when node ``index``'s process exited (it
        may be started again); a clear error past ``deadline``."""
        while time.monotonic() < deadline:
            if self.procs[index].poll() is not None:
                if index == 0:
                    raise self._failed(0, f"exited with code {self.procs[0].returncode}")
                return False
            if self.alive_nodes() >= alive:
                return True
            time.sleep(1.0)
        raise self._failed(index, "did not come up in time")

    def alive_nodes(self) -> int:
        """How many nodes the head counts alive (``ray list nodes`` through its dashboard; 0 while it starts)."""
        import httpx

        if self.dashboard_url is None:
            return 0
        try:
            reply = httpx.get(f"{self.dashboard_url}/nodes?view=summary", headers=self._auth_header(), timeout=5.0)
            reply.raise_for_status()
            nodes = reply.json()["data"]["summary"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return 0
        return sum(1 for n in nodes if (n.get("raylet") or {}).get("state") == "ALIVE")

    def _auth_header(self) -> dict[str, str]:
        path = self.auth_env.get("RAY_AUTH_TOKEN_PATH")
        if not path:
            return {}
        return {"Authorization": f"Bearer {Path(path).read_text().strip()}"}

    def _failed(self, index: int, what: str) -> ClusterError:
        name = "the head node" if index == 0 else f"worker node {index + 1}"
        path = self.log_dir / f"node-{index}.log"
        tail = path.read_text(errors="replace").strip().splitlines()[-3:] if path.is_file() else []
        detail = f": {_strip_ansi(' | '.join(tail))[:400]}" if tail else ""
        return ClusterError(f"Ray {name} {what}{detail}", hint=f"its log: {path}")

    def stop(self) -> None:
        """Stop every node, workers first; idempotent."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops its node's processes
        for proc in reversed(self.procs):
            try:
                proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("Ray node process %d did not stop within %.0f s: killed", proc.pid, self.stop_timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.procs.clear()


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)
