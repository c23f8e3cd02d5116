"""One client's whole session, run on its own (a fleet client's greenlet, a Locust user).

Sessions run side by side over one ``Device`` (``SharedDevice`` batches their small-model passes;
a ``ProfileDevice`` only takes a profile's time) and a ``Cloud`` handle: how the cloud is reached. Its
``transport``:

- ``ws`` (devices): the edge SDK's session (``cogenesis.edge_sim.sdk.Client.session``, on the shared device):
  logits steps over the gateway's WebSocket, outlines from the gateway's ``/v1/sketch``, each with the device's
  own bearer token;
- ``redis`` (trusted in-cluster workers): logits steps on the Redis bus as the ``edge`` Redis user, outlines from
  the cloud's own route with the worker token (when the cluster has secrets).

Results are ``SessionResult``s with TTFT and inter-token gaps (``itl_s``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from cogenesis.cluster.bus import EdgeBus
from cogenesis.core import metrics
from cogenesis.core.config import EdgeConfig
from cogenesis.core.errors import CoGenesisError, ConfigError
from cogenesis.core.protocol import error_code
from cogenesis.edge_sim.client import EdgeClient, SessionResult
from cogenesis.edge_sim.device import Device
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.logits import run_logits_sessions
from cogenesis.edge_sim.sketch import HttpOutlines, write_sketch

log = logging.getLogger(__name__)


TRANSPORTS = ("ws", "redis")
DEVICE_TOKEN_TTL_S = 24 * 3600.0
TokenFor = Callable[[int], "str | None"]  # a client's bearer token, by its index


@dataclass
class Cloud:
    """Where the cloud answers and how this process reaches it (see the module doc)."""

    redis_url: str
    http_url: str  # the cloud app's routes (trusted workers)
    http: httpx.Client
    transport: str = "redis"  # ws | redis
    gateway_url: str = ""  # where devices connect (ws)
    token: TokenFor | None = None  # ws: each device's token; redis: the worker token (None: an unlocked cluster)
    secrets_dir: str | None = None  # redis: the cluster's secrets (the ``edge`` Redis user's password)

    def outline_url(self) -> str:
        return self.gateway_url if self.transport == "ws" else self.http_url


def gateway_of(http_url: str) -> str:
    """The gateway's URL beside the cloud app's (``http://host:port/cloud`` -> ``http://host:port``: the gateway app
    serves the root, the cloud app ``/cloud``)."""
    url = http_url.rstrip("/")
    return url[: -len("/cloud")] if url.endswith("/cloud") else url


def token_source(
    transport: str,
    secrets_dir: str | None = None,
    token: str | None = None,
    subject: str = "device",
    ttl_s: float = DEVICE_TOKEN_TTL_S,
) -> TokenFor:
    """Each client's bearer token. ``ws``: ``token`` (or ``$COGENESIS_TOKEN``) for every client, else a device token
    minted per client (subject ``{subject}-{index}``) with the key of ``secrets_dir`` (or ``$COGENESIS_SECRETS_DIR``):
    every simulated device its own, as real ones have. ``redis``: ``token``, else the cluster's worker token, else
    none (an unlocked cluster). Tokens are never logged or put on a command line."""
    from cogenesis.core.secrets import ENV_TOKEN, stored_token
    from cogenesis.core.secrets import secrets_dir as find_secrets

    given = token or os.environ.get(ENV_TOKEN)
    if given:
        return lambda index: given
    found = find_secrets(secrets_dir)
    if transport == "redis":
        worker = stored_token("worker", found.path) if found is not None else None
        return lambda index: worker
    if transport != "ws":
        raise ConfigError(f"unknown transport {transport!r}", hint="use ws (devices) or redis (trusted workers)")
    if found is None:
        raise ConfigError(
            "no device token: the gateway needs one",
            hint="pass --token (or set $COGENESIS_TOKEN), or the cluster's secrets directory (--secrets-dir, "
            "$COGENESIS_SECRETS_DIR) to mint one per simulated device",
        )
    return device_minter(found.cluster_key(), subject, ttl_s)


def device_minter(key: bytes, subject: str, ttl_s: float = DEVICE_TOKEN_TTL_S) -> TokenFor:
    """Each simulated device's own device token (subject ``{subject}-{index}``), minted with ``key`` once."""
    from cogenesis.core.auth import mint

    minted: dict[int, str] = {}

    def mint_for(index: int) -> str:
        if index not in minted:
            minted[index] = mint(key, f"{subject}-{index}", "device", ttl_s)
        return minted[index]

    return mint_for


def run_session(
    client: EdgeClient,
    mode: str,
    engine: EdgeEngine,
    device: Device,
    cloud: Cloud,
    cfg: EdgeConfig,
    stop_at: float | None = None,
) -> SessionResult:
    """Run one ``mode`` session for ``client``; failures come back as a result with ``error`` (never raised:
    an unexpected exception is logged here and reported as ``internal``)."""
    t0 = time.perf_counter()
    token = cloud.token(client.index) if cloud.token is not None else None
    try:
        if cloud.transport == "ws":  # a device: the edge SDK's session, through the gateway with its token
            from cogenesis.edge_sim.sdk import Client

            sdk = Client(cloud.gateway_url, token or "", config=cfg, engine=engine, device=device, http=cloud.http)
            try:
                return sdk.session(client, mode, cfg, stop_at=stop_at)  # type: ignore[arg-type]
            finally:
                sdk.close()
        if mode == "logits":
            bus = EdgeBus(cloud.redis_url, cfg.redis_retry_s, secrets=cloud.secrets_dir)
            try:
                return run_logits_sessions([client], engine, bus, cfg, stop_at=stop_at, device=device)[0]
            finally:
                bus.close()
        if mode == "sketch":
            outlines = HttpOutlines(
                cloud.http, cloud.outline_url(), cfg.step_timeout_s, cfg.admission_timeout_s, token=token
            )
            return write_sketch(client, outlines, engine, device, cfg)
        raise ValueError(f"unknown mode {mode!r}: use sketch or logits")
    except Exception as exc:
        if not isinstance(exc, CoGenesisError):  # a bug: its traceback goes to this process's log only
            log.exception("client %d %s session crashed", client.index, mode)
        message = exc.message if isinstance(exc, CoGenesisError) else type(exc).__name__
        metrics.session_done(mode, "failed", 0)  # raised before the session could end normally
        seconds = time.perf_counter() - t0
        return SessionResult(
            client.index, client.record.tid, mode, "", 0, seconds, error=message, error_code=error_code(exc)
        )
