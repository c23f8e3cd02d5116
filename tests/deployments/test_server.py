"""The Serve shim over a fake engine. The sketch endpoint's answers (JSON, server-sent events, 429, 503, 504,
a client that leaves) are checked fast, through ``sketch_response`` on an ASGI app with a real step loop and
Redis; the whole app (``build_app`` through ``LocalCluster``, slow) with a deterministic engine in place of the
model, so every reply can be checked exactly."""

import asyncio
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import msgspec
import pytest
import ray.cloudpickle
from cloud_fakes import FakeEngine
from fastapi import FastAPI, Request

from cogenesis.cluster.bus import CloudBus, EdgeBus
from cogenesis.cluster.local import LocalCluster
from cogenesis.core.config import CloudConfig
from cogenesis.core.errors import Busy, ClusterError, SessionError
from cogenesis.core.protocol import (
    CloseSession,
    ErrorReply,
    OpenSession,
    SketchProgress,
    SketchReply,
    SketchRequest,
    StatelessRequest,
    StepReply,
    StepRequest,
    deadline_in,
    decode_json,
    encode,
    pack_ids,
)
from cogenesis.deployments.server import CloudServer, sketch_response, wants_events
from cogenesis.deployments.step_loop import StepLoop
from cogenesis.edge_sim.gate import OutboundGate


def fake_engine(cfg: CloudConfig) -> FakeEngine:
    return FakeEngine(max_outlines=64)


# ---- the sketch endpoint, fast ----------------------------------------------------------------------------


@pytest.fixture
def hub(redis_url):
    """A step loop over a FakeEngine (2 outlines at once) and the sketch endpoint on a plain ASGI app."""
    engine = FakeEngine(max_outlines=2)
    loop = StepLoop(engine, CloudBus(redis_url, "r1"), threading.Lock()).start()
    app = FastAPI()

    @app.post("/v1/sketch")
    async def sketch(request: Request):
        arrived = time.monotonic()
        req = decode_json(await request.body(), SketchRequest)
        return await sketch_response(loop, req, arrived, wants_events(request), request.is_disconnected)

    yield SimpleNamespace(engine=engine, loop=loop, app=app)
    loop.stop()


def run(hub, *calls):
    """Post each (body, headers) to the app concurrently; the responses, in order."""

    async def go():
        transport = httpx.ASGITransport(app=hub.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica", timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/sketch", json=b, headers=h) for b, h in calls))

    return asyncio.run(go())


def sketch_body(rid, instruction, **kw):
    return {"type": "sketch", "request_id": rid, "instruction": instruction, **kw}


def parse_events(text: str) -> list[tuple[str, bytes]]:
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], lines["data"].encode()))
    return out


def test_sketch_answers_json_by_default(hub):
    (answer,) = run(hub, (sketch_body("a", "abcd"), {}))
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    reply = msgspec.json.decode(answer.content, type=SketchReply)
    assert (reply.request_id, reply.sketch, reply.tokens) == ("a", "outline of abcd", 4)


def test_sketch_streams_progress_then_done_as_server_sent_events(hub):
    (answer,) = run(hub, (sketch_body("s", "abcd"), {"Accept": "text/event-stream"}))
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    events = parse_events(answer.text)
    assert [name for name, _ in events] == ["progress", "progress", "progress", "done"]
    progress = [msgspec.json.decode(data, type=SketchProgress) for _, data in events[:3]]
    assert [(p.request_id, p.tokens, p.text) for p in progress] == [
        ("s", 1, "w1"),
        ("s", 2, "w1 w2"),
        ("s", 3, "w1 w2 w3"),
    ]
    assert msgspec.json.decode(events[-1][1], type=SketchReply).sketch == "outline of abcd"


def test_a_full_outline_queue_is_429_with_retry_after_and_bad_settings_422(hub):
    async def go():
        transport = httpx.ASGITransport(app=hub.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica", timeout=30) as client:
            held = [
                asyncio.ensure_future(client.post("/v1/sketch", json=sketch_body(f"x{i}", "stall", budget_ms=2000)))
                for i in range(2)
            ]
            while hub.engine.outlines_pending() < 2:  # both slots taken
                await asyncio.sleep(0.01)
            busy = await client.post("/v1/sketch", json=sketch_body("late", "abcd"))
            bad = await client.post("/v1/sketch", json=sketch_body("bad", "  "))
            return busy, bad, await asyncio.gather(*held)

    busy, bad, held = asyncio.run(go())
    assert busy.status_code == 429 and busy.headers["Retry-After"] == "3"  # 2.5 s, in whole seconds
    assert busy.json() == {"error": "the outline queue is full", "hint": Busy("").hint}
    assert bad.status_code == 422
    assert bad.json() == {"error": "empty instruction", "hint": "send the general instruction to outline"}
    assert [a.status_code for a in held] == [504, 504]


def test_an_outline_past_its_budget_is_cancelled_and_answered_504(hub):
    (answer,) = run(hub, (sketch_body("slow", "stall forever", budget_ms=200), {}))
    assert answer.status_code == 504
    assert "ran past its budget of 200 ms" in answer.json()["error"] and answer.json()["hint"]
    deadline = time.monotonic() + 10
    while not hub.engine.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [c.split("#")[0] for c in hub.engine.cancelled] == ["slow"] and hub.engine.outlines == {}


def test_a_stream_past_its_budget_ends_with_an_error_event(hub):
    (answer,) = run(hub, (sketch_body("slow", "stall", budget_ms=200), {"Accept": "text/event-stream"}))
    assert answer.status_code == 200
    ((name, data),) = parse_events(answer.text)
    assert name == "error" and "budget" in msgspec.json.decode(data)["error"]


def test_a_client_that_leaves_cancels_its_outline(hub):
    async def gone():
        return True

    async def ask():
        req = SketchRequest(request_id="left", instruction="stall")
        return await sketch_response(hub.loop, req, time.monotonic(), disconnected=gone)

    assert asyncio.run(ask()).status_code == 499
    deadline = time.monotonic() + 10
    while not hub.engine.cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [c.split("#")[0] for c in hub.engine.cancelled] == ["left"]


def test_a_replica_that_is_not_serving_answers_503(hub):
    hub.loop.stop()
    (answer,) = run(hub, (sketch_body("a", "abcd"), {}))
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    assert "not serving" in answer.json()["error"]


def test_the_health_check_raises_while_the_loop_is_unhealthy():
    unhealthy = SimpleNamespace(replica="r9", loop=SimpleNamespace(health=lambda: "Redis unreachable for 31 s"))
    with pytest.raises(ClusterError, match="replica r9 is unhealthy: Redis unreachable for 31 s"):
        CloudServer.check_health(unhealthy)
    CloudServer.check_health(SimpleNamespace(replica="r1", loop=SimpleNamespace(health=lambda: None)))


# ---- the whole app on Ray Serve (slow) -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud(redis_server):
    """One Ray + Serve for the module: the shim over ``fake_engine`` (pickled by value: this test module is
    not importable in a replica)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(sys.modules[FakeEngine.__module__])
    cfg = CloudConfig(replica_cpus=0.25)
    local = LocalCluster(cfg, redis_url=redis_server.url, start_timeout_s=240, engine_factory=fake_engine)
    info = local.start()
    replica = httpx.get(f"{info.http_url}/healthz", timeout=30).json()["replica"]
    yield info, replica
    local.stop()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[FakeEngine.__module__])


def _send(bus, replica, msg):
    bus.send_many([(replica, msg.session_id, OutboundGate(" ", []).seal(msg))])


def _reply(bus, session_id, step):
    return bus.wait_many({session_id: step}, deadline_in(30))[session_id]


@pytest.mark.slow
def test_healthz_names_the_replica(cloud):
    info, replica = cloud
    assert httpx.get(f"{info.http_url}/healthz", timeout=30).json() == {"ok": True, "replica": replica}


@pytest.mark.slow
def test_sketch_serves_concurrent_outlines_and_refuses_only_its_bad_request(cloud):
    info, _ = cloud
    bodies = [sketch_body(str(i), f"write note {i}") for i in range(3)]
    bodies.append(sketch_body("bad", "  "))
    with ThreadPoolExecutor(len(bodies)) as pool:  # concurrent: written in the same passes of the step loop
        answers = list(pool.map(lambda b: httpx.post(f"{info.http_url}/v1/sketch", json=b, timeout=30), bodies))
    assert [a.status_code for a in answers] == [200, 200, 200, 422]
    for i, a in enumerate(answers[:3]):
        reply = msgspec.json.decode(a.content, type=SketchReply)
        assert reply.request_id == str(i) and reply.sketch == f"outline of write note {i}" and reply.tokens == 12
    assert answers[3].json() == {"error": "empty instruction", "hint": "send the general instruction to outline"}
    malformed = httpx.post(f"{info.http_url}/v1/sketch", content=b"{not json", timeout=30)
    assert malformed.status_code == 400 and "malformed SketchRequest" in malformed.json()["error"]
    with httpx.stream(
        "POST", f"{info.http_url}/v1/sketch", json=sketch_body("sse", "abc"), headers={"Accept": "text/event-stream"}
    ) as stream:
        events = parse_events(stream.read().decode())
    assert [name for name, _ in events] == ["progress", "progress", "done"]


@pytest.mark.slow
def test_stateless_returns_the_engines_top_k_traced(cloud):
    info, replica = cloud
    req = StatelessRequest(session_id="x", tokens=pack_ids([5, 6, 7]), top_k=3, budget_ms=30_000)
    answer = httpx.post(f"{info.http_url}/v1/stateless", content=encode(req), timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/msgpack"
    reply = msgspec.msgpack.decode(answer.content, type=StepReply)
    ids, logprobs = reply.top_k()
    assert (reply.session_id, reply.step, reply.replica, reply.prompt_tokens) == ("x", 3, replica, 3)
    assert ids.tolist() == [[3, 4, 5]] and logprobs.tolist() == [[0.0, -1.0, -2.0]] and reply.drafts().size == 0
    assert reply.compute_ms == 1.0
    assert reply.traced and 0 <= reply.model_us <= reply.server_us and reply.queue_us == 0  # served on arrival


@pytest.mark.slow
def test_stateless_bad_requests_get_typed_errors(cloud):
    info, _ = cloud
    url = f"{info.http_url}/v1/stateless"

    def post(body: bytes) -> tuple[int, ErrorReply]:
        answer = httpx.post(url, content=body, timeout=30)
        return answer.status_code, msgspec.msgpack.decode(answer.content, type=ErrorReply)

    status, junk = post(b"junk")
    assert status == 400 and junk.code == "bad_request"
    status, empty = post(encode(StatelessRequest(session_id="e", tokens=b"", top_k=3, budget_ms=30_000)))
    assert status == 422 and (empty.session_id, empty.code) == ("e", "bad_request")
    assert "invalid token ids" in empty.message
    late = StatelessRequest(session_id="l", tokens=pack_ids([1, 2]), top_k=3, budget_ms=0)  # spent on arrival
    status, refused = post(encode(late))
    assert status == 422 and (refused.session_id, refused.step, refused.code) == ("l", 2, "deadline")


@pytest.mark.slow
def test_logits_session_over_the_bus(cloud):
    info, replica = cloud
    bus = EdgeBus(info.redis_url)
    try:
        _send(bus, None, OpenSession(session_id="s", instruction="write a haiku", top_k=4, budget_ms=30_000))
        first = _reply(bus, "s", 0)
        assert isinstance(first, StepReply) and (first.replica, first.prompt_tokens) == (replica, 3)
        assert first.top_k()[0].tolist() == [[3, 4, 5, 6]]
        step = StepRequest(session_id="s", step=1, tokens=pack_ids([9, 9]), budget_ms=30_000)
        _send(bus, replica, step)
        second = _reply(bus, "s", 1)
        assert (
            isinstance(second, StepReply) and second.prompt_tokens == 5 and second.top_k()[0].tolist() == [[5, 6, 7, 8]]
        )
        _send(bus, replica, CloseSession(session_id="s"))
        _send(bus, replica, StepRequest(session_id="s", step=2, tokens=pack_ids([1]), budget_ms=30_000))
        gone = _reply(bus, "s", 2)
        assert isinstance(gone, SessionError) and "unknown session s" in str(gone)
        _send(bus, None, OpenSession(session_id="e", instruction=" ", top_k=4, budget_ms=30_000))
        refused = _reply(bus, "e", 0)
        assert isinstance(refused, SessionError) and "bad_request: empty instruction" in str(refused)
    finally:
        bus.close()


@pytest.mark.slow
def test_stats_merge_the_engine_and_the_step_loop(cloud):
    info, replica = cloud

    def stats() -> dict:
        return httpx.get(f"{info.http_url}/v1/stats", timeout=30).json()

    before = stats()
    assert before["replica"] == replica and before["metrics"].startswith("127.0.0.1:")
    assert set(before) >= {"refusals", "claimed_entries", "swept_sessions", "outlines"}
    bus = EdgeBus(info.redis_url)
    try:
        _send(bus, None, OpenSession(session_id="t", instruction="count me", top_k=2, budget_ms=30_000))
        assert isinstance(_reply(bus, "t", 0), StepReply)
        _send(bus, None, OpenSession(session_id="t2", instruction=" ", top_k=2, budget_ms=30_000))
        assert isinstance(_reply(bus, "t2", 0), SessionError)
    finally:
        bus.close()
    after = stats()
    assert after["active_sessions"] == before["active_sessions"] + 1
    assert (after["bus_requests"], after["bus_errors"]) == (before["bus_requests"] + 2, before["bus_errors"] + 1)
    assert after["refusals"].get("bad_request", 0) == before["refusals"].get("bad_request", 0) + 1
