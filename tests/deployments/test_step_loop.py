"""The replica's step loop over a real Redis: with a deterministic fake engine of the ``CloudEngine`` contract
(every reply checkable exactly, faults on demand) and with the tiny real model."""

import threading
import time

import pytest
import redis
from cloud_fakes import FakeEngine

import cogenesis.deployments.step_loop as step_loop_module
from cogenesis.cluster.bus import GROUP, OPEN_STREAM, CloudBus, EdgeBus, alive_key, in_stream, read_alive, reply_key
from cogenesis.cluster.redis_server import RedisServer
from cogenesis.core import metrics
from cogenesis.core.config import CloudConfig
from cogenesis.core.errors import Busy, SessionError
from cogenesis.core.models import load_causal_lm
from cogenesis.core.protocol import (
    CloseSession,
    ErrorReply,
    OpenSession,
    SketchRequest,
    StepBatch,
    StepReply,
    StepRequest,
    deadline_in,
    decode_replies,
    encode,
    now_ms,
    pack_ids,
)
from cogenesis.deployments.engine import TransformersCloudEngine
from cogenesis.deployments.step_loop import StepLoop, Trace
from cogenesis.edge_sim.gate import OutboundGate

GATE = OutboundGate("Write a haiku", [])


def tiny_engine(tiny_large):
    model, tok = load_causal_lm(str(tiny_large))
    return TransformersCloudEngine(model, tok)


@pytest.fixture
def make_loop(redis_url):
    """Start loops (stopped at the end): ``make_loop(engine, replica="r1", url=None, **CloudConfig fields)``."""
    started = []

    def make(engine, replica="r1", url=None, hang_s=300.0, **cfg):
        config = CloudConfig(**{"stop_linger_s": 0.0, **cfg})  # stopping at once unless a test asks
        bus = CloudBus(url or redis_url, replica, heartbeat_ttl_s=config.heartbeat_ttl_s)
        loop = StepLoop(engine, bus, threading.Lock(), config=config, hang_s=hang_s).start()
        started.append(loop)
        return loop

    yield make
    for loop in started:
        loop.stop(timeout_s=10)


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def post(r, stream, msg, entry_id="*"):
    """Put a message (or raw bytes) on a stream, as an edge would (or would not)."""
    r.xadd(stream, {b"m": msg if isinstance(msg, bytes) else encode(msg)}, id=entry_id)


def collect(r, reply_to, sessions, timeout_s=20.0):
    """The replies on a reply list until every session in ``sessions`` has one (the newest kept)."""
    got: dict[str, StepReply | ErrorReply] = {}
    deadline = time.monotonic() + timeout_s
    while not set(sessions) <= set(got):
        left = deadline - time.monotonic()
        assert left > 0, f"no reply for {sorted(set(sessions) - set(got))}; got {got}"
        item = r.brpop([reply_key(reply_to)], timeout=min(left, 1.0))
        if item is not None:
            for reply in decode_replies(item[1]):
                got[reply.session_id] = reply
    return got


def eventually(check, timeout_s=20.0, what="the condition"):
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.02)


def nothing_pending(r, replica="r1"):
    for stream in (OPEN_STREAM, in_stream(replica)):
        if r.exists(stream):
            assert r.xpending(stream, GROUP)["pending"] == 0, stream
            assert r.xlen(stream) == 0, stream  # acknowledged entries are deleted


def opened(r, sessions, reply_to="pool", top_k=3):
    """Open ``sessions`` through the loop; their step-0 replies."""
    for sid in sessions:
        post(
            r,
            OPEN_STREAM,
            OpenSession(session_id=sid, instruction="a b", top_k=top_k, budget_ms=60_000, reply_to=reply_to),
        )
    got = collect(r, reply_to, sessions)
    assert all(isinstance(got[s], StepReply) and got[s].step == 0 for s in sessions), got
    return got


# ---- every request gets an answer ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fake", "tiny"])
def test_poison_pills_get_their_answer_and_the_rest_is_served(kind, make_loop, r, request):
    engine = FakeEngine() if kind == "fake" else tiny_engine(request.getfixturevalue("tiny_large"))
    loop = make_loop(engine)
    first = opened(r, ["a", "b"])

    def step(sid, n, tokens, **kw):
        return encode(StepRequest(session_id=sid, step=n, tokens=tokens, budget_ms=60_000, reply_to="pool", **kw))

    batch = StepBatch(
        items=[
            step("a", 1, pack_ids([5])),  # good
            b"\x00garbage",  # names no session: a warning, no reply
            step("c", 1, b"\x01\x02\x03"),  # tokens not a multiple of 4 bytes
            step("b", 1, pack_ids([10**8])),  # a token id outside the vocabulary
            step("nobody", 1, pack_ids([5])),  # never opened
            step("old", 1, pack_ids([5]), v=2),  # another protocol version
            encode(StepBatch(items=[step("a", 2, pack_ids([5]))])),  # a batch in a batch: dropped, logged
        ]
    )
    post(r, in_stream("r1"), batch)
    post(r, in_stream("r1"), b"\x93\x01\x02")  # msgpack, but not a request
    r.xadd(in_stream("r1"), {b"other": b"field"})  # no payload at all
    post(r, OPEN_STREAM, OpenSession(session_id="k0", instruction="a b", top_k=0, budget_ms=60_000, reply_to="pool"))
    post(
        r,
        OPEN_STREAM,
        OpenSession(
            session_id="res",
            instruction="a b",
            top_k=3,
            budget_ms=60_000,
            reply_to="pool",
            resume=b"\x01\x02",
            resume_step=3,
        ),
    )
    post(
        r,
        OPEN_STREAM,
        StepRequest(session_id="misrouted", step=1, tokens=pack_ids([5]), budget_ms=60_000, reply_to="pool"),
    )
    post(r, OPEN_STREAM, b"\xff\xfe")
    got = collect(r, "pool", ["a", "c", "b", "nobody", "old", "k0", "res", "misrouted"])

    assert isinstance(got["a"], StepReply) and got["a"].step == 1
    assert got["a"].prompt_tokens == first["a"].prompt_tokens + 1
    codes = {sid: (reply.code, reply.step) for sid, reply in got.items() if isinstance(reply, ErrorReply)}
    assert codes == {
        "c": ("bad_request", 1),
        "b": ("bad_request", 1),
        "nobody": ("unknown_session", 1),
        "old": ("bad_request", 1),
        "k0": ("bad_request", 0),
        "res": ("bad_request", 3),  # a resume open's answer carries the step its edge waits for
        "misrouted": ("bad_request", 1),
    }
    assert "not a multiple of 4" in got["c"].message and "not a multiple of 4" in got["res"].message
    assert "invalid token ids" in got["b"].message and "version 2" in got["old"].message
    assert "top_k=0" in got["k0"].message and "open stream" in got["misrouted"].message
    # the loop goes on: the good sessions keep stepping
    post(
        r, in_stream("r1"), StepRequest(session_id="a", step=2, tokens=pack_ids([7]), budget_ms=60_000, reply_to="pool")
    )
    again = collect(r, "pool", ["a"])["a"]
    assert isinstance(again, StepReply) and again.step == 2
    nothing_pending(r)
    assert loop.refusals["bad_request"] == 6 and loop.refusals["unknown_session"] == 1
    assert loop.errors >= 6 + 1 + 5  # the refusals and the five entries that named no session


def test_every_refusal_is_counted_by_reason(make_loop, r):
    before = metrics.refusals.labels("unknown_session")._value.get()
    make_loop(FakeEngine())
    post(r, in_stream("r1"), StepRequest(session_id="x", step=1, tokens=pack_ids([1]), budget_ms=60_000))
    assert collect(r, "x", ["x"])["x"].code == "unknown_session"
    assert metrics.refusals.labels("unknown_session")._value.get() == before + 1


def test_an_engine_failure_answers_internal_and_acks_everything(make_loop, r):
    engine = FakeEngine()
    make_loop(engine)
    opened(r, ["a", "b"])
    engine.explode = True
    batch = StepBatch(
        items=[
            encode(StepRequest(session_id=s, step=1, tokens=pack_ids([1]), budget_ms=60_000, reply_to="pool"))
            for s in ("a", "b")
        ]
    )
    post(r, in_stream("r1"), batch)
    got = collect(r, "pool", ["a", "b"])
    assert {s: (g.code, g.step) for s, g in got.items()} == {"a": ("internal", 1), "b": ("internal", 1)}
    nothing_pending(r)
    engine.explode = False
    post(
        r, in_stream("r1"), StepRequest(session_id="a", step=1, tokens=pack_ids([1]), budget_ms=60_000, reply_to="pool")
    )
    assert isinstance(collect(r, "pool", ["a"])["a"], StepReply)


# ---- limits: nothing past CloudConfig.limits reaches the engine ------------------------------------------

LIMITS = dict(
    max_instruction_chars=64,
    max_step_tokens=4,
    max_session_tokens=64,
    max_batch_items=3,
    max_message_bytes=2048,
    max_budget_ms=60_000,
    max_sketch_tokens=8,
)


def _open(sid, reply_to="pool", **kw):
    fields = dict(session_id=sid, instruction="a b", top_k=3, budget_ms=10_000, reply_to=reply_to)
    return OpenSession(**{**fields, **kw})


def _step(sid, n, ids, reply_to="pool", **kw):
    fields = dict(session_id=sid, step=n, tokens=pack_ids(ids), budget_ms=10_000, reply_to=reply_to)
    return StepRequest(**{**fields, **kw})


def test_every_limit_is_refused_with_its_code_before_the_engine(make_loop, r):
    engine = FakeEngine()
    loop = make_loop(engine, limits=LIMITS)
    opened(r, ["a"])
    opened(r, ["long"])  # 2 words
    for n in range(1, 16):  # 62 tokens
        post(r, in_stream("r1"), _step("long", n, [1, 2, 3, 4]))
        assert collect(r, "pool", ["long"])["long"].step == n
    before = {code: metrics.refusals.labels(code)._value.get() for code in ("too_large", "bad_request")}
    opens, step_calls = len(engine.opened), engine.step_calls
    post(r, OPEN_STREAM, _open("chars", instruction="x " * 40))  # 80 characters
    post(r, OPEN_STREAM, _open("resume", resume=pack_ids(range(65)), resume_step=4))
    post(r, OPEN_STREAM, _open("budget", budget_ms=60_001))
    post(r, OPEN_STREAM, OpenSession(session_id="topk", instruction="a b", top_k=51, budget_ms=10_000, reply_to="pool"))
    post(r, OPEN_STREAM, _open("ahead", lookahead=17))
    post(r, OPEN_STREAM, _open("bytes", resume=pack_ids(range(600))))  # 2400+ bytes: past the entry's limit
    post(r, in_stream("r1"), _step("a", 1, [1, 2, 3, 4, 5]))  # 5 tokens in one step
    post(r, in_stream("r1"), _step("a", 1, [1], budget_ms=10**8))
    post(r, in_stream("r1"), _step("long", 16, [1, 2, 3]))  # 62 + 3 > 64
    big = StepBatch(items=[encode(_step(f"b{i}", 1, [1])) for i in range(4)])  # 4 items, 3 taken
    post(r, in_stream("r1"), big)
    got = collect(r, "pool", ["chars", "resume", "budget", "topk", "ahead", "bytes", "a", "long", "b0", "b3"])
    codes = {sid: (g.code, g.step) for sid, g in got.items() if isinstance(g, ErrorReply)}
    assert codes == {
        "chars": ("too_large", 0),
        "resume": ("too_large", 4),
        "budget": ("too_large", 0),
        "topk": ("bad_request", 0),
        "ahead": ("bad_request", 0),
        "bytes": ("too_large", 0),
        "a": ("too_large", 1),  # the newest of a's two refusals: the budget's
        "long": ("too_large", 16),
        **{f"b{i}": ("too_large", 1) for i in range(4)},
    }
    # each names the limit and the value
    assert "80" in got["chars"].message and "max_instruction_chars" in got["chars"].message
    assert "65" in got["resume"].message and "max_session_tokens" in got["resume"].message
    assert "60001" in got["budget"].message and "max_budget_ms" in got["budget"].message
    assert "top_k=51" in got["topk"].message and "lookahead=17" in got["ahead"].message
    assert "max_message_bytes" in got["bytes"].message
    assert "65 tokens" in got["long"].message and "max_session_tokens" in got["long"].message
    assert "(4)" in got["b0"].message and "max_batch_items" in got["b0"].message
    # nothing of it reached the engine
    assert len(engine.opened) == opens and engine.step_calls == step_calls
    assert engine.sessions["a"]["step"] == 0 and engine.sessions["long"]["step"] == 15
    after = {code: metrics.refusals.labels(code)._value.get() for code in ("too_large", "bad_request")}
    assert after["too_large"] - before["too_large"] == 11 and after["bad_request"] - before["bad_request"] == 2
    assert loop.refusals["too_large"] == 11 and loop.refusals["bad_request"] == 2
    nothing_pending(r)


def test_a_step_past_max_step_tokens_is_named_with_its_value(make_loop, r):
    engine = FakeEngine()
    make_loop(engine, limits=LIMITS)
    opened(r, ["a"])
    post(r, in_stream("r1"), _step("a", 1, [1, 2, 3, 4, 5]))
    reply = collect(r, "pool", ["a"])["a"]
    assert (reply.code, reply.step) == ("too_large", 1) and "(5)" in reply.message
    assert "max_step_tokens" in reply.message and engine.step_calls == 0


def test_requests_naming_no_valid_reply_list_are_dropped_unanswered(make_loop, r, caplog):
    engine = FakeEngine()
    loop = make_loop(engine)
    post(r, OPEN_STREAM, _open("s", reply_to="a/b"))
    post(r, OPEN_STREAM, _open("s2", reply_to="x" * 81))
    post(r, OPEN_STREAM, _open("no good id!", reply_to=""))  # its session id would be the list: not a name
    post(r, OPEN_STREAM, _open("ok", reply_to=""))
    assert isinstance(collect(r, "ok", ["ok"])["ok"], StepReply)
    eventually(lambda: loop.refusals.get("bad_request", 0) == 3, what="the drops")
    assert [o.session_id for o in engine.opened] == ["ok"]
    assert not [k for k in r.scan_iter(match="cg:reply:*") if b"/" in k or b"!" in k or len(k) > 90]
    logged = [rec.getMessage() for rec in caplog.records if "invalid reply list" in rec.getMessage()]
    assert len(logged) == 3 and all("x" * 81 not in m for m in logged)  # sizes, never the names


def test_outlines_past_the_limits_raise_too_large_and_queue_nothing(make_loop):
    from cogenesis.core.errors import TooLarge

    engine = FakeEngine()
    loop = make_loop(engine, limits=LIMITS)
    with pytest.raises(TooLarge, match="max_tokens 9 is above the limit of 8"):
        loop.submit_outline(SketchRequest(request_id="o1", instruction="a b", max_tokens=9), lambda u: None)
    with pytest.raises(TooLarge, match="65 characters"):
        loop.submit_outline(SketchRequest(request_id="o2", instruction="x" * 65, max_tokens=8), lambda u: None)
    time.sleep(0.3)
    assert engine.outlines == {} and engine.events == {}


# ---- owners: a session answers only to the reply list that opened it ---------------------------------------


def test_a_stranger_cannot_step_close_or_resume_another_lists_session(make_loop, r):
    engine = FakeEngine()
    loop = make_loop(engine)
    before = metrics.refusals.labels("forbidden")._value.get()
    first = opened(r, ["s"], reply_to="owner")["s"]
    post(r, in_stream("r1"), _step("s", 1, [5], reply_to="stranger"))
    post(r, in_stream("r1"), CloseSession(session_id="s", reply_to="stranger"))
    post(r, in_stream("r1"), CloseSession(session_id="s"))  # "" = the session id: another list too
    post(r, OPEN_STREAM, _open("s", reply_to="stranger", resume=pack_ids([1, 2, 3]), resume_step=1))
    post(r, OPEN_STREAM, _open("s", reply_to="stranger"))
    got = []
    deadline = time.monotonic() + 20
    while len(got) < 4:
        assert time.monotonic() < deadline, got
        item = r.brpop([reply_key("stranger")], timeout=1)
        if item is not None:
            got.extend(decode_replies(item[1]))
    assert sorted((g.code, g.step) for g in got) == [
        ("forbidden", 0),
        ("forbidden", 0),
        ("forbidden", 1),
        ("forbidden", 1),
    ]
    assert all("belongs to another reply list" in g.message and "owner" not in g.message for g in got)
    eventually(lambda: loop.refusals.get("forbidden", 0) == 5, what="the close from the session id's list")
    assert collect(r, "s", ["s"])["s"].code == "forbidden"  # that one went to its own ("s") list
    assert r.llen(reply_key("owner")) == 0  # the owner heard nothing of it
    assert len(engine.opened) == 1 and engine.step_calls == 0 and engine.sessions["s"]["step"] == 0
    # the owner's session goes on unchanged
    post(r, in_stream("r1"), _step("s", 1, [5], reply_to="owner"))
    reply = collect(r, "owner", ["s"])["s"]
    assert isinstance(reply, StepReply) and reply.step == 1 and reply.prompt_tokens == first.prompt_tokens + 1
    post(r, in_stream("r1"), CloseSession(session_id="s", reply_to="owner"))
    post(r, in_stream("r1"), _step("s", 2, [5], reply_to="owner"))
    assert collect(r, "owner", ["s"])["s"].code == "unknown_session"
    assert metrics.refusals.labels("forbidden")._value.get() == before + 5


def test_two_lists_opening_one_session_in_one_pass_get_one_owner(make_loop, r, redis_url):
    engine = FakeEngine()
    CloudBus(redis_url, "r1").close()  # the groups, before anything is queued
    post(r, OPEN_STREAM, _open("s", reply_to="first"))
    post(r, OPEN_STREAM, _open("s", reply_to="second", resume=pack_ids([1]), resume_step=2))
    make_loop(engine)
    assert isinstance(collect(r, "first", ["s"])["s"], StepReply)
    assert collect(r, "second", ["s"])["s"].code == "forbidden"
    assert len(engine.opened) == 1


def test_the_replicas_owner_table_is_bounded(make_loop, r):
    engine = FakeEngine(max_sessions=1000)
    loop = make_loop(engine, max_sessions=2)  # owners kept: 2 x max_sessions
    opened(r, [f"s{i}" for i in range(7)])
    assert len(loop._owners) == 4 and set(loop._owners) == {"s3", "s4", "s5", "s6"}
    assert set(engine.sessions) == {"s3", "s4", "s5", "s6"}  # a session losing its owner is closed
    for i in range(50):  # requests for sessions this replica does not know leave nothing behind
        post(r, in_stream("r1"), _step(f"u{i}", 1, [1], reply_to="strangers"))
    got = collect(r, "strangers", [f"u{i}" for i in range(50)])
    assert {g.code for g in got.values()} == {"unknown_session"}
    assert len(loop._owners) == 4 and len(engine.sessions) == 4


def test_an_idle_sessions_owner_goes_with_it(make_loop, r):
    engine = FakeEngine(session_idle_s=0.2)
    loop = make_loop(engine, sweep_interval_s=0.1, session_idle_s=0.2)
    opened(r, ["idle"])
    eventually(lambda: not loop._owners, what="the owner's sweep")
    assert "idle" not in engine.sessions


# ---- admission ---------------------------------------------------------------------------------------


def test_an_open_that_waited_too_long_is_refused_busy_without_the_engine(make_loop, r, redis_url):
    engine = FakeEngine()
    CloudBus(redis_url, "r1").close()  # create the groups before anything is queued
    old = f"{now_ms() - 60_000}-0"  # it came a minute ago (the replicas were behind); its budget is left
    post(r, OPEN_STREAM, OpenSession(session_id="late", instruction="a b", top_k=3, budget_ms=600_000), entry_id=old)
    make_loop(engine, max_queue_age_s=10)
    reply = collect(r, "late", ["late"])["late"]
    assert isinstance(reply, ErrorReply) and (reply.code, reply.step, reply.retry_after_ms) == ("busy", 0, 1000)
    assert engine.opened == []
    nothing_pending(r)


def test_the_load_reports_held_sessions_and_the_longest_wait_once(make_loop, r, redis_url):
    CloudBus(redis_url, "r1").close()
    waited = f"{now_ms() - 3_000}-0"  # on the bus for 3 s before the loop took it (within max_queue_age_s)
    post(r, OPEN_STREAM, OpenSession(session_id="w", instruction="a b", top_k=3, budget_ms=600_000), entry_id=waited)
    loop = make_loop(FakeEngine(), heartbeat_s=0.05, max_queue_age_s=10)
    collect(r, "w", ["w"])
    opened(r, ["a", "b"])
    load = loop.load()
    assert load["sessions"] == 3 and load["outlines"] == 0
    assert 3.0 <= load["open_wait_s"] < 10
    assert loop.load()["open_wait_s"] < 3.0  # the window restarts at every report
    eventually(lambda: (read_alive(r, ["r1"])["r1"] or {}).get("sessions") == 3, what="the heartbeat's sessions")


def test_a_replica_announces_where_it_runs_in_its_heartbeat(redis_url, r):
    bus = CloudBus(redis_url, "placed")
    loop = StepLoop(FakeEngine(), bus, threading.Lock(), config=CloudConfig(heartbeat_s=0.05), placement={"node": "n1"})
    loop.start()
    try:
        eventually(lambda: (read_alive(r, ["placed"])["placed"] or {}).get("node") == "n1", what="the node")
    finally:
        loop.stop(timeout_s=10)


def test_the_engines_busy_becomes_a_busy_reply(make_loop, r):
    make_loop(FakeEngine(max_sessions=1))
    opened(r, ["a"])
    post(r, OPEN_STREAM, OpenSession(session_id="b", instruction="a b", top_k=3, budget_ms=60_000, reply_to="pool"))
    reply = collect(r, "pool", ["b"])["b"]
    assert isinstance(reply, ErrorReply) and (reply.code, reply.retry_after_ms) == ("busy", 2000)


@pytest.mark.parametrize("kind", ["fake", "tiny"])
def test_a_resume_open_is_answered_as_the_step_its_edge_waits_for(kind, make_loop, r, request):
    engine = FakeEngine() if kind == "fake" else tiny_engine(request.getfixturevalue("tiny_large"))
    make_loop(engine)
    plain = opened(r, ["plain"])["plain"]
    resume = OpenSession(
        session_id="back",
        instruction="a b",
        top_k=3,
        budget_ms=60_000,
        reply_to="pool",
        resume=pack_ids([5, 6, 7]),
        resume_step=3,
    )
    post(r, OPEN_STREAM, resume)
    reply = collect(r, "pool", ["back"])["back"]
    assert isinstance(reply, StepReply) and reply.step == 3
    assert reply.prompt_tokens == plain.prompt_tokens + 3  # rebuilt from instruction + the ids it had released
    post(
        r,
        in_stream("r1"),
        StepRequest(session_id="back", step=4, tokens=pack_ids([8]), budget_ms=60_000, reply_to="pool"),
    )
    nxt = collect(r, "pool", ["back"])["back"]
    assert isinstance(nxt, StepReply) and nxt.step == 4 and nxt.prompt_tokens == reply.prompt_tokens + 1
    if kind == "fake":
        assert engine.opened[-1].resume == (5, 6, 7) and engine.opened[-1].resume_step == 3


# ---- dead replicas -----------------------------------------------------------------------------------


def test_a_dead_replicas_pending_open_is_claimed_and_served(make_loop, r, redis_url):
    dead = CloudBus(redis_url, "dead", heartbeat_ttl_s=0.3)
    post(r, OPEN_STREAM, OpenSession(session_id="s", instruction="a b", top_k=3, budget_ms=60_000))
    assert [e[0] for e in dead.read(block_ms=1000)] == [OPEN_STREAM]  # read, never acknowledged: it "crashed"
    dead.close()  # its heartbeat is gone
    claimed_before = metrics.claimed_entries._value.get()
    loop = make_loop(FakeEngine(), replica="live", heartbeat_ttl_s=0.3)
    reply = collect(r, "s", ["s"])["s"]
    assert isinstance(reply, StepReply) and (reply.step, reply.replica) == (0, "live")
    assert loop.claimed == 1 and metrics.claimed_entries._value.get() == claimed_before + 1
    eventually(
        lambda: "dead" not in {c["name"].decode() for c in r.xinfo_consumers(OPEN_STREAM, GROUP)}, what="cleanup"
    )
    nothing_pending(r, "live")


def test_entries_delivered_to_this_replica_but_never_received_are_served_again(make_loop, r, redis_url):
    lost = CloudBus(redis_url, "r1")
    post(r, OPEN_STREAM, OpenSession(session_id="s", instruction="a b", top_k=3, budget_ms=60_000))
    assert len(lost.read(block_ms=1000)) == 1  # delivered; say the reply to XREADGROUP was lost with its connection
    make_loop(FakeEngine(), replica="r1", heartbeat_ttl_s=0.5)
    reply = collect(r, "s", ["s"])["s"]
    assert isinstance(reply, StepReply) and reply.step == 0
    nothing_pending(r)


def test_a_dead_replicas_input_stream_is_answered_unknown_session(make_loop, r, redis_url):
    dead = CloudBus(redis_url, "dead", heartbeat_ttl_s=0.3)
    dead.read(block_ms=10)  # it joined the group, then died with work left on its stream
    steps = [StepRequest(session_id=s, step=4, tokens=pack_ids([1]), budget_ms=60_000, reply_to="pool") for s in "xy"]
    post(r, in_stream("dead"), StepBatch(items=[encode(s) for s in steps] + [encode(CloseSession(session_id="z"))]))
    post(
        r,
        in_stream("dead"),
        StepRequest(session_id="w", step=2, tokens=pack_ids([1]), budget_ms=60_000, reply_to="pool"),
    )
    dead.close()
    loop = make_loop(FakeEngine(), replica="live", heartbeat_ttl_s=0.3)
    got = collect(r, "pool", ["x", "y", "w"])
    assert {s: (g.code, g.step) for s, g in got.items()} == {
        "x": ("unknown_session", 4),
        "y": ("unknown_session", 4),
        "w": ("unknown_session", 2),
    }
    assert "resume it elsewhere" in got["x"].message
    eventually(lambda: not r.exists(in_stream("dead")), what="the dead stream's deletion")
    assert loop.claimed == 2


def test_a_stream_written_after_its_replica_died_is_answered(make_loop, r, monkeypatch):
    monkeypatch.setattr(step_loop_module, "ORPHAN_SCAN_S", 0.0)
    old = f"{now_ms() - 60_000}-0"
    post(
        r, in_stream("ghost"), StepRequest(session_id="g", step=1, tokens=pack_ids([1]), budget_ms=60_000), entry_id=old
    )
    make_loop(FakeEngine(), replica="live", heartbeat_ttl_s=0.3)
    assert collect(r, "g", ["g"])["g"].code == "unknown_session"
    eventually(lambda: not r.exists(in_stream("ghost")), what="the orphan stream's deletion")


def test_the_heartbeat_is_json_with_a_ttl_and_stops_with_the_loop(make_loop, r):
    loop = make_loop(FakeEngine(), heartbeat_s=0.05, heartbeat_ttl_s=2.0)
    beat = read_alive(r, ["r1", "nobody"])
    assert beat["nobody"] is None and {"pid", "at"} <= set(beat["r1"])  # and what it holds, once the loop beats
    eventually(lambda: set(read_alive(r, ["r1"])["r1"] or {}) == {"pid", "at", "sessions", "outlines", "requests"})
    assert 0 < r.pttl(alive_key("r1")) <= 2000
    loop.stop()
    assert not r.exists(alive_key("r1"))  # a stopped replica is dead at once: its edges resume elsewhere


def test_a_stopping_replica_answers_what_is_left_on_its_stream(make_loop, r, redis_url):
    engine = FakeEngine()
    engine.block = True  # the loop is stuck in a pass: what comes meanwhile is never read
    loop = make_loop(engine)
    post(r, OPEN_STREAM, OpenSession(session_id="o", instruction="a b", top_k=3, budget_ms=60_000))
    assert engine.entered.wait(20)
    post(r, in_stream("r1"), StepRequest(session_id="q", step=3, tokens=pack_ids([1]), budget_ms=60_000))
    # the pass ends only once the loop was told to stop: it never reads the step
    threading.Thread(target=lambda: (loop._stop.wait(10), engine.hold.set()), daemon=True).start()
    loop.stop()
    reply = collect(r, "q", ["q"])["q"]
    assert (reply.code, reply.step) == ("unknown_session", 3) and "the replica stopped" in reply.message
    assert isinstance(collect(r, "o", ["o"])["o"], StepReply)  # the pass it was in finished and was posted
    assert not r.exists(in_stream("r1"))


def test_a_pass_under_way_at_the_stop_ends_while_the_replica_still_beats(make_loop, r):
    """A scale-down stops a replica mid-pass: its heartbeat goes on until the pass has posted its replies (an edge
    drops a routed reply from a replica without heartbeat, and the open it answers is acknowledged)."""
    engine = FakeEngine()
    engine.block = True
    loop = make_loop(engine, heartbeat_s=0.05, heartbeat_ttl_s=0.3)
    post(r, OPEN_STREAM, OpenSession(session_id="o", instruction="a b", top_k=3, budget_ms=60_000, reply_to="o"))
    assert engine.entered.wait(20)
    seen: dict[str, bool] = {}

    def finish_late() -> None:
        loop._stop.wait(10)
        time.sleep(1.0)  # past the heartbeat's TTL: alive only if it still beats
        seen["alive"] = bool(r.exists(alive_key("r1")))
        engine.hold.set()

    threading.Thread(target=finish_late, daemon=True).start()
    loop.stop(timeout_s=10)
    assert seen["alive"], "the heartbeat stopped before the pass under way had ended"
    assert isinstance(collect(r, "o", ["o"])["o"], StepReply)
    assert not r.exists(alive_key("r1"))  # and then it left the bus


def test_a_stopping_replica_answers_whats_left_while_it_still_beats_then_leaves(make_loop, r):
    """``stop_linger_s``: what is left on its stream is answered while the replica still beats (edges take those
    replies, and those that read its last pass's replies late still see it alive); then it leaves the bus."""
    loop = make_loop(FakeEngine(), heartbeat_s=0.05, heartbeat_ttl_s=0.5, stop_linger_s=1.0)
    loop._stop.set()  # the loop reads nothing more: the step below stays on its stream
    loop._thread.join(5)
    post(r, in_stream("r1"), StepRequest(session_id="q", step=3, tokens=pack_ids([1]), budget_ms=60_000))
    stopping = threading.Thread(target=loop.stop)
    stopping.start()
    reply = collect(r, "q", ["q"])["q"]
    assert (reply.code, reply.step) == ("unknown_session", 3)
    assert r.exists(alive_key("r1"))  # answered while beating
    stopping.join(10)
    assert not r.exists(alive_key("r1")) and not r.exists(in_stream("r1"))


def test_a_pass_that_outlives_the_stop_posts_nothing_and_is_taken_over(make_loop, r):
    engine = FakeEngine()
    engine.block = True
    loop = make_loop(engine, heartbeat_s=0.05, heartbeat_ttl_s=1.0)
    post(r, OPEN_STREAM, OpenSession(session_id="o", instruction="a b", top_k=3, budget_ms=60_000, reply_to="o"))
    assert engine.entered.wait(20)
    loop.stop(timeout_s=0.3)  # the pass is still running: cut off
    engine.hold.set()
    time.sleep(0.5)
    assert r.llen(reply_key("o")) == 0  # it posted nothing, and left its open pending
    make_loop(FakeEngine(), replica="r2", heartbeat_s=0.05, heartbeat_ttl_s=1.0)
    assert isinstance(collect(r, "o", ["o"])["o"], StepReply)  # a survivor claimed and served it


# ---- timers and health -----------------------------------------------------------------------------


def test_idle_sessions_are_swept_on_a_timer(make_loop, r):
    engine = FakeEngine(session_idle_s=0.2)
    before = metrics.swept_sessions._value.get()
    loop = make_loop(engine, sweep_interval_s=0.1)
    opened(r, ["idle"])
    eventually(lambda: loop.swept == 1, what="the sweep")  # no new traffic needed
    assert "idle" not in engine.sessions and metrics.swept_sessions._value.get() == before + 1


def test_a_hung_pass_makes_the_replica_unhealthy_and_silent(make_loop, r):
    engine = FakeEngine()
    engine.block = True
    loop = make_loop(engine, hang_s=0.3, heartbeat_s=0.05, heartbeat_ttl_s=0.3)
    assert loop.health() is None
    post(r, OPEN_STREAM, OpenSession(session_id="o", instruction="a b", top_k=3, budget_ms=60_000))
    eventually(lambda: (loop.health() or "").startswith("the step loop made no progress"), what="unhealthy")
    eventually(lambda: not r.exists(alive_key("r1")), what="the heartbeat stopping")  # edges look elsewhere
    engine.hold.set()
    eventually(lambda: loop.health() is None, what="recovery")
    loop.stop()
    assert loop.health() == "the step loop thread is not running"


def _redis_on(port):
    return RedisServer(port=port).start()


def test_the_loop_survives_a_redis_restart():
    server = RedisServer().start()
    loop = None
    try:
        loop = StepLoop(FakeEngine(), CloudBus(server.url, "r1"), threading.Lock(), config=CloudConfig()).start()
        r = redis.Redis.from_url(server.url)
        opened(r, ["before"])
        server.stop()
        eventually(lambda: loop.redis.down_for() > 0, what="the outage being noticed")
        server = _redis_on(server.port)  # empty: no streams, no groups
        r = redis.Redis.from_url(server.url)
        post(
            r,
            OPEN_STREAM,
            OpenSession(session_id="after", instruction="a b", top_k=3, budget_ms=60_000, reply_to="pool"),
        )
        got = collect(r, "pool", ["after"], timeout_s=30)
        assert isinstance(got["after"], StepReply)
        assert loop.redis.down_for() == 0 and loop.health() is None and loop.is_alive()
        eventually(lambda: r.exists(alive_key("r1")), what="the heartbeat after the restart")
    finally:
        if loop is not None:
            loop.stop()
        server.stop()


def test_redis_gone_past_its_grace_makes_the_replica_unhealthy():
    server = RedisServer().start()
    loop = StepLoop(
        FakeEngine(), CloudBus(server.url, "r1"), threading.Lock(), config=CloudConfig(redis_grace_s=0.3)
    ).start()
    try:
        assert loop.health() is None
        server.stop()
        eventually(lambda: "Redis unreachable" in (loop.health() or ""), what="unhealthy")
        server = _redis_on(server.port)
        eventually(lambda: loop.health() is None, timeout_s=30, what="healthy again")
    finally:
        loop.stop()
        server.stop()


# ---- outlines in the loop's batch ------------------------------------------------------------------


def test_outlines_are_written_in_the_loops_passes(make_loop):
    engine = FakeEngine()
    loop = make_loop(engine)
    updates: list = []
    done = threading.Event()

    def deliver(update):
        updates.append(update)
        if update.kind in ("done", "failed"):
            done.set()

    loop.submit_outline(SketchRequest(request_id="o", instruction="write", max_tokens=3), deliver, progress=True)
    assert done.wait(20)
    assert [u.kind for u in updates] == ["accepted", "progress", "progress", "done"]
    assert [u.progress.tokens for u in updates[1:3]] == [1, 2] and updates[2].progress.text == "w1 w2"
    assert updates[-1].reply.request_id == "o" and updates[-1].reply.sketch == "outline of write"
    assert loop.stats()["outlines"] == {"active": 0, "done": 1, "failed": 0}


def test_a_full_outline_queue_and_bad_settings_fail_their_outline(make_loop):
    engine = FakeEngine(max_outlines=1)
    engine.outlines_run.clear()
    loop = make_loop(engine)
    updates: dict[str, list] = {"a": [], "b": [], "e": []}
    tickets = {
        k: loop.submit_outline(SketchRequest(request_id=k, instruction="x" if k != "e" else " "), updates[k].append)
        for k in updates
    }
    eventually(lambda: all(updates.values()), what="the loop answering each")
    assert updates["a"][0].kind == "accepted"
    assert updates["b"][0].kind == "failed" and isinstance(updates["b"][0].error, Busy)
    assert updates["e"][0].kind == "failed" and "empty instruction" in updates["e"][0].error.message
    loop.cancel_outline(tickets["a"])
    eventually(lambda: engine.cancelled == [tickets["a"]], what="the cancel")


def test_an_outline_written_in_the_loop_is_the_engines_own_outline(make_loop, r, tiny_large):
    """On the tiny model: the outline the loop writes pass by pass (beside a logits session) is the one the
    engine's blocking ``sketch`` writes."""
    request = SketchRequest(request_id="o", instruction="Write a poem about the sea", max_tokens=12)
    reference = tiny_engine(tiny_large).sketch([request])[0]
    loop = make_loop(tiny_engine(tiny_large))
    updates: list = []
    done = threading.Event()

    def deliver(update):
        updates.append(update)
        if update.kind in ("done", "failed"):
            done.set()

    loop.submit_outline(request, deliver, progress=True)
    assert isinstance(opened(r, ["a"])["a"], StepReply)
    assert done.wait(120)
    final = updates[-1]
    assert final.kind == "done", final
    assert (final.reply.request_id, final.reply.sketch, final.reply.tokens) == ("o", reference.sketch, reference.tokens)
    counts = [u.progress.tokens for u in updates if u.kind == "progress"]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)


# ---- unchanged behaviour ----------------------------------------------------------------------------


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
