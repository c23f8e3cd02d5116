"""The gateway's outline routes (``/v1/sketch``, OpenAI ``/v1/chat/completions``) over a handle: a fake of Serve's
DeploymentHandle that runs ``CloudServer.outline_events`` of an in-process replica (a real step loop over a
FakeEngine, real Redis) in a task of its own, as Serve runs it in the replica, and cancels that task on
``cancel()``; and scripted fakes for a replica that does not answer."""

import asyncio
import contextlib
import threading
from types import SimpleNamespace

import httpx
import msgspec
import pytest
from cloud_fakes import FakeEngine
from fastapi import FastAPI, Request

from cogenesis.cluster.bus import CloudBus
from cogenesis.core.auth import Claims
from cogenesis.core.config import CloudConfig
from cogenesis.core.protocol import SketchReply
from cogenesis.deployments.outlines_http import (
    ChatMessage,
    ContentPart,
    _chunks,
    chat_completions_route,
    instruction_of,
    sketch_route,
)
from cogenesis.deployments.server import CloudServer
from cogenesis.deployments.step_loop import StepLoop

LIMITS = {"max_body_bytes": 2048, "max_sketch_tokens": 200, "max_instruction_chars": 100}
CLAIMS = Claims(sub="phone-1", role="device", iat=0, exp=2**40)


class HandleCall:
    """One ``outline_events`` call: the replica's generator runs in its own task; ``cancel`` cancels it."""

    def __init__(self, events) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.task = asyncio.ensure_future(self._pump(events))

    async def _pump(self, events) -> None:
        try:
            async for item in events:
                await self.queue.put(("item", item))
            await self.queue.put(("end", None))
        except Exception as exc:
            await self.queue.put(("error", exc))

    def __aiter__(self):
        return self

    async def __anext__(self):
        kind, item = await self.queue.get()
        if kind == "end":
            raise StopAsyncIteration
        if kind == "error":
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True
        self.task.cancel()


class FakeHandle:
    """``handle.options(stream=True).outline_events.remote(body, stream)`` over ``events(body, stream)``."""

    def __init__(self, events) -> None:
        self.events = events
        self.calls: list[HandleCall] = []
        self.outline_events = self

    def options(self, stream: bool = False):
        assert stream, "outline_events is a streaming call"
        return self

    def remote(self, body: bytes, stream: bool) -> HandleCall:
        call = HandleCall(self.events(body, stream))
        self.calls.append(call)
        return call


@pytest.fixture
def gateway(redis_url):
    """The two routes on a plain ASGI app, over a FakeHandle of an in-process replica."""
    engine = FakeEngine(max_outlines=2)
    loop = StepLoop(engine, CloudBus(redis_url, "r1"), threading.Lock()).start()
    cfg = CloudConfig(limits=LIMITS)
    server = object.__new__(CloudServer)  # the parts outline_events uses
    server.cfg, server.loop, server.capture, server.key = cfg, loop, None, None
    handle = FakeHandle(server.outline_events)
    yield SimpleNamespace(engine=engine, loop=loop, cfg=cfg, handle=handle, app=_app(handle, cfg))
    loop.stop()


def _app(handle, cfg) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/sketch")
    async def sketch(request: Request):
        return await sketch_route(handle, request, CLAIMS, cfg)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await chat_completions_route(handle, request, CLAIMS, cfg)

    return app


def post(app, path, **kw) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=30) as client:
            return await client.post(path, **kw)

    return asyncio.run(go())


def sketch_body(rid, instruction, **kw):
    return {"type": "sketch", "request_id": rid, "instruction": instruction, **kw}


def sse(text: str) -> list[tuple[str, str]]:
    out = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((fields.get("event", "message"), fields["data"]))
    return out


# ---- /v1/sketch --------------------------------------------------------------------------------------------


def test_sketch_route_relays_the_json_reply_and_the_event_stream(gateway):
    answer = post(gateway.app, "/v1/sketch", json=sketch_body("a", "abcd"))
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert msgspec.json.decode(answer.content, type=SketchReply).sketch == "outline of abcd"
    stream = post(gateway.app, "/v1/sketch", json=sketch_body("s", "abc"), headers={"Accept": "text/event-stream"})
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    assert stream.headers["cache-control"] == "no-cache"
    events = sse(stream.text)
    assert [name for name, _ in events] == ["progress", "progress", "progress"][:2] + ["done"]
    assert msgspec.json.decode(events[-1][1], type=SketchReply).request_id == "s"


def test_sketch_route_answers_the_clouds_statuses(gateway):
    bad = post(gateway.app, "/v1/sketch", content=b"{not json")
    assert bad.status_code == 400 and "malformed SketchRequest" in bad.json()["error"]
    empty = post(gateway.app, "/v1/sketch", json=sketch_body("e", "  "))
    assert empty.status_code == 422 and empty.json()["error"] == "empty instruction"
    big = post(gateway.app, "/v1/sketch", content=b"x" * 3000)
    assert big.status_code == 413 and "at most 2048" in big.json()["error"]
    long = post(gateway.app, "/v1/sketch", json=sketch_body("l", "abc", max_tokens=500))
    assert long.status_code == 413 and "above the limit of 200" in long.json()["error"]
    assert len(gateway.handle.calls) == 3  # the body's size is checked before the hop


def test_sketch_route_answers_503_when_no_replica_answers():
    async def dead(body, stream):
        raise RuntimeError("actor died")
        yield  # an async generator

    app = _app(FakeHandle(dead), CloudConfig())
    answer = post(app, "/v1/sketch", json=sketch_body("a", "abcd"))
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    assert answer.json()["error"] == "no cloud replica answered"


class Scripted:
    """A handle call that yields ``items`` and then waits forever (an outline being written)."""

    def __init__(self, items) -> None:
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.items:
            return self.items.pop(0)
        await asyncio.Event().wait()

    def cancel(self) -> None:
        self.cancelled = True


def test_a_client_that_leaves_the_relay_cancels_the_handle_call():
    async def go(leave):
        call = Scripted([b"event: progress\ndata: {}\n\n"])
        chunks = _chunks(call)
        assert (await chunks.__anext__()).startswith(b"event: progress")
        if leave == "close":  # the body iterator is closed between chunks
            await chunks.aclose()
            return call
        reading = asyncio.ensure_future(chunks.__anext__())  # the response streams ...
        await asyncio.sleep(0)
        reading.cancel()  # ... and the client leaves: Starlette cancels the task that streams it
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        return call

    assert asyncio.run(go("cancel")).cancelled and asyncio.run(go("close")).cancelled


# ---- /v1/chat/completions ----------------------------------------------------------------------------------


def test_the_last_user_message_is_the_instruction():
    messages = [
        ChatMessage("system", "my private notes"),
        ChatMessage("user", "first"),
        ChatMessage("assistant", "ok"),
        ChatMessage("user", [ContentPart("text", "write "), ContentPart("image_url"), ContentPart("text", "a poem")]),
    ]
    assert instruction_of(messages) == "write a poem"
    assert instruction_of(messages[:3]) == "first"
    with pytest.raises(Exception, match="no user message"):
        instruction_of(messages[:1])


def test_chat_completion_answers_the_outline_of_the_last_user_message(gateway):
    body = {
        "model": "my-model",
        "messages": [
            {"role": "system", "content": "the user's diary: private"},
            {"role": "user", "content": "abcd"},
        ],
        "temperature": 0.0,
        "top_p": 1.0,
        "logit_bias": {},  # fields this route does not read are ignored
    }
    answer = post(gateway.app, "/v1/chat/completions", json=body)
    assert answer.status_code == 200
    out = answer.json()
    assert out["id"].startswith("chatcmpl-") and out["object"] == "chat.completion" and out["model"] == "my-model"
    assert isinstance(out["created"], int)
    assert out["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "outline of abcd"}, "finish_reason": "stop"}
    ]
    assert out["usage"] == {"prompt_tokens": 0, "completion_tokens": 4, "total_tokens": 4}
    capped = post(gateway.app, "/v1/chat/completions", json={**body, "max_tokens": 3}).json()
    assert capped["choices"][0]["finish_reason"] == "length" and capped["usage"]["completion_tokens"] == 3


def test_chat_completion_streams_chunks_then_done(gateway):
    body = {"messages": [{"role": "user", "content": "abc"}], "stream": True, "stream_options": {"include_usage": True}}
    answer = post(gateway.app, "/v1/chat/completions", json=body)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    data = [d for _, d in sse(answer.text)]
    assert data[-1] == "[DONE]"
    chunks = [msgspec.json.decode(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert deltas == ["w1", " w2"]  # the FakeEngine's progress texts "w1", "w1 w2"
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_chat_completion_errors_are_in_openais_shape(gateway):
    def ask(**body):
        return post(gateway.app, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **body})

    no_user = post(gateway.app, "/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
    assert no_user.status_code == 400
    assert no_user.json()["error"] == {
        "message": "no user message: the last user message is the instruction to outline",
        "type": "invalid_request_error",
        "code": "bad_request",
    }
    too_many = ask(max_tokens=500)
    assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "too_large"
    empty = post(gateway.app, "/v1/chat/completions", json={"messages": [{"role": "user", "content": " "}]})
    assert empty.status_code == 400 and "empty instruction" in empty.json()["error"]["message"]
    malformed = post(gateway.app, "/v1/chat/completions", content=b'{"messages": 3}')
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    big = post(gateway.app, "/v1/chat/completions", content=b"x" * 3000)
    assert big.status_code == 413
    streamed = ask(max_tokens=500, stream=True)  # refused before any chunk: a plain error
    assert streamed.status_code == 413 and streamed.headers["content-type"] == "application/json"


def test_chat_completion_busy_and_no_replica(gateway):
    async def dead(body, stream):
        raise RuntimeError("actor died")
        yield

    gone = post(
        _app(FakeHandle(dead), CloudConfig()),
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "a"}]},
    )
    assert gone.status_code == 503 and gone.json()["error"]["type"] == "server_error" and gone.headers["Retry-After"]

    async def busy(body, stream):
        from cogenesis.deployments.outlines_http import OutlineHead

        yield OutlineHead(429, "application/json", {"retry-after": "3"})
        yield msgspec.json.encode({"error": "the outline queue is full", "hint": "retry later"})

    full = post(
        _app(FakeHandle(busy), CloudConfig()),
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "a"}]},
    )
    assert full.status_code == 429 and full.headers["Retry-After"] == "3"
    assert full.json()["error"] == {
        "message": "the outline queue is full (retry later)",
        "type": "rate_limit_error",
        "code": "busy",
    }
