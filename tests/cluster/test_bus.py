"""Edge and cloud ends of the Redis bus, against a real Redis server; the sealed payloads it carries."""

import copy
import dataclasses
import pickle
import threading
import time

import pytest
import redis

from cogenesis.cluster.bus import (
    GROUP,
    OPEN_STREAM,
    CloudBus,
    EdgeBus,
    Received,
    Sealed,
    SealKey,
    claim_seal_key,
    connect,
    entry_ms,
    in_stream,
    reply_key,
    wire_bytes,
)
from cogenesis.core.errors import BusTimeout, ClusterError, SessionError
from cogenesis.core.protocol import (
    ErrorReply,
    OpenSession,
    StepReply,
    deadline_in,
    decode_request,
    encode,
    now_ms,
    pack_ids,
    pack_logprobs,
)
from cogenesis.edge_sim.gate import OutboundGate

GATE = OutboundGate("Write a poem", [])  # the one maker of Sealed payloads


def _open(session_id="s1"):
    return GATE.seal(OpenSession(session_id=session_id, instruction="Write a poem", top_k=3, budget_ms=5_000))


def _wait(edge, session_id, step, deadline_ms):
    """One session's reply for ``step``; a refusal or a timeout is raised."""
    reply = edge.wait_many({session_id: step}, deadline_ms)[session_id]
    if isinstance(reply, Exception):
        raise reply
    return reply


def test_unreachable_redis_is_a_clear_error():
    with pytest.raises(ClusterError, match="cannot reach Redis"):
        connect("redis://127.0.0.1:1/0", timeout_s=0.5)


def test_open_reaches_a_replica_and_reply_comes_back(redis_url):
    cloud = CloudBus(redis_url, "r1")
    edge = EdgeBus(redis_url)
    edge.send_many([(None, "s1", _open())])
    batch = cloud.read(block_ms=1000)
    assert len(batch) == 1 and batch[0][0] == OPEN_STREAM
    assert decode_request(batch[0][2]).session_id == "s1"
    reply = encode(
        StepReply(
            session_id="s1", step=0, replica="r1", ids=pack_ids([5, 6, 7]), logprobs=pack_logprobs([-0.1, -2.0, -3.0])
        )
    )
    cloud.finish([(batch[0][0], batch[0][1])], [("s1", reply)])
    got = _wait(edge, "s1", 0, deadline_in(2))
    assert got.replica == "r1" and got.top_k()[0].tolist() == [[5, 6, 7]]
    r = redis.Redis.from_url(redis_url)
    assert r.xlen(OPEN_STREAM) == 0  # acknowledged entries are deleted
    assert r.xpending(OPEN_STREAM, GROUP)["pending"] == 0


def test_every_key_has_a_ttl(redis_url):
    cloud = CloudBus(redis_url, "r1")
    edge = EdgeBus(redis_url)
    edge.send_many([(None, "s1", _open())])
    edge.send_many([("r1", "", _open())])
    batch = cloud.read(block_ms=1000)
    reply = encode(ErrorReply(session_id="s1", step=0, code="x", message="y"))
    cloud.finish([], [("s1", reply)])
    r = redis.Redis.from_url(redis_url)
    keys = r.keys("cg:*")
    assert {k.decode() for k in keys} >= {OPEN_STREAM, in_stream("r1"), reply_key("s1"), "cg:alive:r1"}
    assert all(r.ttl(k) > 0 for k in keys), {k: r.ttl(k) for k in keys}
    assert len(batch) == 2


def test_two_replicas_share_opens_without_duplicates(redis_url):
    a, b = CloudBus(redis_url, "ra"), CloudBus(redis_url, "rb")
    edge = EdgeBus(redis_url)
    for i in range(10):
        edge.send_many([(None, f"s{i}", _open(f"s{i}"))])
    seen = []
    for bus in (a, b, a, b):
        seen += [decode_request(p).session_id for _, _, p in bus.read(block_ms=50, count=5)]
    assert sorted(seen) == sorted(f"s{i}" for i in range(10))


def test_wait_times_out_and_skips_stale_replies(redis_url):
    edge = EdgeBus(redis_url)
    t0 = time.monotonic()
    with pytest.raises(BusTimeout, match="no reply for step 3"):
        _wait(edge, "nobody", 3, deadline_in(0.3))
    assert time.monotonic() - t0 < 2.0
    r = redis.Redis.from_url(redis_url)
    stale = encode(StepReply(session_id="s", step=1, replica="r", ids=pack_ids([1]), logprobs=pack_logprobs([0.0])))
    fresh = encode(StepReply(session_id="s", step=2, replica="r", ids=pack_ids([2]), logprobs=pack_logprobs([0.0])))
    r.lpush(reply_key("s"), stale, fresh)
    assert _wait(edge, "s", 2, deadline_in(1)).step == 2


def test_long_waits_block_in_slices_shorter_than_the_socket_timeout(redis_url, monkeypatch):
    """A deadline longer than one blocking pop (redis-py 8 has a default read timeout) still waits
    for the reply: the edge pops in slices until the deadline, never tripping the socket timeout."""
    import threading

    import cogenesis.cluster.bus as bus

    monkeypatch.setattr(bus, "BLOCK_SLICE_S", 0.2)
    edge = EdgeBus(redis_url)
    assert edge.r.connection_pool.connection_kwargs["socket_timeout"] == bus.SOCKET_TIMEOUT_S
    late = encode(StepReply(session_id="s", step=1, replica="r", ids=pack_ids([1]), logprobs=pack_logprobs([0.0])))
    timer = threading.Timer(0.9, lambda: redis.Redis.from_url(redis_url).lpush(reply_key("s"), late))
    timer.start()
    assert _wait(edge, "s", 1, deadline_in(5)).step == 1
    timer.join()


def test_error_reply_raises_session_error(redis_url):
    edge = EdgeBus(redis_url)
    r = redis.Redis.from_url(redis_url)
    r.lpush(reply_key("s"), encode(ErrorReply(session_id="s", step=4, code="unknown_session", message="gone")))
    with pytest.raises(SessionError, match="unknown_session: gone"):
        _wait(edge, "s", 4, deadline_in(1))


def test_edge_bus_only_sends_sealed_messages(redis_url):
    edge = EdgeBus(redis_url)
    with pytest.raises(TypeError, match="sealed"):
        edge.send_many([("r1", "s", b"raw bytes")])


# ---- only the gate can make a sealed payload ----------------------------------------------------------


def _forgeries(genuine: Sealed) -> dict[str, object]:
    """Every way the test knows to make something that looks sealed without the gate."""
    bare = object.__new__(Sealed)  # no constructor: no fields at all

    class Sub(Sealed):
        __slots__ = ()

    sub = object.__new__(Sub)  # a subclass carrying the genuine one's fields
    for name in ("payload", "kind", "_tag"):
        object.__setattr__(sub, name, getattr(genuine, name))
    edited = _open("edited")  # sealed by the gate, then its bytes swapped behind the gate's back
    unchecked = encode(OpenSession(session_id="edited", instruction="Martin Reynolds", top_k=3, budget_ms=5_000))
    object.__setattr__(edited, "payload", unchecked)
    return {
        "bytes": genuine.payload,
        "message": OpenSession(session_id="x", instruction="Write a poem", top_k=1, budget_ms=1),
        "bare": bare,
        "subclass": sub,
        "edited": edited,
    }


def test_only_the_gate_can_seal():
    msg = OpenSession(session_id="s", instruction="Write a poem", top_k=3, budget_ms=5_000)
    with pytest.raises(TypeError, match="outbound gate"):
        Sealed(SealKey(), encode(msg), "OpenSession")  # a key of the right type is not the key
    with pytest.raises(TypeError):
        Sealed(encode(msg), "OpenSession")  # type: ignore[call-arg]
    with pytest.raises(RuntimeError, match="only cogenesis.edge_sim.gate"):
        claim_seal_key()  # nobody else may claim it ...
    with pytest.raises(RuntimeError, match="claims the key once"):
        exec("claim_seal_key()", {"__name__": "cogenesis.edge_sim.gate", "claim_seal_key": claim_seal_key})  # ... twice


def test_a_sealed_payload_cannot_be_changed_copied_or_pickled():
    sealed = _open()
    with pytest.raises(AttributeError):
        sealed.payload = b"tampered"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del sealed.payload
    for forge in (copy.copy, copy.deepcopy, pickle.dumps, lambda s: dataclasses.replace(s, payload=b"x")):
        with pytest.raises(TypeError):
            forge(sealed)
    with pytest.raises(TypeError):
        copy.copy(claim_seal_key.__globals__["_SEAL_KEY"])
    assert "Write a poem" not in repr(sealed)  # a repr names the kind and size, not the bytes
    assert wire_bytes(sealed) == sealed.payload


@pytest.mark.parametrize("name", ["bytes", "message", "bare", "subclass", "edited"])
def test_transports_refuse_anything_but_a_genuine_seal(redis_url, name):
    forged = _forgeries(_open())[name]
    with pytest.raises(TypeError, match="sealed by the outbound gate"):
        wire_bytes(forged)
    edge = EdgeBus(redis_url)
    with pytest.raises(TypeError, match="sealed by the outbound gate"):
        edge.send_many([(None, "ok", _open("ok")), (None, "x", forged)])  # type: ignore[list-item]
    assert not edge.r.exists(OPEN_STREAM)  # refused before anything was sent, the genuine one too


def test_the_bytes_on_the_wire_are_the_sealed_bytes(redis_url):
    edge = EdgeBus(redis_url)
    opened, single, batch = _open("o"), _step("t", 1), [_step(f"s{i}", 1) for i in range(3)]
    edge.send_many([(None, "o", opened), ("r2", "t", single)] + [("r1", f"s{i}", b) for i, b in enumerate(batch)])
    ((_, fields),) = edge.r.xrange(OPEN_STREAM)
    assert fields[b"m"] == opened.payload
    ((_, fields),) = edge.r.xrange(in_stream("r2"))
    assert fields[b"m"] == single.payload
    ((_, fields),) = edge.r.xrange(in_stream("r1"))
    assert decode_request(fields[b"m"]).items == [b.payload for b in batch]  # a StepBatch of them, verbatim


def test_stream_entry_ids_tell_when_redis_took_the_entry(redis_url):
    edge = EdgeBus(redis_url)
    before = now_ms()
    edge.send_many([(None, "s", _open("s"))])
    ((entry_id, _),) = edge.r.xrange(OPEN_STREAM)
    assert before - 1000 <= entry_ms(entry_id) <= now_ms() + 1000 and entry_ms(entry_id.decode()) == entry_ms(entry_id)


def test_arrivals_say_whether_a_reply_was_already_waiting(redis_url):
    edge = EdgeBus(redis_url)
    early = encode(StepReply(session_id="a", step=1, replica="r", ids=pack_ids([1]), logprobs=pack_logprobs([0.0])))
    late = encode(StepReply(session_id="b", step=1, replica="r", ids=pack_ids([1]), logprobs=pack_logprobs([0.0])))
    edge.r.lpush(reply_key("a"), early)
    timer = threading.Timer(0.3, lambda: redis.Redis.from_url(redis_url).lpush(reply_key("b"), late))
    timer.start()
    arrivals: dict[str, Received] = {}
    before = time.time_ns() // 1000
    got = edge.wait_many({"a": 1, "b": 1}, deadline_in(5), arrivals)
    timer.join()
    assert {s: r.step for s, r in got.items()} == {"a": 1, "b": 1}
    assert arrivals["a"].looked_us is not None and before <= arrivals["a"].looked_us <= arrivals["a"].at_us
    assert arrivals["b"].looked_us is None and arrivals["b"].at_us - arrivals["a"].at_us > 200_000


def _step(session_id, step, reply_to="pool"):
    from cogenesis.core.protocol import StepRequest

    return GATE.seal(
        StepRequest(session_id=session_id, step=step, tokens=pack_ids([7]), budget_ms=5_000, reply_to=reply_to)
    )


def test_a_round_for_one_replica_is_one_stream_entry(redis_url):
    from cogenesis.core.protocol import StepBatch

    edge, cloud = EdgeBus(redis_url), CloudBus(redis_url, "r1")
    edge.send_many([("r1", f"s{i}", _step(f"s{i}", 1)) for i in range(5)] + [("r2", "t", _step("t", 1))])
    assert edge.r.xlen(in_stream("r1")) == 1 and edge.r.xlen(in_stream("r2")) == 1
    ((stream, _, payload),) = cloud.read(block_ms=1000)
    batch = decode_request(payload)
    assert stream == in_stream("r1") and isinstance(batch, StepBatch)
    assert [decode_request(b).session_id for b in batch.items] == [f"s{i}" for i in range(5)]


def test_pool_replies_share_one_list_and_early_ones_are_kept(redis_url):
    from cogenesis.core.protocol import ReplyBatch

    edge = EdgeBus(redis_url)
    replies = [
        StepReply(session_id=s, step=2, replica="r1", ids=pack_ids([1]), logprobs=pack_logprobs([-1.0]))
        for s in ("a", "b", "c")
    ]
    edge.r.lpush(reply_key("pool"), encode(ReplyBatch(items=replies)))
    arrivals = {}
    got = edge.wait_many({"a": 2, "b": 2}, deadline_in(2), arrivals, reply_to={"a": "pool", "b": "pool"})
    assert {s: r.step for s, r in got.items()} == {"a": 2, "b": 2} and set(arrivals) == {"a", "b"}
    assert edge.r.llen(reply_key("pool")) == 0  # "c" came in the same batch: kept on the edge, not lost
    assert edge.wait_many({"c": 2}, deadline_in(0.2), reply_to={"c": "pool"})["c"].session_id == "c"
    edge.r.lpush(reply_key("pool"), encode(ReplyBatch(items=replies[:1])))
    edge.wait_many({"b": 3}, deadline_in(0.2), reply_to={"b": "pool"})  # times out; the stray "a" is kept...
    edge.forget(["a"])  # ...until its session ends
    assert isinstance(edge.wait_many({"a": 2}, deadline_in(0.2))["a"], BusTimeout)


def test_a_flood_of_opens_is_taken_a_share_at_a_time(redis_url):
    """Prefill is the expensive part: a replica takes max_opens new sessions per pass, while every
    step pending for it is still served in that pass; the rest of the opens wait in the stream."""
    edge, cloud = EdgeBus(redis_url), CloudBus(redis_url, "r1")
    for i in range(10):
        edge.send_many([(None, f"s{i}", _open(f"s{i}"))])
    edge.send_many([("r1", f"t{i}", _step(f"t{i}", 1)) for i in range(5)])
    first = cloud.read(block_ms=1000, max_opens=4)
    assert sum(s == OPEN_STREAM for s, _, _ in first) == 4
    assert sum(s != OPEN_STREAM for s, _, _ in first) == 1  # the round's steps: one StepBatch entry
    assert sum(s == OPEN_STREAM for s, _, _ in cloud.read(block_ms=1000, max_opens=4)) == 4
    assert sum(s == OPEN_STREAM for s, _, _ in cloud.read(block_ms=1000, max_opens=4)) == 2


def test_replica_drains_a_burst_into_one_read(redis_url):
    edge, cloud = EdgeBus(redis_url), CloudBus(redis_url, "r1")
    for i in range(4):
        edge.send_many([(None, f"s{i}", _open(f"s{i}"))])
    assert len(cloud.read(block_ms=1000)) == 4
