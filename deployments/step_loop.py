"""The replica's logits-mode loop: read requests from the bus, drive the engine, post replies.

Runs in one thread per replica. Errors never kill the loop: each bad request gets an
ErrorReply naming the problem (or, if it cannot even be decoded, a warning in the log).

Time is this replica's own: a request's budget counts from its arrival on the cloud (its stream
entry's id, Redis's clock), and a reply's tracing fields are durations measured here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import TypeVar

from cogenesis.cluster.bus import OPEN_STREAM, CloudBus, entry_ms
from cogenesis.core import metrics
from cogenesis.core.errors import CoGenesisError, ProtocolError, SessionError, UnknownSession
from cogenesis.core.protocol import (
    CloseSession,
    EdgeToCloud,
    ErrorReply,
    OpenSession,
    ReplyBatch,
    StepBatch,
    StepReply,
    StepRequest,
    decode_request,
    encode,
    now_ms,
    now_us,
    unpack_ids,
)
from cogenesis.deployments.engine import CloudEngine, OpenArgs, StepArgs, TopK
from cogenesis.deployments.replies import TraceFields, step_reply

log = logging.getLogger(__name__)

Outcome = TopK | Exception  # what the engine made of one request
_A = TypeVar("_A")


@dataclass(frozen=True)
class Trace:
    """When this replica read a batch and how long it held it (see ``StepReply`` tracing fields);
    every time is on this replica's clock."""

    read_called_us: int  # the loop was idle (waiting on the bus) from here
    read_us: int  # the batch was in hand
    model_us: int = 0  # time in (or waiting for) the engine while serving the batch
    posted_us: int = 0

    def fields(self, arrived_ms: int) -> TraceFields:
        """A request's durations; ``arrived_ms``: when its stream entry arrived (Redis's clock, whole ms).

        Its queue time is how long it waited before this replica began the read that took it (while the
        replica served others); ms resolution makes it a lower bound, and a request that came during the
        read did not queue."""
        return TraceFields(
            server_us=self.posted_us - self.read_us,
            model_us=self.model_us,
            queue_us=max(0, self.read_called_us - (arrived_ms + 1) * 1000),
        )


def _error(session_id: str, step: int, code: str, message: str) -> ErrorReply:
    return ErrorReply(session_id=session_id, step=step, code=code, message=message)


def _decode(payload: bytes) -> EdgeToCloud | ProtocolError:
    try:
        return decode_request(payload)
    except ProtocolError as exc:
        return exc


def _reply_to(msg: OpenSession | StepRequest) -> str:
    return msg.reply_to or msg.session_id


def _spent(arrived_ms: int, msg: OpenSession | StepRequest) -> bool:
    """The request's budget, counted from its arrival, is used up (a budget of 0 always is)."""
    return arrived_ms + msg.budget_ms <= now_ms()


def _pack(replies: list[tuple[str, StepReply | ErrorReply]]) -> list[tuple[str, bytes]]:
    """One payload per reply list: the reply itself, or a ReplyBatch when a pool gets several."""
    groups: dict[str, list[StepReply | ErrorReply]] = {}
    for key, msg in replies:
        groups.setdefault(key, []).append(msg)
    return [
        (key, encode(msgs[0]) if len(msgs) == 1 else encode(ReplyBatch(items=msgs))) for key, msgs in groups.items()
    ]


class StepLoop:
    def __init__(
        self,
        engine: CloudEngine,
        bus: CloudBus,
        engine_lock: AbstractContextManager[object],
        metrics_address: str | None = None,
    ) -> None:
        self.engine = engine
        self.metrics_address = metrics_address  # announced on the bus with every heartbeat
        self.bus = bus
        self.lock = engine_lock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cogenesis-step-loop", daemon=True)
        self.requests = self.errors = 0

    def start(self) -> StepLoop:
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
                    if self.metrics_address:
                        metrics.announce(self.bus.r, "cloud", self.bus.replica, self.metrics_address)
                    last_beat = time.monotonic()
                called = now_us()
                batch = self.bus.read(block_ms=100)
                if batch:
                    self._serve(batch, Trace(called, now_us()))
            except Exception:  # the loop must survive Redis hiccups; they are logged, then retried
                log.exception("step loop error; retrying in 0.5 s")
                self._stop.wait(0.5)

    def _serve(self, batch: list[tuple[str, bytes, bytes]], trace: Trace) -> None:
        """One bus read = one batch: all opens in one forward pass, all steps in another."""
        done: list[tuple[str, bytes]] = []
        replies: list[tuple[str, StepReply | ErrorReply]] = []
        opens: list[tuple[OpenSession, int]] = []  # (request, when its entry arrived: ms, Redis's clock)
        steps: list[tuple[StepRequest, int]] = []
        closes: list[CloseSession] = []
        for stream, entry_id, msg in self._expand(batch, done):
            self.requests += 1
            if isinstance(msg, ProtocolError):
                self.errors += 1
                log.warning("dropped undecodable message %s on %s: %s", entry_id, stream, msg.message)
                continue
            if isinstance(msg, StepBatch):
                self.errors += 1
                log.warning("dropped a StepBatch where single messages belong (%s on %s)", entry_id, stream)
                continue
            if stream == OPEN_STREAM and not isinstance(msg, OpenSession):
                self.errors += 1
                log.warning("dropped %s on the open stream", type(msg).__name__)
                continue
            if isinstance(msg, CloseSession):
                closes.append(msg)
                continue
            arrived = entry_ms(entry_id)
            if _spent(arrived, msg):
                self.errors += 1
                step = msg.step if isinstance(msg, StepRequest) else 0
                replies.append(
                    (
                        _reply_to(msg),
                        _error(
                            msg.session_id, step, "deadline", "the request's time budget ran out before it was served"
                        ),
                    )
                )
            elif isinstance(msg, OpenSession):
                opens.append((msg, arrived))
            else:
                steps.append((msg, arrived))
        t_model = now_us()
        with self.lock:
            t_locked = now_us()  # the model's own time starts here (before: waiting for an outline to yield)
            for msg in closes:
                self.engine.close(msg.session_id)
            open_out = self._call(
                self.engine.open_many, [OpenArgs(m.session_id, m.instruction, m.top_k, m.lookahead) for m, _ in opens]
            )
            step_out = self._call(
                self.engine.step_many,
                [StepArgs(m.session_id, m.step, tuple(unpack_ids(m.tokens).tolist())) for m, _ in steps],
            )
        posted = now_us()
        trace = replace(trace, model_us=posted - t_model, posted_us=posted)
        self._observe(len(opens) + len(steps), [m for m, _ in steps], (posted - t_locked) / 1e6)
        for (msg, arrived), out in zip(opens, open_out):
            replies.append((_reply_to(msg), self._encode(msg, 0, out, trace.fields(arrived))))
        for (msg, arrived), out in zip(steps, step_out):
            replies.append((_reply_to(msg), self._encode(msg, msg.step, out, trace.fields(arrived))))
        self.bus.finish(done, _pack(replies))

    def _observe(self, served: int, steps: list[StepRequest], model_s: float) -> None:
        if served:
            metrics.step_batch_size.observe(served)
            metrics.step_seconds.observe(model_s)
            metrics.cloud_tokens.labels("logits").inc(sum(len(unpack_ids(m.tokens)) for m in steps))
        stats = self.engine.stats()
        metrics.active_sessions.set(stats.get("active_sessions", 0))
        metrics.kv_cache_bytes.set(stats.get("kv_bytes", 0))
        metrics.bus_queue_depth.set(self.bus.backlog())

    def _expand(
        self, batch: list[tuple[str, bytes, bytes]], done: list[tuple[str, bytes]]
    ) -> list[tuple[str, bytes, EdgeToCloud | ProtocolError]]:
        """Decoded messages, one per request: a StepBatch entry yields its items (acked once, as one
        entry). A payload that does not decode yields its ProtocolError, reported by the caller."""
        out: list[tuple[str, bytes, EdgeToCloud | ProtocolError]] = []
        for stream, entry_id, payload in batch:
            done.append((stream, entry_id))
            msg = _decode(payload)
            if isinstance(msg, StepBatch) and stream != OPEN_STREAM:
                out.extend((stream, entry_id, _decode(item)) for item in msg.items)
            else:
                out.append((stream, entry_id, msg))
        return out

    def _call(self, fn: Callable[[Sequence[_A]], list[TopK | SessionError]], args: list[_A]) -> Sequence[Outcome]:
        if not args:
            return []
        try:
            return fn(args)
        except Exception as exc:  # a bug in the engine: every request of the batch gets an error reply
            log.exception("engine failed on a batch of %d", len(args))
            return [exc] * len(args)

    def _encode(
        self, msg: OpenSession | StepRequest, step: int, out: Outcome, trace: TraceFields
    ) -> StepReply | ErrorReply:
        session_id = msg.session_id
        if isinstance(out, TopK):
            return step_reply(session_id, step, self.bus.replica, out, trace)
        self.errors += 1
        if isinstance(out, UnknownSession):
            return _error(session_id, step, "unknown_session", out.message)
        if isinstance(out, CoGenesisError):
            return _error(session_id, step, "bad_request", out.message)
        return _error(session_id, step, "internal", f"{type(out).__name__} on the replica")
