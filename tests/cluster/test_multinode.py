"""`cogenesis up --nodes 3`: a three-node Ray cluster on this machine (the documented `ray start --head` /
`ray start --address` sequence, token authentication from the secrets directory) serving logits and sketch
sessions from replicas on two nodes, shown node by node by `cogenesis status`, reached by URL as any deployed
cluster is, with edge pools as Ray tasks spread over the nodes; stopped without leaving a Ray process."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

from cogenesis.cluster import daemon
from cogenesis.core.config import CloudConfig, EdgeConfig
from cogenesis.core.models import load_causal_lm
from cogenesis.core.secrets import ENV_DIR, SecretsDir
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.pool import EdgePool

pytestmark = pytest.mark.slow


def _ray_node_processes(state_dir) -> list[psutil.Process]:
    """The `ray start` processes of this cluster's nodes (their logs live in its state dir)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ray start" in cmd or ("/ray" in cmd and " start " in cmd and "--block" in cmd):
            found.append(p)
    return found


@pytest.fixture(scope="module")
def three_nodes(tiny_large, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("multinode-state")
    before = {p.pid for p in _ray_node_processes(state_dir)}
    cfg = CloudConfig(
        large_model=str(tiny_large), replica_cpus=0.25, torch_threads=1, num_replicas=2, max_replicas_per_node=1
    )
    state, started = daemon.up(cfg, state_dir, timeout_s=420, nodes=3)
    assert started and state.nodes == 3
    yield state, state_dir
    daemon.down(state_dir, timeout_s=60)
    assert daemon.running(state_dir) is None
    time.sleep(2)
    left = [p for p in _ray_node_processes(state_dir) if p.pid not in before and p.is_running()]
    assert not left, f"Ray node processes left running: {[p.pid for p in left]}"


def _cli(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cogenesis.apps.cli", *argv], capture_output=True, text=True, timeout=timeout
    )


def _hosting(st: dict) -> list[dict]:
    return [n for n in st.get("nodes", []) if n["replicas"]]


def _status_with_two_hosts(state_dir, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        st = daemon.status(state_dir)
        if len(st.get("nodes", [])) == 3 and len(_hosting(st)) == 2:
            return st
        assert time.monotonic() < deadline, f"status never showed 3 nodes, 2 with replicas: {st}"
        time.sleep(1)


def test_status_shows_three_nodes_and_replicas_on_two_of_them(three_nodes):
    state, state_dir = three_nodes
    st = _status_with_two_hosts(state_dir)
    assert st["healthy"] and st["ray_address"] == state.ray_address
    assert all(len(n["replicas"]) == 1 for n in _hosting(st))  # max_replicas_per_node=1: one each
    printed = _cli("status", "--json", "--state-dir", str(state_dir))
    assert printed.returncode == 0, printed.stderr[-2000:]
    shown = json.loads(printed.stdout)
    assert [n["node"] for n in shown["nodes"]] == [n["node"] for n in st["nodes"]]
    text = _cli("status", "--state-dir", str(state_dir)).stdout
    assert "nodes  3 (2 with replicas)" in text


def test_any_deployed_cluster_is_reached_by_its_urls(three_nodes):
    state, _ = three_nodes
    named = _cli(
        "status", "--json", "--redis-url", state.redis_url, "--http-url", state.http_url, "--secrets-dir",
        state.secrets_dir,
    )  # fmt: skip
    assert named.returncode == 0, named.stdout + named.stderr[-2000:]
    st = json.loads(named.stdout)
    assert st["healthy"] and len(_hosting(st)) == 2 and "pid" not in st  # seen through its URLs, not the daemon
    refused = _cli("status", "--redis-url", state.redis_url, "--http-url", state.http_url, "--secrets-dir", "/nope")
    assert refused.returncode == 1 and "does not answer" in refused.stdout


def test_logits_and_sketch_sessions_are_served_by_replicas_on_two_nodes(
    three_nodes, tiny_small, sample_records, monkeypatch
):
    state, state_dir = three_nodes
    monkeypatch.setenv(ENV_DIR, state.secrets_dir)  # a trusted worker: the cluster's edge password, worker token
    model, tok = load_causal_lm(str(tiny_small))
    cfg = EdgeConfig(max_new_tokens=4, sketch_max_tokens=8, max_prompt_tokens=384, sampling={"temperature": 0.0})
    pool = EdgePool(sample_records[:2], EdgeEngine(model, tok, cfg.max_prompt_tokens), cfg)
    served_before = _requests_by_node(daemon.status(state_dir))
    for _ in range(6):  # waves of opens: a replica that just served one queues behind the other for the next
        results = pool.run_logits(state.redis_url)
        assert [r.error for r in results] == [None, None]
        sketches = pool.run_sketch(state.http_url, token=SecretsDir(state.secrets_dir).token("worker"))
        assert [r.error for r in sketches] == [None, None]
        time.sleep(1.5)  # a heartbeat carries the counts
        grew = {
            node: n - served_before.get(node, 0)
            for node, n in _requests_by_node(daemon.status(state_dir)).items()
            if n > served_before.get(node, 0)
        }
        if len(grew) == 2:
            return
    pytest.fail(f"logits requests reached replicas on {len(grew)} node(s) only: {grew}")


def _requests_by_node(st: dict) -> dict[str, int]:
    return {n["node"]: sum(r["requests"] or 0 for r in n["replicas"]) for n in _hosting(st)}


def test_edge_pools_run_as_ray_tasks_spread_over_the_nodes(three_nodes, tiny_small, tmp_path):
    _, state_dir = three_nodes
    out = tmp_path / "edge.json"
    proc = _cli(
        "edge", "--state-dir", str(state_dir), "--launcher", "ray", "--clients", "4", "--pools", "2",
        "--sessions-per-client", "1", "--think-time", "0..0.5", "--device", "phone", "--max-new-tokens", "4",
        "--small-model", str(tiny_small), "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sessions"] == {"ok": 4, "failed": 0, "cut": 0}, report["errors"]
