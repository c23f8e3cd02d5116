"""Ray Serve application: a thin shim over a cloud engine.

HTTP ingress (sketch mode, the stateless baseline, health, stats) and the Redis step loop (logits mode
and outlines) share one engine. The step loop drives it: outlines are handed to the loop and written in
its batched passes beside the logits steps (``/v1/sketch`` waits for them, or streams their progress as
server-sent events); only the stateless baseline calls the engine from a handler, under the same plain
lock (the engine is not thread-safe). The engine comes from a factory (``CloudConfig.engine_factory``,
resolved in the replica; ``build_app(engine_factory=...)`` passes one directly). Build the app from a
CloudConfig with ``build_app`` (also the ``import_path`` for ``serve run configs/serve.yaml``). The engine
and the step loop (torch, transformers) are imported in the replica, not where the app is built.

Status codes of ``/v1/sketch``: 200 (the ``SketchReply``, or the event stream), 400 (not a SketchRequest),
422 (invalid settings), 429 + Retry-After (the replica's outline queue is full), 503 + Retry-After (the
replica is not serving: its loop died or hung, or Redis is gone past its grace), 504 (the outline ran past
its ``budget_ms``, counted from its arrival here; it is cancelled).
"""

import asyncio
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve import Application

from cogenesis.core import metrics
from cogenesis.core.config import CloudConfig, validate
from cogenesis.core.errors import Busy, ClusterError, CoGenesisError, ProtocolError, SessionError
from cogenesis.core.protocol import (
    ErrorReply,
    SketchRequest,
    StatelessRequest,
    StepReply,
    decode_json,
    decode_msgpack,
    encode,
    now_ms,
    now_us,
    unpack_ids,
)
from cogenesis.deployments.audit import RequestCapture
from cogenesis.deployments.replies import TraceFields, step_reply

if TYPE_CHECKING:
    from cogenesis.deployments.engine import EngineFactory, TopK
    from cogenesis.deployments.step_loop import OutlineUpdate, StepLoop

log = logging.getLogger("cogenesis.cloud")
api = FastAPI(title="CoGenesis cloud", docs_url=None, redoc_url=None)

EVENT_STREAM = "text/event-stream"
POLL_S = 0.5  # how often a waiting handler looks at its client and its replica's health
UNAVAILABLE_RETRY_S = 5  # Retry-After of a 503: about the time Serve takes to notice and replace a replica


def _msgpack(msg: StepReply | ErrorReply, status: int = 200) -> Response:
    return Response(encode(msg), status_code=status, media_type="application/msgpack")


def _error_body(message: str, hint: str | None) -> bytes:
    return msgspec.json.encode({"error": message, "hint": hint})


def _json_error(status: int, message: str, hint: str | None = None, retry_after_s: float | None = None) -> Response:
    headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else None
    return Response(_error_body(message, hint), status_code=status, media_type="application/json", headers=headers)


class _Refused(Exception):
    """An outline ended without its reply: the status, message and hint to answer with."""

    def __init__(self, status: int, message: str, hint: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.hint, self.retry_after_s = status, message, hint, retry_after_s

    def response(self) -> Response:
        return _json_error(self.status, self.message, self.hint, self.retry_after_s)

    @classmethod
    def of(cls, error: CoGenesisError) -> "_Refused":
        if isinstance(error, Busy):
            return cls(429, error.message, error.hint, error.retry_after_s)
        if isinstance(error, ClusterError):
            return cls(503, error.message, error.hint, UNAVAILABLE_RETRY_S)
        if isinstance(error, SessionError | ProtocolError):
            return cls(422, error.message, error.hint)
        return cls(500, error.message, error.hint)


class _ClientGone(Exception):
    """The client disconnected: nobody reads the answer."""


class OutlineCall:
    """One outline in the step loop, seen from its HTTP handler: updates arrive on the handler's event loop
    (the step loop's thread hands them over with ``call_soon_threadsafe``); the outline is cancelled when
    the call ends without its reply (budget, disconnect, cancelled task)."""

    def __init__(self, loop: "StepLoop", request: SketchRequest, arrived_s: float, progress: bool) -> None:
        self.loop = loop
        self.request = request
        self.deadline = None if request.budget_ms is None else arrived_s + request.budget_ms / 1000
        self._events = asyncio.get_running_loop()
        self._queue: asyncio.Queue[OutlineUpdate] = asyncio.Queue()
        self.finished = False
        self.ticket = loop.submit_outline(request, self._deliver, progress=progress)

    def _deliver(self, update: "OutlineUpdate") -> None:  # the step loop's thread
        self._events.call_soon_threadsafe(self._queue.put_nowait, update)

    async def next(self, disconnected: Callable[[], Awaitable[bool]] | None = None) -> "OutlineUpdate":
        """The next update; raises ``_Refused`` (budget spent: 504; replica unhealthy: 503) or ``_ClientGone``."""
        while True:
            wait = POLL_S
            if self.deadline is not None:
                wait = min(wait, self.deadline - time.monotonic())
                if wait <= 0:
                    metrics.refusals.labels("deadline").inc()
                    raise _Refused(
                        504,
                        f"sketch {self.request.request_id}: the outline ran past its budget of "
                        f"{self.request.budget_ms} ms (counted from its arrival on the replica); it was cancelled",
                        "raise budget_ms or lower max_tokens; the replica may be overloaded (retry later)",
                    )
            try:
                update = await asyncio.wait_for(self._queue.get(), wait)
            except asyncio.TimeoutError:
                if disconnected is not None and await disconnected():
                    raise _ClientGone() from None
                reason = self.loop.health()
                if reason is not None:
                    raise _Refused(
                        503, f"this replica stopped serving: {reason}", "retry: Serve replaces it", UNAVAILABLE_RETRY_S
                    ) from None
                continue
            if update.kind in ("done", "failed"):
                self.finished = True
            return update

    def close(self) -> None:
        """Cancel the outline unless it ended (idempotent)."""
        if not self.finished:
            self.finished = True
            self.loop.cancel_outline(self.ticket)


def _done(update: "OutlineUpdate") -> bytes:
    assert update.reply is not None
    metrics.sketch_requests.inc()
    metrics.cloud_tokens.labels("sketch").inc(update.reply.tokens)
    return msgspec.json.encode(update.reply)


def _event(name: str, data: bytes) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


async def sketch_response(
    loop: "StepLoop",
    request: SketchRequest,
    arrived_s: float,
    stream: bool = False,
    disconnected: Callable[[], Awaitable[bool]] | None = None,
) -> Response:
    """Answer a sketch request through the step loop: the ``SketchReply`` as JSON, or (``stream``) server-sent
    events: ``progress`` (a ``SketchProgress``) while it is written, then ``done`` (the ``SketchReply``) or
    ``error`` ({"error", "hint"}). ``arrived_s``: the request's arrival (``time.monotonic``), from which its
    budget counts. Refusals before the first byte (busy, unhealthy, invalid) are plain JSON errors."""
    reason = loop.health()
    if reason is not None:
        return _json_error(
            503, f"this replica is not serving: {reason}", "retry: Serve replaces it", UNAVAILABLE_RETRY_S
        )
    call = OutlineCall(loop, request, arrived_s, progress=stream)
    streaming = False
    try:
        update = await call.next(disconnected)
        if update.kind == "failed":
            assert update.error is not None
            return _Refused.of(update.error).response()
        if not stream:
            while update.kind != "done":
                update = await call.next(disconnected)
                if update.kind == "failed":
                    assert update.error is not None
                    return _Refused.of(update.error).response()
            return Response(_done(update), media_type="application/json")
        streaming = True
        return StreamingResponse(
            _events(call), media_type=EVENT_STREAM, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
    except _Refused as exc:
        return exc.response()
    except _ClientGone:
        return Response(status_code=499)  # nobody reads it; the outline is cancelled below
    finally:
        if not streaming:
            call.close()


async def _events(call: OutlineCall) -> AsyncIterator[bytes]:
    """The event stream of an accepted outline (a disconnected client cancels this generator: the outline
    is cancelled)."""
    try:
        while True:
            try:
                update = await call.next()
            except _Refused as exc:
                yield _event("error", _error_body(exc.message, exc.hint))
                return
            if update.kind == "progress" and update.progress is not None:
                yield _event("progress", msgspec.json.encode(update.progress))
            elif update.kind == "done":
                yield _event("done", _done(update))
                return
            elif update.kind == "failed":
                assert update.error is not None
                yield _event("error", _error_body(update.error.message, update.error.hint))
                return
    finally:
        call.close()


def wants_events(request: Request) -> bool:
    return EVENT_STREAM in request.headers.get("accept", "")


@serve.ingress(api)
class CloudServer:
    """One replica: an engine from ``engine_factory`` (default: ``CloudConfig.engine_factory``) behind HTTP
    and the bus step loop."""

    def __init__(self, config: dict, engine_factory: "EngineFactory | None" = None) -> None:
        from cogenesis.cluster.bus import CloudBus
        from cogenesis.deployments.engine import load_engine_factory
        from cogenesis.deployments.step_loop import StepLoop

        self.cfg = validate(CloudConfig, config, "CloudServer")
        self.engine = (engine_factory or load_engine_factory(self.cfg.engine_factory))(self.cfg)
        self.lock = threading.Lock()  # the step loop's passes and the stateless baseline take turns
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (tests of the shim)
            self.replica = uuid.uuid4().hex[:8]
        self.metrics_address = metrics.serve(metrics.CLOUD)  # announced on the bus by the heartbeat
        self.capture = RequestCapture(self.cfg.capture_http) if self.cfg.capture_http else None
        bus = CloudBus(self.cfg.redis_url, self.replica, heartbeat_ttl_s=self.cfg.heartbeat_ttl_s)
        self.loop = StepLoop(self.engine, bus, self.lock, metrics_address=self.metrics_address, config=self.cfg).start()
        log.info("replica %s ready (pid %d)", self.replica, os.getpid())

    def _stateless_locked(self, ids: list[int], top_k: int) -> "tuple[TopK, int]":
        with self.lock:
            return self.engine.stateless_top_k(ids, top_k), now_us()

    async def _body(self, request: Request) -> bytes:
        """The request's body, captured as it arrived when ``CloudConfig.capture_http`` is set."""
        body = await request.body()
        if self.capture is not None:
            self.capture.capture(request.url.path, body)
        return body

    @api.post("/v1/sketch")
    async def sketch(self, request: Request) -> Response:
        arrived = time.monotonic()  # the budget counts from here, on this replica's clock
        try:
            req = decode_json(await self._body(request), SketchRequest)
        except ProtocolError as exc:
            return _json_error(400, exc.message, "POST a SketchRequest as JSON (see cogenesis.core.protocol)")
        return await sketch_response(self.loop, req, arrived, wants_events(request), request.is_disconnected)

    @api.post("/v1/stateless")
    async def stateless(self, request: Request) -> Response:
        """The official code's protocol (benchmark baseline): whole sequence in, next top-k out, no state."""
        arrived = now_us()
        try:
            req = decode_msgpack(await self._body(request), StatelessRequest)
            ids = unpack_ids(req.tokens).tolist()
        except ProtocolError as exc:
            return _msgpack(ErrorReply(session_id="", step=0, code="bad_request", message=exc.message), 400)
        if arrived // 1000 + req.budget_ms <= now_ms():  # the budget counts from arrival, on this replica's clock
            return _msgpack(
                ErrorReply(
                    session_id=req.session_id,
                    step=len(ids),
                    code="deadline",
                    message="the request's time budget ran out before it was served",
                ),
                422,
            )
        t0 = now_us()  # from here on: waiting for a worker thread and the lock (a pass of the loop), then the model
        try:
            top, t1 = await asyncio.to_thread(self._stateless_locked, ids, req.top_k)
        except CoGenesisError as exc:
            return _msgpack(
                ErrorReply(session_id=req.session_id, step=len(ids), code="bad_request", message=exc.message), 422
            )
        posted = now_us()
        trace = TraceFields(server_us=posted - arrived, model_us=t1 - t0, queue_us=0)  # served on arrival
        return _msgpack(step_reply(req.session_id, len(ids), self.replica, top, trace))

    @api.get("/healthz")
    def healthz(self) -> Response:
        reason = self.loop.health()
        if reason is None:
            return Response(msgspec.json.encode({"ok": True, "replica": self.replica}), media_type="application/json")
        body = {"ok": False, "replica": self.replica, "reason": reason}
        return Response(msgspec.json.encode(body), status_code=503, media_type="application/json")

    @api.get("/v1/stats")
    def stats(self) -> dict:
        return {"replica": self.replica, "metrics": self.metrics_address, **self.engine.stats(), **self.loop.stats()}

    def check_health(self) -> None:
        """Serve's health check: a replica whose loop died or hung, or that lost Redis past its grace, is
        replaced."""
        reason = self.loop.health()
        if reason is not None:
            raise ClusterError(f"replica {self.replica} is unhealthy: {reason}", hint="Serve replaces it")

    def __del__(self) -> None:
        """Serve calls this when the replica shuts down: stop the step loop (and its heartbeat), then the engine."""
        if hasattr(self, "loop"):
            self.loop.stop()
        if hasattr(self, "engine"):
            self.engine.shutdown()
        capture = getattr(self, "capture", None)
        if capture is not None:
            capture.close()


CloudDeployment = serve.deployment(name="CloudServer", health_check_period_s=5, graceful_shutdown_timeout_s=10)(
    CloudServer
)


def build_app(args: dict | CloudConfig | None = None, engine_factory: "EngineFactory | None" = None) -> Application:
    """Serve application builder (``import_path: cogenesis.deployments.server:build_app``); ``engine_factory``
    replaces ``CloudConfig.engine_factory`` (tests: a callable Ray can pickle).

    A replica takes at least as many HTTP requests at once as outlines it can hold (being written plus
    queued), so a full outline queue is answered 429 rather than waiting in Serve's queue."""
    cfg = args if isinstance(args, CloudConfig) else validate(CloudConfig, dict(args or {}), "serve args")
    return CloudDeployment.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=max(cfg.max_ongoing_requests, cfg.sketch_max_batch + cfg.sketch_max_queue + 1),
        ray_actor_options={"num_cpus": cfg.replica_cpus},
    ).bind(cfg.model_dump(), engine_factory)
