"""The replica's step loop over a real Redis with a tiny real model."""

import threading

import pytest
import redis

from cogenesis.cluster.bus import CloudBus, EdgeBus, Sealed, in_stream
from cogenesis.core.errors import SessionError
from cogenesis.core.models import load_causal_lm
from cogenesis.core.protocol import CloseSession, OpenSession, StepRequest, deadline_in, encode, now_ms, pack_ids
from cogenesis.deployments.engine import TransformersCloudEngine
from cogenesis.deployments.step_loop import StepLoop


@pytest.fixture
def loop(tiny_large, redis_url):
    model, tok = load_causal_lm(str(tiny_large))
    engine = TransformersCloudEngine(model, tok)
    loop = StepLoop(engine, CloudBus(redis_url, "r1"), threading.Lock()).start()
    yield loop
    loop.stop()


def seal(msg):
    return Sealed(encode(msg), type(msg).__name__)


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
    send_open(edge, OpenSession(session_id="s", instruction="Write a haiku", top_k=4, deadline_ms=deadline_in(10)))
    first = wait_reply(edge, "s", 0, deadline_in(10))
    assert first.replica == "r1" and first.top_k()[0].shape == (1, 4)
    token = int(first.top_k()[0][0, 0])
    send_to(edge, "r1", StepRequest(session_id="s", step=1, tokens=pack_ids([token]), deadline_ms=deadline_in(10)))
    second = wait_reply(edge, "s", 1, deadline_in(10))
    assert second.prompt_tokens == first.prompt_tokens + 1
    send_to(edge, "r1", CloseSession(session_id="s"))
    send_to(edge, "r1", StepRequest(session_id="s", step=2, tokens=pack_ids([token]), deadline_ms=deadline_in(10)))
    with pytest.raises(SessionError, match="unknown_session"):
        wait_reply(edge, "s", 2, deadline_in(10))


def test_malformed_messages_do_not_stop_the_loop(loop, redis_url):
    r = redis.Redis.from_url(redis_url)
    r.xadd(in_stream("r1"), {b"m": b"\x00not msgpack"})
    r.xadd(in_stream("r1"), {b"other": b"field"})
    edge = EdgeBus(redis_url)
    send_open(edge, OpenSession(session_id="ok", instruction="Hi", top_k=2, deadline_ms=deadline_in(10)))
    assert wait_reply(edge, "ok", 0, deadline_in(10)).step == 0
    assert loop.errors >= 2


def test_expired_deadline_gets_an_error_reply(loop, redis_url):
    edge = EdgeBus(redis_url)
    send_open(edge, OpenSession(session_id="late", instruction="Hi", top_k=2, deadline_ms=now_ms() - 1))
    with pytest.raises(SessionError, match="deadline"):
        wait_reply(edge, "late", 0, deadline_in(10))


def test_bad_step_gets_a_clear_error(loop, redis_url):
    edge = EdgeBus(redis_url)
    send_open(edge, OpenSession(session_id="s", instruction="Hi", top_k=2, deadline_ms=deadline_in(10)))
    wait_reply(edge, "s", 0, deadline_in(10))
    send_to(edge, "r1", StepRequest(session_id="s", step=5, tokens=pack_ids([1]), deadline_ms=deadline_in(10)))
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
            OpenSession(
                session_id=f"s{i}", instruction=f"Write note {i}", top_k=3, deadline_ms=deadline_in(30), lookahead=2
            ),
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
            StepRequest(
                session_id=f"s{i}", step=1, tokens=pack_ids([int(f.drafts()[0]), 7]), deadline_ms=deadline_in(30)
            ),
        )
    loop = serve_queued()
    seconds = [wait_reply(edge, f"s{i}", 1, deadline_in(30)) for i in range(6)]
    loop.stop()
    assert [s.prompt_tokens for s in seconds] == [f.prompt_tokens + 2 for f in firsts]
    assert engine.stats()["batches"] == 6 and engine.stats()["recomputes"] == 0
