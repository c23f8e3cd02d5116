"""The replica's logits-mode loop: read requests from the bus, drive the engine, post replies.

Runs in one thread per replica. Errors never kill the loop: each bad request gets an
ErrorReply naming the problem (or, if it cannot even be decoded, a warning in the log).
"""

from __future__ import annotations

import logging
import threading
import time

from cluster.bus import OPEN_STREAM, CloudBus
from cogenesis.errors import CoGenesisError, ProtocolError, UnknownSession
from cogenesis.protocol import (
    CloseSession,
    ErrorReply,
    OpenSession,
    StepReply,
    StepRequest,
    decode_request,
    encode,
    now_ms,
    pack_ids,
    pack_logprobs,
    unpack_ids,
)
from deployments.engine import CloudEngine, OpenArgs, StepArgs, TopK

log = logging.getLogger(__name__)


def _reply(session_id: str, step: int, replica: str, top: TopK) -> bytes:
    return encode(StepReply(session_id=session_id, step=step, replica=replica, ids=pack_ids(top.ids.ravel()),
                            logprobs=pack_logprobs(top.logprobs.ravel()), draft=pack_ids(top.draft),
                            prompt_tokens=top.context_len, compute_ms=round(top.compute_ms, 3)))


def _error(session_id: str, step: int, code: str, message: str) -> bytes:
    return encode(ErrorReply(session_id=session_id, step=step, code=code, message=message))


class StepLoop:
    def __init__(self, engine: CloudEngine, bus: CloudBus, engine_lock: threading.Lock,
                 route_ttl_s: int = 600) -> None:
        self.engine = engine
        self.bus = bus
        self.lock = engine_lock
        self.route_ttl_s = route_ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cogenesis-step-loop", daemon=True)
        self.requests = self.errors = 0

    def start(self) -> "StepLoop":
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        self.bus.close()

    def _run(self) -> None:
        last_beat = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_beat > 2.0:
                    self.bus.heartbeat()
                    last_beat = time.monotonic()
                batch = self.bus.read(block_ms=100)
                if batch:
                    self._serve(batch)
            except Exception:  # the loop must survive Redis hiccups; they are logged, then retried
                log.exception("step loop error; retrying in 0.5 s")
                self._stop.wait(0.5)

    def _serve(self, batch: list[tuple[str, bytes, bytes]]) -> None:
        """One bus read = one batch: all opens in one forward pass, all steps in another."""
        done, replies, routes = [], [], []
        opens: list[OpenSession] = []
        steps: list[StepRequest] = []
        closes: list[CloseSession] = []
        for stream, entry_id, payload in batch:
            done.append((stream, entry_id))
            self.requests += 1
            try:
                msg = decode_request(payload)
            except ProtocolError as exc:
                self.errors += 1
                log.warning("dropped undecodable message %s on %s: %s", entry_id, stream, exc.message)
                continue
            if stream == OPEN_STREAM and not isinstance(msg, OpenSession):
                self.errors += 1
                log.warning("dropped %s on the open stream", type(msg).__name__)
                continue
            if isinstance(msg, CloseSession):
                closes.append(msg)
            elif msg.deadline_ms < now_ms():
                self.errors += 1
                step = msg.step if isinstance(msg, StepRequest) else 0
                replies.append((msg.session_id, _error(msg.session_id, step, "deadline",
                                                       "the request's deadline passed before it was served")))
            else:
                (opens if isinstance(msg, OpenSession) else steps).append(msg)
        with self.lock:
            for msg in closes:
                self.engine.close(msg.session_id)
            for msg, out in zip(opens, self._call(self.engine.open_many, [
                    OpenArgs(m.session_id, m.instruction, m.top_k, m.lookahead) for m in opens])):
                replies.append((msg.session_id, self._encode(msg.session_id, 0, out)))
                routes.append(msg.session_id)
            for msg, out in zip(steps, self._call(self.engine.step_many, [
                    StepArgs(m.session_id, m.step, tuple(unpack_ids(m.tokens).tolist())) for m in steps])):
                replies.append((msg.session_id, self._encode(msg.session_id, msg.step, out)))
        self.bus.finish(done, replies, routes, self.route_ttl_s)

    def _call(self, fn, args: list) -> list:
        if not args:
            return []
        try:
            return fn(args)
        except Exception as exc:  # a bug in the engine: every request of the batch gets an error reply
            log.exception("engine failed on a batch of %d", len(args))
            return [exc] * len(args)

    def _encode(self, session_id: str, step: int, out) -> bytes:
        if isinstance(out, TopK):
            return _reply(session_id, step, self.bus.replica, out)
        self.errors += 1
        if isinstance(out, UnknownSession):
            return _error(session_id, step, "unknown_session", out.message)
        if isinstance(out, CoGenesisError):
            return _error(session_id, step, "bad_request", out.message)
        return _error(session_id, step, "internal", f"{type(out).__name__} on the replica")
