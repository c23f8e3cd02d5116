"""A gevent-patched process (as Locust's) exits by itself after offloaded work that started executor threads.

Each case runs in a subprocess: gevent's monkey-patching must not reach the test process. A process that
hangs in interpreter exit shows up as a subprocess timeout (generous: a healthy one exits in seconds).
"""

import subprocess
import sys

import pytest

EXECUTOR = """
from gevent import monkey; monkey.patch_all()
import sys
from concurrent.futures import ThreadPoolExecutor
import gevent
from cogenesis.loadtest.native import offload, threads_blocking_exit

def work():  # what transformers' weight loader does: an executor, stopped without waiting for it
    pool = ThreadPoolExecutor(2)
    futures = [pool.submit(pow, 2, n) for n in range(8)]
    total = sum(f.result() for f in futures)
    pool.shutdown(wait=False, cancel_futures=True)
    return total

run = offload if sys.argv[1] == "offload" else gevent.get_hub().threadpool.apply
print("result", run(work), flush=True)
print("blocking exit:", threads_blocking_exit(), flush=True)
"""

MODEL = """
from gevent import monkey; monkey.patch_all()
import sys
from cogenesis.core.models import load_causal_lm
from cogenesis.loadtest.native import offload, threads_blocking_exit

model, tok = offload(lambda: load_causal_lm(sys.argv[1]))
print("loaded", type(model).__name__, "blocking exit:", threads_blocking_exit(), flush=True)
"""


def _run(script: str, *argv: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def test_offloaded_executor_threads_are_joined_so_the_process_exits():
    out = _run(EXECUTOR, "offload", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "result 255" in out.stdout and "blocking exit: []" in out.stdout, out.stdout


def test_without_the_join_the_stopped_executor_blocks_exit():
    """The failure the module exists for: its worker is parked on the pool thread's hub, and exit joins it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", EXECUTOR, "plain"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert first.startswith("result 255"), first
        assert "ThreadPoolExecutor-" in second and "in _worker" in second, second  # named, with where it waits
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=20)  # a healthy process has exited long before
    finally:
        proc.kill()
        proc.wait()


def test_a_model_loaded_in_a_native_thread_leaves_nothing_that_blocks_exit(tiny_small):
    out = _run(MODEL, str(tiny_small), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loaded LlamaForCausalLM blocking exit: []" in out.stdout, out.stdout
