"""The replica's loop: read requests from the bus, drive the engine, post replies; write outlines.

Runs in one thread per replica, the only one that drives the engine besides the HTTP stateless baseline
(both under one lock: the engine is not thread-safe). What it promises:

- **Every request gets an answer.** Each item of a read (each message of a ``StepBatch``) is decoded and
  validated on its own: a bad one gets ``bad_request`` on its own reply list (or, when not even its session
  is known, a warning in the log, without its bytes), the rest are served, and every entry read is
  acknowledged and deleted whatever happens in the pass (``finally``).
- **Admission.** An open that waited on the bus longer than ``max_queue_age_s`` (the replica is behind), or
  that the engine cannot admit (``Busy``), is answered ``busy`` with a retry-after; the edge retries.
- **Outlines share the batch.** ``/v1/sketch`` hands its request here (``submit_outline``, thread-safe);
  while outlines are pending every pass advances them by one token beside the logits steps, and their
  events go back to the waiting handler through the callback it gave.
- **Dead replicas' work is taken over.** A heartbeat thread of its own keeps ``cg:alive:{replica}`` (a
  long forward pass does not silence it); every few seconds the loop looks for replicas of the open
  stream's group without heartbeat, claims their pending opens and serves them, and answers what is left
  on their input streams ``unknown_session`` (their edges resume elsewhere at once).
- **Limits.** Whatever a sender puts on the bus is bounded (``CloudConfig.limits``) before it reaches the
  engine: an entry's bytes, a batch's items, an open's instruction, resume ids and budget, a step's tokens and
  its session's total; past a limit the request is answered ``too_large``, a value out of its range (``top_k``,
  ``lookahead``, a reply list name) ``bad_request``, and the engine never sees it.
- **A session has one owner: the reply list that opened it.** A step, close or re-open of a held session
  naming another ``reply_to`` is answered ``forbidden`` on *that* (the requester's) list and changes nothing;
  replies go only to the owner's list. Reply list names are checked (``REPLY_TO``): a request naming no
  valid list cannot be answered and is dropped (logged by size).
- **Timers.** Idle sessions are swept every ``sweep_interval_s`` (their edges vanished).
- **Redis outages** are survived: capped exponential backoff, one log line per outage, groups and streams
  recreated after a restart, replies of a pass that could not be posted posted once Redis is back;
  ``health`` reports a dead or hung loop and an outage past ``redis_grace_s`` (Serve's health check).

Time is this replica's own: a request's budget counts from its arrival on the cloud (its stream
entry's id, Redis's clock), and a reply's tracing fields are durations measured here.
"""

from __future__ import annotations

import itertools
import logging
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import msgspec

from cogenesis.cluster.bus import OPEN_STREAM, REDIS_DOWN, CloudBus, entry_ms
from cogenesis.core import metrics
from cogenesis.core.config import CloudConfig, LimitsConfig
from cogenesis.core.errors import Busy, ClusterError, CoGenesisError, ProtocolError, TooLarge, UnknownSession
from cogenesis.core.protocol import (
    MAX_TOP_K,
    CloseSession,
    ErrorReply,
    OpenSession,
    ReplyBatch,
    SketchProgress,
    SketchReply,
    SketchRequest,
    StepBatch,
    StepReply,
    StepRequest,
    decode_request,
    encode,
    now_ms,
    now_us,
    unpack_ids,
)
from cogenesis.deployments.engine import MAX_LOOKAHEAD, CloudEngine, OpenArgs, SessionTooLarge, StepArgs, TopK
from cogenesis.deployments.limits import check_outline
from cogenesis.deployments.replies import TraceFields, step_reply

log = logging.getLogger(__name__)

Outcome = TopK | Exception  # what the engine made of one request
Reply = StepReply | ErrorReply

BUSY_RETRY_MS = 1000  # what a replica that is behind suggests to an open it refuses
BACKOFF_BASE_S = 0.1  # Redis outages: first retry, doubled per failure ...
BACKOFF_CAP_S = 5.0  # ... up to this
ORPHAN_SCAN_S = 30.0  # a full keyspace scan for streams of dead replicas written to after their takeover
HANG_S = 300.0  # a loop that made no iteration this long is hung (a pass that never ends): unhealthy
STOP_S = 20.0  # a stopping replica waits this long for its pass to end (Serve gives its shutdown 30 s)
MAX_UNFINISHED = 1000  # passes whose replies and acks wait for Redis to come back
REPLY_TO = re.compile(r"[A-Za-z0-9_-]{1,80}")  # a reply list's name (``cg:reply:{name}``), whole
MAX_SESSION_ID_CHARS = 128  # a session id is a key of the replica's tables: bounded like everything else


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


@dataclass(frozen=True)
class OutlineUpdate:
    """What the loop tells an outline's waiting handler: ``accepted`` (queued in the engine), ``progress``
    (the outline so far), ``done`` (the reply), ``failed`` (the error: ``Busy`` when the engine's queue is
    full, ``SessionError`` for invalid settings, ``ClusterError`` when the replica stops)."""

    kind: Literal["accepted", "progress", "done", "failed"]
    progress: SketchProgress | None = None
    reply: SketchReply | None = None
    error: CoGenesisError | None = None


Deliver = Callable[[OutlineUpdate], None]


@dataclass(frozen=True)
class _Outline:
    ticket: str  # the engine's request id for it: unique on this replica, whatever ids edges choose
    request: SketchRequest
    deliver: Deliver
    progress: bool


@dataclass
class _Item:
    """One request to serve (an open or a step), decoded and checked."""

    msg: OpenSession | StepRequest
    arrived_ms: int  # its stream entry's arrival (Redis's clock)
    ids: tuple[int, ...]  # a step's tokens; an open's resume ids
    answered: bool = False

    @property
    def step(self) -> int:
        return self.msg.step if isinstance(self.msg, StepRequest) else self.msg.resume_step

    @property
    def reply_to(self) -> str:
        return self.msg.reply_to or self.msg.session_id


@dataclass
class _Parsed:
    items: list[_Item] = field(default_factory=list)
    closes: list[CloseSession] = field(default_factory=list)
    replies: list[tuple[str, Reply]] = field(default_factory=list)


@dataclass
class _Owner:
    """Who holds a session on this replica: the reply list it was opened with (its only recipient), how many
    tokens it has (the engine's context length after its last reply) and when it was last used (monotonic)."""

    reply_to: str
    tokens: int
    used: float
    step: int  # the step of its last reply (a replayed step adds no tokens)


def _forbidden(msg: OpenSession | StepRequest | CloseSession, step: int) -> ErrorReply:
    what = "re-open" if isinstance(msg, OpenSession) else "step" if isinstance(msg, StepRequest) else "close"
    message = f"session {msg.session_id} belongs to another reply list: this {what} was refused and changed nothing"
    return _error(msg.session_id, step, "forbidden", message)


def _too_large(what: str, value: int, limit: int, name: str) -> str:
    return f"{what} is {value}; at most {limit} are taken (CloudConfig.limits.{name})"


def check_open(msg: OpenSession, resume_ids: int, limits: LimitsConfig) -> tuple[str, str] | None:
    """(code, message) refusing an open past the limits or out of range, or None: it may reach the engine."""
    if len(msg.instruction) > limits.max_instruction_chars:
        what = f"the instruction's length ({len(msg.instruction)} characters)"
        return "too_large", _too_large(
            what, len(msg.instruction), limits.max_instruction_chars, "max_instruction_chars"
        )
    if resume_ids > limits.max_session_tokens:
        what = f"the resume ({resume_ids} token ids)"
        return "too_large", _too_large(what, resume_ids, limits.max_session_tokens, "max_session_tokens")
    if msg.budget_ms > limits.max_budget_ms:
        return "too_large", _too_large("budget_ms", msg.budget_ms, limits.max_budget_ms, "max_budget_ms")
    if not 1 <= msg.top_k <= MAX_TOP_K:
        return "bad_request", f"top_k={msg.top_k} is outside 1..{MAX_TOP_K}"
    if not 0 <= msg.lookahead <= MAX_LOOKAHEAD:
        return "bad_request", f"lookahead={msg.lookahead} is outside 0..{MAX_LOOKAHEAD}"
    return None


def check_step(msg: StepRequest, tokens: int, limits: LimitsConfig) -> tuple[str, str] | None:
    """(code, message) refusing a step past the limits, or None (its session's total is checked on serving)."""
    if tokens > limits.max_step_tokens:
        what = f"step {msg.step}'s tokens ({tokens})"
        return "too_large", _too_large(what, tokens, limits.max_step_tokens, "max_step_tokens")
    if msg.budget_ms > limits.max_budget_ms:
        return "too_large", _too_large("budget_ms", msg.budget_ms, limits.max_budget_ms, "max_budget_ms")
    return None


class _RedisState:
    """When this replica last reached Redis, and since when it cannot (either thread reports)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.last_ok = time.monotonic()
        self.down_since: float | None = None

    def ok(self) -> None:
        with self._lock:
            now = time.monotonic()
            if self.down_since is not None:
                log.warning("Redis is reachable again after %.1f s", now - self.down_since)
                self.down_since = None
            self.last_ok = now

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            if self.down_since is None:  # one line per outage, not one per retry
                self.down_since = time.monotonic()
                log.warning("Redis unreachable (%s): retrying with backoff", type(exc).__name__)

    def down_for(self) -> float:
        with self._lock:
            return 0.0 if self.down_since is None else time.monotonic() - self.down_since


def _error(session_id: str, step: int, code: str, message: str, retry_after_ms: int = 0) -> ErrorReply:
    return ErrorReply(session_id=session_id, step=step, code=code, message=message, retry_after_ms=retry_after_ms)


def _identify(payload: bytes) -> tuple[str, str, int] | None:
    """(session, reply list, step) of a message that did not decode as a request (wrong version, a malformed
    field), read leniently so that its sender still gets an answer; None when it names no session (or is
    a close, which is never answered)."""
    try:
        raw = msgspec.msgpack.decode(payload)
    except (msgspec.DecodeError, ValueError, TypeError):
        return None
    if not isinstance(raw, dict) or raw.get("type") == "close":
        return None
    session_id, reply_to = raw.get("session_id"), raw.get("reply_to")
    if not isinstance(session_id, str) or not session_id or len(session_id) > MAX_SESSION_ID_CHARS:
        return None
    step = raw.get("step", raw.get("resume_step", 0))
    step = step if isinstance(step, int) and not isinstance(step, bool) else 0
    to = _reply_list(reply_to if isinstance(reply_to, str) else "", session_id)
    return None if to is None else (session_id, to, step)


def _reply_list(reply_to: str, session_id: str) -> str | None:
    """The reply list a request names (``reply_to``, or its session id when empty), or None when that is no
    valid list name (``REPLY_TO``): such a request cannot be answered."""
    name = reply_to or session_id
    return name if REPLY_TO.fullmatch(name) else None


def _pack(replies: list[tuple[str, Reply]]) -> list[tuple[str, bytes]]:
    """One payload per reply list: the reply itself, or a ReplyBatch when a pool gets several."""
    groups: dict[str, list[Reply]] = {}
    for key, msg in replies:
        groups.setdefault(key, []).append(msg)
    return [
        (key, encode(msgs[0]) if len(msgs) == 1 else encode(ReplyBatch(items=msgs))) for key, msgs in groups.items()
    ]


class StepLoop:
    """One replica's loop over its engine and the bus (see the module docstring).

    ``config`` supplies the timers and limits (``max_queue_age_s``, ``sweep_interval_s``, ``heartbeat_s``,
    ``heartbeat_ttl_s``, ``redis_grace_s``); defaults: ``CloudConfig()``'s."""

    def __init__(
        self,
        engine: CloudEngine,
        bus: CloudBus,
        engine_lock: AbstractContextManager[object],
        metrics_address: str | None = None,
        config: CloudConfig | None = None,
        hang_s: float = HANG_S,
        placement: dict[str, str] | None = None,
    ) -> None:
        self.engine = engine
        self.placement = dict(placement or {})  # where this replica runs (Ray node id and address): in its heartbeat
        self.metrics_address = metrics_address  # announced on the bus with every heartbeat
        self.bus = bus
        self.lock = engine_lock
        self.cfg = config or CloudConfig()
        self.limits = self.cfg.limits
        # session -> its owner (the reply list that opened it), least recently used first; every session the
        # engine holds has one (a session losing its owner is closed in the engine), at most ``_owners_max``
        self._owners: OrderedDict[str, _Owner] = OrderedDict()
        self._owners_max = 2 * self.cfg.max_sessions
        self.bus.heartbeat_ttl_s = self.cfg.heartbeat_ttl_s  # who counts as dead: the same rule everywhere
        self.hang_s = hang_s
        self._stop = threading.Event()
        self._stopped = False
        self._retired = False  # stopped while a pass ran on: that pass posts and acknowledges nothing
        self._wake = threading.Event()  # an outline was submitted or cancelled: stop waiting
        self._thread = threading.Thread(target=self._run, name="cogenesis-step-loop", daemon=True)
        self._beat_stop = threading.Event()
        self._beater = threading.Thread(target=self._beat, name="cogenesis-heartbeat", daemon=True)
        self.redis = _RedisState()
        self.iterated = time.monotonic()  # the loop's last iteration began
        # bus work
        self._claimed: list[tuple[str, bytes, bytes]] = []  # dead replicas' opens, served with the next read
        self._unfinished: list[tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]] = []  # (acks, replies)
        self._failures = 0  # consecutive Redis failures (backoff)
        self._retry_at = 0.0  # no bus call before this (monotonic)
        now = time.monotonic()
        self._next_sweep = now + self.cfg.sweep_interval_s
        self._claim_every = max(0.5, min(5.0, self.cfg.heartbeat_ttl_s / 2))
        self._next_claim = now + self._claim_every
        self._next_orphans = now + ORPHAN_SCAN_S
        # outlines
        self._commands: queue.SimpleQueue[_Outline | str] = queue.SimpleQueue()  # submissions, cancelled tickets
        self._outlines: dict[str, _Outline] = {}  # ticket -> outline the engine holds
        self._tickets = itertools.count(1)
        # counters (``/v1/stats``)
        self.requests = self.errors = 0
        self.refusals: dict[str, int] = {}
        self.claimed = self.swept = 0
        self.outlines_done = self.outlines_failed = 0
        # load since the autoscaler last asked (``load``): the longest an admitted or refused open had waited
        self._open_wait_ms = 0

    # ---- lifecycle ----------------------------------------------------------------------------------

    def start(self) -> StepLoop:
        self._thread.start()
        self._beater.start()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = STOP_S) -> None:
        """Stop the loop, then the heartbeat, fail waiting outlines, hand back what is left on this replica's
        input stream (answered ``unknown_session``: its edges resume elsewhere) and close the bus. Idempotent.

        The pass under way ends first (joined within ``timeout_s``) and the heartbeat beats until it has: its
        replies reach edges that still see this replica alive (an edge drops a routed reply from a replica
        without heartbeat, and the entries it answers are acknowledged). A pass that outlives ``timeout_s`` is
        cut off: it posts and acknowledges nothing (``_retired``), so what it read is taken over as a dead
        replica's (opens claimed by a survivor, steps answered ``unknown_session``) rather than lost."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._retired = True
            log.warning(
                "the step loop's pass did not end within %.0f s of the stop: its results are dropped", timeout_s
            )
        self._beat_stop.set()
        if self._beater.is_alive():
            self._beater.join(timeout_s)
        gone = ClusterError("the replica is shutting down", hint="retry: another replica will serve it")
        for outline in list(self._outlines.values()) + self._queued_outlines():
            self._deliver(outline, OutlineUpdate("failed", error=gone))
        self._outlines.clear()
        try:
            if not self._retired and self.cfg.stop_linger_s > 0:
                # still beating: what is left is answered now (edges take these replies), and edges that read
                # this pass's last replies late still see the replica alive; what comes meanwhile is answered
                # once it has left
                self.bus.heartbeat(self.cfg.stop_linger_s + self.cfg.heartbeat_ttl_s)
                left = self.bus.take_stream(self.bus.replica)
                if left:
                    self.bus.finish([], _pack(self._answer_lost(self.bus.replica, left, "the replica stopped")))
                time.sleep(self.cfg.stop_linger_s)
            left = self.bus.retire()
            if left:
                replies = self._answer_lost(self.bus.replica, left, "the replica stopped")
                self.bus.finish([], _pack(replies))
        except Exception as exc:  # Redis away: survivors will answer the stream once our heartbeat expires
            log.info("could not hand back this replica's stream at shutdown (%s)", type(exc).__name__)
        finally:
            with suppress(Exception):
                self.bus.close()

    def health(self) -> str | None:
        """Why this replica should be replaced, or None: the loop thread died, made no iteration for
        ``hang_s`` (a pass that never ends), or Redis has been unreachable longer than ``redis_grace_s``."""
        if not self._thread.is_alive():
            return "the step loop thread is not running"
        stalled = time.monotonic() - self.iterated
        if stalled > self.hang_s:
            return f"the step loop made no progress for {stalled:.0f} s"
        down = self.redis.down_for()
        if down > self.cfg.redis_grace_s:
            return f"Redis unreachable for {down:.0f} s (grace {self.cfg.redis_grace_s:.0f} s)"
        return None

    def stats(self) -> dict:
        return {
            "bus_requests": self.requests,
            "bus_errors": self.errors,
            "refusals": dict(self.refusals),
            "claimed_entries": self.claimed,
            "swept_sessions": self.swept,
            "outlines": {"active": len(self._outlines), "done": self.outlines_done, "failed": self.outlines_failed},
        }

    def load(self) -> dict[str, float]:
        """What loads this replica, for the autoscaler (``cogenesis.deployments.autoscale``): the sessions and
        outlines it holds and queues, and the longest an open waited on the bus before this replica took it (or
        refused it ``busy``) since the last call. Thread-safe (read from Serve's metrics thread)."""
        waited, self._open_wait_ms = self._open_wait_ms, 0
        return {
            "sessions": float(len(self._owners)),
            "outlines": float(len(self._outlines) + self._commands.qsize()),  # held, and submitted not yet taken
            "open_wait_s": waited / 1000.0,
        }

    # ---- outlines (called from HTTP handlers: thread-safe) ----------------------------------------------

    def submit_outline(self, request: SketchRequest, deliver: Deliver, progress: bool = False) -> str:
        """Queue an outline for the loop's batch; ``deliver`` is called from the loop thread with every
        ``OutlineUpdate`` (``progress`` ones only when asked). Returns the ticket ``cancel_outline`` takes.

        Raises ``TooLarge`` (nothing queued) for a request past ``CloudConfig.limits`` (``max_sketch_tokens``,
        ``max_instruction_chars``)."""
        check_outline(request, self.limits)
        ticket = f"{request.request_id}#{next(self._tickets)}"
        self._commands.put(_Outline(ticket, request, deliver, progress))
        self._wake.set()
        return ticket

    def cancel_outline(self, ticket: str) -> None:
        """Stop writing an outline (its client left or its budget ran out); nothing more is delivered."""
        self._commands.put(ticket)
        self._wake.set()

    def _queued_outlines(self) -> list[_Outline]:
        out: list[_Outline] = []
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return out
            if isinstance(cmd, _Outline):
                out.append(cmd)

    # ---- the loop ------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self.iterated = time.monotonic()
            try:
                self._iterate()
            except REDIS_DOWN as exc:
                self._redis_failed(exc)
            except Exception:  # a bug: logged, and the loop goes on
                log.exception("step loop error; retrying in 0.5 s")
                self._stop.wait(0.5)

    def _iterate(self) -> None:
        self._wake.clear()
        self._apply_commands()
        self._sweep()
        batch: list[tuple[str, bytes, bytes]] = []
        called = now_us()
        if time.monotonic() >= self._retry_at:
            try:
                self._flush_unfinished()
                self._take_over()
                waiting = bool(self._outlines) or not self._commands.empty()
                batch = self._claimed + self.bus.read(block_ms=None if waiting else 100)
                self._claimed = []
                self._redis_ok()
            except REDIS_DOWN as exc:
                self._redis_failed(exc)
        elif not self._outlines:  # nothing to do but wait for Redis (or a new outline)
            self._wake.wait(max(0.0, min(self._retry_at - time.monotonic(), 1.0)))
        if batch or self._outlines:
            self._serve(batch, Trace(called, now_us()))

    def _redis_ok(self) -> None:
        self._failures = 0
        self._retry_at = 0.0
        self.redis.ok()

    def _redis_failed(self, exc: BaseException) -> None:
        self.redis.failed(exc)
        self._retry_at = time.monotonic() + min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**self._failures)
        self._failures = min(self._failures + 1, 30)

    def _beat(self) -> None:
        """The heartbeat thread: ``cg:alive:{replica}`` every ``heartbeat_s``, whatever the loop is doing
        (a long pass), but not for a loop that died or hung: then edges must look elsewhere."""
        while not self._beat_stop.is_set():
            if self._thread.is_alive() and time.monotonic() - self.iterated <= self.hang_s:
                try:
                    held = {"sessions": len(self._owners), "outlines": len(self._outlines), "requests": self.requests}
                    self.bus.heartbeat(self.cfg.heartbeat_ttl_s, {**self.placement, **held})
                    if self.metrics_address:
                        metrics.announce(self.bus.r, "cloud", self.bus.replica, self.metrics_address)
                    self.redis.ok()
                except REDIS_DOWN as exc:
                    self.redis.failed(exc)
                except Exception:
                    log.exception("heartbeat failed")
            self._beat_stop.wait(self.cfg.heartbeat_s)

    # ---- timers --------------------------------------------------------------------------------------

    def _sweep(self) -> None:
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self.cfg.sweep_interval_s
        try:
            with self.lock:
                swept = self.engine.sweep_idle()
                for sid in swept:
                    self._owners.pop(sid, None)
                self._prune_owners(time.monotonic() - self.cfg.session_idle_s)
        except Exception:
            log.exception("sweeping idle sessions failed")
            return
        if swept:
            self.swept += len(swept)
            metrics.swept_sessions.inc(len(swept))
            log.info("closed %d idle session(s)", len(swept))

    def _prune_owners(self, idle_before: float) -> None:
        """Forget owners idle since before ``idle_before`` (their sessions were swept by the engine too, or are
        now) and the least recently used beyond ``_owners_max``; the engine closes their sessions, so that it
        never holds one without an owner. Under the engine lock."""
        while self._owners:
            sid, owner = next(iter(self._owners.items()))
            if owner.used >= idle_before and len(self._owners) <= self._owners_max:
                return
            del self._owners[sid]
            self._engine_call(self.engine.close, sid)

    def _take_over(self) -> None:
        """Claim dead replicas' pending opens (served with the next read) and answer their input streams; and
        serve again what was delivered to this replica but never came (a reply lost with its connection:
        between passes nothing else is pending here but what ``_claimed`` holds)."""
        now = time.monotonic()
        if now < self._next_claim:
            return
        self._next_claim = now + self._claim_every
        held = {entry_id for _, entry_id, _ in self._claimed}
        lost = [e for e in self.bus.own_pending() if e[1] not in held]
        if lost:
            log.warning("serving %d entries again: delivered to this replica, never received", len(lost))
            self._claimed.extend(lost)
        dead = self.bus.dead_consumers()
        if now >= self._next_orphans:
            self._next_orphans = now + ORPHAN_SCAN_S
            dead += [name for name in self.bus.orphan_streams() if name not in dead]
        for name in dead:
            claimed, clean = self.bus.claim(name)
            self._claimed.extend(claimed)  # pending for this replica now: served with the next read
            left = self.bus.take_stream(name)
            replies = self._answer_lost(name, left, "its replica is gone")
            self.claimed += len(claimed) + len(left)
            metrics.claimed_entries.inc(len(claimed) + len(left))
            self._finish([], replies)
            if clean:
                self.bus.remove_consumer(name)
            if claimed or left:
                log.warning(
                    "took over dead replica %s: %d open(s) claimed, %d entries answered", name, len(claimed), len(left)
                )

    def _answer_lost(self, replica: str, entries: list[tuple[bytes, bytes]], why: str) -> list[tuple[str, Reply]]:
        """``unknown_session`` for every request left on a lost replica's input stream: its edge re-opens the
        session elsewhere and replays its tokens, at once rather than after its step timeout."""
        replies: list[tuple[str, Reply]] = []
        for entry_id, payload in entries:
            try:
                msg = decode_request(payload)
                msgs = [decode_request(item) for item in msg.items] if isinstance(msg, StepBatch) else [msg]
            except ProtocolError:
                log.warning("dropped an undecodable entry %r of replica %s (%d bytes)", entry_id, replica, len(payload))
                continue
            for m in msgs:
                to = _reply_list(m.reply_to, m.session_id) if isinstance(m, StepRequest | OpenSession) else None
                if isinstance(m, StepRequest | OpenSession) and to is not None:
                    step = m.step if isinstance(m, StepRequest) else m.resume_step
                    message = f"session {m.session_id}: {why} (replica {replica}); resume it elsewhere"
                    replies.append((to, _error(m.session_id, step, "unknown_session", message)))
        return replies

    # ---- outlines ------------------------------------------------------------------------------------

    def _apply_commands(self) -> None:
        """Submit new outlines to the engine and cancel those their clients gave up on, in order."""
        submits: dict[str, _Outline] = {}
        cancels: list[str] = []
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Outline):
                submits[cmd.ticket] = cmd
            elif submits.pop(cmd, None) is None:  # one not submitted yet is just dropped
                cancels.append(cmd)
        if not submits and not cancels:
            return
        fresh = list(submits.values())
        with self.lock:
            for ticket in cancels:
                if self._outlines.pop(ticket, None) is not None:
                    self._engine_call(self.engine.cancel_outline, ticket)
            results: Sequence[Any] = []
            if fresh:
                requests = [msgspec.structs.replace(o.request, request_id=o.ticket) for o in fresh]
                results = self._call(self.engine.submit_outlines, requests)
        for outline, result in zip(fresh, results):
            if result is None:
                self._outlines[outline.ticket] = outline
                self._deliver(outline, OutlineUpdate("accepted"))
            else:
                self._fail_outline(outline, result)

    def _deliver(self, outline: _Outline, update: OutlineUpdate) -> bool:
        try:
            outline.deliver(update)
            return True
        except Exception:  # its handler is gone (event loop closed): stop writing it
            if outline.ticket in self._outlines:
                self.cancel_outline(outline.ticket)
            return False

    def _fail_outline(self, outline: _Outline, error: BaseException) -> None:
        self.outlines_failed += 1
        if isinstance(error, Busy):
            self.refusals["busy"] = self.refusals.get("busy", 0) + 1
            metrics.refusals.labels("busy").inc()
        if not isinstance(error, CoGenesisError):
            log.error("outline %s failed on the replica: %s", outline.ticket, type(error).__name__)
            error = CoGenesisError(f"the outline failed on the replica ({type(error).__name__})", hint="retry")
        self._deliver(outline, OutlineUpdate("failed", error=error))

    def _route_events(self, events: Sequence[Any]) -> None:
        """Hand each engine event to its outline's handler, under the request id its client chose."""
        for ev in events:
            outline = self._outlines.get(ev.request_id)
            if outline is None:  # cancelled meanwhile
                continue
            rid = outline.request.request_id
            if ev.error is not None:
                del self._outlines[ev.request_id]
                self._fail_outline(outline, ev.error)
            elif ev.reply is not None:
                del self._outlines[ev.request_id]
                self.outlines_done += 1
                reply = msgspec.structs.replace(ev.reply, request_id=rid)
                self._deliver(outline, OutlineUpdate("done", reply=reply))
            elif outline.progress:
                self._deliver(
                    outline,
                    OutlineUpdate("progress", progress=SketchProgress(request_id=rid, tokens=ev.tokens, text=ev.text)),
                )

    # ---- one pass --------------------------------------------------------------------------------------

    def _serve(self, batch: list[tuple[str, bytes, bytes]], trace: Trace) -> None:
        """One bus read = one pass: all opens in one forward pass, all steps (and one token of every outline)
        in another. Every entry read is acknowledged and deleted, whatever happens."""
        done = [(stream, entry_id) for stream, entry_id, _ in batch]
        parsed = _Parsed()
        try:
            self._parse_batch(batch, parsed)
            self._run_engine(parsed, trace)
        except Exception:
            log.exception("a pass failed; its requests are answered `internal`")
            for item in parsed.items:
                if not item.answered:
                    item.answered = True
                    parsed.replies.append(
                        (item.reply_to, _error(item.msg.session_id, item.step, "internal", "the replica failed"))
                    )
        finally:
            self._finish(done, parsed.replies)

    def _parse_batch(self, batch: list[tuple[str, bytes, bytes]], out: _Parsed) -> None:
        limits = self.limits
        for stream, entry_id, payload in batch:
            arrived = entry_ms(entry_id)
            if len(payload) > limits.max_message_bytes:
                what = f"the bus entry's size ({len(payload)} bytes)"
                self._refuse_entry(
                    stream,
                    entry_id,
                    payload,
                    _too_large(what, len(payload), limits.max_message_bytes, "max_message_bytes"),
                    out,
                )
                continue
            try:
                msg = decode_request(payload)
            except ProtocolError as exc:
                self._refuse_raw(stream, entry_id, payload, exc.message, out)
                continue
            if not isinstance(msg, StepBatch):
                self._parse_one(stream, entry_id, msg, arrived, out)
            elif stream == OPEN_STREAM:
                self.errors += 1
                log.warning("dropped a StepBatch on the open stream (%r)", entry_id)
            elif len(msg.items) > limits.max_batch_items:
                what = f"the StepBatch's items ({len(msg.items)})"
                self._refuse_entry(
                    stream,
                    entry_id,
                    payload,
                    _too_large(what, len(msg.items), limits.max_batch_items, "max_batch_items"),
                    out,
                )
            else:
                for item in msg.items:
                    try:
                        inner = decode_request(item)
                    except ProtocolError as exc:
                        self._refuse_raw(stream, entry_id, item, exc.message, out)
                        continue
                    if isinstance(inner, StepBatch):
                        self.errors += 1
                        log.warning("dropped a StepBatch inside a StepBatch (%r on %s)", entry_id, stream)
                    else:
                        self._parse_one(stream, entry_id, inner, arrived, out)

    def _refuse_entry(self, stream: str, entry_id: bytes, payload: bytes, message: str, out: _Parsed) -> None:
        """An entry past a limit: ``too_large`` to the sender of each request it holds (a batch's every item),
        none of them served."""
        try:
            msg: object = decode_request(payload)
        except ProtocolError:
            msg = None
        items = msg.items if isinstance(msg, StepBatch) else [payload]
        for item in items:
            self._refuse_raw(stream, entry_id, item, message, out, code="too_large")

    def _refuse_raw(
        self, stream: str, entry_id: bytes, payload: bytes, message: str, out: _Parsed, code: str = "bad_request"
    ) -> None:
        """A payload that is not a valid request (or past a limit): ``code`` to its sender when it names its
        session and a valid reply list, else a warning (never its bytes: they may be anything)."""
        self.requests += 1
        who = _identify(payload)
        if who is None:
            if code == "bad_request":  # garbage: an error, not a refusal of a request
                self.errors += 1
            else:
                self._count_dropped(code)
            log.warning("dropped an unanswerable entry %r on %s (%d bytes, %s)", entry_id, stream, len(payload), code)
            return
        session_id, reply_to, step = who
        out.replies.append((reply_to, _error(session_id, step, code, message)))

    def _count_dropped(self, code: str) -> None:
        """A refusal that has no reply list to go to (counted all the same)."""
        self.errors += 1
        self.refusals[code] = self.refusals.get(code, 0) + 1
        metrics.refusals.labels(code).inc()

    def _parse_one(
        self, stream: str, entry_id: bytes, msg: OpenSession | StepRequest | CloseSession, arrived: int, out: _Parsed
    ) -> None:
        self.requests += 1
        step = msg.step if isinstance(msg, StepRequest) else msg.resume_step if isinstance(msg, OpenSession) else 0
        reply_to = _reply_list(msg.reply_to, msg.session_id)
        if reply_to is None:  # nowhere to answer: a list name that is no name (nor is its session id)
            self._count_dropped("bad_request")
            log.warning(
                "dropped a %s naming an invalid reply list (%d characters) on %s (%r)",
                type(msg).__name__,
                len(msg.reply_to or msg.session_id),
                stream,
                entry_id,
            )
            return
        if not msg.session_id or len(msg.session_id) > MAX_SESSION_ID_CHARS:
            message = f"a session id of {len(msg.session_id)} characters: it takes 1..{MAX_SESSION_ID_CHARS}"
            if not isinstance(msg, CloseSession):
                out.replies.append((reply_to, _error(msg.session_id, step, "bad_request", message)))
            else:
                self._count_dropped("bad_request")
            return
        if isinstance(msg, CloseSession):
            if stream == OPEN_STREAM:
                self.errors += 1
                log.warning("dropped a CloseSession on the open stream (%r)", entry_id)
            else:
                out.closes.append(msg)
            return
        try:
            if isinstance(msg, StepRequest):
                if stream == OPEN_STREAM:
                    raise ProtocolError(
                        "a StepRequest on the open stream: send steps to the replica that owns the session"
                    )
                ids = tuple(unpack_ids(msg.tokens).tolist())
                refused = check_step(msg, len(ids), self.limits)
            else:
                if msg.resume_step < 0:
                    raise ProtocolError(f"resume_step={msg.resume_step} is negative")
                if len(msg.resume) // 4 > self.limits.max_session_tokens:  # never unpacked whole
                    ids = ()
                    refused = check_open(msg, len(msg.resume) // 4, self.limits)
                else:
                    ids = tuple(unpack_ids(msg.resume).tolist())
                    refused = check_open(msg, len(ids), self.limits)
        except ProtocolError as exc:
            out.replies.append((reply_to, _error(msg.session_id, step, "bad_request", exc.message)))
            return
        if refused is not None:
            out.replies.append((reply_to, _error(msg.session_id, step, *refused)))
            return
        out.items.append(_Item(msg, arrived, ids))

    def _admit(self, items: list[_Item], out: _Parsed) -> tuple[list[_Item], list[_Item]]:
        """Requests whose budget ran out get ``deadline``; opens that waited longer than ``max_queue_age_s``
        get ``busy`` without touching the engine. Returns the (opens, steps) to serve."""
        now = now_ms()
        max_age = int(self.cfg.max_queue_age_s * 1000)
        opens: list[_Item] = []
        steps: list[_Item] = []
        for item in items:
            msg = item.msg
            if item.arrived_ms + msg.budget_ms <= now:  # the budget counts from arrival (a budget of 0 always is spent)
                message = "the request's time budget ran out before it was served"
                self._answer(out, item, _error(msg.session_id, item.step, "deadline", message))
            elif isinstance(msg, OpenSession) and (waited := now - item.arrived_ms) > max_age:
                self._open_wait_ms = max(self._open_wait_ms, waited)
                message = f"the open waited {(now - item.arrived_ms) / 1000:.1f} s on the bus: the replicas are behind"
                self._answer(out, item, _error(msg.session_id, item.step, "busy", message, BUSY_RETRY_MS))
            elif isinstance(msg, OpenSession):
                self._open_wait_ms = max(self._open_wait_ms, now - item.arrived_ms)
                opens.append(item)
            else:
                steps.append(item)
        return opens, steps

    def _run_engine(self, parsed: _Parsed, trace: Trace) -> None:
        opens, steps = self._admit(parsed.items, parsed)
        t_model = now_us()
        events: Sequence[Any] = []
        with self.lock:
            t_locked = now_us()  # the model's own time starts here (before: waiting for a stateless request)
            for msg in parsed.closes:
                self._close(msg, parsed)
            opens = self._owned_opens(opens, parsed)
            open_out = self._call(
                self.engine.open_many,
                [
                    OpenArgs(
                        m.msg.session_id,
                        m.msg.instruction,
                        m.msg.top_k,
                        m.msg.lookahead,
                        resume=m.ids,
                        resume_step=m.msg.resume_step,
                    )
                    for m in opens
                    if isinstance(m.msg, OpenSession)
                ],
            )
            self._own(opens, open_out)
            steps = self._owned_steps(steps, parsed)
            outlines = self._engine_call(self.engine.outlines_pending) or 0
            step_out: Sequence[Outcome] = []
            if steps or outlines:  # a pass with outlines alone advances them by one token
                step_out = self._call(
                    self.engine.step_many,
                    [StepArgs(m.msg.session_id, m.step, m.ids) for m in steps],
                    allow_empty=True,
                )
            self._own(steps, step_out)
            if outlines or self._outlines:
                events = self._engine_call(self.engine.outline_events) or []
                outlines = self._engine_call(self.engine.outlines_pending) or 0
        posted = now_us()
        trace = replace(trace, model_us=posted - t_model, posted_us=posted)
        self._route_events(events)
        if not outlines and self._outlines:  # the engine holds none of them any more: never leave a client waiting
            lost = CoGenesisError("the replica lost the outline", hint="retry")
            for ticket in list(self._outlines):
                self._fail_outline(self._outlines.pop(ticket), lost)
        metrics.outlines_active.set(outlines)
        self._observe(len(opens) + len(steps), steps, (posted - t_locked) / 1e6)
        for item, out in zip(opens, open_out):
            self._answer(parsed, item, self._encode(item, out, trace.fields(item.arrived_ms)))
        for item, out in zip(steps, step_out):
            self._answer(parsed, item, self._encode(item, out, trace.fields(item.arrived_ms)))

    # ---- owners: a session answers only to the reply list that opened it -----------------------------------

    def _close(self, msg: CloseSession, out: _Parsed) -> None:
        """Close a session for its owner; another list's close is answered ``forbidden`` (on its own list)."""
        to = msg.reply_to or msg.session_id
        owner = self._owners.get(msg.session_id)
        if owner is not None and owner.reply_to != to:
            log.warning("refused a close of session %s from another reply list", msg.session_id)
            out.replies.append((to, _forbidden(msg, 0)))
            return
        self._owners.pop(msg.session_id, None)
        self._engine_call(self.engine.close, msg.session_id)  # without an owner the engine holds none: a no-op

    def _owned_opens(self, opens: list[_Item], out: _Parsed) -> list[_Item]:
        """The opens that may reach the engine: new sessions, and re-opens (replays, resumes) by their owner; an
        open of a session another list holds (or opened earlier in this pass) is answered ``forbidden``."""
        claims: dict[str, str] = {}
        keep: list[_Item] = []
        for item in opens:
            sid = item.msg.session_id
            owner = self._owners.get(sid)
            holder = owner.reply_to if owner is not None else claims.get(sid)
            if holder is not None and holder != item.reply_to:
                log.warning("refused an open of session %s from another reply list", sid)
                self._answer(out, item, _forbidden(item.msg, item.step))
                continue
            claims[sid] = item.reply_to
            keep.append(item)
        return keep

    def _owned_steps(self, steps: list[_Item], out: _Parsed) -> list[_Item]:
        """The steps that may reach the engine: those of sessions their owner drives, within
        ``max_session_tokens`` (another list's step is ``forbidden``, one past the session's limit
        ``too_large``). A session without owner is one the engine does not hold (it answers ``unknown_session``):
        every session a loop opens has one, and one losing it is closed. Only a loop started over an engine that
        already held sessions meets one that is held: its first step binds it to its list."""
        planned: dict[str, int] = {}  # session -> its tokens once the steps kept so far are served
        claims: dict[str, str] = {}  # sessions without owner -> the list whose step goes first
        keep: list[_Item] = []
        limit = self.limits.max_session_tokens
        for item in steps:
            sid = item.msg.session_id
            owner = self._owners.get(sid)
            holder = owner.reply_to if owner is not None else claims.setdefault(sid, item.reply_to)
            if holder != item.reply_to:
                log.warning("refused a step of session %s from another reply list", sid)
                self._answer(out, item, _forbidden(item.msg, item.step))
                continue
            if owner is not None:
                tokens = planned.get(sid, owner.tokens) + (0 if item.step == owner.step else len(item.ids))
                if tokens > limit:
                    what = f"session {sid}'s length after step {item.step} ({tokens} tokens)"
                    message = _too_large(what, tokens, limit, "max_session_tokens")
                    self._answer(out, item, _error(sid, item.step, "too_large", message))
                    continue
                planned[sid] = tokens
            keep.append(item)
        return keep

    def _own(self, items: list[_Item], outcomes: Sequence[Outcome]) -> None:
        """Record what the engine made of opens or steps: a served one's owner (bound at its open) with its
        length; a session the engine no longer holds has no owner."""
        now = time.monotonic()
        for item, outcome in zip(items, outcomes):
            sid = item.msg.session_id
            if isinstance(outcome, TopK):
                owner = self._owners.pop(sid, None) or _Owner(item.reply_to, 0, now, 0)
                owner.tokens = outcome.context_len if outcome.context_len > 0 else owner.tokens + len(item.ids)
                owner.step, owner.used = item.step, now
                self._owners[sid] = owner  # the most recently used
            elif isinstance(outcome, UnknownSession):
                self._owners.pop(sid, None)
        self._prune_owners(now - self.cfg.session_idle_s)

    @staticmethod
    def _answer(out: _Parsed, item: _Item, reply: Reply) -> None:
        item.answered = True
        out.replies.append((item.reply_to, reply))

    def _finish(self, done: list[tuple[str, bytes]], replies: list[tuple[str, Reply]]) -> None:
        """Post replies and acknowledge entries; while Redis is away they wait for it (``_flush_unfinished``)."""
        for _, reply in replies:
            if isinstance(reply, ErrorReply):
                self.errors += 1
                self.refusals[reply.code] = self.refusals.get(reply.code, 0) + 1
                metrics.refusals.labels(reply.code).inc()
        payloads = _pack(replies)
        if not done and not payloads:
            return
        if self._retired:  # the replica left the bus: what this pass read is a dead replica's, taken over
            log.info("a pass that outlived the stop: %d replies not posted, %d entries left", len(payloads), len(done))
            return
        try:
            self.bus.finish(done, payloads)
        except Exception as exc:
            self._unfinished.append((done, payloads))
            if len(self._unfinished) > MAX_UNFINISHED:
                self._unfinished.pop(0)
                log.warning("dropped the replies of a pass that waited too long for Redis")
            if isinstance(exc, REDIS_DOWN):
                self._redis_failed(exc)
            else:
                log.exception("posting a pass's replies failed; retrying")
                self._retry_at = time.monotonic() + BACKOFF_BASE_S

    def _flush_unfinished(self) -> None:
        while self._unfinished:
            done, payloads = self._unfinished[0]
            self.bus.finish(done, payloads)
            self._unfinished.pop(0)

    def _observe(self, served: int, steps: list[_Item], model_s: float) -> None:
        if served:
            metrics.step_batch_size.observe(served)
            metrics.step_seconds.observe(model_s)
            metrics.cloud_tokens.labels("logits").inc(sum(len(m.ids) for m in steps))
        try:
            stats = self.engine.stats()
        except Exception:
            return
        metrics.active_sessions.set(stats.get("active_sessions", 0))
        metrics.kv_cache_bytes.set(stats.get("kv_bytes", 0))

    def _engine_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A single engine call whose failure must not fail the pass (logged; None)."""
        try:
            return fn(*args)
        except Exception:
            log.exception("engine call %s failed", getattr(fn, "__name__", fn))
            return None

    def _call(
        self, fn: Callable[[Sequence[Any]], Sequence[Any]], args: list[Any], allow_empty: bool = False
    ) -> Sequence[Any]:
        """A batched engine call: one outcome per request; a failure of the call (a bug in the engine) is
        every request's outcome."""
        if not args and not allow_empty:
            return []
        try:
            out = list(fn(args))
        except Exception as exc:
            log.exception("engine failed on a batch of %d", len(args))
            return [exc] * len(args)
        if len(out) != len(args):
            log.error("engine answered %d of %d requests", len(out), len(args))
            return [RuntimeError("the engine lost a request")] * len(args)
        return out

    def _encode(self, item: _Item, out: Outcome, trace: TraceFields) -> Reply:
        session_id, step = item.msg.session_id, item.step
        if isinstance(out, TopK):
            return step_reply(session_id, step, self.bus.replica, out, trace)
        if isinstance(out, Busy):
            return _error(session_id, step, "busy", out.message, max(1, int(out.retry_after_s * 1000)))
        if isinstance(out, SessionTooLarge | TooLarge):
            return _error(session_id, step, "too_large", out.message)
        if isinstance(out, UnknownSession):
            return _error(session_id, step, "unknown_session", out.message)
        if isinstance(out, CoGenesisError):
            return _error(session_id, step, "bad_request", out.message)
        return _error(session_id, step, "internal", f"{type(out).__name__} on the replica")
