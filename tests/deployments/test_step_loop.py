"""The replica's step loop over a real Redis with a tiny real model."""

import threading
import time

import pytest
import redis

from cogenesis.cluster.bus import CloudBus, EdgeBus, in_stream
from cogenesis.core.errors import SessionError
from cogenesis.core.models import load_causal_lm
from cogenesis.core.protocol import CloseSession, OpenSession, StepRequest, deadline_in, pack_ids
from cogenesis.deployments.engine import TransformersCloudEngine
from cogenesis.deployments.step_loop import StepLoop, Trace
from cogenesis.edge_sim.gate import OutboundGate

GATE = OutboundGate("Write a haiku", [])


@pytest.fixture
def loop(tiny_large, redis_url):
    model, tok = load_causal_lm(str(tiny_large))
    engine = TransformersCloudEngine(model, tok)
    loop = StepLoop(engine, CloudBus(redis_url, "r1"), threading.Lock()).start()
    yield loop
    loop.stop()


def seal(msg):
    return GATE.seal(msg)


def send_open(edge, msg):
    edge.send_many([(None, msg.session_id, seal(msg))])


def send_to(edge, replica, msg):
    edge.send_many([(replica, msg.session_id, seal(msg))])


def wait_reply(edge, session_id, step, deadline_ms):
    """One session's reply for ``step``; a refusal or a timeout is raised."""
    reply = edge.wait_many({session_id: step}, deadline_ms)[session_id]
    if isinstance(reply, Exception):
        raise reply
    return reply


def test_open_step_close_through_the_loop(loop, redis_url):
    edge = EdgeBus(redis_url)
    send_open(edge, OpenSession(session_id="s", instruction="Write a haiku", top_k=4, budget_ms=10_000))
    first = wait_reply(edge, "s", 0, deadline_in(10))
    assert first.replica == "r1" and first.top_k()[0].shape == (1, 4)
    token = int(first.top_k()[0][0, 0])
    send_to(edge, "r1", StepRequest(session_id="s", step=1, tokens=pack_ids([token]), budget_ms=10_000))
    second = wait_reply(edge, "s", 1, deadline_in(10))
    assert second.prompt_tokens == first.prompt_tokens + 1
    send_to(edge, "r1", CloseSession(session_id="s"))
    send_to(edge, "r1", StepRequest(session_id="s", step=2, tokens=pack_ids([token]), budget_ms=10_000))
    with pytest.raises(SessionError, match="unknown_session"):
        wait_reply(edge, "s", 2, deadline_in(10))


def test_malformed_messages_do_not_stop_the_loop(loop, redis_url):
    r = redis.Redis.from_url(redis_url)
    r.xadd(in_stream("r1"), {b"m": b"\x00not msgpack"})
    r.xadd(in_stream("r1"), {b"other": b"field"})
    edge = EdgeBus(redis_url)
    send_open(edge, OpenSession(session_id="ok", instruction="Hi", top_k=2, budget_ms=10_000))
    assert wait_reply(edge, "ok", 0, deadline_in(10)).step == 0
    assert loop.errors >= 2


def test_expired_deadline_gets_an_error_reply(loop, redis_url):
    edge = EdgeBus(redis_url)
    send_open(edge, OpenSession(session_id="late", instruction="Hi", top_k=2, budget_ms=0))  # spent on arrival
    with pytest.raises(SessionError, match="deadline"):
        wait_reply(edge, "late", 0, deadline_in(10))


def test_the_budget_counts_from_arrival_on_the_cloud(tiny_large, redis_url):
    """A request that waited in its stream longer than its budget (the replica was busy) is answered
    with a deadline error; one whose budget is left is served. Both clocks are the cloud's."""
    model, tok = load_causal_lm(str(tiny_large))
    engine = TransformersCloudEngine(model, tok)
    CloudBus(redis_url, "r1").close()  # create the groups before anything is queued
    edge = EdgeBus(redis_url)
    send_open(edge, OpenSession(session_id="stale", instruction="Hi", top_k=2, budget_ms=300))
    send_open(edge, OpenSession(session_id="fresh", instruction="Hi", top_k=2, budget_ms=60_000))
    time.sleep(0.6)  # queued while no replica reads
    loop = StepLoop(engine, CloudBus(redis_url, "r1"), threading.Lock()).start()
    try:
        with pytest.raises(SessionError, match="deadline: the request's time budget ran out"):
            wait_reply(edge, "stale", 0, deadline_in(10))
        fresh = wait_reply(edge, "fresh", 0, deadline_in(10))
    finally:
        loop.stop()
    assert fresh.step == 0 and fresh.traced
    assert fresh.queue_us >= 400_000  # it waited for the replica: not the exchange's overhead
    assert 0 <= fresh.model_us <= fresh.server_us


def test_trace_fields_are_durations_on_the_replicas_clock():
    trace = Trace(read_called_us=10_000_000, read_us=10_000_300, model_us=2_000, posted_us=10_002_600)
    assert trace.fields(arrived_ms=9_000) == {
        "server_us": 2_300,
        "model_us": 2_000,
        "queue_us": 999_000,
    }  # 1 s, less the ms rounding
    # an entry that arrived while the replica was reading (or in the same millisecond) did not queue
    assert trace.fields(arrived_ms=10_000)["queue_us"] == 0 and trace.fields(arrived_ms=10_001)["queue_us"] == 0


def test_bad_step_gets_a_clear_error(loop, redis_url):
    edge = EdgeBus(redis_url)
    send_open(edge, OpenSession(session_id="s", instruction="Hi", top_k=2, budget_ms=10_000))
    wait_reply(edge, "s", 0, deadline_in(10))
    send_to(edge, "r1", StepRequest(session_id="s", step=5, tokens=pack_ids([1]), budget_ms=10_000))
    with pytest.raises(SessionError, match="bad_request: .*out of order"):
        wait_reply(edge, "s", 5, deadline_in(10))


def test_pending_requests_are_served_in_one_batch(tiny_large, redis_url):
    """Requests queued while the replica is busy are served together: 6 opens with lookahead 2 take
    3 batched passes (prefill + 2 drafts), 6 steps another 3 (1 token each + 2 drafts)."""
    model, tok = load_causal_lm(str(tiny_large))
    engine = TransformersCloudEngine(model, tok)
    edge = EdgeBus(redis_url)

    def serve_queued():
        loop = StepLoop(engine, CloudBus(redis_url, "r1"), threading.Lock()).start()
        return loop

    CloudBus(redis_url, "r1").close()  # create the groups before anything is queued
    for i in range(6):
        send_open(
            edge,
            OpenSession(session_id=f"s{i}", instruction=f"Write note {i}", top_k=3, budget_ms=30_000, lookahead=2),
        )
    loop = serve_queued()
    firsts = [wait_reply(edge, f"s{i}", 0, deadline_in(30)) for i in range(6)]
    loop.stop()
    assert all(f.top_k()[0].shape == (3, 3) and f.drafts().size == 2 for f in firsts)
    assert engine.stats()["batches"] == 3
    for i, f in enumerate(firsts):  # accept the first draft token, then choose another
        send_to(
            edge,
            "r1",
            StepRequest(session_id=f"s{i}", step=1, tokens=pack_ids([int(f.drafts()[0]), 7]), budget_ms=30_000),
        )
    loop = serve_queued()
    seconds = [wait_reply(edge, f"s{i}", 1, deadline_in(30)) for i in range(6)]
    loop.stop()
    assert [s.prompt_tokens for s in seconds] == [f.prompt_tokens + 2 for f in firsts]
    assert engine.stats()["batches"] == 6 and engine.stats()["recomputes"] == 0
