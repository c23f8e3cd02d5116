"""An edge pool: many simulated clients sharing one small model in one process.

Each client keeps its own record, gate, sampling generator and KV state; only the model
weights are shared. Sketch mode writes all clients' answers in one batched generation
(``cogenesis.edge_sim.sketch``); logits mode steps all clients' sessions together
(``cogenesis.edge_sim.logits``). The clients reach the cloud as devices (through the gateway, each with its own
token and connection: ``run_logits_gateway``, ``run_sketch(token=...)``) or as a trusted worker (the Redis bus
as the ``edge`` user: ``run_logits``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager

import httpx

from cogenesis.cluster.bus import EdgeBus
from cogenesis.core import metrics
from cogenesis.core.config import EdgeConfig
from cogenesis.core.data import Record
from cogenesis.core.errors import CoGenesisError
from cogenesis.core.protocol import error_code
from cogenesis.edge_sim.client import EdgeClient, SessionResult
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.gateway_link import DeviceLinks
from cogenesis.edge_sim.links import CloudLink
from cogenesis.edge_sim.logits import run_logits_sessions
from cogenesis.edge_sim.sketch import HttpOutlines, Token, write_sketches

log = logging.getLogger(__name__)

OnResult = Callable[[SessionResult], None]


class EdgePool:
    def __init__(self, records: Sequence[Record], engine: EdgeEngine, cfg: EdgeConfig) -> None:
        self.cfg = cfg
        self.engine = engine
        self.clients = [EdgeClient(i, rec, engine, cfg) for i, rec in enumerate(records)]

    def run_sketch(
        self, http_url: str, on_result: OnResult = lambda r: None, token: Token = None
    ) -> list[SessionResult]:
        """All clients ask the cloud for outlines at once (Serve batches them), then write locally. ``http_url``: the
        gateway (``token``: each device's, by client index) or the cloud's own route (a worker token)."""
        with httpx.Client() as http:
            outlines = HttpOutlines(http, http_url, self.cfg.step_timeout_s, self.cfg.admission_timeout_s, token=token)
            results = write_sketches(self.clients, outlines, self.engine, self.cfg)
        for r in results:
            on_result(r)
        return results

    def run_logits(
        self, redis_url: str, on_result: OnResult = lambda r: None, secrets_dir: str | None = None
    ) -> list[SessionResult]:
        """Every client runs one logits session; the pool steps them together (one batched small-model
        pass per round, all cloud requests of a round pipelined on one bus connection, as the ``edge`` Redis
        user with the password of ``secrets_dir``: a trusted worker)."""
        return self._run_logits(_bus_link(redis_url, self.cfg.redis_retry_s, secrets_dir), on_result)

    def run_logits_gateway(
        self, gateway_url: str, token_for: Callable[[int], str], on_result: OnResult = lambda r: None
    ) -> list[SessionResult]:
        """Every client runs one logits session through the gateway, as a device: each over its own WebSocket with
        its own token (``token_for(client index)``); the pool still steps them together."""
        return self._run_logits(_gateway_links(gateway_url, token_for, self.cfg.redis_retry_s), on_result)

    def _run_logits(self, link: AbstractContextManager[CloudLink], on_result: OnResult) -> list[SessionResult]:
        try:
            with link as opened:
                return run_logits_sessions(self.clients, self.engine, opened, self.cfg, on_result)
        except CoGenesisError as exc:  # the cloud unreachable from the start, a setup error: every session says so
            results = [_failed(c, exc) for c in self.clients]
            for r in results:
                on_result(r)
            return results


@contextmanager
def _bus_link(redis_url: str, retry_s: float, secrets_dir: str | None) -> Iterator[CloudLink]:
    from cogenesis.edge_sim.links import BusLink

    bus = EdgeBus(redis_url, retry_s, secrets=secrets_dir)
    try:
        yield BusLink(bus)
    finally:
        bus.close()


@contextmanager
def _gateway_links(gateway_url: str, token_for: Callable[[int], str], retry_s: float) -> Iterator[CloudLink]:
    links = DeviceLinks(gateway_url, token_for, reconnect_s=retry_s)
    try:
        yield links
    finally:
        links.shutdown()


def _failed(client: EdgeClient, exc: CoGenesisError) -> SessionResult:
    log.warning("client %d logits session failed: %s", client.index, exc.message)
    metrics.session_done("logits", "failed", 0)
    return SessionResult(
        client.index, client.record.tid, "logits", "", 0, 0.0, error=exc.message, error_code=error_code(exc)
    )
