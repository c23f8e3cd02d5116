"""An edge pool: many simulated clients sharing one small model in one process.

Each client keeps its own record, gate, sampling generator and KV state; only the model
weights are shared. Sketch mode batches the clients' final generation into one batched
decode; logits mode steps all clients' sessions together (``cogenesis.edge_sim.logits``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

from cogenesis.cluster.bus import EdgeBus
from cogenesis.core import metrics
from cogenesis.core.config import EdgeConfig
from cogenesis.core.data import Record
from cogenesis.core.errors import CoGenesisError
from cogenesis.edge_sim.client import EdgeClient, SessionResult
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.logits import run_logits_sessions

log = logging.getLogger(__name__)

OnResult = Callable[[SessionResult], None]


def _failed(client: EdgeClient, mode: str, exc: Exception, seconds: float) -> SessionResult:
    message = exc.message if isinstance(exc, CoGenesisError) else f"{type(exc).__name__}: {exc}"
    log.warning("client %d %s session failed: %s", client.index, mode, message)
    metrics.session_done(mode, "failed", 0)
    return SessionResult(client.index, client.record.tid, mode, "", 0, seconds, error=message)


class EdgePool:
    def __init__(self, records: Sequence[Record], engine: EdgeEngine, cfg: EdgeConfig) -> None:
        self.cfg = cfg
        self.engine = engine
        self.clients = [EdgeClient(i, rec, engine, cfg) for i, rec in enumerate(records)]
        self.stop = threading.Event()

    def run_sketch(self, http_url: str, on_result: OnResult = lambda r: None) -> list[SessionResult]:
        """All clients ask the cloud for outlines at once (Serve batches them), then write locally."""
        t0 = time.perf_counter()
        with httpx.Client() as http, ThreadPoolExecutor(max(1, min(32, len(self.clients)))) as ex:
            futures = [ex.submit(c.request_sketch, http, http_url) for c in self.clients]
            sketches: list[tuple | Exception] = []
            for f in futures:
                try:
                    sketches.append(f.result())
                except Exception as exc:  # reported per session below
                    sketches.append(exc)
        ok = [(c, s) for c, s in zip(self.clients, sketches) if not isinstance(s, Exception)]
        results = {
            c.index: _failed(c, "sketch", s, time.perf_counter() - t0)
            for c, s in zip(self.clients, sketches)
            if isinstance(s, Exception)
        }
        if ok and not self.stop.is_set():
            t_gen = time.perf_counter()
            samp = self.cfg.sampling
            outs = self.engine.generate(
                [c.sketch_prompt(s[0]) for c, s in ok],
                self.cfg.max_new_tokens,
                samp.temperature,
                samp.top_p,
                [c.seed for c, _ in ok],
            )
            gen_s = time.perf_counter() - t_gen
            for (c, (sketch, _, sketch_s)), ids in zip(ok, outs):
                text = self.engine.tok.decode(ids, skip_special_tokens=True).strip()
                metrics.session_done("sketch", "ok", len(ids))
                results[c.index] = SessionResult(
                    c.index,
                    c.record.tid,
                    "sketch",
                    text,
                    len(ids),
                    sketch_s + gen_s,
                    round_trips=1,
                    sketch=sketch,
                    extra={"sketch_seconds": sketch_s, "edge_seconds": gen_s},
                )
        ordered = [results[c.index] for c in self.clients if c.index in results]
        for r in ordered:
            on_result(r)
        return ordered

    def run_logits(self, redis_url: str, on_result: OnResult = lambda r: None) -> list[SessionResult]:
        """Every client runs one logits session; the pool steps them together (one batched small-model
        pass per round, all cloud requests of a round pipelined on one bus connection)."""
        bus = EdgeBus(redis_url)
        try:
            return run_logits_sessions(self.clients, self.engine, bus, self.cfg, on_result)
        except CoGenesisError as exc:
            results = [_failed(c, "logits", exc, 0.0) for c in self.clients]
            for r in results:
                on_result(r)
            return results
        finally:
            bus.close()
