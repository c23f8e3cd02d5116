"""A gevent-patched process (a fleet's edge pool, a Locust process) exits by itself after offloaded work that started
executor threads.

Each case runs in a subprocess: gevent's monkey-patching must not reach the test process. A process that
hangs in interpreter exit shows up as a subprocess timeout (generous: a healthy one exits in seconds).
"""

import subprocess
import sys
import threading

import msgspec
import pytest
import redis

EXECUTOR = """
from gevent import monkey; monkey.patch_all()
import sys
from concurrent.futures import ThreadPoolExecutor
import gevent
from cogenesis.edge_sim.native import offload, threads_blocking_exit

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
from cogenesis.edge_sim.native import offload, threads_blocking_exit

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


@pytest.fixture
def replica(tiny_large, redis_url):
    """A cloud replica (its step loop in this process, on the tiny large model) for the pool to talk to."""
    from cogenesis.cluster.bus import CloudBus
    from cogenesis.core.models import load_causal_lm
    from cogenesis.deployments.engine import TransformersCloudEngine
    from cogenesis.deployments.step_loop import StepLoop

    large, tok = load_causal_lm(str(tiny_large))
    loop = StepLoop(TransformersCloudEngine(large, tok), CloudBus(redis_url, "r1"), threading.Lock()).start()
    yield loop
    loop.stop()


def test_a_fleet_pool_on_the_real_small_model_exits_by_itself_when_its_sessions_are_done(
    replica, redis_url, tiny_small
):
    """``python -m cogenesis.edge_sim.fleet`` as ``cogenesis edge`` starts it, with the small model loaded in a native
    thread: once its clients are done it publishes its summary and its process ends with 0, unsignalled (the
    launcher's SIGTERM after the summary is not what ends it)."""
    from cogenesis.edge_sim.fleet import FleetOptions, PoolSummary, decode_done, done_key

    edge = {
        "small_model": str(tiny_small),
        "max_new_tokens": 6,
        "ignore_eos": True,
        "max_prompt_tokens": 256,
        "top_k": 5,
        "torch_threads": 1,
        "sampling": {"temperature": 0.0, "top_p": 1.0, "seed": 0},
    }
    opts = FleetOptions(
        clients=2,
        mode="logits",
        duration_s=None,
        sessions_per_client=1,
        think_s=(0.0, 0.0),
        device="real",
        edge=edge,
        transport="redis",  # a trusted worker on the bus: this test's replica has no gateway in front
    )
    argv = [sys.executable, "-m", "cogenesis.edge_sim.fleet", "--run-id", "exit", "--pool", "0"]
    argv += ["--redis-url", redis_url, "--http-url", "http://127.0.0.1:9", "--options", msgspec.json.encode(opts)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    r = redis.Redis.from_url(redis_url)
    try:
        out, _ = proc.communicate(timeout=120)  # a healthy pool exits seconds after its sessions end
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        done = "after publishing its result" if r.llen(done_key("exit")) else "and published no result"
        pytest.fail(f"the pool did not exit by itself {done}:\n{out[-3000:]}")
    finally:
        raws = r.lrange(done_key("exit"), 0, -1)
        r.close()
    assert proc.returncode == 0, out[-3000:]
    (raw,) = raws
    summary = decode_done(raw)
    assert isinstance(summary, PoolSummary), summary
    assert (summary.counts.ok, summary.counts.failed, summary.counts.tokens) == (2, 0, 12), summary
