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


# ---- CloudBus: heartbeats and dead replicas -------------------------------------------------------------


def test_the_heartbeat_is_json_with_a_millisecond_ttl(redis_url):
    import json
    import os

    from cogenesis.cluster.bus import alive_key, read_alive

    cloud = CloudBus(redis_url, "r1", heartbeat_ttl_s=1.5)
    beat = json.loads(cloud.r.get(alive_key("r1")))
    assert beat["pid"] == os.getpid() and abs(beat["at"] - time.time()) < 60
    assert 0 < cloud.r.pttl(alive_key("r1")) <= 1500
    cloud.r.set(alive_key("old"), "1700000000.5")  # an older replica's bare time: alive all the same
    assert read_alive(cloud.r, ["r1", "old", "gone"]) == {
        "r1": beat,
        "old": {"pid": None, "at": 1700000000.5},
        "gone": None,
    }
    assert read_alive(cloud.r, []) == {}


def test_a_replica_without_heartbeat_is_dead_only_once_silent_for_the_ttl(redis_url):
    from cogenesis.cluster.bus import alive_key

    live = CloudBus(redis_url, "live", heartbeat_ttl_s=0.3)
    CloudBus(redis_url, "new", heartbeat_ttl_s=0.3).r.delete(alive_key("new"))  # no heartbeat, but just joined
    assert live.dead_consumers() == []
    time.sleep(0.4)  # silent for longer than the ttl
    assert live.dead_consumers() == ["new"]
    live.heartbeat()
    assert "live" not in CloudBus(redis_url, "other", heartbeat_ttl_s=0.3).dead_consumers()


def test_a_dead_replicas_pending_opens_are_claimed_once(redis_url):
    dead = CloudBus(redis_url, "dead", heartbeat_ttl_s=0.2)
    edge = EdgeBus(redis_url)
    for i in range(3):
        edge.send_many([(None, f"s{i}", _open(f"s{i}"))])
    taken = dead.read(block_ms=1000)
    assert len(taken) == 3
    dead.finish([taken[0][:2]], [])  # it served one, then crashed with two pending
    dead.close()
    a, b = CloudBus(redis_url, "a", heartbeat_ttl_s=0.2), CloudBus(redis_url, "b", heartbeat_ttl_s=0.2)
    assert a.claim("dead") == ([], False)  # not idle for the ttl yet: not taken
    time.sleep(0.3)
    claimed, clean = a.claim("dead")
    assert clean and [decode_request(p).session_id for _, _, p in claimed] == ["s1", "s2"]
    assert b.claim("dead") == ([], True)  # nothing left for a second survivor
    assert a.r.xpending(OPEN_STREAM, GROUP)["pending"] == 2  # pending for "a" now, until it serves them
    a.finish([(s, i) for s, i, _ in claimed], [])
    a.remove_consumer("dead")
    assert "dead" not in {c["name"].decode() for c in a.r.xinfo_consumers(OPEN_STREAM, GROUP)}
    assert a.r.xpending(OPEN_STREAM, GROUP)["pending"] == 0


def test_a_dead_replicas_stream_is_taken_whole_and_once(redis_url):
    edge, survivor = EdgeBus(redis_url), CloudBus(redis_url, "live")
    edge.send_many([("dead", "s", _step("s", 3))])
    edge.send_many([("dead", f"t{i}", _step(f"t{i}", 2)) for i in range(2)])
    entries = survivor.take_stream("dead")
    assert [type(decode_request(p)).__name__ for _, p in entries] == ["StepRequest", "StepBatch"]
    assert not survivor.r.exists(in_stream("dead")) and survivor.take_stream("dead") == []


def test_streams_written_after_their_replica_died_are_found(redis_url):
    survivor = CloudBus(redis_url, "live", heartbeat_ttl_s=0.2)
    old = f"{now_ms() - 60_000}-0"
    survivor.r.xadd(in_stream("ghost"), {b"m": b"x"}, id=old)
    survivor.r.xadd(in_stream("fresh"), {b"m": b"x"})  # written just now: its replica may be starting
    CloudBus(redis_url, "alive", heartbeat_ttl_s=60).r.xadd(in_stream("alive"), {b"m": b"x"}, id=old)
    assert survivor.orphan_streams() == ["ghost"]


def test_a_retiring_replica_hands_back_its_stream_and_leaves_the_group(redis_url):
    from cogenesis.cluster.bus import alive_key

    edge, cloud = EdgeBus(redis_url), CloudBus(redis_url, "r1")
    edge.send_many([("r1", "s", _step("s", 1))])
    left = cloud.retire()
    assert [decode_request(p).session_id for _, p in left] == ["s"]
    assert not cloud.r.exists(alive_key("r1")) and not cloud.r.exists(in_stream("r1"))
    assert "r1" not in {c["name"].decode() for c in cloud.r.xinfo_consumers(OPEN_STREAM, GROUP)}


def test_a_restarted_empty_redis_gets_its_groups_back_on_the_next_read(redis_url):
    cloud = CloudBus(redis_url, "r1")
    cloud.r.flushall()  # what a restarted Redis without persistence looks like
    assert cloud.read(block_ms=10) == []  # NOGROUP: recreated
    EdgeBus(redis_url).send_many([(None, "s", _open("s"))])
    assert [decode_request(p).session_id for _, _, p in cloud.read(block_ms=1000)] == ["s"]


# ---- the edge bus under faults: dead replicas, busy, malformed replies, Redis restarts ------------------------


def _reply(session_id, step, replica="r1"):
    return StepReply(
        session_id=session_id, step=step, replica=replica, ids=pack_ids([1]), logprobs=pack_logprobs([0.0])
    )


def test_a_replica_without_heartbeat_fails_its_sessions_long_before_the_deadline(redis_url):
    from cogenesis.cluster.bus import ReplicaLost, alive_key

    edge = EdgeBus(redis_url)
    edge.r.set(alive_key("live"), '{"pid": 1, "at": 0}', px=60_000)
    late = encode(_reply("b", 2, "live"))
    timer = threading.Timer(1.5, lambda: redis.Redis.from_url(redis_url).lpush(reply_key("pool"), late))
    timer.start()
    got = edge.wait_many(
        {"a": 2, "b": 2}, deadline_in(60), reply_to={"a": "pool", "b": "pool"}, replicas={"a": "gone", "b": "live"}
    )
    timer.join()
    assert isinstance(got["a"], ReplicaLost) and "replica gone stopped" in got["a"].message
    assert isinstance(got["b"], StepReply)  # a live replica's session waits on (past a heartbeat check)


def test_an_opening_session_takes_no_stale_answer(redis_url):
    """A session being (re-)opened waits for its open's answer: an ``unknown_session`` for its old step (a
    survivor answering a dead replica's stream) or a reply of a replica found dead is not it."""
    from cogenesis.cluster.bus import alive_key

    edge = EdgeBus(redis_url)
    edge.r.set(alive_key("live"), "{}", px=60_000)
    edge.r.set(alive_key("dead"), "{}", px=60_000)
    edge.r.lpush(reply_key("s"), encode(_reply("s", 2, "dead")))
    assert edge.wait_many({"s": 2}, deadline_in(2), replicas={})["s"].replica == "dead"  # s lived on "dead"
    edge.r.delete(alive_key("dead"))
    time.sleep(1.1)  # the next wait checks heartbeats (at most once a second)
    edge.wait_many({"x": 1}, deadline_in(0.1), replicas={"x": "dead"})  # finds "dead" dead
    for msg in (
        ErrorReply(session_id="s", step=3, code="unknown_session", message="no such session"),
        _reply("s", 3, "dead"),
        _reply("s", 3, "live"),
    ):
        edge.r.lpush(reply_key("s"), encode(msg))
    got = edge.wait_many({"s": 3}, deadline_in(2), replicas={})
    assert isinstance(got["s"], StepReply) and got["s"].replica == "live"


def test_an_open_answered_by_a_replica_that_stopped_before_it_was_read_is_resumed(redis_url):
    """A replica took the open, answered it and left the bus (scaled down) before the edge read the answer: nobody
    else will answer that open, so the session fails ``ReplicaLost`` (and is resumed) instead of waiting to its
    deadline. A name this edge never saw beating is still dropped as forged (its session waits on)."""
    from cogenesis.cluster.bus import ReplicaLost, alive_key

    edge = EdgeBus(redis_url)
    edge.r.set(alive_key("leaving"), "{}", px=60_000)
    edge.r.lpush(reply_key("a"), encode(_reply("a", 4, "leaving")))
    assert edge.wait_many({"a": 4}, deadline_in(2), replicas={})["a"].replica == "leaving"  # seen beating
    edge.r.delete(alive_key("leaving"))  # it stopped
    time.sleep(1.1)  # a sighting counts for a second (then the heartbeat is read again)
    edge.r.lpush(reply_key("b"), encode(_reply("b", 0, "leaving")))  # its answer to b's open, read only now
    got = edge.wait_many({"b": 0}, deadline_in(5), replicas={})
    assert isinstance(got["b"], ReplicaLost)
    edge.r.lpush(reply_key("c"), encode(_reply("c", 0, "never-seen")))
    assert isinstance(edge.wait_many({"c": 0}, deadline_in(1.5), replicas={})["c"], BusTimeout)


def test_refusals_become_typed_errors(redis_url):
    from cogenesis.core.errors import Busy, UnknownSession

    edge = EdgeBus(redis_url)
    edge.r.lpush(
        reply_key("a"), encode(ErrorReply(session_id="a", step=0, code="busy", message="full", retry_after_ms=750))
    )
    edge.r.lpush(reply_key("b"), encode(ErrorReply(session_id="b", step=4, code="unknown_session", message="gone")))
    got = edge.wait_many({"a": 0, "b": 4}, deadline_in(2))
    assert isinstance(got["a"], Busy) and got["a"].retry_after_s == 0.75
    assert isinstance(got["b"], UnknownSession)


def test_a_malformed_reply_is_dropped_unread(redis_url, caplog):
    edge = EdgeBus(redis_url)
    garbage = b"\xc1 private-looking bytes"
    edge.r.lpush(reply_key("s"), garbage, encode(_reply("s", 1)))
    assert edge.wait_many({"s": 1}, deadline_in(2))["s"].step == 1
    logged = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert logged == [f"dropped a malformed reply of {len(garbage)} bytes"]  # its size, never its content


def test_the_edge_never_trims_a_stream(redis_url, monkeypatch):
    """A trimmed stream drops unread requests silently: no XADD of the edge carries MAXLEN or MINID."""
    calls = []
    original = redis.client.Pipeline.xadd

    def spy(self, name, fields, *args, **kwargs):
        calls.append((args, kwargs))
        return original(self, name, fields, *args, **kwargs)

    monkeypatch.setattr(redis.client.Pipeline, "xadd", spy)
    edge = EdgeBus(redis_url)
    edge.send_many([(None, "o", _open("o")), ("r1", "s", _step("s", 1)), ("r1", "t", _step("t", 1))])
    assert len(calls) == 2
    assert all(not args and kwargs.get("maxlen") is None and kwargs.get("minid") is None for args, kwargs in calls)


def test_kept_replies_are_bounded_and_ended_sessions_keep_none(redis_url, monkeypatch, caplog):
    import cogenesis.cluster.bus as bus

    monkeypatch.setattr(bus, "STASH_MAX", 3)
    edge = EdgeBus(redis_url)
    edge.forget(["ended"])
    from cogenesis.core.protocol import ReplyBatch

    strays = [_reply(s, 1) for s in ("ended", "k1", "k2", "k3", "k4")]
    edge.r.lpush(reply_key("pool"), encode(ReplyBatch(items=[*strays, _reply("me", 1)])))
    assert edge.wait_many({"me": 1}, deadline_in(2), reply_to={"me": "pool"})["me"].step == 1
    assert list(edge._stash) == ["k2", "k3", "k4"]  # the oldest dropped (and said so), the ended one never kept
    assert any("dropped the oldest kept reply" in r.getMessage() for r in caplog.records)


def test_a_forged_reply_never_routes_a_session(redis_url, caplog):
    """A reply names the replica that holds its session (where its next steps go): the edge takes the name only
    when it is a replica name, that of the session's holder, or (a session opening) that of a replica with a
    live heartbeat. A forged one is dropped (logged by size) and the session waits on for its genuine reply."""
    from cogenesis.cluster.bus import alive_key

    edge = EdgeBus(redis_url)
    edge.r.set(alive_key("live"), '{"pid": 1, "at": 0}', px=60_000)
    edge.r.set(alive_key("other"), '{"pid": 2, "at": 0}', px=60_000)
    forged = [
        _reply("opening", 2, "ghost"),  # no such replica (no heartbeat)
        _reply("opening", 2, "../cg:in:x"),  # no replica name at all
        _reply("opening", 2, "x" * 65),
        _reply("held", 4, "other"),  # a live replica, but not the one holding the session
    ]
    for msg in forged:
        edge.r.lpush(reply_key("pool"), encode(msg))
    edge.r.lpush(reply_key("pool"), encode(_reply("opening", 2, "live")), encode(_reply("held", 4, "live")))
    got = edge.wait_many(
        {"opening": 2, "held": 4},
        deadline_in(10),
        reply_to={"opening": "pool", "held": "pool"},
        replicas={"held": "live"},
    )
    assert got["opening"].replica == "live" and got["held"].replica == "live"
    dropped = [r.getMessage() for r in caplog.records if "dropped a reply for session" in r.getMessage()]
    assert len(dropped) == 4 and not any("ghost" in m or "x" * 65 in m or "../" in m for m in dropped)
    assert "(65 characters)" in " ".join(dropped)
    assert edge._stash == {}  # nothing of them kept


def test_a_forged_reply_alone_leaves_its_session_waiting_not_redirected(redis_url):
    edge = EdgeBus(redis_url)
    edge.r.lpush(reply_key("pool"), encode(_reply("s", 1, "ghost")))
    got = edge.wait_many({"s": 1}, deadline_in(1.5), reply_to={"s": "pool"}, replicas={})
    assert isinstance(got["s"], BusTimeout)  # no route taken; the session loop times it out (or resumes it)
    # a forged reply kept for a session nobody waits on cannot shadow the genuine one either
    edge.r.lpush(reply_key("pool"), encode(_reply("later", 99, "ghost")), encode(_reply("now", 1, "ghost")))
    edge.wait_many({"now": 1}, deadline_in(0.5), reply_to={"now": "pool"}, replicas={})
    assert "later" not in edge._stash


def test_a_reply_of_a_replica_not_yet_beating_after_redis_came_back_empty_is_taken(redis_url):
    """Right after Redis restarted empty no replica has beaten again: a well-formed name passes."""
    import time as _time

    edge = EdgeBus(redis_url)
    edge._grace_until = _time.monotonic() + 5  # what ``_check_marker`` sets when the marker is gone
    edge.r.lpush(reply_key("s"), encode(_reply("s", 0, "fresh")))
    assert edge.wait_many({"s": 0}, deadline_in(2), replicas={})["s"].replica == "fresh"


@pytest.fixture
def own_redis():
    from cogenesis.cluster.redis_server import RedisServer, free_port

    box = {"port": free_port()}
    box["server"] = RedisServer(port=box["port"]).start()
    yield box
    box["server"].stop()


def test_a_redis_restart_between_send_and_wait_loses_the_exchange(own_redis):
    """Redis restarts (empty) while no command is running; the client reconnects unnoticed, but the bus's
    marker is gone: what was sent before is reported lost (to be resumed), what comes after is not."""
    from cogenesis.cluster.bus import ExchangeLost
    from cogenesis.cluster.redis_server import RedisServer

    edge = EdgeBus(own_redis["server"].url)
    edge.send_many([("r1", "before", _step("before", 1))])
    own_redis["server"].stop()
    own_redis["server"] = RedisServer(port=own_redis["port"]).start()
    got = edge.wait_many({"before": 1}, deadline_in(30))
    assert isinstance(got["before"], ExchangeLost) and got["before"].message.endswith("step 1 was in flight")
    edge.send_many([("r1", "after", _step("after", 1))])
    edge.r.lpush(reply_key("after"), encode(_reply("after", 1)))
    assert isinstance(edge.wait_many({"after": 1}, deadline_in(5))["after"], StepReply)


def test_a_connection_lost_mid_wait_is_retried_then_reported(own_redis):
    """Redis goes away during a blocking wait: the bus retries with backoff; if Redis comes back the waiting
    sessions are reported lost (their replies may have gone with it), if not, unreachable; sends alike."""
    from cogenesis.cluster.bus import ExchangeLost
    from cogenesis.cluster.redis_server import RedisServer

    edge = EdgeBus(own_redis["server"].url, redis_retry_s=30)
    edge.send_many([("r1", "s", _step("s", 1))])

    def bounce():
        own_redis["server"].stop()
        time.sleep(0.5)
        own_redis["server"] = RedisServer(port=own_redis["port"]).start()

    timer = threading.Timer(0.3, bounce)
    timer.start()
    got = edge.wait_many({"s": 1}, deadline_in(60))
    timer.join()
    assert isinstance(got["s"], ExchangeLost)

    edge.redis_retry_s = 0.5
    edge.send_many([("r1", "t", _step("t", 1))])
    own_redis["server"].stop()
    got = edge.wait_many({"t": 1}, deadline_in(60))
    assert isinstance(got["t"], ClusterError) and "unreachable" in got["t"].message
    with pytest.raises(ClusterError, match="unreachable"):
        edge.send_many([("r1", "s", _step("s", 2))])
    edge.close()  # no raw exception here either
