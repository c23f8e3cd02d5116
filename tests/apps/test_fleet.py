"""`cogenesis edge`: the launcher starts pool processes of gevent clients against a real background cluster
(tiny models), follows their progress on Redis and merges their summaries."""

import json

import msgspec
import pytest
import redis

from cogenesis.apps.fleet import merge, percentiles, run_fleet, sum_progress
from cogenesis.core.config import EdgeConfig
from cogenesis.core.errors import ConfigError
from cogenesis.edge_sim.fleet import (
    FleetOptions,
    LatencySamples,
    PoolCounts,
    PoolFailed,
    PoolProgress,
    PoolSummary,
    RssMb,
    progress_key,
)


def _edge(tiny_small, **kw):
    return EdgeConfig(
        small_model=str(tiny_small),
        max_new_tokens=6,
        sketch_max_tokens=12,
        max_prompt_tokens=256,
        step_timeout_s=60,
        **kw,
    ).model_dump()


def _secrets(state) -> str | None:
    """The background cluster's secrets directory (devices' tokens are minted with its key)."""
    return getattr(state, "secrets_dir", None)


def test_unknown_device_names_the_profiles(redis_url):
    with pytest.raises(ConfigError, match="unknown device 'toaster'") as err:
        run_fleet(FleetOptions(device="toaster", duration_s=1), redis_url, "http://127.0.0.1:9")
    assert "phone" in err.value.hint


def test_percentiles_are_milliseconds():
    assert percentiles([0.001, 0.002, 0.003]) == {"p50": 2.0, "p99": 2.98}
    assert percentiles([]) == {"p50": None, "p99": None}


def test_progress_is_summed_over_the_pools_that_published(redis_url):
    rdb = redis.Redis.from_url(redis_url)
    for pool, (active, rss) in enumerate([(2, 100.04), (3, 50.03)]):
        progress = PoolProgress(pool=pool, clients=4, counts=PoolCounts(connected=4, active=active, ok=1), rss_mb=rss)
        rdb.set(progress_key("run1", pool), msgspec.json.encode(progress))
    total = sum_progress(rdb, "run1", 3)  # pool 2 has not published yet
    rdb.close()
    assert total["active"] == 5 and total["connected"] == 8 and total["ok"] == 2 and total["failed"] == 0
    assert total["clients"] == 8 and total["rss_mb"] == 150.1


@pytest.mark.slow
def test_real_device_fleet_runs_every_session_in_mixed_mode(background_cluster, tiny_small):
    state, _, audit = background_cluster
    opts = FleetOptions(
        clients=6,
        mode="mixed",
        duration_s=None,
        sessions_per_client=2,
        think_s=(0.0, 0.5),
        pools=2,
        device="real",
        edge=_edge(tiny_small),
    )
    seen = []
    report = run_fleet(
        opts, state.redis_url, state.http_url, state.ray_address, seen.append, secrets_dir=_secrets(state)
    )
    assert report["sessions"] == {"ok": 12, "failed": 0, "cut": 0}, report["errors"]
    assert report["transport"] == "ws"  # every device through the gateway, a token each
    assert report["tokens"] > 0 and report["ttft_ms"]["p50"] is not None and report["itl_ms"]["p99"] is not None
    assert report["device"].startswith("real") and report["pools"] == 2 and len(report["pool_rss_mb"]) == 2
    assert seen and max(c.get("connected", 0) for c in seen) <= 6
    json.dumps(report)


@pytest.mark.slow
def test_profile_fleet_is_named_in_the_report_and_bounded_by_duration(background_cluster, tiny_small):
    state, _, _ = background_cluster
    opts = FleetOptions(
        clients=40,
        mode="logits",
        duration_s=6.0,
        think_s=(0.5, 2.0),
        pools=1,
        device="phone",
        grace_s=60,
        edge=_edge(tiny_small),
    )
    report = run_fleet(opts, state.redis_url, state.http_url, secrets_dir=_secrets(state))
    assert report["device"].startswith("phone (simulated: 20 tok/s decode")
    assert report["sessions"]["failed"] == 0, report["errors"]
    assert report["sessions"]["ok"] >= 40  # every client ran at least one session
    assert report["peak_connected"] == 40
    assert report["seconds"] < 6.0 + 60 + 30


def test_merge_counts_a_pool_that_died_as_a_failure():
    opts = FleetOptions()
    ok = PoolSummary(
        pool=0,
        clients=1,
        seconds=10.0,
        counts=PoolCounts(ok=3, failed=1, cut=0, tokens=30),
        errors={"timeout": 1},
        samples=LatencySamples(ttft=[0.1], itl=[0.01], session=[1.0]),
        rss_mb=RssMb(start=1, end=1, peak=1),
        device_passes=None,
        device_rows=None,
    )
    report = merge([ok, PoolFailed(pool=1, code="setup")], opts, None, 10.0, 4, 8)
    assert report["sessions"] == {"ok": 3, "failed": 2, "cut": 0}
    assert report["errors"] == {"timeout": 1, "pool 1 failed: setup": 1}
    assert report["tokens_per_s"] == 3.0


@pytest.mark.slow
def test_thinking_clients_stop_when_the_duration_ends(background_cluster, tiny_small):
    """Clients asleep in a long think time end with the duration, not when their sleep would."""
    state, _, _ = background_cluster
    opts = FleetOptions(
        clients=20,
        mode="logits",
        duration_s=3.0,
        think_s=(0.0, 600.0),
        pools=1,
        device="phone",
        grace_s=60,
        edge=_edge(tiny_small),
        transport="redis",  # trusted workers on the bus
    )
    report = run_fleet(opts, state.redis_url, state.http_url, secrets_dir=_secrets(state))
    assert report["sessions"]["failed"] == 0, report["errors"]
    assert report["seconds"] < 3.0 + 60  # pool start-up + running sessions' grace, never the 600 s think


@pytest.mark.slow
def test_pools_run_as_ray_tasks_on_the_clusters_ray(background_cluster, tiny_small, tmp_path):
    """`cogenesis edge --launcher ray`: each pool is a Ray task on the cluster of `cogenesis up`."""
    import subprocess
    import sys

    _, state_dir, _ = background_cluster
    out = tmp_path / "edge.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cogenesis.apps.cli",
            "edge",
            "--state-dir",
            str(state_dir),
            "--launcher",
            "ray",
            "--clients",
            "6",
            "--pools",
            "2",
            "--sessions-per-client",
            "1",
            "--think-time",
            "0..0.5",
            "--device",
            "phone",
            "--max-new-tokens",
            "6",
            "--small-model",
            str(tiny_small),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sessions"] == {"ok": 6, "failed": 0, "cut": 0}, report["errors"]
    assert len(report["pool_rss_mb"]) == 2
    assert "device: phone (simulated" in proc.stdout
