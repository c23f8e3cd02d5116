"""The Grafana dashboard and Prometheus config reference only metrics that exist, and render to PNG."""

import json
import re
from pathlib import Path

import pytest
import yaml

from cogenesis.apps.dashboard import DASHBOARD, _legend, panels, text_to_png
from cogenesis.core import metrics
from cogenesis.core.errors import ClusterError


def _known_series() -> set[str]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    names = set()
    for reg in (metrics.CLOUD, metrics.EDGE):
        for f in text_string_to_metric_families(generate_latest(reg).decode()):
            names |= {s.name for s in f.samples}
    return names


def test_every_panel_query_uses_existing_metrics():
    known = _known_series()
    ps = panels()
    titles = " ".join(p["title"] for p in ps)
    for needed in ("Tokens/s by mode", "round trip", "Batch size", "Active sessions", "queue depth", "Lookahead"):
        assert needed in titles
    for p in ps:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            for name in re.findall(r"cogenesis_\w+", t["expr"]):
                assert name in known, (p["title"], name)
    assert json.loads(Path(DASHBOARD).read_text())["uid"] == "cogenesis-serve"


def test_prometheus_config_discovers_from_a_file():
    cfg = yaml.safe_load(Path("configs/prometheus.yml").read_text())
    job = cfg["scrape_configs"][0]
    assert job["job_name"] == "cogenesis"
    assert job["file_sd_configs"][0]["files"] == ["prometheus-targets.json"]


def test_cluster_copy_points_discovery_at_its_state_dir(tmp_path):
    from cogenesis.cluster.daemon import TARGETS_FILE, write_prometheus_config

    cfg = yaml.safe_load(write_prometheus_config(tmp_path).read_text())
    assert cfg["scrape_configs"][0]["file_sd_configs"][0]["files"] == [str(tmp_path / TARGETS_FILE)]
    assert json.loads((tmp_path / TARGETS_FILE).read_text()) == []


def test_legends_and_terminal_capture(tmp_path):
    assert _legend("edge {{mode}}", {"mode": "logits"}) == "edge logits"
    out = text_to_png("cogenesis top\n│ a │ 1 │\n", tmp_path / "top.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreachable_prometheus_is_a_clear_error(tmp_path):
    from cogenesis.apps.dashboard import render

    with pytest.raises(ClusterError, match="cannot query Prometheus"):
        render("http://127.0.0.1:9", tmp_path / "d.png", minutes=1)
