"""One client's whole session, run on its own (a fleet client's greenlet, a Locust user).

Sessions run side by side over one ``Device`` (``SharedDevice`` batches their small-model passes;
a ``ProfileDevice`` only takes a profile's time) and a ``Cloud`` handle (the bus's Redis URL and
the HTTP ingress). Results are ``SessionResult``s with TTFT and inter-token gaps (``itl_s``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import httpx

from cogenesis.cluster.bus import EdgeBus
from cogenesis.core import metrics
from cogenesis.core.config import EdgeConfig
from cogenesis.core.errors import CoGenesisError
from cogenesis.core.protocol import error_code
from cogenesis.edge_sim.client import EdgeClient, SessionResult
from cogenesis.edge_sim.device import Device
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.logits import run_logits_sessions
from cogenesis.edge_sim.sketch import HttpOutlines, write_sketch

log = logging.getLogger(__name__)


@dataclass
class Cloud:
    redis_url: str
    http_url: str
    http: httpx.Client


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
    try:
        if mode == "logits":
            bus = EdgeBus(cloud.redis_url, cfg.redis_retry_s)
            try:
                return run_logits_sessions([client], engine, bus, cfg, stop_at=stop_at, device=device)[0]
            finally:
                bus.close()
        if mode == "sketch":
            outlines = HttpOutlines(cloud.http, cloud.http_url, cfg.step_timeout_s, cfg.admission_timeout_s)
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
