"""`cogenesis up/status/down`: a background cluster process with a state file, found again, stopped."""

import os

import httpx
import pytest

from cogenesis.cluster import daemon
from cogenesis.core.config import CloudConfig
from cogenesis.core.errors import ClusterError

pytestmark = pytest.mark.slow


def test_up_is_idempotent_and_status_reports_a_healthy_app(background_cluster):
    state, state_dir, _ = background_cluster
    again, started = daemon.up(CloudConfig(), state_dir)
    assert not started and again.pid == state.pid  # found, not started twice
    st = daemon.status(state_dir)
    assert st["running"] and st["healthy"] and st["pid"] == state.pid
    assert st["stats"]["replica"] and isinstance(st["redis_keys"], int)
    assert httpx.get(f"{state.http_url}/healthz", timeout=5).status_code == 200
    assert (state_dir / "cluster.log").is_file()


def test_status_and_down_without_a_cluster(tmp_path):
    assert daemon.status(tmp_path) == {"running": False}
    assert daemon.down(tmp_path) is None


def test_a_stale_state_file_is_cleared(tmp_path):
    dead = daemon.ClusterState(
        pid=2**22 + 12345, redis_url="redis://x", http_url="http://x", ray_address="", started_at=0.0, config={}
    )
    dead.write(tmp_path)
    assert daemon.running(tmp_path) is None
    assert not (tmp_path / "state.json").exists()


def test_a_damaged_state_file_is_a_clear_error(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ClusterError, match="damaged"):
        daemon.running(tmp_path)


def test_a_cluster_that_cannot_start_says_why(tmp_path):
    with pytest.raises(ClusterError, match="did not start") as err:
        daemon.up(CloudConfig(large_model=str(tmp_path / "no-such-model")), tmp_path, timeout_s=240)
    assert "no-such-model" in err.value.message or "cluster.log" in (err.value.hint or "")
    assert daemon.running(tmp_path) is None
    assert not any(p.name == "state.json" for p in tmp_path.iterdir())
    assert os.path.getsize(tmp_path / "cluster.log") > 0
