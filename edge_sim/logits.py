"""Logits-mode sessions for a pool of clients, stepped in lockstep with one batched small model.

Per round, for every live session: decide by the schedule whether this position is fused; if it
is and no cloud top-k covers it yet, ask the owning replica (all such requests pipelined, all
replies awaited together); choose the token (fused or small-only), accepting the cloud's draft
when the choice equals it, which keeps the next position covered without a round trip; then run
the small model on every session's new token in one batched pass. When the schedule is known in
advance, the request for the next position leaves before that pass, so the cloud computes while
the device does. Every token passes the session's stream gate (``cogenesis.edge_sim.gate.TokenStream``)
before it may leave: a token that could begin a private span is held (the positions after it are written
without fusion until it is decided), and a private span reaches the cloud only as a placeholder. How
requests reach the cloud is a ``CloudLink`` (``cogenesis.edge_sim.links``): the Redis
bus (CoGenesis) or, for the benchmark's baseline, stateless HTTP. The loop hands a link typed
items (``Opening``, ``Step``, ``Closing``) and applies the ``Arrival``s it returns.

A session's state is split by concern: what it wrote (``_Live``), its exchange with the cloud
(``_Exchange``), when things happened (``_Trace``) and its counts (``_Stats``).

Faults. The device is the source of truth of a session: it holds every id it released to the cloud, so a
session whose request was lost (its replica died: ``ReplicaLost``; the replica no longer knows it:
``unknown_session``; Redis lost the exchange) is re-opened at once by a *resume* open carrying every id it
had released through its in-flight step, and that step's number; the replica that takes it rebuilds the
session and answers that step, and the session goes on where it was: greedy output is the same as if
nothing happened, no token lost or repeated. At most ``EdgeConfig.max_resumes`` times; then it fails
(``replica_lost``). A request refused ``busy`` parks its session (it keeps its device state) until the
retry time (``busy_delay``: the cloud's retry-after, exponential backoff, jitter), while the pool's other
sessions keep stepping (on a ``PackedDevice`` its row sits their passes out); after ``admission_timeout_s`` from the
first refused open it fails (``busy``). A reply whose top-k rows are malformed ends only its own session
(``bad_reply``). A session that ends frees its device state and its replica slot at once, so a session waiting
for admission can take the slot.

Errors the loop does not expect (a bug, a failed small-model pass) end what they touch, never the caller: one in a
session's own work (applying its reply, choosing its token) fails that session alone, one in a batched part of a
round (the device's pass, the link) fails the sessions of that round (``internal``, or the ``CoGenesisError``'s
code); the traceback goes to this process's log only.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from cogenesis.cluster.bus import EdgeBus
from cogenesis.core import metrics
from cogenesis.core.config import EdgeConfig
from cogenesis.core.errors import CoGenesisError, ConfigError, PrivacyViolation, ProtocolError, SessionError
from cogenesis.core.fusion_net import Fuser
from cogenesis.core.prompts import cloud_prompt_ids
from cogenesis.core.protocol import ErrorCode, StepReply, error_code
from cogenesis.core.sampling import sample, sampling_probs
from cogenesis.core.schedules import Schedule
from cogenesis.core.speculative import accept_draft
from cogenesis.edge_sim.client import EdgeClient, SessionResult, busy_delay
from cogenesis.edge_sim.device import Device, PackedDevice
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.gate import PublicStream, TokenStream
from cogenesis.edge_sim.links import Arrival, BusLink, Closing, CloudLink, Failure, Opening, Step

log = logging.getLogger(__name__)
OnToken = Callable[[int, int], "bool | None"]  # (client index, token id) -> False: stop that session


# ---- one session's state, by concern ------------------------------------------------------------------


@dataclass
class _Exchange:
    """What the cloud told a session: who holds it, the top-k rows of its last reply and their drafts."""

    replica: str = ""
    step: int = 0  # last step number sent
    sent: int = 0  # how many of the released ids the cloud was sent (through the in-flight step)
    in_flight: bool = False
    opening: bool = False  # the request in flight is an open (plain or resume): its reply admits the session
    rows: tuple[np.ndarray, np.ndarray] | None = None  # cloud top-k rows [P, K] of the last reply
    drafts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    row: int | None = None  # which row covers the current position (None: not covered)


@dataclass
class _Trace:
    """When things happened: first token, every chosen token, and per reply its round trip and overhead."""

    t0: float  # perf_counter at the session's start
    ttft: float | None = None
    prefill_s: float | None = None  # of the time to first token: the device's prefill of the pool's prompts ...
    cloud_wait_s: float | None = None  # ... and the wait for the cloud's first replies after it (the opening)
    token_times: list[float] = field(default_factory=list)  # perf_counter at each chosen token
    rtt_us: list[int] = field(default_factory=list)  # per reply: sent -> received
    overhead_us: list[int] = field(default_factory=list)  # per reply: bus + serialization (StepReply)

    def chose(self) -> None:
        self.ttft = self.ttft if self.ttft is not None else time.perf_counter() - self.t0

    def wrote(self) -> None:
        self.token_times.append(time.perf_counter())

    def replied(self, arrival: Arrival, reply: StepReply) -> None:
        if arrival.received_us is None:  # an untimed (in-process) link
            return
        rtt = arrival.received_us - arrival.sent_us
        self.rtt_us.append(rtt)
        metrics.step_roundtrip_seconds.observe(rtt / 1e6)
        overhead = arrival.exchange_overhead_us()
        if overhead is not None:  # traced by the replica
            self.overhead_us.append(overhead)

    def gaps(self) -> list[float]:
        """Inter-token latencies (s)."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


@dataclass
class _Stats:
    round_trips: int = 0
    resumes: int = 0  # re-opened by replay
    busy_retries: int = 0  # requests retried after a busy refusal
    busy_now: int = 0  # ... in the current admission (the backoff's exponent)
    fused: int = 0
    accepted: int = 0  # draft tokens accepted
    accepted_now: int = 0  # ... of the current reply's drafts


@dataclass(eq=False, repr=False)  # a session is its own key on the device (identity)
class _Live:
    """One running session: what it wrote, and where its exchange, trace and counts stand."""

    client: EdgeClient
    session_id: str
    gen: torch.Generator | None
    trace: _Trace
    stream: TokenStream | PublicStream  # the outbound gate on its tokens (public: a simulated device, see ``start``)
    lp: torch.Tensor | None = None  # [V] small model's log-probs at the current position
    plain_lp: torch.Tensor | None = None  # [V] ... without the private context (contrast fusion only)
    plain_key: object = field(default_factory=object)  # this session's row on the no-context pass
    out: list[int] = field(default_factory=list)  # what the device wrote
    unsent: list[int] = field(default_factory=list)  # ids the stream gate released that the cloud has not seen yet
    released: list[int] = field(default_factory=list)  # every id released: the cloud's view of ``out``
    error: str | None = None
    error_code: ErrorCode | None = None  # what may leave the device of ``error``
    done: bool = False
    stopped: bool = False  # ended early by the caller's time budget
    retired: bool = False  # ended, and its device state and replica slot freed
    parked_until: float | None = None  # refused busy: its open is sent again at this ``time.monotonic()``
    admit_from: float | None = None  # when the open now being admitted was first sent (``time.monotonic()``)
    cloud: _Exchange = field(default_factory=_Exchange)
    stats: _Stats = field(default_factory=_Stats)

    @classmethod
    def start(cls, client: EdgeClient, engine: EdgeEngine, simulated: bool) -> _Live:
        """A simulated device's tokens are drawn from the cloud's own top-k with nothing of the record
        as input, so they carry nothing private (and it could not write a held position alone)."""
        gen = torch.Generator().manual_seed(client.seed) if client.seed is not None else None
        session_id = uuid.uuid4().hex
        gate = client.gate
        stream = gate.public_stream(session_id) if simulated else gate.stream(engine.tok, session_id)
        return cls(client, session_id, gen, _Trace(time.perf_counter()), stream)

    def __repr__(self) -> str:  # never what it wrote (an error message or a log line may quote it)
        return f"<logits session {self.session_id[:8]} of client {self.client.index}>"

    @property
    def holding(self) -> bool:
        """Tokens are held back: the cloud's view is stale, so positions are written without fusion."""
        return self.stream.holding

    @property
    def parked(self) -> bool:
        return self.parked_until is not None

    def wrote(self, token: int) -> None:
        """Pass the token just written through the stream gate; queue what it releases for the cloud."""
        self.out.append(token)
        try:
            ids = self.stream.push(token)
        except PrivacyViolation as exc:  # span policy 'refuse'
            self.error, self.error_code, self.done = exc.message, error_code(exc), True
            log.warning("client %d logits session ended by its privacy gate", self.client.index)
            return
        self.unsent += ids
        self.released += ids
        if ids != [token]:  # held or replaced: the cloud's rows and drafts no longer follow the device's text
            self.cloud.row = None

    def admitted(self) -> bool:
        """Whether the gate lets this session's instruction out; a refused session ends here, alone."""
        try:
            self.client.gate.check_text(self.client.record.public_instruction)
        except PrivacyViolation as exc:
            self.error, self.error_code, self.done = exc.message, error_code(exc), True
            log.warning("client %d logits session refused by its privacy gate", self.client.index)
            return False
        return True

    def opening(self) -> Opening:
        """Open the session, or re-open it where it is: a resume carries every id released through its in-flight
        step (not those released since) and that step's number (a first open: none, and step 0)."""
        c = self.cloud
        resume = tuple(self.released[: c.sent])
        return Opening(
            self.session_id, self.client.index, self.client.record.public_instruction, self.client.gate, resume, c.step
        )

    def next_step(self) -> Step:
        """Number the next request and hand over the tokens the cloud has not seen."""
        self.cloud.step += 1
        tokens, self.unsent = self.unsent, []
        self.cloud.sent = len(self.released)
        return Step(
            self.session_id, self.cloud.step, tuple(tokens), tuple(self.released), self.cloud.replica, self.client.gate
        )

    def closing(self) -> Closing:
        return Closing(self.session_id, self.cloud.replica, self.client.gate)

    def sent(self, opening: bool = False) -> None:
        self.cloud.in_flight = True
        self.stats.round_trips += 1
        if opening:
            self.cloud.opening, self.parked_until = True, None
            self.admit_from = self.admit_from if self.admit_from is not None else time.monotonic()

    def arrived(self, arrival: Arrival, cfg: EdgeConfig, rng: random.Random) -> bool:
        """Apply the answer to the request in flight; True: the session is to be re-opened (resumed) now."""
        self.cloud.in_flight = False
        if isinstance(arrival.reply, Failure):
            return self.failed(arrival.reply, cfg, rng)
        reply = arrival.reply
        try:
            rows, drafts = reply.top_k(), reply.drafts()
        except ProtocolError as exc:  # a malformed reply ends its own session only
            self.fail(f"malformed reply from replica {reply.replica}: {exc.message}", "bad_reply")
            return False
        self.reply_done()
        cloud = self.cloud
        cloud.rows, cloud.drafts, cloud.row = rows, drafts, 0
        cloud.replica, cloud.opening = reply.replica, False
        self.admit_from, self.stats.busy_now = None, 0
        self.trace.replied(arrival, reply)
        return False

    def failed(self, failure: Failure, cfg: EdgeConfig, rng: random.Random) -> bool:
        """A request was not answered: resume the session (True), park it until the cloud has room, or end it."""
        if failure.resume is not None:
            if self.stats.resumes >= cfg.max_resumes:
                self.fail(
                    f"{failure.message} (the session was already resumed {self.stats.resumes} times, "
                    f"max_resumes {cfg.max_resumes})",
                    "replica_lost",
                )
                return False
            self.stats.resumes += 1
            metrics.resumes.labels(failure.resume).inc()
            log.warning(
                "client %d logits session %s: %s; resuming at step %d (resume %d of %d)",
                self.client.index,
                self.session_id[:8],
                failure.resume,
                self.cloud.step,
                self.stats.resumes,
                cfg.max_resumes,
            )
            self.admit_from = None  # a new admission: its own admission timeout
            return True
        if failure.retry_after_s is not None:  # busy, rate limited, the gateway cannot reach the bus: retry later
            now = time.monotonic()
            start = self.admit_from if self.admit_from is not None else now
            deadline = start + cfg.admission_timeout_s
            if now >= deadline:
                self.fail(
                    f"the cloud refused the session {failure.code} for {now - start:.0f} s (admission_timeout_s "
                    f"{cfg.admission_timeout_s:g}): {failure.message}",
                    failure.code,
                )
                return False
            self.parked_until = min(deadline, now + busy_delay(failure.retry_after_s, self.stats.busy_now, rng))
            self.stats.busy_now += 1
            self.stats.busy_retries += 1
            metrics.busy_retries.inc()
            return False
        self.fail(failure.message, failure.code)
        return False

    def fail(self, message: str, code: ErrorCode) -> None:
        self.error, self.error_code, self.done = message, code, True
        log.warning("client %d logits session failed: %s", self.client.index, message)

    def crash(self, exc: Exception) -> None:
        """End the session on an error the loop did not expect: a ``CoGenesisError`` by its code, else ``internal``."""
        if isinstance(exc, CoGenesisError):
            self.fail(exc.message, error_code(exc))
        else:
            self.fail(f"internal error: {type(exc).__name__}: {str(exc)[:300]}", "internal")

    def reply_done(self) -> None:
        """The current reply is used up: count how many of its drafts were accepted."""
        if self.cloud.drafts.size:
            metrics.lookahead_accepted_tokens.observe(self.stats.accepted_now)
        self.stats.accepted_now = 0


# ---- the lockstep loop ------------------------------------------------------------------------------------


def schedule_of(cfg: EdgeConfig) -> Schedule:
    s = cfg.schedule
    return Schedule(s.kind, s.p, s.k, s.t, s.tau)


def run_logits_sessions(
    clients: list[EdgeClient],
    engine: EdgeEngine,
    link: CloudLink | EdgeBus,
    cfg: EdgeConfig,
    on_result: Callable[[SessionResult], None] = lambda r: None,
    stop_at: float | None = None,
    device: Device | None = None,
    on_token: OnToken | None = None,
    prefill_budget_s: float | None = None,
    decode_budget_s: float | None = None,
) -> list[SessionResult]:
    """Run one logits session per client, all stepped together; returns their results in order.

    ``stop_at`` (a ``time.perf_counter()`` instant, for time-boxed benchmarks): sessions still
    running then end early with what they wrote, marked ``stopped``. Per-phase budgets (seconds, the
    benchmark's): until every live session has chosen its first token, the run also stops ``prefill_budget_s``
    after its start; from the instant every live session has chosen its first token, it stops at the earlier of
    ``stop_at`` and that instant + ``decode_budget_s`` (the prefill budget no longer applies). ``device``: where the
    small-model passes run (default: one packed batch of these sessions). ``on_token(client, token)``: called with
    every token a session writes, as it is written (a streaming caller, ``cogenesis.edge_sim.sdk``); returning
    False ends that session there, marked ``stopped``.
    """
    for name, seconds in (("prefill_budget_s", prefill_budget_s), ("decode_budget_s", decode_budget_s)):
        if seconds is not None and seconds < 0:
            raise ConfigError(f"{name} {seconds} is negative")
    budget = _Budget(stop_at, time.perf_counter(), prefill_budget_s, decode_budget_s)
    loop = _Loop.prepare(BusLink(link) if isinstance(link, EdgeBus) else link, engine, cfg, device)
    loop.on_token = on_token
    lives = [_Live.start(c, engine, loop.device.simulated) for c in clients]
    try:
        with _together(lives):
            loop.open(lives)
        while live := [lv for lv in lives if not lv.done]:
            loop.retire(lives)
            until = budget.until(lives, live)
            if until is not None and time.perf_counter() >= until:
                for lv in live:
                    lv.stopped = lv.done = True
                break
            if all(lv.parked for lv in live):  # nothing to step: sleep until the first retry is due
                _sleep_until(min(lv.parked_until or 0.0 for lv in live), until)
                if until is not None and time.perf_counter() >= until:
                    continue
            with _together(live):
                loop.step_round(live)
    finally:
        loop.release(lives)
    results = [_result(lv, engine) for lv in lives]
    for r in results:
        on_result(r)
    return results


@dataclass
class _Budget:
    """When a run stops early (``run_logits_sessions``): at ``stop_at``, and at the end of its phase's budget."""

    stop_at: float | None  # perf_counter instant, whatever the phase
    start: float  # perf_counter at the run's start
    prefill_s: float | None = None  # until every live session has its first token
    decode_s: float | None = None  # from then on
    decoding_from: float | None = None  # the instant the last live session chose its first token

    def until(self, lives: list[_Live], live: list[_Live]) -> float | None:
        """The perf_counter instant the run stops at (None: it runs to the end), as of now."""
        if self.decoding_from is None and all(lv.trace.ttft is not None for lv in live):
            firsts = [lv.trace.t0 + lv.trace.ttft for lv in lives if lv.trace.ttft is not None]
            self.decoding_from = max(firsts, default=time.perf_counter())
        if self.decoding_from is None:
            phase = None if self.prefill_s is None else self.start + self.prefill_s
        else:
            phase = None if self.decode_s is None else self.decoding_from + self.decode_s
        ends = [t for t in (self.stop_at, phase) if t is not None]
        return min(ends) if ends else None


@contextmanager
def _together(lives: list[_Live]) -> Iterator[None]:
    """A batched part of the loop (a round, the opening): an error it did not expect ends the sessions it was
    running for (they share the device's pass and the link's round trip), not the caller."""
    try:
        yield
    except Exception as exc:
        log.exception("logits sessions: unexpected error in a round of %d session(s)", len(lives))
        for lv in lives:
            if not lv.done:
                lv.crash(exc)


@contextmanager
def _alone(lv: _Live) -> Iterator[None]:
    """One session's own work (applying its reply, choosing its token): an error it did not expect ends this
    session only; the others go on."""
    try:
        yield
    except Exception as exc:
        log.exception("client %d logits session %s: unexpected error", lv.client.index, lv.session_id[:8])
        lv.crash(exc)


def _sleep_until(when: float, stop_at: float | None) -> None:
    """Sleep until ``when`` (``time.monotonic()``), or the caller's ``stop_at`` (``time.perf_counter()``)."""
    wait = when - time.monotonic()
    if stop_at is not None:
        wait = min(wait, stop_at - time.perf_counter())
    if wait > 0:
        time.sleep(wait)


@dataclass
class _Loop:
    """What stays fixed over a run: how the cloud is reached, where passes run, how tokens are chosen."""

    link: CloudLink
    engine: EdgeEngine
    cfg: EdgeConfig
    sched: Schedule
    device: Device
    fuser: Fuser | None  # None: a simulated device (tokens sampled from the cloud's top-k)
    plain: Device | None  # contrast fusion: the small model without the context, stepped beside the real one
    network: Callable[[], None]  # a profile's round trip per exchange
    rng: random.Random = field(default_factory=random.Random)  # busy retries' jitter (not the device's seed)
    on_token: OnToken | None = None  # told every token written (``run_logits_sessions``)

    @classmethod
    def prepare(cls, link: CloudLink, engine: EdgeEngine, cfg: EdgeConfig, device: Device | None) -> _Loop:
        sched = schedule_of(cfg)
        device = device or PackedDevice(engine.model, engine.pad_id, cfg.prefill_threads)
        _check_device(device, sched, cfg)
        fuser = Fuser(cfg.fusion, cfg.top_k, engine.vocab) if not device.simulated else None
        plain = None
        if fuser is not None and fuser.needs_plain:
            plain = (
                PackedDevice(engine.model, engine.pad_id, cfg.prefill_threads)
                if isinstance(device, PackedDevice)
                else device
            )
        return cls(link, engine, cfg, sched, device, fuser, plain, getattr(device, "network", lambda: None))

    def open(self, lives: list[_Live]) -> None:
        """Open every session the gate admits, prefill the private prompts while the cloud prefills, then take the
        first replies."""
        lives = [lv for lv in lives if lv.admitted()]
        if not lives:
            return
        self.send_opens(lives)
        t0 = time.perf_counter()
        if getattr(self.device, "reads_prompts", True):
            private_prompts = [self.engine.prompt_ids(lv.client.record) for lv in lives]
        else:  # a device that ignores them (the bench's instant device): not built
            private_prompts = [[] for _ in lives]
        for lv, lp in zip(lives, self.device.prefill(lives, private_prompts)):
            lv.lp = lp  # computed while the cloud prefills
        if self.plain is not None:
            plain_prompts = [cloud_prompt_ids(self.engine.tok, lv.client.record.public_instruction) for lv in lives]
            for lv, lp in zip(lives, self.plain.prefill([lv.plain_key for lv in lives], plain_prompts)):
                lv.plain_lp = lp
        t1 = time.perf_counter()
        self.collect(lives)
        self.network()
        t2 = time.perf_counter()
        for lv in lives:  # the time to first token, by cause
            lv.trace.prefill_s, lv.trace.cloud_wait_s = t1 - t0, t2 - t1

    def step_round(self, live: list[_Live]) -> None:
        """One position of every live session that is not parked: cloud top-k where needed (and the answer of
        every open in flight), a token each, one small-model pass. A parked session whose retry is due is
        opened again first; one refused busy now is parked, and neither writes nor steps this round."""
        now = time.monotonic()
        due = [lv for lv in live if lv.parked_until is not None and lv.parked_until <= now]
        if due:
            self.send_opens(due)
        live = [lv for lv in live if not lv.parked]
        opening = [lv for lv in live if lv.cloud.opening]
        need = [lv for lv in live if not lv.cloud.opening and _fuses(lv, self.sched) and lv.cloud.row is None]
        self.ask([lv for lv in need if not lv.cloud.in_flight])
        if need or opening:
            self.collect(opening + need)
            self.network()
        choosing = [lv for lv in live if not lv.done and not lv.parked]
        picks = self.choose_round(choosing)
        for lv in choosing:
            with _alone(lv):
                _choose(lv, self, picks.get(lv))
        live = [lv for lv in live if not lv.done and not lv.parked]
        if not live:
            return
        if self.sched.known_in_advance:  # ask early, so the cloud computes while the device does
            self.ask([lv for lv in live if lv.cloud.row is None and _fuses(lv, self.sched)])
        self.advance(live)

    @property
    def greedy(self) -> bool:
        return self.cfg.sampling.temperature == 0

    def choose_round(self, lives: list[_Live]) -> dict[_Live, _Pick]:
        """The round's batched part of choosing: tensor operations over all of its sessions at once.

        - Fusion: the fused distribution [1, V] of every session whose position is fused with a cloud row, in one
          call of the (pure, row-wise) fusion over all of them.
        - Greedy decoding (temperature 0): every session's token, one argmax over the round: over the fused rows,
          over the cloud's top-k rows (a simulated device) and over the small model's own rows (positions not
          fused).

        A session left out is chosen alone in ``_choose`` (sampling, which draws from each session's own
        generator, always is); so is every session when a batched part fails, so that one bad reply ends only its
        own session."""
        picks: dict[_Live, _Pick] = {}
        fusing = [(lv, row) for lv in lives if _fuses(lv, self.sched) and (row := _cloud_row(lv)) is not None]
        real = [(lv, row) for lv, row in fusing if lv.lp is not None and self.fuser is not None]
        try:
            if len(real) >= 2 and self.fuser is not None:
                t0 = time.perf_counter()
                ids = torch.from_numpy(np.stack([row[0] for _, row in real]).astype(np.int64))  # [B, K]
                lps = torch.from_numpy(np.stack([row[1] for _, row in real]))
                plain = _stack([lv.plain_lp for lv, _ in real]) if self.fuser.needs_plain else None
                target = self.fuser(_stack([lv.lp for lv, _ in real]), ids, lps, plain)
                metrics.fusion_seconds.observe(time.perf_counter() - t0)
                greedy = target.argmax(-1).tolist() if self.greedy else [None] * len(real)
                for b, (lv, _) in enumerate(real):
                    picks[lv] = _Pick(target[b : b + 1], greedy[b], fused=True)
            if not self.greedy:
                return picks
            cloud_only = [(lv, row) for lv, row in fusing if lv.lp is None or self.fuser is None]
            if cloud_only:  # a simulated device: the cloud's best of its top-k
                best = np.stack([row[1] for _, row in cloud_only]).argmax(-1)
                for (lv, row), i in zip(cloud_only, best.tolist()):
                    picks[lv] = _Pick(None, int(row[0][i]), fused=True)
            covered = {lv for lv, _ in fusing}
            own = [lv for lv in lives if lv not in covered and lv.lp is not None]
            if len(own) >= 2:  # positions the device writes alone: its own best token
                for lv, token in zip(own, _stack([lv.lp for lv in own]).argmax(-1).tolist()):
                    picks[lv] = _Pick(None, token)
        except Exception:  # e.g. rows of different widths: each session is chosen (and fails) on its own
            log.debug("the batched choice of %d sessions failed; choosing one by one", len(lives), exc_info=True)
            return {}
        return picks

    def ask(self, lives: list[_Live]) -> None:
        self.link.request([lv.next_step() for lv in lives], self.cfg)
        for lv in lives:
            lv.sent()

    def send_opens(self, lives: list[_Live]) -> None:
        """Open (or re-open where they are) these sessions; their answers are collected with the next replies."""
        self.link.open([lv.opening() for lv in lives], self.cfg)
        for lv in lives:
            lv.sent(opening=True)

    def collect(self, lives: list[_Live]) -> None:
        """Every answer of these sessions' requests in flight; a session to resume is re-opened at once and
        its answer awaited in the same call, so each ends answered, parked (busy) or done."""
        waiting = {lv.session_id: lv for lv in lives if lv.cloud.in_flight and not lv.done}
        while waiting:
            resume = []
            for a in self.link.collect(list(waiting), self.cfg):
                lv = waiting[a.session_id]
                with _alone(lv):
                    if lv.arrived(a, self.cfg, self.rng):
                        resume.append(lv)
            if resume:
                self.send_opens(resume)
            waiting = {lv.session_id: lv for lv in resume if lv.cloud.in_flight and not lv.done}

    def advance(self, live: list[_Live]) -> None:
        """Run the small model on every session's new token (and the no-context pass beside it)."""
        for lv, lp in zip(live, self.device.step(live, [lv.out[-1] for lv in live])):
            lv.lp = lp
        if self.plain is not None:
            for lv, lp in zip(live, self.plain.step([lv.plain_key for lv in live], [lv.out[-1] for lv in live])):
                lv.plain_lp = lp

    def retire(self, lives: list[_Live]) -> None:
        """Free what the sessions that ended hold: their device state (a packed device drops their rows) and
        their session on the replica (its slot goes to a session waiting for admission)."""
        self._free([lv for lv in lives if lv.done and not lv.retired])

    def release(self, lives: list[_Live]) -> None:
        """The run is over: free every session's state."""
        self._free([lv for lv in lives if not lv.retired])

    def _free(self, lives: list[_Live]) -> None:
        """What fails here is logged; the sessions' results stand (a device left broken fails the next round)."""
        if not lives:
            return
        for lv in lives:
            lv.retired = True
        try:
            self.device.release(lives)
            if self.plain is not None:
                self.plain.release([lv.plain_key for lv in lives])
        except Exception:
            log.exception("logits sessions: could not free the device state of %d session(s)", len(lives))
        try:
            self.link.close([lv.closing() for lv in lives])
        except Exception:  # the replica's idle sweeper frees them
            log.exception("logits sessions: could not close %d session(s) on the cloud", len(lives))


def _check_device(device: Device, sched: Schedule, cfg: EdgeConfig) -> None:
    if device.simulated and sched.kind != "every":
        raise ConfigError(
            f"a simulated device has no distribution of its own, so it cannot run the {sched.kind!r} schedule",
            hint="use --device real, or the 'every' schedule",
        )
    if device.simulated and cfg.fusion.method != "constant":
        raise ConfigError(
            f"a simulated device samples the cloud's top-k and fuses nothing, so {cfg.fusion.method!r} "
            "fusion cannot run on it",
            hint="use --device real for fusion methods other than constant",
        )


# ---- one token ---------------------------------------------------------------------------------------------


def _fuses(lv: _Live, sched: Schedule) -> bool:
    """Whether the session's current position is fused: the schedule says so and no token is held back."""
    return not lv.holding and sched.fuses(len(lv.out), lv.lp)


def _cloud_row(lv: _Live) -> tuple[np.ndarray, np.ndarray] | None:
    """The cloud's top-k (ids [K], log-probs [K]) at the session's position (None: not covered)."""
    rows, row = lv.cloud.rows, lv.cloud.row
    return None if rows is None or row is None else (rows[0][row], rows[1][row])


def _stack(rows: list[torch.Tensor | None]) -> torch.Tensor:
    """[V] rows -> [B, V]; a missing row is an error (the batch falls back to one session at a time)."""
    if any(r is None for r in rows):
        raise ValueError("a session of the batch has no distribution")
    return torch.stack([r for r in rows if r is not None])


@dataclass(frozen=True)
class _Pick:
    """What the round's batched part (``_Loop.choose_round``) computed for one session's position."""

    target: torch.Tensor | None  # the fused distribution [1, V] (None: not computed in the batch)
    token: int | None = None  # greedy decoding: the token (a vocabulary id)
    fused: bool = False  # the position is fused with the cloud's row


def _choose(lv: _Live, loop: _Loop, pick: _Pick | None = None) -> None:
    """Choose the session's token at its position, accepting the cloud's draft when the choice equals it.
    ``pick``: what the round's batched part computed for it."""
    samp = loop.cfg.sampling
    if pick is not None and pick.token is not None:  # greedy, chosen in the batch: a draft is accepted when equal
        lv.stats.fused += pick.fused
        token, row = pick.token, lv.cloud.row
        accepted = row is not None and row < lv.cloud.drafts.size and int(lv.cloud.drafts[row]) == token
        lv.cloud.row = row + 1 if accepted and row is not None else None
        lv.stats.accepted += accepted
        lv.stats.accepted_now += accepted
        _write(lv, loop, token)
        return
    if pick is not None and pick.target is not None:
        lv.stats.fused += 1
        target, space = pick.target, None
    else:
        target, space = _target(lv, _fuses(lv, loop.sched), loop.fuser)
    row = lv.cloud.row
    draft = _draft(lv.cloud.drafts, row, space)
    if draft is not None and row is not None:  # a draft proposes this position's token
        q = sampling_probs(target, samp.temperature, samp.top_p)[0]
        token, accepted = accept_draft(q, draft, 1.0, lv.gen)
        lv.cloud.row = row + 1 if accepted else None
        lv.stats.accepted += accepted
        lv.stats.accepted_now += accepted
    else:
        token = int(sample(target, samp.temperature, samp.top_p, lv.gen)[0])
        lv.cloud.row = None
    if space is not None:
        token = int(space[token])
    _write(lv, loop, token)


def _write(lv: _Live, loop: _Loop, token: int) -> None:
    """The session chose ``token``: end it (end of text), or write it through its stream gate."""
    lv.trace.chose()
    if token in loop.engine.stop_ids and not loop.cfg.ignore_eos:
        lv.done = True
        return
    lv.trace.wrote()
    lv.wrote(token)
    if loop.on_token is not None and loop.on_token(lv.client.index, token) is False:
        lv.stopped = lv.done = True  # the caller wants no more of it
        return
    if len(lv.out) >= loop.cfg.max_new_tokens:
        lv.done = True


def _target(lv: _Live, fuses: bool, fuser: Fuser | None) -> tuple[torch.Tensor, np.ndarray | None]:
    """The distribution to choose from [1, V], and the ids it spans (None: the whole vocabulary)."""
    rows, row = lv.cloud.rows, lv.cloud.row
    if fuses and rows is not None and row is not None:
        lv.stats.fused += 1
        ids, lps = rows[0][row], rows[1][row]
        if lv.lp is None or fuser is None:  # a simulated device: the cloud's top-k alone (sampled over K)
            return torch.from_numpy(lps).float()[None], ids
        t0 = time.perf_counter()
        target = fuser(
            lv.lp[None],
            torch.from_numpy(ids.astype(np.int64))[None],
            torch.from_numpy(lps)[None],
            None if lv.plain_lp is None else lv.plain_lp[None],
        )
        metrics.fusion_seconds.observe(time.perf_counter() - t0)
        return target, None
    if lv.lp is None:
        raise SessionError(
            f"session {lv.session_id}: no cloud top-k covers position {len(lv.out)}, and a simulated device "
            "has no distribution of its own"
        )
    return lv.lp[None], None


def _draft(drafts: np.ndarray, row: int | None, space: np.ndarray | None) -> int | None:
    """The cloud's draft for this position: a token id, or its index among ``space`` (None: no draft, or
    a draft outside the K ids, which cannot be accepted)."""
    if row is None or row >= drafts.size:
        return None
    draft = int(drafts[row])
    if space is None:
        return draft
    hits = np.flatnonzero(space == draft)
    return int(hits[0]) if hits.size else None


def _result(lv: _Live, engine: EdgeEngine) -> SessionResult:
    seconds = time.perf_counter() - lv.trace.t0
    lv.reply_done()
    metrics.session_done(
        "logits", "failed" if lv.error else "cut" if lv.stopped else "ok", 0 if lv.error else len(lv.out)
    )
    c = lv.client
    gated = lv.stream.stats
    text, ids, ttft = "", [], None
    if not lv.error:
        text, ids, ttft = engine.tok.decode(lv.out, skip_special_tokens=True).strip(), list(lv.out), lv.trace.ttft
        log.info(
            "client %d logits session %s: %d tokens, %d round trips in %.2f s",
            c.index,
            lv.session_id[:8],
            len(lv.out),
            lv.stats.round_trips,
            seconds,
        )
    return SessionResult(
        c.index,
        c.record.tid,
        "logits",
        text,
        len(ids),
        seconds,
        ids=ids,
        ttft_s=ttft,
        round_trips=lv.stats.round_trips,
        resumes=lv.stats.resumes,
        busy_retries=lv.stats.busy_retries,
        error=lv.error or None,
        error_code=lv.error_code if lv.error else None,
        itl_s=lv.trace.gaps(),
        ttft_device_prefill_s=lv.trace.prefill_s,
        ttft_cloud_wait_s=lv.trace.cloud_wait_s,
        stopped=lv.stopped,
        fused_steps=lv.stats.fused,
        accepted_draft_tokens=lv.stats.accepted,
        rtt_us=lv.trace.rtt_us,
        overhead_us=lv.trace.overhead_us,
        held_tokens=gated.held,
        private_spans=gated.replaced,
        span_policy=gated.policy,
    )
