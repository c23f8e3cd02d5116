"""An edge pool: many simulated clients sharing one small model in one process.

Each client keeps its own record, gate, sampling generator and KV state; only the model
weights are shared. Sketch mode writes all clients' answers in one batched generation
(``cogenesis.edge_sim.sketch``); logits mode steps all clients' sessions together
(``cogenesis.edge_sim.logits``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import httpx

from cogenesis.cluster.bus import EdgeBus
from cogenesis.core import metrics
from cogenesis.core.config import EdgeConfig
from cogenesis.core.data import Record
from cogenesis.core.errors import CoGenesisError
from cogenesis.core.protocol import error_code
from cogenesis.edge_sim.client import EdgeClient, SessionResult
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.logits import run_logits_sessions
from cogenesis.edge_sim.sketch import HttpOutlines, write_sketches

log = logging.getLogger(__name__)

OnResult = Callable[[SessionResult], None]


class EdgePool:
    def __init__(self, records: Sequence[Record], engine: EdgeEngine, cfg: EdgeConfig) -> None:
        self.cfg = cfg
        self.engine = engine
        self.clients = [EdgeClient(i, rec, engine, cfg) for i, rec in enumerate(records)]

    def run_sketch(self, http_url: str, on_result: OnResult = lambda r: None) -> list[SessionResult]:
        """All clients ask the cloud for outlines at once (Serve batches them), then write locally."""
        with httpx.Client() as http:
            outlines = HttpOutlines(http, http_url, self.cfg.step_timeout_s, self.cfg.admission_timeout_s)
            results = write_sketches(self.clients, outlines, self.engine, self.cfg)
        for r in results:
            on_result(r)
        return results

    def run_logits(self, redis_url: str, on_result: OnResult = lambda r: None) -> list[SessionResult]:
        """Every client runs one logits session; the pool steps them together (one batched small-model
        pass per round, all cloud requests of a round pipelined on one bus connection)."""
        bus = None
        try:
            bus = EdgeBus(redis_url, self.cfg.redis_retry_s)
            return run_logits_sessions(self.clients, self.engine, bus, self.cfg, on_result)
        except CoGenesisError as exc:  # Redis unreachable from the start, a setup error: every session says so
            results = [_failed(c, exc) for c in self.clients]
            for r in results:
                on_result(r)
            return results
        finally:
            if bus is not None:
                bus.close()


def _failed(client: EdgeClient, exc: CoGenesisError) -> SessionResult:
    log.warning("client %d logits session failed: %s", client.index, exc.message)
    metrics.session_done("logits", "failed", 0)
    return SessionResult(
        client.index, client.record.tid, "logits", "", 0, 0.0, error=exc.message, error_code=error_code(exc)
    )
