"""A real Prometheus (Debian's `prometheus`, installed by `make setup`) scrapes a running cluster under
a short load; tokens/s and the p99 step round trip come back through its HTTP API."""

import json
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from cogenesis.apps.fleet import run_fleet
from cogenesis.cluster.redis_server import free_port
from cogenesis.edge_sim.fleet import FleetOptions

pytestmark = pytest.mark.slow

PROMETHEUS = shutil.which("prometheus")


def _query(base: str, expr: str) -> list:
    r = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", r
    return r["data"]["result"]


@pytest.mark.skipif(
    PROMETHEUS is None,
    reason="the `prometheus` binary is not installed: `make setup` installs "
    "Debian's package where apt-get can (as root); install it to run this test",
)
def test_prometheus_scrapes_throughput_and_round_trip_under_load(background_cluster, tiny_small, tmp_path):
    from cogenesis.core.config import EdgeConfig

    state, state_dir, _ = background_cluster
    config = state_dir / "prometheus.yml"
    assert config.is_file()  # written by the cluster, pointed at its discovery file
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "wb"),
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("prometheus did not become ready: " + (tmp_path / "prometheus.log").read_text()[-2000:])
        edge = EdgeConfig(
            small_model=str(tiny_small), max_new_tokens=24, max_prompt_tokens=256, ignore_eos=True, step_timeout_s=60
        ).model_dump()
        top = subprocess.Popen(  # `cogenesis top` while the load runs: it finds the replica and the pool
            f"sleep 12 && {sys.executable} -m cogenesis.apps.cli top --once --json --interval 5 --state-dir {state_dir}",
            shell=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        report = run_fleet(
            FleetOptions(
                clients=12,
                mode="logits",
                duration_s=25.0,
                think_s=(0.0, 1.0),
                pools=1,
                device="phone",
                grace_s=60,
                edge=edge,
            ),
            state.redis_url,
            state.http_url,
            secrets_dir=state.secrets_dir,
        )
        assert report["sessions"]["failed"] == 0 and report["sessions"]["ok"] > 0
        out, err = top.communicate(timeout=60)
        assert top.returncode == 0, err[-2000:]
        seen = json.loads(out)
        assert seen["targets"] >= 2 and not seen["errors"]
        assert seen["edge_tokens_per_s"]["logits"] > 0 and seen["roundtrip_ms"]["p99"] > 0
        time.sleep(6)  # one more scrape after the last session
        up = _query(base, 'up{job="cogenesis"}')
        assert {r["metric"]["role"] for r in up} >= {"cloud"}  # discovered through the cluster's file
        tokens = _query(base, "sum(max_over_time(rate(cogenesis_edge_tokens_total[20s])[2m:5s]))")
        assert tokens and float(tokens[0]["value"][1]) > 0
        cloud = _query(base, "sum(increase(cogenesis_cloud_tokens_total[2m]))")
        assert cloud and float(cloud[0]["value"][1]) > 0
        p99 = _query(
            base,
            "max_over_time(histogram_quantile(0.99, sum by (le) "
            "(rate(cogenesis_step_roundtrip_seconds_bucket[20s])))[2m:5s])",
        )
        assert p99 and 0 < float(p99[0]["value"][1]) < 60
        from cogenesis.apps.dashboard import render  # the dashboard's own queries work against it too

        png = render(base, tmp_path / "dashboard.png", minutes=2)
        assert png.stat().st_size > 10_000
    finally:
        proc.terminate()
        proc.wait(timeout=30)
