"""`cogenesis loadtest`: a real headless Locust run (subprocess) against a real background cluster."""

import json
import subprocess
import sys

import pytest

from cogenesis.core.errors import ConfigError
from cogenesis.loadtest.run import LoadtestOptions, locust_command, parse_duration, run_loadtest


def test_durations_use_locusts_syntax():
    assert [parse_duration(t) for t in ("60", "60s", "2m", "1h30m", "1m5s")] == [60, 60, 120, 5400, 65]
    for bad in ("", "soon", "0s", "-5"):
        with pytest.raises(ConfigError):
            parse_duration(bad)


def test_options_fail_before_locust_starts():
    with pytest.raises(ConfigError, match="unknown device"):
        LoadtestOptions(device="toaster").validate()
    with pytest.raises(ConfigError, match="mode"):
        LoadtestOptions(mode="both").validate()
    with pytest.raises(ConfigError, match="does not exist"):
        LoadtestOptions(shape="configs/loadtest/nope.yaml").validate()


def test_command_names_the_user_classes_and_the_cluster(tmp_path):
    cmd = locust_command(
        LoadtestOptions(mode="mixed", processes=3, device="phone"),
        "redis://r",
        "http://h",
        tmp_path / "locust",
        tmp_path / "r.html",
    )
    assert cmd[-2:] == ["LogitsUser", "SketchUser"]
    assert "--headless" in cmd and cmd[cmd.index("--processes") + 1] == "3"
    assert cmd[cmd.index("--cg-device") + 1] == "phone" and cmd[cmd.index("--cg-redis-url") + 1] == "redis://r"
    shaped = locust_command(
        LoadtestOptions(shape="configs/loadtest/spike.yaml"), "r", "h", tmp_path / "l", tmp_path / "h"
    )
    assert "-u" not in shaped and "loadtest/shapes.py" in shaped[shaped.index("-f") + 1]


def test_locustfile_loads_in_plain_locust():
    """`locust -f loadtest/locustfile.py --list` sees the two user classes (and no abstract one)."""
    out = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--list"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "LogitsUser" in out.stdout and "SketchUser" in out.stdout and "EdgeUser" not in out.stdout


LOCUST_OPTIONS = """
import importlib.util, json, sys
from locust import argument_parser
from cogenesis.apps.flags import LOCUST
from cogenesis.core.config import EdgeConfig

spec = importlib.util.spec_from_file_location("locustfile", "loadtest/locustfile.py")
spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers its options
opts = argument_parser.parse_options(["-f", "loadtest/locustfile.py", *sys.argv[1:]])
print(json.dumps({"options": {k: v for k, v in vars(opts).items() if k.startswith("cg_")},
                  "edge": LOCUST.config(opts, EdgeConfig).model_dump()}))
"""


def locust_options(*argv: str) -> dict:
    """Locust's parsed --cg-* options and the EdgeConfig a Locust process builds from them (in a
    subprocess: Locust monkey-patches with gevent on import)."""
    out = subprocess.run(
        [sys.executable, "-c", LOCUST_OPTIONS, *argv], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_locust_options_come_from_the_config_with_the_loadtest_defaults():
    parsed = locust_options()
    # what the --cg-* options defaulted to when the locustfile declared them itself
    before = {
        "cg_max_new_tokens": 32,
        "cg_sketch_max_tokens": 64,
        "cg_top_k": 10,
        "cg_edge_prompt_tokens": 512,
        "cg_step_timeout": 120.0,
        "cg_threads": 1,
        "cg_small_model": "embedded:small",
        "cg_redis_url": "",
        "cg_http_url": "",
        "cg_device": "real",
        "cg_max_active": 0,
        "cg_think_time": "5..15",
        "cg_data": "",
        "cg_state_dir": "",
    }
    # the stream gate's options (issue 14), new: the config's defaults
    privacy = {
        "cg_span_policy": "placeholder",
        "cg_privacy_placeholder": "[private]",
        "cg_privacy_ngram": 5,
        "cg_privacy_max_hold_tokens": 16,
    }
    assert parsed["options"] == before | privacy
    edge = parsed["edge"]
    assert (edge["max_new_tokens"], edge["sketch_max_tokens"], edge["top_k"]) == (32, 64, 10)
    assert (edge["max_prompt_tokens"], edge["step_timeout_s"], edge["torch_threads"]) == (512, 120.0, 1)
    assert locust_options("--cg-top-k", "7", "--cg-step-timeout", "5")["edge"]["top_k"] == 7


def test_loadtest_options_default_to_the_loadtest_config():
    opts = LoadtestOptions()
    assert (opts.max_new_tokens, opts.small_model) == (32, "embedded:small")


@pytest.mark.slow
def test_headless_locust_run_has_sessions_and_no_failures(background_cluster, tiny_small, sample_records, tmp_path):
    state, state_dir, audit = background_cluster
    opts = LoadtestOptions(
        users=8,
        spawn_rate=8,
        run_time="20s",
        mode="mixed",
        think_time="0..2",
        processes=2,
        max_new_tokens=6,
        stop_timeout_s=60,
        small_model=str(tiny_small),
        out_dir=str(tmp_path),
    )
    summary = run_loadtest(opts, state.redis_url, state.http_url)
    log = (tmp_path / "locust.log").read_text()[-4000:]
    assert summary["sessions"]["failed"] == 0 and not summary["failures"] and not summary["exceptions"], log
    assert summary["users_reached"] == 8 and summary["locust_exit_code"] == 0
    assert set(summary["modes"]) == {"logits", "sketch"}, log
    logits = summary["modes"]["logits"]
    assert logits["sessions_ok"] > 0 and logits["tokens"] > 0
    assert logits["ttft_ms"]["p50"] > 0 and logits["itl_ms"]["p99"] > 0 and logits["step_ms"]["p50"] > 0
    assert summary["tokens_per_s"] > 0 and summary["device"].startswith("real")
    for name in (
        "report.html",
        "locust_stats.csv",
        "locust_stats_history.csv",
        "summary.json",
        "locust.log",
        "loadtest.png",
    ):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "summary.json").read_text())["sessions"] == summary["sessions"]
    import time

    import psutil

    def leftovers():
        return [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]

    deadline = time.monotonic() + 15
    while leftovers() and time.monotonic() < deadline:  # Locust's worker processes exit with it
        time.sleep(0.5)
    assert not leftovers()
    # private context stays in the Locust process: not in the cloud's model input, reports or logs
    texts = [audit.read_text(), (state_dir / "cluster.log").read_text()] + [
        (tmp_path / n).read_text() for n in ("report.html", "locust_stats.csv", "locust.log", "summary.json")
    ]
    for rec in sample_records:
        for field in rec.private_fields():
            probe = field.strip()[:60]
            if len(probe) >= 30 and probe not in rec.public_instruction:
                assert not any(probe in t for t in texts), "a private field reached the cloud or a report"
