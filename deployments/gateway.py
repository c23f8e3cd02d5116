"""The device gateway: where real devices connect (Serve app ``gateway``, deployment ``Gateway``).

Devices hold a bearer token (``cogenesis.core.auth``), never Redis credentials. The gateway checks the token,
rate-limits per device, and relays (``cogenesis.deployments.relay``) with its own ``gateway`` Redis user.

Routes (``gateway_api``), every one needing ``Authorization: Bearer <token>`` unless noted:

- ``GET /v1/ws``: a WebSocket speaking the typed msgpack protocol (binary frames; see the relay). Role device,
  worker or admin. A missing, malformed, forged or expired token is refused before the socket is accepted: an
  HTTP 401 answer to the upgrade with ``{"error", "hint"}`` where the server supports the WebSocket denial
  response (uvicorn, Starlette's TestClient), else the socket closes at once with code 4401 and the reason
  (4403 for a role that may not connect); nothing the device sent is read. A replica at
  ``gateway.max_connections`` closes new sockets with 1013 (try again later); a frame far past
  ``limits.max_message_bytes`` closes the socket with 1009 after its ``too_large`` answer; a token that expires
  while connected closes the socket with 4401.
- ``POST /v1/sketch`` and ``POST /v1/chat/completions``: outlines through a CloudServer replica's handle
  (``cogenesis.deployments.outlines_http``), after the token (401/403) and the rate limit (429 + Retry-After).
- ``GET /healthz``: without a token ``{"ok": bool}`` (503 when Redis is unreachable); with an admin token, details.
- ``GET /v1/stats``: admin only (401 without a valid token, 403 for another role).

Tokens travel only in the Authorization header: not in a query string (``?token=``), which proxies and access
logs record. A browser's WebSocket API cannot set that header; browsers are not this gateway's clients (devices
run the SDK, ``cogenesis.edge_sim.sdk``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import Any

from fastapi import FastAPI, Request, Response, WebSocket
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from starlette.websockets import WebSocketState

from cogenesis.core import metrics
from cogenesis.core.auth import Claims, Role, bearer, verify
from cogenesis.core.config import CloudConfig, validate
from cogenesis.core.errors import AuthError, Busy, ConfigError, Forbidden, RateLimited
from cogenesis.core.secrets import cluster_key
from cogenesis.deployments import outlines_http
from cogenesis.deployments.outlines_http import error_json, openai_error
from cogenesis.deployments.relay import ENORMOUS_FACTOR, GatewayRelay, connect_async

log = logging.getLogger("cogenesis.gateway")

CLOSE_UNAUTHORIZED = 4401  # the token is missing, malformed, forged or expired
CLOSE_FORBIDDEN = 4403  # the token's role may not connect
CLOSE_TRY_LATER = 1013  # the replica holds gateway.max_connections sockets
CLOSE_TOO_BIG = 1009  # a frame far past limits.max_message_bytes
DEVICE_ROLES: tuple[Role, ...] = ("device", "worker")  # an admin is allowed what a worker is
CLOUD_APP, CLOUD_DEPLOYMENT = "cogenesis", "CloudServer"
ANNOUNCE_S = 10.0  # how often a gateway replica announces its metrics address


def gateway_key(cfg: CloudConfig) -> bytes:
    """The cluster key the gateway checks tokens with; a ConfigError when the cluster has none (a gateway
    without authentication would hand the bus to anyone)."""
    try:
        return cluster_key(cfg.secrets_dir)
    except ConfigError as exc:
        raise ConfigError(
            f"the device gateway cannot start: {exc.message}",
            hint="give the cluster a secrets directory (CloudConfig.secrets_dir or $COGENESIS_SECRETS_DIR; "
            "`cogenesis up` makes one), or disable the gateway (gateway.enabled: false)",
        ) from None


def _reason(text: str) -> str:
    """A WebSocket close reason: at most 123 bytes of UTF-8."""
    raw = text.encode()[:123]
    return raw.decode(errors="ignore")


class GatewayServer:
    """One gateway replica: token checks, the relay (``GatewayRelay``) and the outline routes. Outside Serve
    (tests), build it with a relay and a cloud handle and serve ``gateway_api(server)``."""

    def __init__(self, config: dict, relay: GatewayRelay | None = None, cloud_handle: Any = None) -> None:
        self.cfg = validate(CloudConfig, config, "Gateway")
        self.key = gateway_key(self.cfg)
        try:
            self.id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Serve
            self.id = secrets.token_hex(4)
        if relay is None:
            client = connect_async(self.cfg.redis_url, "gateway", self.cfg.secrets_dir, self.cfg.redis_ca_file)
            relay = GatewayRelay(client, self.cfg.limits, self.cfg.gateway, gateway_id=self.id)
        self.relay = relay
        self._cloud = cloud_handle
        self.metrics_address: str | None = None
        self._announcer: asyncio.Task | None = None
        log.info("gateway %s ready", self.relay.id)

    # ---- tokens -----------------------------------------------------------------------------------

    def claims(self, authorization: str | None, *roles: Role) -> Claims:
        """The verified claims of the request's bearer token; AuthError (401) or Forbidden (403)."""
        return verify(self.key, bearer(authorization)).require(*roles)

    def cloud(self) -> Any:
        if self._cloud is None:
            self._cloud = serve.get_deployment_handle(CLOUD_DEPLOYMENT, app_name=CLOUD_APP)
        return self._cloud

    # ---- WebSocket ----------------------------------------------------------------------------------

    async def websocket(self, ws: WebSocket) -> None:
        try:
            claims = self.claims(ws.headers.get("authorization"), *DEVICE_ROLES)
        except AuthError as exc:
            self.relay.refuse("unauthorized")
            await self._refuse(ws, CLOSE_UNAUTHORIZED, 401, exc.message, exc.hint)
            return
        except Forbidden as exc:
            self.relay.refuse("forbidden")
            await self._refuse(ws, CLOSE_FORBIDDEN, 403, exc.message, exc.hint)
            return
        try:
            conn = self.relay.connect(claims.sub, ws.send_bytes)
        except Busy as exc:
            await ws.accept()
            await ws.close(CLOSE_TRY_LATER, _reason(exc.message))
            return
        self._start_announcer()
        await ws.accept()
        log.info("gateway %s: %s connected (%s)", self.relay.id, claims.sub, conn.id)
        conn.start()
        enormous = ENORMOUS_FACTOR * self.cfg.limits.max_message_bytes
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                if time.time() >= claims.exp:
                    await ws.close(CLOSE_UNAUTHORIZED, "the token expired: reconnect with a fresh one")
                    break
                data = message.get("bytes")
                if data is None:
                    await conn.refuse_text()
                    continue
                await conn.handle(data)
                if len(data) > enormous:
                    await ws.close(CLOSE_TOO_BIG, "frame far over the gateway's message limit")
                    break
                if not conn.reading:  # the reader could not write to the device: the socket is gone
                    break
        except Exception as exc:  # the socket broke mid-frame, or a send timed out: clean up below
            log.info("gateway %s: connection %s ended: %s", self.relay.id, conn.id, type(exc).__name__)
        finally:
            await conn.close()
            if ws.client_state == WebSocketState.CONNECTED:
                with contextlib.suppress(Exception):
                    await ws.close(1000)

    async def _refuse(self, ws: WebSocket, code: int, status: int, message: str, hint: str | None) -> None:
        """Refuse an upgrade: an HTTP answer where the server can send one (the WebSocket denial response
        extension), else accept and close at once with ``code`` and the reason (the only way a WebSocket
        client sees why); the device's frames are never read."""
        if "websocket.http.response" in ws.scope.get("extensions", {}):
            await ws.send_denial_response(JSONResponse({"error": message, "hint": hint}, status_code=status))
            return
        await ws.accept()
        await ws.close(code, _reason(message))

    # ---- health and stats ---------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        ok = await self.relay.ping()
        body: dict[str, Any] = {"ok": ok}
        try:
            self.claims(request.headers.get("authorization"), "admin")
            body.update(self.relay.stats(), redis=ok, metrics=self.metrics_address)
        except (AuthError, Forbidden):
            pass
        return JSONResponse(body, status_code=200 if ok else 503)

    async def stats(self, request: Request) -> Response:
        try:
            self.claims(request.headers.get("authorization"), "admin")
        except AuthError as exc:
            return error_json(401, exc.message, exc.hint)
        except Forbidden as exc:
            return error_json(403, exc.message, exc.hint)
        return JSONResponse({**self.relay.stats(), "redis": await self.relay.ping(), "metrics": self.metrics_address})

    # ---- outlines -----------------------------------------------------------------------------------

    async def outline(self, request: Request, route: str) -> Response:
        """``route`` (``sketch_route`` | ``chat_completions_route`` of ``outlines_http``) after the token and
        the rate limit; those answer in the route's own error shape."""
        openai = route == "chat_completions_route"
        try:
            claims = self.claims(request.headers.get("authorization"), *DEVICE_ROLES)
            self.relay.limiter.take(claims.sub)
        except AuthError as exc:
            self.relay.refuse("unauthorized")
            return openai_error(401, exc.message, "unauthorized") if openai else error_json(401, exc.message, exc.hint)
        except Forbidden as exc:
            self.relay.refuse("forbidden")
            return openai_error(403, exc.message, "forbidden") if openai else error_json(403, exc.message, exc.hint)
        except RateLimited as exc:
            self.relay.refuse("rate_limited")
            if openai:
                return openai_error(429, exc.message, "rate_limited", exc.retry_after_s)
            return error_json(429, exc.message, exc.hint, exc.retry_after_s)
        handler = getattr(outlines_http, route)
        return await handler(self.cloud(), request, claims, self.cfg)

    # ---- metrics ------------------------------------------------------------------------------------

    def _start_announcer(self) -> None:
        if self.metrics_address is not None and (self._announcer is None or self._announcer.done()):
            self._announcer = asyncio.get_running_loop().create_task(self._announce())

    async def _announce(self) -> None:
        """Tell ``cogenesis top`` and Prometheus discovery where this replica's metrics are."""
        key = f"{metrics.METRICS_PREFIX}:gateway:{self.relay.id}"
        while True:
            try:
                await asyncio.wait_for(
                    self.relay.r.set(key, self.metrics_address or "", ex=metrics.ANNOUNCE_TTL_S), ANNOUNCE_S
                )
            except Exception as exc:  # Redis away: announced again on the next round
                log.debug("gateway %s: metrics announce failed: %s", self.relay.id, type(exc).__name__)
            await asyncio.sleep(ANNOUNCE_S)


def gateway_api(server: GatewayServer) -> FastAPI:
    """The gateway's routes over one ``GatewayServer`` (Serve builds it in each replica)."""
    app = FastAPI(title="CoGenesis gateway", docs_url=None, redoc_url=None, openapi_url=None)

    @app.websocket("/v1/ws")
    async def ws(websocket: WebSocket) -> None:
        await server.websocket(websocket)

    @app.get("/healthz")
    async def healthz(request: Request) -> Response:
        return await server.healthz(request)

    @app.get("/v1/stats")
    async def stats(request: Request) -> Response:
        return await server.stats(request)

    @app.post("/v1/sketch")
    async def sketch(request: Request) -> Response:
        return await server.outline(request, "sketch_route")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await server.outline(request, "chat_completions_route")

    return app


@serve.ingress()
class Gateway(GatewayServer):
    """The Serve deployment: a ``GatewayServer`` per replica, its metrics served on a loopback port."""

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        self.metrics_address = metrics.serve(metrics.CLOUD)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return gateway_api(self)

    def check_health(self) -> None:
        """Serve's health check: the replica runs (Redis trouble is answered per message, not by a restart)."""

    async def __del__(self) -> None:
        relay = getattr(self, "relay", None)
        if relay is not None:
            await relay.aclose()


GatewayDeployment = serve.deployment(name="Gateway", health_check_period_s=10, graceful_shutdown_timeout_s=10)(Gateway)


def build_gateway_app(args: dict | CloudConfig) -> Application:
    """The Serve application of the gateway (deploy it as app ``gateway`` at ``cfg.gateway.route_prefix``); also
    the ``import_path`` builder of configs/serve.yaml, which Serve calls with the app's ``args`` as a dict. A
    ConfigError when the cluster has no secrets. Every open WebSocket is an ongoing request to Serve, so a
    replica takes ``gateway.max_connections`` sockets plus ``max_ongoing_requests`` HTTP requests."""
    cfg = args if isinstance(args, CloudConfig) else validate(CloudConfig, dict(args), "serve args")
    gateway_key(cfg)
    return GatewayDeployment.options(
        num_replicas=cfg.gateway.num_replicas,
        max_ongoing_requests=cfg.gateway.max_connections + cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.gateway.replica_cpus},
    ).bind(cfg.model_dump())
