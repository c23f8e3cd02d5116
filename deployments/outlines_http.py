"""Outlines over HTTP, relayed from the gateway to a cloud replica through a Serve DeploymentHandle.

The gateway (``cogenesis.deployments.gateway``) authenticates and rate-limits a device's request, then calls
``sketch_route`` (``POST /v1/sketch``: the cloud's own sketch protocol, same statuses and events) or
``chat_completions_route`` (``POST /v1/chat/completions``: OpenAI's chat completions API, so any OpenAI client
can ask for an outline). Both call ``CloudServer.outline_events`` on a replica through the handle: it yields an
``OutlineHead`` (status, media type, headers) and then the body in chunks (the ``SketchReply`` JSON, an error
JSON, or the server-sent events), written by the same code as the cloud's own ``/v1/sketch``. A client that
leaves cancels the handle call, and with it the outline on the replica.

The helpers every outline route shares live here too: ``read_body`` (413 past ``limits.max_body_bytes``,
checked on Content-Length first and again on the bytes read) and ``check_outline`` (413 past
``limits.max_sketch_tokens`` / ``limits.max_instruction_chars``).
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

import msgspec
from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from cogenesis.core.auth import Claims
from cogenesis.core.config import CloudConfig, EdgeConfig, LimitsConfig
from cogenesis.core.errors import ProtocolError, TooLarge
from cogenesis.core.protocol import SketchProgress, SketchReply, SketchRequest
from cogenesis.deployments.limits import check_outline

log = logging.getLogger("cogenesis.gateway")

EVENT_STREAM = "text/event-stream"
UNAVAILABLE_RETRY_S = 5  # Retry-After when no replica answers: about the time Serve takes to replace one
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
RELAYED_HEADERS = ("retry-after", "cache-control", "x-accel-buffering")
DEFAULT_CHAT_TOKENS = EdgeConfig.model_fields["sketch_max_tokens"].default  # an edge's outline length (160)


class OutlineHead(msgspec.Struct, frozen=True):
    """The first item ``CloudServer.outline_events`` yields: how to answer; the body chunks follow."""

    status: int
    media_type: str
    headers: dict[str, str] = {}


# ---- shared by the cloud's routes and the gateway's -------------------------------------------------------


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, refused (``TooLarge``) past ``max_bytes``: on its declared Content-Length before
    anything is read, and on the bytes actually read (a chunked body declares none)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ProtocolError(f"invalid Content-Length {declared[:40]!r}") from None
        if size > max_bytes:
            raise _body_too_large(size, max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _body_too_large(len(body), max_bytes)
    return bytes(body)


def _body_too_large(size: int, max_bytes: int) -> TooLarge:
    return TooLarge(
        f"the request body has {'more than ' if size > max_bytes else ''}{size} bytes; at most {max_bytes} are taken",
        hint="send a shorter request (the limit is CloudConfig.limits.max_body_bytes)",
    )


def wants_events(request: Request) -> bool:
    return EVENT_STREAM in request.headers.get("accept", "")


def error_headers(status: int, retry_after_s: float | None = None) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) when given; ``WWW-Authenticate`` on a 401 (RFC 6750)."""
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def error_body(message: str, hint: str | None) -> bytes:
    return msgspec.json.encode({"error": message, "hint": hint})


def error_json(status: int, message: str, hint: str | None = None, retry_after_s: float | None = None) -> Response:
    """An error as JSON ``{"error", "hint"}``, with ``error_headers``: every route of both apps answers so."""
    return Response(
        error_body(message, hint),
        status_code=status,
        media_type="application/json",
        headers=error_headers(status, retry_after_s),
    )


# ---- the relay ---------------------------------------------------------------------------------------------


class _Stream(Protocol):  # a DeploymentResponseGenerator, or a test's fake of one
    def __aiter__(self) -> AsyncIterator[Any]: ...
    async def __anext__(self) -> Any: ...
    def cancel(self) -> None: ...


class _NoReplica(Exception):
    """The handle call failed before its head: no replica answered (or it died)."""


async def _open(cloud_handle: Any, body: bytes, stream: bool) -> tuple[_Stream, OutlineHead]:
    """Start ``outline_events`` on a replica; its head. ``_NoReplica`` when the call fails."""
    gen: _Stream = cloud_handle.options(stream=True).outline_events.remote(body, stream)
    try:
        head = await gen.__anext__()
    except Exception as exc:  # Ray's errors (actor died, unavailable, backpressure): the replica did not answer
        gen.cancel()
        log.warning("outline relay: the cloud did not answer (%s)", type(exc).__name__)
        raise _NoReplica() from None
    if not isinstance(head, OutlineHead):
        gen.cancel()
        raise _NoReplica()
    return gen, head


async def _rest(gen: _Stream) -> bytes:
    """Every chunk after the head (a whole JSON body)."""
    out = bytearray()
    async for chunk in gen:
        out += chunk
    return bytes(out)


async def _chunks(gen: _Stream) -> AsyncIterator[bytes]:
    """The chunks after the head; a client that leaves ends this generator, which cancels the call (and the
    outline on the replica)."""
    finished = False
    try:
        async for chunk in gen:
            yield chunk
        finished = True
    finally:
        if not finished:
            gen.cancel()


async def sketch_route(cloud_handle: Any, request: Request, claims: Claims, cfg: CloudConfig) -> Response:
    """``POST /v1/sketch`` on the gateway: the cloud's sketch protocol (a ``SketchRequest`` as JSON; the
    ``SketchReply``, or server-sent events with ``Accept: text/event-stream``), relayed to a replica. Statuses
    as the cloud's own route (400 413 422 429 503 504); 503 + Retry-After when no replica answers."""
    try:
        body = await read_body(request, cfg.limits.max_body_bytes)
    except TooLarge as exc:
        return error_json(413, exc.message, exc.hint)
    except ProtocolError as exc:
        return error_json(400, exc.message)
    log.info("sketch from %s: %d bytes", claims.sub, len(body))
    try:
        gen, head = await _open(cloud_handle, body, wants_events(request))
    except _NoReplica:
        return error_json(503, "no cloud replica answered", "retry later", UNAVAILABLE_RETRY_S)
    if head.media_type.startswith(EVENT_STREAM):
        return StreamingResponse(
            _chunks(gen), status_code=head.status, media_type=head.media_type, headers=head.headers
        )
    try:
        content = await _rest(gen)
    finally:
        gen.cancel()  # a no-op once it ended; a handler cancelled while waiting (client gone) cancels the outline
    return Response(content, status_code=head.status, media_type=head.media_type, headers=head.headers)


# ---- OpenAI chat completions -------------------------------------------------------------------------------


class ContentPart(msgspec.Struct, frozen=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, frozen=True):
    """The fields of OpenAI's chat completions request this route reads (others are ignored)."""

    messages: list[ChatMessage]
    model: str = "cogenesis"
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


ErrorType = Literal["invalid_request_error", "authentication_error", "rate_limit_error", "server_error"]


def openai_error(
    status: int, message: str, code: str, retry_after_s: float | None = None, type_: ErrorType | None = None
) -> Response:
    """An error in OpenAI's shape: ``{"error": {"message", "type", "code"}}``."""
    kind = type_ or (
        "rate_limit_error"
        if status == 429
        else "authentication_error"
        if status in (401, 403)
        else "server_error"
        if status >= 500
        else "invalid_request_error"
    )
    body = msgspec.json.encode({"error": {"message": message, "type": kind, "code": code}})
    return Response(
        body, status_code=status, media_type="application/json", headers=error_headers(status, retry_after_s)
    )


_CODES = {400: "bad_request", 413: "too_large", 422: "bad_request", 429: "busy", 503: "unavailable", 504: "deadline"}


def _from_cloud_error(head: OutlineHead, content: bytes) -> Response:
    """The cloud's ``{"error", "hint"}`` refusal in OpenAI's shape (its 422, invalid settings, becomes a 400)."""
    try:
        err = msgspec.json.decode(content)
        message = str(err.get("error") or "the outline failed")
        if err.get("hint"):
            message += f" ({err['hint']})"
    except (msgspec.DecodeError, AttributeError):
        message = "the outline failed"
    retry = head.headers.get("Retry-After") or head.headers.get("retry-after")
    status = 400 if head.status == 422 else head.status
    return openai_error(status, message, _CODES.get(head.status, "internal"), float(retry) if retry else None)


def instruction_of(messages: list[ChatMessage]) -> str:
    """The content of the last user message (a string, or its text parts joined); ``ProtocolError`` if none."""
    for message in reversed(messages):
        if message.role != "user":
            continue
        if isinstance(message.content, str):
            return message.content
        if message.content is not None:
            return "".join(p.text or "" for p in message.content if p.type in ("text", "input_text"))
        return ""
    raise ProtocolError("no user message: the last user message is the instruction to outline")


def _sketch_request(chat: ChatCompletionRequest, limits: LimitsConfig) -> SketchRequest:
    asked = chat.max_completion_tokens if chat.max_completion_tokens is not None else chat.max_tokens
    max_tokens = asked if asked is not None else min(DEFAULT_CHAT_TOKENS, limits.max_sketch_tokens)
    if max_tokens < 1:
        raise ProtocolError(f"max_tokens {max_tokens} must be at least 1")
    extra: dict[str, Any] = {}
    if chat.temperature is not None:
        extra["temperature"] = chat.temperature
    if chat.top_p is not None:
        extra["top_p"] = chat.top_p
    if chat.seed is not None:
        extra["seed"] = chat.seed
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    return SketchRequest(request_id=rid, instruction=instruction_of(chat.messages), max_tokens=max_tokens, **extra)


async def chat_completions_route(cloud_handle: Any, request: Request, claims: Claims, cfg: CloudConfig) -> Response:
    """``POST /v1/chat/completions``: OpenAI's chat completions API answered with an outline.

    The content of the last ``user`` message (a string, or its text parts) is the instruction; the reply's
    assistant message is the cloud's outline of it. This route only ever asks the cloud for an outline of that
    public instruction: ``system`` and ``assistant`` messages (and any earlier turns) are ignored, nothing else
    reaches the model. ``max_tokens`` (or ``max_completion_tokens``; default: an edge's outline length, 160,
    capped by ``limits.max_sketch_tokens``), ``temperature``, ``top_p`` and ``seed`` are the outline's
    (omitted: greedy); ``model`` is echoed. ``stream``: ``chat.completion.chunk`` events carrying the text as
    it is written, a last chunk with ``finish_reason``, then ``data: [DONE]``. ``finish_reason`` is
    ``length`` when the outline used all its tokens, else ``stop``. ``usage.prompt_tokens`` is 0 (the cloud
    does not report its prompt). Errors: ``{"error": {"message", "type", "code"}}`` with 400 (malformed or
    invalid settings), 413 (past a limit), 429 (busy), 503 (no replica), 504 (the outline's budget)."""
    try:
        body = await read_body(request, cfg.limits.max_body_bytes)
        chat = msgspec.json.decode(body, type=ChatCompletionRequest)
        sketch = _sketch_request(chat, cfg.limits)
        check_outline(sketch, cfg.limits)
    except TooLarge as exc:
        return openai_error(413, exc.message, "too_large")
    except ProtocolError as exc:
        return openai_error(400, exc.message, "bad_request")
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return openai_error(400, f"malformed chat completions request: {exc}", "bad_request")
    log.info("chat completion %s from %s: %d bytes", sketch.request_id, claims.sub, len(body))
    created = int(time.time())
    try:
        gen, head = await _open(cloud_handle, msgspec.json.encode(sketch), chat.stream)
    except _NoReplica:
        return openai_error(503, "no cloud replica answered; retry later", "unavailable", UNAVAILABLE_RETRY_S)
    if not (head.status == 200 and chat.stream and head.media_type.startswith(EVENT_STREAM)):
        try:
            content = await _rest(gen)
        finally:
            gen.cancel()
        if head.status != 200:
            return _from_cloud_error(head, content)
        reply = msgspec.json.decode(content, type=SketchReply)
        return Response(
            msgspec.json.encode(_completion(sketch, chat.model, created, reply)), media_type="application/json"
        )
    return StreamingResponse(
        _chat_chunks(_chunks(gen), sketch, chat, created), media_type=EVENT_STREAM, headers=SSE_HEADERS
    )


def _finish(sketch: SketchRequest, tokens: int) -> str:
    return "length" if tokens >= sketch.max_tokens else "stop"


def _usage(tokens: int) -> dict[str, int]:
    return {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}


def _completion(sketch: SketchRequest, model: str, created: int, reply: SketchReply) -> dict[str, Any]:
    return {
        "id": sketch.request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.sketch},
                "finish_reason": _finish(sketch, reply.tokens),
            }
        ],
        "usage": _usage(reply.tokens),
    }


def _data(payload: Any) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


def _sse_events(buffer: bytearray) -> list[tuple[str, bytes]]:
    """Whole server-sent events taken off the front of ``buffer`` (a partial one stays)."""
    out = []
    while (end := buffer.find(b"\n\n")) >= 0:
        block, buffer[: end + 2] = bytes(buffer[:end]), b""
        name, data = "message", b""
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = line[6:]
        out.append((name, data))
    return out


async def _chat_chunks(
    events: AsyncIterator[bytes], sketch: SketchRequest, chat: ChatCompletionRequest, created: int
) -> AsyncIterator[bytes]:
    """The outline's events (``progress``: the text so far, ``done``, ``error``) as ``chat.completion.chunk``s:
    each carries what was written since the last; the first names the role."""

    def chunk(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {
            "id": sketch.request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": chat.model,
            "choices": [choice],
        }

    sent = ""
    yield _data(chunk({"role": "assistant", "content": ""}))
    buffer = bytearray()
    async for raw in events:
        buffer += raw
        for name, data in _sse_events(buffer):
            if name == "progress":
                text = msgspec.json.decode(data, type=SketchProgress).text
                if text.startswith(sent) and len(text) > len(sent):
                    yield _data(chunk({"content": text[len(sent) :]}))
                    sent = text
            elif name == "done":
                reply = msgspec.json.decode(data, type=SketchReply)
                if reply.sketch.startswith(sent) and len(reply.sketch) > len(sent):
                    yield _data(chunk({"content": reply.sketch[len(sent) :]}))
                yield _data(chunk({}, _finish(sketch, reply.tokens)))
                if chat.stream_options is not None and chat.stream_options.include_usage:
                    yield _data({**chunk({}), "choices": [], "usage": _usage(reply.tokens)})
                yield b"data: [DONE]\n\n"
                return
            elif name == "error":
                err = msgspec.json.decode(data)
                message = str(err.get("error") or "the outline failed") if isinstance(err, dict) else "failed"
                yield _data({"error": {"message": message, "type": "server_error", "code": "internal"}})
                yield b"data: [DONE]\n\n"
                return
    yield _data({"error": {"message": "the outline stream ended early", "type": "server_error", "code": "internal"}})
    yield b"data: [DONE]\n\n"
