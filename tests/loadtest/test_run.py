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


def test_command_passes_the_transport_and_never_a_token(tmp_path, monkeypatch):
    monkeypatch.setenv("COGENESIS_TOKEN", "cgt1.secret.sig")
    opts = LoadtestOptions(transport="ws", gateway_url="http://gw:8000")
    cmd = locust_command(opts, "redis://r", "http://h/cloud", tmp_path / "locust", tmp_path / "r.html")
    assert cmd[cmd.index("--cg-transport") + 1] == "ws" and cmd[cmd.index("--cg-gateway-url") + 1] == "http://gw:8000"
    assert not any("cgt1" in part for part in cmd)  # tokens reach Locust in its environment only
    trusted = locust_command(LoadtestOptions(transport="redis"), "r", "h", tmp_path / "l", tmp_path / "h")
    assert trusted[trusted.index("--cg-transport") + 1] == "redis" and "--cg-gateway-url" not in trusted
    with pytest.raises(ConfigError, match="transport"):
        LoadtestOptions(transport="carrier-pigeon").validate()


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
    # how users reach the cluster (issue 15), new: devices through the gateway
    transport = {"cg_transport": "ws", "cg_gateway_url": "", "cg_token": ""}
    assert parsed["options"] == before | privacy | transport
    edge = parsed["edge"]
    assert (edge["max_new_tokens"], edge["sketch_max_tokens"], edge["top_k"]) == (32, 64, 10)
    assert (edge["max_prompt_tokens"], edge["step_timeout_s"], edge["torch_threads"]) == (512, 120.0, 1)
    assert locust_options("--cg-top-k", "7", "--cg-step-timeout", "5")["edge"]["top_k"] == 7


def test_loadtest_options_default_to_the_loadtest_config():
    opts = LoadtestOptions()
    assert (opts.max_new_tokens, opts.small_model) == (32, "embedded:small")


# A stand-in for Locust: writes a (empty) stats CSV, starts a "worker" child, logs Locust's last line, and
# then exits, or hangs in its exit as Locust did (issue 13).
FAKE_LOCUST = """
import subprocess, sys, time
prefix, how, pidfile = sys.argv[1:]
open(prefix + "_stats.csv", "w").write("Type,Name,Request Count,Failure Count\\n")
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(pidfile, "w").write(str(child.pid))
print("[x] vm/INFO/locust.main: Shutting down (exit code 0)", flush=True)
if how == "exit":
    child.terminate()
    child.wait()
    sys.exit(0)
time.sleep(600)
"""


@pytest.fixture
def fake_locust(monkeypatch, tmp_path):
    """Replace Locust's command line with FAKE_LOCUST; returns a setter for how it ends, and its child's pid file."""
    import cogenesis.loadtest.run as run

    how = {"value": "exit"}
    pidfile = tmp_path / "child.pid"
    monkeypatch.setattr(
        run,
        "locust_command",
        lambda opts, r, h, prefix, html: [sys.executable, "-c", FAKE_LOCUST, str(prefix), how["value"], str(pidfile)],
    )
    return how, pidfile


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_locust_finished_reads_its_shutdown_line(tmp_path):
    from cogenesis.loadtest.run import locust_finished

    log = tmp_path / "locust.log"
    assert not locust_finished(log)  # no log yet
    log.write_bytes(b"x" * 200_000 + b"\n[t] vm/INFO/locust.main: --run-time limit reached, shutting down\n")
    assert not locust_finished(log)
    with open(log, "ab") as f:
        f.write(b"[t] vm/INFO/locust.main: Shutting down (exit code 0)\n" + b"Type Name ...\n" * 100)
    assert locust_finished(log)


def test_a_locust_that_exits_by_itself_is_reported_so(fake_locust, tmp_path):
    opts = LoadtestOptions(run_time="1s", device="phone", out_dir=str(tmp_path / "out"), exit_grace_s=60)
    summary = run_loadtest(opts, "redis://unused", "http://unused")
    assert summary["locust_ended"] == "exited" and summary["locust_exit_code"] == 0
    assert summary["locust_exit_s"] is not None


def test_a_locust_that_hangs_in_its_exit_is_killed_with_its_workers_and_reported(fake_locust, tmp_path):
    how, pidfile = fake_locust
    how["value"] = "hang"
    opts = LoadtestOptions(run_time="1s", device="phone", out_dir=str(tmp_path / "out"), exit_grace_s=1)
    summary = run_loadtest(opts, "redis://unused", "http://unused")
    assert summary["locust_ended"] == "killed" and summary["locust_exit_code"] != 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["locust_ended"] == "killed"
    assert _gone(int(pidfile.read_text()))  # its process group went with it


def test_cogenesis_loadtest_fails_and_says_so_when_it_had_to_kill_locust(fake_locust, tmp_path, capsys, monkeypatch):
    """Through the command: a clean run returns 0; a Locust killed after its run returns 1 with a clear line."""
    import functools
    import os

    import cogenesis.loadtest.run as run
    from cogenesis.apps.cli import main
    from cogenesis.cluster.daemon import ClusterState

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    ClusterState(os.getpid(), "redis://unused", "http://unused", "", 0.0, {}).write(state_dir)  # "a running cluster"
    monkeypatch.setenv("COGENESIS_TOKEN", "a-device-token")  # devices need one: the command checks before it starts
    argv = ["loadtest", "--state-dir", str(state_dir), "--run-time", "1s", "--device", "phone", "--out"]
    assert main([*argv, str(tmp_path / "ok")]) == 0
    assert "did not exit" not in capsys.readouterr().out
    how, _ = fake_locust
    how["value"] = "hang"
    monkeypatch.setattr(run, "LoadtestOptions", functools.partial(run.LoadtestOptions, exit_grace_s=1.0))
    assert main([*argv, str(tmp_path / "hung")]) == 1
    out = capsys.readouterr().out
    assert "Locust finished its run but its process did not exit within 1 s: killed it" in out, out


@pytest.mark.slow
def test_cogenesis_loadtest_on_the_real_small_model_ends_with_locust_exiting_by_itself(background_cluster, tmp_path):
    """Issue 13: Locust said "Shutting down (exit code 0)" and then hung in interpreter exit (a stopped
    transformers executor's thread, parked on a native thread's hub) until `cogenesis loadtest` killed it.
    Through the command, on the real small model (one Locust process, as the README's command runs)."""
    _, state_dir, _ = background_cluster
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "cogenesis.apps.cli", "loadtest", "--state-dir", str(state_dir), "--users", "4"]
        + ["--spawn-rate", "4", "--run-time", "20s", "--think-time", "0..1", "--max-new-tokens", "4"]
        + ["--stop-timeout", "120", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = (out / "locust.log").read_text()[-3000:] if (out / "locust.log").is_file() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"].startswith("real") and summary["sessions"]["failed"] == 0
    assert summary["locust_ended"] == "exited" and summary["locust_exit_code"] == 0, log
    assert "interpreter exit will wait for" not in log


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
    summary = run_loadtest(opts, state.redis_url, state.http_url, secrets_dir=state.secrets_dir)
    log = (tmp_path / "locust.log").read_text()[-4000:]
    assert summary["sessions"]["failed"] == 0 and not summary["failures"] and not summary["exceptions"], log
    assert summary["users_reached"] == 8 and summary["locust_exit_code"] == 0
    assert summary["locust_ended"] == "exited", log  # the master and its --processes workers ended by themselves
    assert "interpreter exit will wait for" not in log
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
