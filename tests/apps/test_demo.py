"""``cogenesis demo`` end to end (real models, Redis, Ray Serve), and a clean Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "cogenesis.apps.cli"]


def _interruptible() -> None:
    """In the child: SIGINT back to its default, so Python turns it into KeyboardInterrupt as in a terminal. A test
    run launched in the background by a shell without job control (``cmd &``) inherits SIGINT ignored, and so
    would the demo."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _started_by(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_demo_with_its_defaults_runs_every_session_ok(tmp_path):
    """`make demo` runs `cogenesis demo` with no flags, on the embedded models: the first command a user runs.
    Issue 13: it failed on a fresh 2-core machine (every sketch session timed out) and nothing caught it.
    Only --json is added (it changes nothing but writes the report)."""
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [*CLI, "demo", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,  # ~2 minutes on a 2-core machine; generous for a loaded CI runner
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    report = json.loads(out.read_text())
    sessions = report["sessions"]
    assert sorted((s["client"], s["mode"]) for s in sessions) == [
        (c, m) for c in range(4) for m in ("logits", "sketch")
    ], tail  # the defaults: 4 clients, both modes
    failed = [(s["client"], s["mode"], s["error"]) for s in sessions if "error" in s]
    assert not failed, failed
    assert all(s["tokens"] > 0 for s in sessions), sessions
    modes = report["summary"]["modes"]
    assert set(modes) == {"sketch", "logits"}
    assert report["summary"]["transport"] == "ws"  # every client a device on the gateway, with its own token
    assert all(m["failed"] == 0 and m["sessions"] == 4 and m["tokens"] > 0 for m in modes.values()), modes
    for s in sessions:
        assert s["tid"] and isinstance(s["seconds"], float) and len(s["text"].split()) >= 2
        assert 0 < s["tokens"] <= 64  # the default --max-new-tokens
    summary = report["summary"]
    assert summary["models"]["large"].endswith("smollm2-135m-instruct")  # the embedded pair
    assert summary["models"]["small_derivation"]["num_layers"] == 24
    assert summary["redis_version"] and summary["ray_version"]
    assert all(m["tokens_per_s"] > 0 for m in modes.values())
    assert "CoGenesis demo" in proc.stdout  # the summary table


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_shuts_everything_down(tmp_path, sig):
    """Ctrl-C and `kill` both stop Serve, Ray and Redis (Ray's own SIGTERM handler would abort)."""
    proc = subprocess.Popen(
        [*CLI, "demo", "--clients", "2", "--max-new-tokens", "400"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        preexec_fn=_interruptible,
    )
    seen, deadline = [], time.monotonic() + 300
    for line in proc.stdout:
        seen.append(line)
        if "cluster up" in line or time.monotonic() > deadline:
            break
    assert any("cluster up" in x for x in seen), "".join(seen)[-2000:]
    time.sleep(3)  # let sessions start
    children = _started_by(proc.pid)
    assert any("redis-server" in " ".join(c.cmdline()) for c in children if c.is_running())
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, rest[-2000:]
    assert "interrupted" in rest and "Traceback" not in rest
    time.sleep(2)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [" ".join(c.cmdline())[:120] for c in alive]
