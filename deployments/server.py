"""Ray Serve application: a thin shim over a cloud engine.

HTTP ingress (sketch mode, the stateless baseline, health, stats) and the Redis step loop (logits mode
and outlines) share one engine. The step loop drives it: outlines are handed to the loop and written in
its batched passes beside the logits steps (``/v1/sketch`` waits for them, or streams their progress as
server-sent events); only the stateless baseline calls the engine from a handler, under the same plain
lock (the engine is not thread-safe). The engine comes from a factory (``CloudConfig.engine_factory``,
resolved in the replica; ``build_app(engine_factory=...)`` passes one directly). Build the app from a
CloudConfig with ``build_app`` (``serve_app`` is the ``import_path`` for ``serve run configs/serve.yaml``). The engine
and the step loop (torch, transformers) are imported in the replica, not where the app is built.

Status codes of ``/v1/sketch``: 200 (the ``SketchReply``, or the event stream), 400 (not a SketchRequest),
401/403 (no worker or admin token, when the cluster has secrets), 413 (past ``CloudConfig.limits``: body bytes,
max_tokens, instruction characters), 422 (invalid settings), 429 + Retry-After (the replica's outline queue is full), 503 + Retry-After (the
replica is not serving: its loop died or hung, or Redis is gone past its grace), 504 (the outline ran past
its ``budget_ms``, counted from its arrival here; it is cancelled).
"""

import asyncio
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application

from cogenesis.core import metrics
from cogenesis.core.auth import Claims, Role, bearer, verify
from cogenesis.core.config import CloudConfig, validate
from cogenesis.core.errors import (
    AuthError,
    Busy,
    ClusterError,
    CoGenesisError,
    Forbidden,
    ProtocolError,
    SessionError,
    TooLarge,
)
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
from cogenesis.core.secrets import ENV_CLUSTER_KEY, secrets_dir
from cogenesis.deployments.audit import RequestCapture
from cogenesis.deployments.limits import check_outline, check_stateless
from cogenesis.deployments.outlines_http import (
    EVENT_STREAM,
    RELAYED_HEADERS,
    SSE_HEADERS,
    OutlineHead,
    error_body,
    error_json,
    read_body,
    wants_events,
)
from cogenesis.deployments.replies import TraceFields, step_reply

if TYPE_CHECKING:
    from cogenesis.deployments.engine import EngineFactory, TopK
    from cogenesis.deployments.step_loop import OutlineUpdate, StepLoop

log = logging.getLogger("cogenesis.cloud")
api = FastAPI(title="CoGenesis cloud", docs_url=None, redoc_url=None)

POLL_S = 0.5  # how often a waiting handler looks at its client and its replica's health
UNAVAILABLE_RETRY_S = 5  # Retry-After of a 503: about the time Serve takes to notice and replace a replica


def _msgpack(msg: StepReply | ErrorReply, status: int = 200) -> Response:
    return Response(encode(msg), status_code=status, media_type="application/msgpack")


class _Refused(Exception):
    """An outline ended without its reply: the status, message and hint to answer with."""

    def __init__(self, status: int, message: str, hint: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.hint, self.retry_after_s = status, message, hint, retry_after_s

    def response(self) -> Response:
        return error_json(self.status, self.message, self.hint, self.retry_after_s)

    @classmethod
    def of(cls, error: CoGenesisError) -> "_Refused":
        if isinstance(error, Busy):
            return cls(429, error.message, error.hint, error.retry_after_s)
        if isinstance(error, ClusterError):
            return cls(503, error.message, error.hint, UNAVAILABLE_RETRY_S)
        if isinstance(error, TooLarge):
            return cls(413, error.message, error.hint)
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
        return error_json(
            503, f"this replica is not serving: {reason}", "retry: Serve replaces it", UNAVAILABLE_RETRY_S
        )
    try:
        call = OutlineCall(loop, request, arrived_s, progress=stream)
    except CoGenesisError as exc:  # refused on submission (a limit of the step loop's)
        return _Refused.of(exc).response()
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
        return StreamingResponse(_events(call), media_type=EVENT_STREAM, headers=SSE_HEADERS)
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
                yield _event("error", error_body(exc.message, exc.hint))
                return
            if update.kind == "progress" and update.progress is not None:
                yield _event("progress", msgspec.json.encode(update.progress))
            elif update.kind == "done":
                yield _event("done", _done(update))
                return
            elif update.kind == "failed":
                assert update.error is not None
                yield _event("error", error_body(update.error.message, update.error.hint))
                return
    finally:
        call.close()


def route_key(cfg: CloudConfig) -> bytes | None:
    """The key the cloud's routes check tokens with: ``$COGENESIS_CLUSTER_KEY``, else the secrets directory's
    (``cfg.secrets_dir`` or ``$COGENESIS_SECRETS_DIR``); None when the cluster has no secrets (open routes)."""
    from cogenesis.core.secrets import cluster_key

    if not os.environ.get(ENV_CLUSTER_KEY) and secrets_dir(cfg.secrets_dir) is None:
        return None
    return cluster_key(cfg.secrets_dir)


def authorize(key: bytes | None, authorization: str | None, *roles: Role) -> Claims | None:
    """The claims of the request's bearer token, which must have one of ``roles``: ``AuthError`` (401) when
    it is missing or not genuine, ``Forbidden`` (403) for another role. None: no key, the routes are open."""
    if key is None:
        return None
    return verify(key, bearer(authorization)).require(*roles)


def denied(exc: AuthError | Forbidden) -> Response:
    """401 (with ``WWW-Authenticate: Bearer``) or 403, as JSON ``{"error", "hint"}``."""
    return error_json(401 if isinstance(exc, AuthError) else 403, exc.message, exc.hint)


def _placement() -> dict[str, str]:
    """Where this replica runs (its Ray node's id and address), announced with its heartbeat; empty outside Ray.
    Defined before ``CloudServer``: Serve pickles the class, with the globals it uses, where it is decorated."""
    try:
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    except Exception:  # outside a Ray worker (tests of the shim)
        return {}


@serve.ingress(api)
class CloudServer:
    """One replica: an engine from ``engine_factory`` (default: ``CloudConfig.engine_factory``) behind HTTP
    and the bus step loop.

    Its HTTP routes are for trusted in-cluster workers: with cluster secrets (``CloudConfig.secrets_dir`` or
    ``$COGENESIS_SECRETS_DIR``) they need a ``worker`` or ``admin`` bearer token (401 without a genuine one,
    403 for another role); ``/v1/stats`` needs ``admin``; ``/healthz`` answers anyone ``{"ok": bool}`` and an
    admin the details. Devices reach outlines through the gateway, which calls ``outline_events`` through a
    Serve handle. Bodies past ``limits.max_body_bytes`` are refused 413."""

    def __init__(self, config: dict, engine_factory: "EngineFactory | None" = None) -> None:
        from cogenesis.cluster.bus import CloudBus
        from cogenesis.deployments.engine import load_engine_factory
        from cogenesis.deployments.step_loop import StepLoop

        self.cfg = validate(CloudConfig, config, "CloudServer")
        self.key = route_key(self.cfg)  # read once: a rotated key takes effect when the replicas restart
        self.engine = (engine_factory or load_engine_factory(self.cfg.engine_factory))(self.cfg)
        self.lock = threading.Lock()  # the step loop's passes and the stateless baseline take turns
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (tests of the shim)
            self.replica = uuid.uuid4().hex[:8]
        if self.key is None:
            log.warning(
                "replica %s: no cluster secrets (CloudConfig.secrets_dir, $COGENESIS_SECRETS_DIR): its HTTP routes "
                "are open to anyone who reaches them",
                self.replica,
            )
        self.metrics_address = metrics.serve(metrics.CLOUD)  # announced on the bus by the heartbeat
        self.capture = RequestCapture(self.cfg.capture_http) if self.cfg.capture_http else None
        bus = CloudBus(  # as the `replica` Redis user, with the password of the cluster's secrets directory
            self.cfg.redis_url,
            self.replica,
            heartbeat_ttl_s=self.cfg.heartbeat_ttl_s,
            secrets=self.cfg.secrets_dir,
            ca_file=self.cfg.redis_ca_file,
        )
        self.loop = StepLoop(
            self.engine, bus, self.lock, metrics_address=self.metrics_address, config=self.cfg, placement=_placement()
        ).start()
        log.info("replica %s ready (pid %d)", self.replica, os.getpid())

    def _stateless_locked(self, ids: list[int], top_k: int) -> "tuple[TopK, int]":
        with self.lock:
            return self.engine.stateless_top_k(ids, top_k), now_us()

    def _authorize(self, request: Request, *roles: Role) -> Response | None:
        """None when the request may go on; else the 401/403 to answer."""
        try:
            authorize(self.key, request.headers.get("authorization"), *roles)
        except (AuthError, Forbidden) as exc:
            return denied(exc)
        return None

    def _captured(self, route: str, body: bytes) -> bytes:
        """``body``, captured as it arrived when ``CloudConfig.capture_http`` is set."""
        if self.capture is not None:
            self.capture.capture(route, body)
        return body

    async def _body(self, request: Request) -> bytes:
        """The request's body (``TooLarge`` past ``limits.max_body_bytes``; ``ProtocolError``: a bad length)."""
        return self._captured(request.url.path, await read_body(request, self.cfg.limits.max_body_bytes))

    async def _outline(
        self, body: bytes, arrived: float, stream: bool, disconnected: Callable[[], Awaitable[bool]] | None
    ) -> Response:
        """An outline request's answer (the one code path of the route and of ``outline_events``)."""
        try:
            req = decode_json(body, SketchRequest)
        except ProtocolError as exc:
            return error_json(400, exc.message, "POST a SketchRequest as JSON (see cogenesis.core.protocol)")
        try:
            check_outline(req, self.cfg.limits)
        except TooLarge as exc:
            return error_json(413, exc.message, exc.hint)
        return await sketch_response(self.loop, req, arrived, stream, disconnected)

    @api.post("/v1/sketch")
    async def sketch(self, request: Request) -> Response:
        arrived = time.monotonic()  # the budget counts from here, on this replica's clock
        refused = self._authorize(request, "worker")
        if refused is not None:
            return refused
        try:
            body = await self._body(request)
        except TooLarge as exc:
            return error_json(413, exc.message, exc.hint)
        except ProtocolError as exc:
            return error_json(400, exc.message)
        return await self._outline(body, arrived, wants_events(request), request.is_disconnected)

    async def outline_events(self, body: bytes, stream: bool) -> AsyncIterator[OutlineHead | bytes]:
        """An outline for a Serve handle caller (the gateway, which authenticated the device): first an
        ``OutlineHead`` (status, media type, headers), then the body in chunks: the ``SketchReply`` JSON or a
        JSON error, or (``stream``) the server-sent events, exactly what ``/v1/sketch`` answers. The caller
        cancelling the call (its client left) cancels the outline."""
        arrived = time.monotonic()
        if len(body) > self.cfg.limits.max_body_bytes:
            yield OutlineHead(413, "application/json")
            yield error_body(
                f"the request body has {len(body)} bytes; at most {self.cfg.limits.max_body_bytes} are taken",
                "send a shorter request (the limit is CloudConfig.limits.max_body_bytes)",
            )
            return
        response = await self._outline(self._captured("/v1/sketch", body), arrived, stream, None)
        headers = {k: v for k, v in response.headers.items() if k.lower() in RELAYED_HEADERS}
        yield OutlineHead(response.status_code, response.media_type or "application/json", headers)
        if not isinstance(response, StreamingResponse):
            yield bytes(response.body)
            return
        chunks = response.body_iterator
        try:
            async for chunk in chunks:
                yield chunk.encode() if isinstance(chunk, str) else bytes(chunk)
        finally:
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()  # ends _events: the outline is cancelled unless it finished

    @api.post("/v1/stateless")
    async def stateless(self, request: Request) -> Response:
        """The official code's protocol (benchmark baseline): whole sequence in, next top-k out, no state."""
        arrived = now_us()
        refused = self._authorize(request, "worker")
        if refused is not None:
            return refused
        try:
            req = decode_msgpack(await self._body(request), StatelessRequest)
            ids = unpack_ids(req.tokens).tolist()
            check_stateless(len(ids), self.cfg.limits)
        except TooLarge as exc:
            return _msgpack(ErrorReply(session_id="", step=0, code="too_large", message=exc.message), 413)
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
    def healthz(self, request: Request) -> Response:
        """``{"ok": bool}`` for anyone (200, or 503 while the replica is not serving); with an admin token (or
        on a cluster without secrets) also the replica and the reason it is not serving."""
        reason = self.loop.health()
        body: dict = {"ok": reason is None}
        try:
            authorize(self.key, request.headers.get("authorization"), "admin")
            body["replica"] = self.replica
            if reason is not None:
                body["reason"] = reason
        except (AuthError, Forbidden):
            pass  # no details without an admin token
        return Response(
            msgspec.json.encode(body), status_code=200 if reason is None else 503, media_type="application/json"
        )

    @api.get("/v1/stats")
    def stats(self, request: Request) -> Response:
        """The engine's and the step loop's counters (admin only)."""
        refused = self._authorize(request, "admin")
        if refused is not None:
            return refused
        body = {"replica": self.replica, "metrics": self.metrics_address, **self.engine.stats(), **self.loop.stats()}
        return JSONResponse(body)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What loads this replica (``StepLoop.load``), which Serve hands the autoscaling policy
        (``cogenesis.deployments.autoscale``) when ``CloudConfig.autoscaling`` is set."""
        return self.loop.load()

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


# Serve's graceful shutdown (``__del__``) outlasts the step loop's wait for its last pass (``STOP_S``)
CloudDeployment = serve.deployment(name="CloudServer", health_check_period_s=5, graceful_shutdown_timeout_s=30)(
    CloudServer
)


def deployment_options(cfg: CloudConfig) -> dict:
    """The Serve options of the cloud deployment from its config: a fixed ``num_replicas``, or (``autoscaling``)
    Serve's autoscaling with the session policy (``cogenesis.deployments.autoscale``); placement; admission.

    A replica takes at least as many HTTP requests at once as outlines it can hold (being written plus
    queued), so a full outline queue is answered 429 rather than waiting in Serve's queue."""
    from cogenesis.deployments.autoscale import POLICY_PATH

    opts: dict = {
        "max_ongoing_requests": max(cfg.max_ongoing_requests, cfg.sketch_max_batch + cfg.sketch_max_queue + 1),
        "ray_actor_options": {"num_cpus": cfg.replica_cpus},
    }
    if cfg.max_replicas_per_node is not None:
        opts["max_replicas_per_node"] = cfg.max_replicas_per_node
    scale = cfg.autoscaling
    if scale is None:
        opts["num_replicas"] = cfg.num_replicas
        return opts
    opts["num_replicas"] = "auto"
    opts["autoscaling_config"] = {
        "min_replicas": scale.min_replicas,
        "max_replicas": scale.max_replicas,
        "initial_replicas": min(max(cfg.num_replicas, scale.min_replicas), scale.max_replicas),
        "upscale_delay_s": scale.upscale_delay_s,
        "downscale_delay_s": scale.downscale_delay_s,
        "look_back_period_s": scale.look_back_period_s,
        "metrics_interval_s": scale.metrics_interval_s,
        "policy": {
            "policy_function": POLICY_PATH,
            "policy_kwargs": {"target_sessions": scale.target_sessions, "max_open_wait_s": scale.max_open_wait_s},
        },
    }
    return opts


def serve_app(args: dict) -> Application:
    """The ``import_path`` builder (``cogenesis.deployments.server:serve_app``, configs/serve.yaml): Serve calls
    builders with exactly one argument, the app's ``args`` (a CloudConfig as a dict)."""
    return build_app(args)


def build_app(args: dict | CloudConfig | None = None, engine_factory: "EngineFactory | None" = None) -> Application:
    """The cloud's Serve application from a CloudConfig; ``engine_factory`` replaces
    ``CloudConfig.engine_factory`` (tests: a callable Ray can pickle); the options: ``deployment_options``."""
    cfg = args if isinstance(args, CloudConfig) else validate(CloudConfig, dict(args or {}), "serve args")
    return CloudDeployment.options(**deployment_options(cfg)).bind(cfg.model_dump(), engine_factory)
