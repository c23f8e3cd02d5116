"""Ray Serve application: a thin shim over a cloud engine.

HTTP ingress (sketch mode, the stateless baseline, health, stats) and the Redis step loop
(logits mode) share one engine; a lock serialises model calls. The engine comes from a factory
(``CloudConfig.engine_factory``, resolved in the replica; ``build_app(engine_factory=...)`` passes one
directly). Build the app from a CloudConfig with ``build_app`` (also the ``import_path`` for
``serve run configs/serve.yaml``). The engine and the step loop (torch, transformers) are imported
in the replica, not where the app is built.
"""

import asyncio
import logging
import os
import uuid
from typing import TYPE_CHECKING

import msgspec
from fastapi import FastAPI, Request, Response
from ray import serve
from ray.serve import Application

from cogenesis.core import metrics
from cogenesis.core.config import CloudConfig, validate
from cogenesis.core.errors import CoGenesisError, ProtocolError
from cogenesis.core.protocol import (
    ErrorReply,
    SketchReply,
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
from cogenesis.deployments.fairlock import FairLock
from cogenesis.deployments.replies import TraceFields, step_reply

if TYPE_CHECKING:
    from cogenesis.deployments.engine import EngineFactory, TopK

log = logging.getLogger("cogenesis.cloud")
api = FastAPI(title="CoGenesis cloud", docs_url=None, redoc_url=None)


def _msgpack(msg: StepReply | ErrorReply, status: int = 200) -> Response:
    return Response(encode(msg), status_code=status, media_type="application/msgpack")


def _json_error(status: int, message: str, hint: str | None = None) -> Response:
    return Response(
        msgspec.json.encode({"error": message, "hint": hint}), status_code=status, media_type="application/json"
    )


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
        self.lock = FairLock()  # outlines yield to waiting logits steps between tokens
        self.engine.set_yield_point(self.lock.yield_)
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve (tests of the shim)
            self.replica = uuid.uuid4().hex[:8]
        self.metrics_address = metrics.serve(metrics.CLOUD)  # announced on the bus by the step loop
        self.capture = RequestCapture(self.cfg.capture_http) if self.cfg.capture_http else None
        self.loop = StepLoop(
            self.engine, CloudBus(self.cfg.redis_url, self.replica), self.lock, metrics_address=self.metrics_address
        ).start()
        self._sketch_batch = serve.batch(
            max_batch_size=self.cfg.sketch_max_batch, batch_wait_timeout_s=self.cfg.sketch_batch_wait_s
        )(self._sketch_many)
        log.info("replica %s ready (pid %d)", self.replica, os.getpid())

    async def _sketch_many(self, requests: list[SketchRequest]) -> list[SketchReply | CoGenesisError]:
        try:
            return list(await asyncio.to_thread(self._sketch_locked, requests))
        except CoGenesisError:
            if len(requests) == 1:
                raise
            # one bad request must not fail its batch-mates: retry each alone
            out: list[SketchReply | CoGenesisError] = []
            for req in requests:
                try:
                    out.extend(await asyncio.to_thread(self._sketch_locked, [req]))
                except CoGenesisError as exc:
                    out.append(exc)
            return out

    def _sketch_locked(self, requests: list[SketchRequest]) -> list[SketchReply]:
        with self.lock:
            return self.engine.sketch(requests)

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
        try:
            req = decode_json(await self._body(request), SketchRequest)
            reply = await self._sketch_batch(req)
            if isinstance(reply, CoGenesisError):
                raise reply
            metrics.sketch_requests.inc()
            metrics.cloud_tokens.labels("sketch").inc(reply.tokens)
        except ProtocolError as exc:
            return _json_error(400, exc.message, "POST a SketchRequest as JSON (see cogenesis.core.protocol)")
        except CoGenesisError as exc:
            return _json_error(422, exc.message, exc.hint)
        return Response(msgspec.json.encode(reply), media_type="application/json")

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
        t0 = now_us()  # from here on: waiting for a worker thread and the lock (a busy model), then the model
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
    def healthz(self) -> dict:
        return {"ok": True, "replica": self.replica}

    @api.get("/v1/stats")
    def stats(self) -> dict:
        return {
            "replica": self.replica,
            "metrics": self.metrics_address,
            **self.engine.stats(),
            "bus_requests": self.loop.requests,
            "bus_errors": self.loop.errors,
        }

    def check_health(self) -> None:
        if not self.loop.is_alive():
            raise RuntimeError("the step loop thread died")

    def __del__(self) -> None:
        """Serve calls this when the replica shuts down: stop the step loop, then the engine."""
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
    replaces ``CloudConfig.engine_factory`` (tests: a callable Ray can pickle)."""
    cfg = args if isinstance(args, CloudConfig) else validate(CloudConfig, dict(args or {}), "serve args")
    return CloudDeployment.options(
        num_replicas=cfg.num_replicas,
        max_ongoing_requests=max(cfg.max_ongoing_requests, cfg.sketch_max_batch),
        ray_actor_options={"num_cpus": cfg.replica_cpus},
    ).bind(cfg.model_dump(), engine_factory)
