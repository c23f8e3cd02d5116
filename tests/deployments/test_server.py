"""The Serve shim over a fake engine. The sketch endpoint's answers (JSON, server-sent events, 429, 503, 504,
a client that leaves) are checked fast, through ``sketch_response`` on an ASGI app with a real step loop and
Redis; the whole app (``build_app`` through ``LocalCluster``, slow) with a deterministic engine in place of the
model, so every reply can be checked exactly."""

import asyncio
import contextlib
import inspect
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
from cogenesis.core.auth import mint
from cogenesis.core.config import CloudConfig
from cogenesis.core.errors import Busy, ClusterError, SessionError, TooLarge
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
from cogenesis.core.secrets import SecretsDir
from cogenesis.deployments.outlines_http import OutlineHead
from cogenesis.deployments.server import CloudServer, route_key, sketch_response, wants_events
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


# ---- the routes' credentials and limits, and outline_events, fast ------------------------------------------


LIMITS = {
    "max_body_bytes": 2048,
    "max_sketch_tokens": 200,
    "max_instruction_chars": 100,
    "max_session_tokens": 64,
    "max_budget_ms": 60_000,
}


@pytest.fixture
def replica(redis_url, tmp_path):
    """A CloudServer in this process (its routes called directly on a plain ASGI app): a step loop over a
    FakeEngine, the cluster's secrets in ``tmp_path``, small limits."""
    secrets = SecretsDir.create(tmp_path / "secrets")
    engine = FakeEngine(max_outlines=2)
    loop = StepLoop(engine, CloudBus(redis_url, "r1"), threading.Lock()).start()
    server = object.__new__(CloudServer)  # no Serve, no engine factory: the parts the routes use
    server.cfg = CloudConfig(secrets_dir=str(secrets.path), limits=LIMITS)
    server.key, server.engine, server.loop, server.replica = route_key(server.cfg), engine, loop, "r1"
    server.capture, server.metrics_address, server.lock = None, "127.0.0.1:1", threading.Lock()
    app = FastAPI()
    for path, method, verb in (
        ("/v1/sketch", CloudServer.sketch, "POST"),
        ("/v1/stateless", CloudServer.stateless, "POST"),
        ("/healthz", CloudServer.healthz, "GET"),
        ("/v1/stats", CloudServer.stats, "GET"),
    ):
        app.add_api_route(path, _bound(server, method), methods=[verb])
    key = secrets.cluster_key()
    tokens = {role: mint(key, f"{role}-1", role) for role in ("device", "worker", "admin")}
    yield SimpleNamespace(server=server, engine=engine, loop=loop, app=app, secrets=secrets, key=key, tokens=tokens)
    loop.stop()


def _bound(server, method):
    async def handler(request: Request):
        answer = method(server, request)
        return await answer if inspect.isawaitable(answer) else answer

    return handler


def call(app, *requests):
    """Each (method, path, kwargs) on the app, in turn; the responses."""

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://replica", timeout=30) as client:
            return [await client.request(m, path, **kw) for m, path, kw in requests]

    return asyncio.run(go())


def bearer_of(token):
    return {"Authorization": f"Bearer {token}"}


def test_the_routes_need_a_worker_or_admin_token(replica):
    t = replica.tokens
    expired = mint(replica.key, "w", "worker", ttl_s=60, now=time.time() - 3600)
    forged = mint(b"x" * 32, "w", "worker")
    body = {"json": sketch_body("a", "abcd")}
    answers = call(
        replica.app,
        ("POST", "/v1/sketch", body),
        ("POST", "/v1/sketch", {**body, "headers": bearer_of(forged)}),
        ("POST", "/v1/sketch", {**body, "headers": bearer_of(expired)}),
        ("POST", "/v1/sketch", {**body, "headers": {"Authorization": "Basic dXNlcjpwdw=="}}),
        ("POST", "/v1/sketch", {**body, "headers": bearer_of(t["device"])}),
        ("POST", "/v1/sketch", {**body, "headers": bearer_of(t["worker"])}),
        ("POST", "/v1/sketch", {**body, "headers": bearer_of(t["admin"])}),
    )
    assert [a.status_code for a in answers] == [401, 401, 401, 401, 403, 200, 200]
    assert answers[0].headers["WWW-Authenticate"] == "Bearer" and "bearer token" in answers[0].json()["error"]
    assert "signature is invalid" in answers[1].json()["error"] and "expired" in answers[2].json()["error"]
    assert "a device token may not do this" in answers[4].json()["error"] and answers[4].json()["hint"]
    assert msgspec.json.decode(answers[5].content, type=SketchReply).sketch == "outline of abcd"
    stateless = encode(StatelessRequest(session_id="x", tokens=pack_ids([5, 6]), top_k=2, budget_ms=30_000))
    refused, served = call(
        replica.app,
        ("POST", "/v1/stateless", {"content": stateless, "headers": bearer_of(t["device"])}),
        ("POST", "/v1/stateless", {"content": stateless, "headers": bearer_of(t["worker"])}),
    )
    assert (refused.status_code, served.status_code) == (403, 200)


def test_healthz_tells_anyone_ok_and_an_admin_the_details_and_stats_are_admin_only(replica):
    t = replica.tokens
    anon, worker, admin, stats_worker, stats_admin = call(
        replica.app,
        ("GET", "/healthz", {}),
        ("GET", "/healthz", {"headers": bearer_of(t["worker"])}),
        ("GET", "/healthz", {"headers": bearer_of(t["admin"])}),
        ("GET", "/v1/stats", {"headers": bearer_of(t["worker"])}),
        ("GET", "/v1/stats", {"headers": bearer_of(t["admin"])}),
    )
    assert (anon.status_code, anon.json()) == (200, {"ok": True})
    assert worker.json() == {"ok": True}
    assert admin.json() == {"ok": True, "replica": "r1"}
    assert stats_worker.status_code == 403
    assert stats_admin.status_code == 200 and stats_admin.json()["replica"] == "r1"
    replica.loop.stop()
    down_anon, down_admin = call(
        replica.app, ("GET", "/healthz", {}), ("GET", "/healthz", {"headers": bearer_of(t["admin"])})
    )
    assert (down_anon.status_code, down_anon.json()) == (503, {"ok": False})
    assert down_admin.status_code == 503 and down_admin.json()["reason"]


def test_bodies_and_outlines_past_the_limits_are_413(replica):
    auth = bearer_of(replica.tokens["worker"])

    async def chunked():  # no Content-Length: refused on the bytes read
        for _ in range(3):
            yield b"x" * 1000

    long_sequence = StatelessRequest(session_id="l", tokens=pack_ids([5] * 65), top_k=2, budget_ms=30_000)
    declared, streamed, tokens, chars, budget, stateless, sequence = call(
        replica.app,
        ("POST", "/v1/sketch", {"content": b"{" + b" " * 3000 + b"}", "headers": auth}),
        ("POST", "/v1/sketch", {"content": chunked(), "headers": auth}),
        ("POST", "/v1/sketch", {"json": sketch_body("t", "abcd", max_tokens=201), "headers": auth}),
        ("POST", "/v1/sketch", {"json": sketch_body("c", "x" * 101), "headers": auth}),
        ("POST", "/v1/sketch", {"json": sketch_body("b", "abcd", budget_ms=60_001), "headers": auth}),
        ("POST", "/v1/stateless", {"content": b"\x00" * 3000, "headers": auth}),
        ("POST", "/v1/stateless", {"content": encode(long_sequence), "headers": auth}),
    )
    answers = (declared, streamed, tokens, chars, budget, stateless, sequence)
    assert [a.status_code for a in answers] == [413] * 7
    assert "budget_ms 60001 is above the limit of 60000" in budget.json()["error"]
    refused = msgspec.msgpack.decode(sequence.content, type=ErrorReply)
    assert refused.code == "too_large" and "65 token ids; at most 64" in refused.message
    assert "3002 bytes; at most 2048" in declared.json()["error"]
    assert "more than" in streamed.json()["error"] and "max_body_bytes" in streamed.json()["hint"]
    assert "max_tokens 201 is above the limit of 200" in tokens.json()["error"]
    assert "101 characters; at most 100" in chars.json()["error"]
    assert msgspec.msgpack.decode(stateless.content, type=ErrorReply).code == "too_large"
    assert replica.engine.outlines == {} and replica.engine.cancelled == []  # nothing reached the engine


def test_a_limit_of_the_step_loop_is_413_too(replica, monkeypatch):
    def refuse(request, deliver, progress=False):
        raise TooLarge("the outline queue takes no such thing", hint="smaller")

    monkeypatch.setattr(replica.loop, "submit_outline", refuse)
    (answer,) = call(
        replica.app,
        ("POST", "/v1/sketch", {"json": sketch_body("a", "abcd"), "headers": bearer_of(replica.tokens["worker"])}),
    )
    assert answer.status_code == 413 and answer.json() == {
        "error": "the outline queue takes no such thing",
        "hint": "smaller",
    }


def test_without_secrets_the_routes_are_open(replica, monkeypatch):
    monkeypatch.delenv("COGENESIS_SECRETS_DIR", raising=False)
    monkeypatch.delenv("COGENESIS_CLUSTER_KEY", raising=False)
    assert route_key(CloudConfig()) is None
    replica.server.key = None
    sketch, health = call(
        replica.app, ("POST", "/v1/sketch", {"json": sketch_body("a", "ab")}), ("GET", "/healthz", {})
    )
    assert sketch.status_code == 200 and health.json() == {"ok": True, "replica": "r1"}


def events_of(server, body: bytes, stream: bool) -> list:
    """What a handle caller of ``outline_events`` receives (the head, then the chunks)."""

    async def go():
        return [item async for item in server.outline_events(body, stream)]

    return asyncio.run(go())


def test_outline_events_yields_the_head_then_the_routes_body(replica):
    server = replica.server
    head, body = events_of(server, msgspec.json.encode(SketchRequest(request_id="j", instruction="abcd")), False)
    assert head == OutlineHead(200, "application/json", {})
    assert msgspec.json.decode(body, type=SketchReply).sketch == "outline of abcd"
    head, *chunks = events_of(server, msgspec.json.encode(SketchRequest(request_id="s", instruction="abc")), True)
    assert head.status == 200 and head.media_type == "text/event-stream"
    assert head.headers["cache-control"] == "no-cache"
    assert [name for name, _ in parse_events(b"".join(chunks).decode())] == ["progress", "progress", "done"]
    busy_free = events_of(server, b"{not json", False)
    assert busy_free[0].status == 400 and b"malformed SketchRequest" in busy_free[1]
    too_many = SketchRequest(request_id="t", instruction="abcd", max_tokens=1000)
    head, body = events_of(server, msgspec.json.encode(too_many), True)
    assert head.status == 413 and b"above the limit of 200" in body


def test_cancelling_an_outline_events_call_cancels_the_outline(replica):
    body = msgspec.json.encode(SketchRequest(request_id="gone", instruction="stall"))

    async def go(stream: bool):
        items: list = []

        async def consume():
            async for item in replica.server.outline_events(body, stream):
                items.append(item)

        task = asyncio.ensure_future(consume())
        while replica.engine.outlines_pending() < 1 or (stream and not items):  # under way
            await asyncio.sleep(0.01)
        task.cancel()  # what Serve does to the replica's task when the handle caller cancels
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return items

    for stream in (False, True):
        replica.engine.cancelled.clear()
        items = asyncio.run(go(stream))
        assert items[:1] == ([OutlineHead(200, "text/event-stream", items[0].headers)] if stream else [])
        deadline = time.monotonic() + 10
        while not replica.engine.cancelled and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [c.split("#")[0] for c in replica.engine.cancelled] == ["gone"]


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
    replica = httpx.get(f"{info.http_url}/healthz", headers=auth(info), timeout=30).json()["replica"]
    yield info, replica
    local.stop()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[FakeEngine.__module__])


def auth(info):
    """An admin token of the cluster (it may do what a worker may, and read health details and stats)."""
    return {"Authorization": f"Bearer {SecretsDir(info.secrets_dir).token('admin')}"}


def _send(bus, replica, msg):
    bus.send_many([(replica, msg.session_id, OutboundGate(" ", []).seal(msg))])


def _reply(bus, session_id, step):
    return bus.wait_many({session_id: step}, deadline_in(30))[session_id]


@pytest.mark.slow
def test_healthz_names_the_replica(cloud):
    info, replica = cloud
    assert httpx.get(f"{info.http_url}/healthz", headers=auth(info), timeout=30).json() == {
        "ok": True,
        "replica": replica,
    }


@pytest.mark.slow
def test_sketch_serves_concurrent_outlines_and_refuses_only_its_bad_request(cloud):
    info, _ = cloud
    bodies = [sketch_body(str(i), f"write note {i}") for i in range(3)]
    bodies.append(sketch_body("bad", "  "))
    with ThreadPoolExecutor(len(bodies)) as pool:  # concurrent: written in the same passes of the step loop
        answers = list(
            pool.map(lambda b: httpx.post(f"{info.http_url}/v1/sketch", json=b, headers=auth(info), timeout=30), bodies)
        )
    assert [a.status_code for a in answers] == [200, 200, 200, 422]
    for i, a in enumerate(answers[:3]):
        reply = msgspec.json.decode(a.content, type=SketchReply)
        assert reply.request_id == str(i) and reply.sketch == f"outline of write note {i}" and reply.tokens == 12
    assert answers[3].json() == {"error": "empty instruction", "hint": "send the general instruction to outline"}
    malformed = httpx.post(f"{info.http_url}/v1/sketch", content=b"{not json", headers=auth(info), timeout=30)
    assert malformed.status_code == 400 and "malformed SketchRequest" in malformed.json()["error"]
    with httpx.stream(
        "POST",
        f"{info.http_url}/v1/sketch",
        json=sketch_body("sse", "abc"),
        headers={"Accept": "text/event-stream", **auth(info)},
    ) as stream:
        events = parse_events(stream.read().decode())
    assert [name for name, _ in events] == ["progress", "progress", "done"]


@pytest.mark.slow
def test_stateless_returns_the_engines_top_k_traced(cloud):
    info, replica = cloud
    req = StatelessRequest(session_id="x", tokens=pack_ids([5, 6, 7]), top_k=3, budget_ms=30_000)
    answer = httpx.post(f"{info.http_url}/v1/stateless", content=encode(req), headers=auth(info), timeout=30)
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
        answer = httpx.post(url, content=body, headers=auth(info), timeout=30)
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
        return httpx.get(f"{info.http_url}/v1/stats", headers=auth(info), timeout=30).json()

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


@pytest.mark.slow
def test_the_gateway_answers_chat_completions_with_a_token_and_401_without(cloud):
    info, _ = cloud
    assert info.gateway_url is not None and info.http_url == f"{info.gateway_url}/cloud"
    secrets = SecretsDir(info.secrets_dir)
    body = {"model": "m", "messages": [{"role": "user", "content": "abcd"}]}
    url = f"{info.gateway_url}/v1/chat/completions"
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    for token in (secrets.token("worker"), mint(secrets.cluster_key(), "phone-1", "device")):
        answer = httpx.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"] == {"role": "assistant", "content": "outline of abcd"}
    assert httpx.post(f"{info.http_url}/v1/sketch", json=sketch_body("x", "ab"), timeout=30).status_code == 401
