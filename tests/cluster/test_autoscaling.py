"""Autoscaling on what loads the replicas: a `cogenesis up` cluster with ``cloud.autoscaling`` (1..2 replicas, two
sessions each) starts a second replica when simulated devices hold more sessions than one replica should, and
stops it when the load falls, while devices keep writing: a session on the replica that stops is resumed on the
other (its edge replays it), and none fails."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from cogenesis.cluster import daemon
from cogenesis.cluster.bus import connect, live_replicas
from cogenesis.core.config import CloudConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scaling_cluster(tiny_large, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("autoscale-state")
    cfg = CloudConfig(
        large_model=str(tiny_large),
        replica_cpus=0.25,
        torch_threads=1,
        autoscaling={
            "min_replicas": 1,
            "max_replicas": 2,
            "target_sessions": 2,
            "upscale_delay_s": 1,
            "downscale_delay_s": 5,
            "look_back_period_s": 2,
            "metrics_interval_s": 0.5,
        },
    )
    state, started = daemon.up(cfg, state_dir, timeout_s=300)
    assert started
    yield state, state_dir
    daemon.down(state_dir, timeout_s=60)


def _fleet(state_dir, tiny_small, out, clients: int, seconds: float) -> subprocess.Popen:
    """`cogenesis edge`: ``clients`` phone-speed devices writing session after session for ``seconds``."""
    cmd = [
        sys.executable, "-m", "cogenesis.apps.cli", "edge", "--state-dir", str(state_dir), "--clients", str(clients),
        "--duration", str(seconds), "--think-time", "0..0.2", "--device", "phone", "--max-new-tokens", "24",
        "--small-model", str(tiny_small), "--transport", "redis", "--json", str(out),
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _replicas(state) -> int:
    r = connect(state.redis_url, role="admin", secrets=state.secrets_dir)
    try:
        return len(live_replicas(r))
    finally:
        r.close()


def _wait(what: str, check, procs, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        for p in procs:
            assert p.poll() is None or p.returncode == 0, f"a fleet failed while waiting for {what}: {p.stderr.read()}"
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f} s"
        time.sleep(1.0)


def test_load_starts_a_second_replica_and_its_fall_stops_one_without_losing_a_session(
    scaling_cluster, tiny_small, tmp_path
):
    state, state_dir = scaling_cluster
    assert _replicas(state) == 1
    light = _fleet(state_dir, tiny_small, tmp_path / "light.json", clients=2, seconds=75)
    heavy = _fleet(state_dir, tiny_small, tmp_path / "heavy.json", clients=6, seconds=25)
    t0 = time.monotonic()
    try:
        _wait("a second replica", lambda: _replicas(state) == 2, [light, heavy], timeout_s=120)
        up_s = time.monotonic() - t0
        heavy.wait(timeout=180)  # the load falls to the light fleet's two sessions: one replica's target
        _wait("the scale-down to one replica", lambda: _replicas(state) == 1, [light], timeout_s=90)
        down_s = time.monotonic() - t0
        light.wait(timeout=240)
    finally:
        for p in (light, heavy):
            if p.poll() is None:
                p.kill()
    reports = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("light", "heavy")}
    for name, (p, report) in {"light": (light, reports["light"]), "heavy": (heavy, reports["heavy"])}.items():
        assert p.returncode == 0, f"{name}: {p.stderr.read()[-3000:]}"
        assert report["sessions"]["failed"] == 0, (name, report["errors"])
        assert report["sessions"]["ok"] > 0
    # the light fleet ran through both changes; whatever the stopped replica held was resumed, not lost
    assert reports["light"]["sessions"]["ok"] >= 4
    print(
        f"second replica after {up_s:.0f} s, back to one after {down_s:.0f} s; resumes: light "
        f"{reports['light']['resumes']}, heavy {reports['heavy']['resumes']}"
    )
