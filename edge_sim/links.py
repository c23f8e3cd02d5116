"""How an edge pool's logits sessions reach the cloud: a ``CloudLink``.

- ``BusLink``: the CoGenesis protocol. Sessions live on a replica (KV cache), each step sends only
  the new token ids over Redis, and a round's requests are pipelined together.
- ``StatelessLink``: the official code's protocol, kept as the benchmark's baseline. Every step
  POSTs the whole public sequence (prompt + generated ids) over HTTP and the cloud keeps nothing;
  one request per session per step, each computed alone.

A link only moves messages: the session loop (``cogenesis.edge_sim.logits``) decides what to ask and
hands the link typed items (``Opening``, ``Step``, ``Closing``); every message is sealed by the
client's outbound gate carried in the item, and a link sends exactly the sealed bytes (``wire_bytes``).
``collect`` returns an ``Arrival`` per session: its reply or a ``Failure`` (a code and a message), with
the send and receive times, on the edge's own clock, from which the loop traces the round trip and the
exchange overhead (bus + serialization, not model time). A link never touches the loop's state.
Requests carry a time budget, never the edge's clock.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import httpx

from cogenesis.cluster.bus import EdgeBus, ExchangeLost, Received, Sealed, wire_bytes
from cogenesis.core import prompts
from cogenesis.core.auth import bearer_header
from cogenesis.core.errors import (
    BusTimeout,
    Busy,
    ClusterError,
    CoGenesisError,
    PrivacyViolation,
    ProtocolError,
    ReplicaLost,
    SessionError,
    UnknownSession,
)
from cogenesis.core.protocol import (
    CloseSession,
    CompletionsRequest,
    ErrorCode,
    ErrorReply,
    OpenSession,
    ReplyBatch,
    StatelessRequest,
    StepReply,
    StepRequest,
    budget_of,
    deadline_in,
    decode_reply,
    error_code,
    now_us,
    pack_ids,
    pack_logprobs,
)
from cogenesis.edge_sim.gate import OutboundGate

if TYPE_CHECKING:
    from cogenesis.core.config import EdgeConfig

log = logging.getLogger(__name__)


# ---- what the session loop hands a link, and what it gets back ----------------------------------------


@dataclass(frozen=True)
class Opening:
    """Start a session: its public instruction is the only text that leaves the device. A *resume* (re-opening
    a session whose replica died, or whose exchange Redis lost) also carries every id the session had released
    up to its in-flight step, and that step's number: the replica rebuilds the session and answers that step."""

    session_id: str
    client: int  # the client's index (attributes what the cloud received, locally; never sent)
    instruction: str
    gate: OutboundGate  # seals the message before it leaves
    resume: tuple[int, ...] = ()  # ids the session's stream released, through its in-flight step
    resume_step: int = 0  # the step it waits for (0: a plain open)


@dataclass(frozen=True)
class Step:
    """Ask for the next top-k: the generated ids the cloud has not seen yet, under a new step number."""

    session_id: str
    step: int
    tokens: tuple[int, ...]  # new ids since the last request
    generated: tuple[int, ...]  # every id written so far (a stateless link re-sends them all)
    replica: str  # the replica holding the session
    gate: OutboundGate


@dataclass(frozen=True)
class Closing:
    """The session ended: free what the cloud holds for it."""

    session_id: str
    replica: str  # "" when no reply came yet (no replica holds it)
    gate: OutboundGate


ResumeCause = Literal["replica_lost", "unknown_session", "redis"]


@dataclass(frozen=True)
class Failure:
    """Why a session's request was not answered: a message for the user (it stays on the device) and
    the code that may leave it (``cogenesis.edge_sim.client.ErrorCode``). ``resume``: the session can go on
    by re-opening it with its tokens (why: its replica died, the replica no longer knows it, or Redis lost
    the exchange); ``retry_after_s``: the cloud refused it busy and asks to retry after this long."""

    message: str
    code: ErrorCode
    resume: ResumeCause | None = None
    retry_after_s: float | None = None

    @classmethod
    def of(cls, exc: Exception) -> Failure:
        message = exc.message if isinstance(exc, CoGenesisError) else f"{type(exc).__name__}: {exc}"
        retry = exc.retry_after_s if isinstance(exc, Busy) else None
        return cls(message, error_code(exc), resume_cause(exc), retry)


def resume_cause(exc: Exception) -> ResumeCause | None:
    """Why a failed request can be resumed by replay (None: it cannot)."""
    if isinstance(exc, ExchangeLost):
        return "redis"
    if isinstance(exc, ReplicaLost):
        return "replica_lost"
    if isinstance(exc, UnknownSession):
        return "unknown_session"
    return None


@dataclass(frozen=True)
class Arrival:
    """A session's answer to its in-flight request, with the times (the edge's clock) its trace needs."""

    session_id: str
    reply: StepReply | Failure
    sent_us: int = 0  # when the request left (``now_us``)
    received_us: int | None = None  # when the edge had the reply; None: not timed (an in-process link)
    waited_from_us: int = 0  # when the edge began the wait that found the reply already there (it arrived
    # unobserved while the edge computed); 0: it arrived while the edge waited, or a receiving thread
    # timed it, so ``received_us`` is its arrival

    def exchange_overhead_us(self) -> int | None:
        """The step's bus + serialization time (``StepReply.exchange_overhead_us``); None: untimed or untraced."""
        reply = self.reply
        if self.received_us is None or not isinstance(reply, StepReply) or not reply.traced:
            return None
        fetch = self.received_us - self.waited_from_us if self.waited_from_us else None
        return reply.exchange_overhead_us(self.received_us - self.sent_us, fetch)


def open_request(opening: Opening, cfg: EdgeConfig, reply_to: str = "") -> OpenSession:
    """The message that opens (or resumes) ``opening``'s session on the cloud (sealed by its gate before it
    leaves, which checks that a resume carries only ids the session's stream released)."""
    return OpenSession(
        session_id=opening.session_id,
        instruction=opening.instruction,
        top_k=cfg.top_k,
        budget_ms=budget_of(cfg.step_timeout_s),
        lookahead=cfg.lookahead,
        reply_to=reply_to,
        resume=pack_ids(opening.resume) if opening.resume else b"",
        resume_step=opening.resume_step,
    )


def step_request(step: Step, cfg: EdgeConfig, reply_to: str = "") -> StepRequest:
    """The message that sends ``step``'s tokens and asks for the next top-k (sealed by its gate before it leaves)."""
    return StepRequest(
        session_id=step.session_id,
        step=step.step,
        tokens=pack_ids(step.tokens),
        budget_ms=budget_of(cfg.step_timeout_s),
        reply_to=reply_to,
    )


class CloudLink(Protocol):
    def open(self, sessions: Sequence[Opening], cfg: EdgeConfig) -> None:
        """Start every session; their first replies are collected by ``collect``."""

    def request(self, steps: Sequence[Step], cfg: EdgeConfig) -> None:
        """Send each session's unsent tokens and ask for the next top-k."""

    def collect(self, session_ids: Sequence[str], cfg: EdgeConfig) -> list[Arrival]:
        """Wait (up to the step timeout) for the in-flight replies of these sessions."""

    def close(self, sessions: Sequence[Closing]) -> None:
        """Free whatever the cloud holds for these sessions (best effort)."""


# ---- links ---------------------------------------------------------------------------------------------


class BusLink:
    """Logits steps over the Redis bus to the replica that owns each session.

    Its sessions share one reply list, named at random per link: a fleet client's or a Locust user's
    session has a link of its own, a demo or benchmark pool one for its batch of sessions (of different
    clients); no link is reused, so the name links no device's sessions to each other.

    A request that cannot be sealed (the gate refused it) or sent (Redis unreachable) fails only its own
    sessions: ``collect`` returns their ``Failure``; nothing is raised to the session loop."""

    def __init__(self, bus: EdgeBus) -> None:
        self.bus = bus
        self.reply_to = f"pool-{uuid.uuid4().hex}"  # one reply list for all of this link's sessions
        # session -> (step awaited, sent_us: the edge's clock, replica holding it: None while it opens)
        self._in_flight: dict[str, tuple[int, int, str | None]] = {}
        self._failed: dict[str, Failure] = {}  # sessions whose request never left

    def open(self, sessions: Sequence[Opening], cfg: EdgeConfig) -> None:
        self._send([(o.session_id, o.resume_step, None, o.gate, open_request(o, cfg, self.reply_to)) for o in sessions])

    def request(self, steps: Sequence[Step], cfg: EdgeConfig) -> None:
        self._send([(s.session_id, s.step, s.replica, s.gate, step_request(s, cfg, self.reply_to)) for s in steps])

    def _send(self, requests: Sequence[tuple[str, int, str | None, OutboundGate, OpenSession | StepRequest]]) -> None:
        """Seal each (session, step awaited, replica or None, gate, message) and send them in one round trip."""
        items: list[tuple[str | None, str, Sealed]] = []
        flights: list[tuple[str, int, str | None]] = []
        for sid, step, replica, gate, msg in requests:
            try:
                items.append((replica, sid, gate.seal(msg)))
            except PrivacyViolation as exc:  # nothing of it left; the session ends alone
                self._failed[sid] = Failure.of(exc)
                continue
            flights.append((sid, step, replica))
        if not items:
            return
        sent = now_us()
        try:
            self.bus.send_many(items)
        except ClusterError as exc:  # Redis unreachable: these sessions end with a clear error
            for sid, _, _ in flights:
                self._failed[sid] = Failure.of(exc)
            return
        self._in_flight.update((sid, (step, sent, replica)) for sid, step, replica in flights)

    def collect(self, session_ids: Sequence[str], cfg: EdgeConfig) -> list[Arrival]:
        out = [Arrival(sid, self._failed.pop(sid)) for sid in session_ids if sid in self._failed]
        waiting = [sid for sid in session_ids if sid in self._in_flight]
        if not waiting:
            return out
        arrivals: dict[str, Received] = {}
        got = self.bus.wait_many(
            {sid: self._in_flight[sid][0] for sid in waiting},
            deadline_in(cfg.step_timeout_s),
            arrivals,
            reply_to=dict.fromkeys(waiting, self.reply_to),
            replicas={sid: r for sid in waiting if (r := self._in_flight[sid][2]) is not None},
        )
        for sid, reply in got.items():
            _, sent, _ = self._in_flight.pop(sid)
            if isinstance(reply, Exception):
                out.append(Arrival(sid, Failure.of(reply)))
            else:
                received = arrivals[sid]
                out.append(Arrival(sid, reply, sent, received.at_us, received.looked_us or 0))
        return out

    def close(self, sessions: Sequence[Closing]) -> None:
        closes: list[tuple[str | None, str, Sealed]] = [
            (c.replica, c.session_id, c.gate.seal(CloseSession(session_id=c.session_id, reply_to=self.reply_to)))
            for c in sessions
            if c.replica
        ]
        if closes:
            try:
                self.bus.send_many(closes)
            except ClusterError as exc:  # the sessions are swept on the replica anyway
                log.warning("could not close %d session(s): %s", len(closes), exc.message)
        for c in sessions:
            self._in_flight.pop(c.session_id, None)
            self._failed.pop(c.session_id, None)
        self.bus.forget(c.session_id for c in sessions)


class StatelessLink:
    """The official code's exchange: the whole sequence over HTTP every step, no server state.

    Requests of one round go out concurrently (one thread each, up to ``max_concurrency``) while
    the edge runs its small model; the cloud computes each one alone (batch 1). Each POST's body is
    exactly the bytes the gate sealed.
    """

    content_type = "application/msgpack"

    def __init__(self, http_url: str, tokenizer, max_concurrency: int = 256, token: str | None = None) -> None:
        self.url = f"{http_url.rstrip('/')}/v1/stateless"
        self.tok = tokenizer
        limits = httpx.Limits(max_connections=max_concurrency)
        self.http = httpx.Client(limits=limits, headers=bearer_header(token))  # a worker token (a locked cluster)
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="stateless")
        self._prompt: dict[str, tuple[list[int], str]] = {}  # session -> (cloud prompt ids, its text)
        self._futures: dict[str, tuple[Future, int]] = {}  # session -> (its POST, sent_us)

    def open(self, sessions: Sequence[Opening], cfg: EdgeConfig) -> None:
        for o in sessions:
            ids = prompts.cloud_prompt_ids(self.tok, o.instruction)
            self._prompt[o.session_id] = (ids, self.tok.decode(ids))
            self._send(o.session_id, (), o.gate, cfg)

    def request(self, steps: Sequence[Step], cfg: EdgeConfig) -> None:
        for s in steps:
            self._send(s.session_id, s.generated, s.gate, cfg)

    def _send(self, session_id: str, generated: Sequence[int], gate: OutboundGate, cfg: EdgeConfig) -> None:
        ids, text = self._prompt[session_id]
        sent = now_us()
        tokens = ids + list(generated)
        sealed = self._seal(session_id, tokens, text, gate, cfg)
        post = self.pool.submit(self._post, sealed, session_id, len(tokens), cfg.step_timeout_s)
        self._futures[session_id] = (post, sent)

    def _seal(
        self, session_id: str, tokens: list[int], prompt_text: str, gate: OutboundGate, cfg: EdgeConfig
    ) -> Sealed:
        """The step's request, as the gate checked and sealed it (``prompt_text``: the prompt's ids decoded)."""
        request = StatelessRequest(
            session_id=session_id, tokens=pack_ids(tokens), top_k=cfg.top_k, budget_ms=budget_of(cfg.step_timeout_s)
        )
        return gate.seal(request, prompt_text=prompt_text)

    def _post(
        self, sealed: Sealed, session_id: str, length: int, timeout_s: float
    ) -> tuple[StepReply | ErrorReply, int]:
        """POST one gate-sealed step (its bytes exactly) and read the reply; returns it and when it came.
        ``length``: how many tokens the request carries (the step of the reply, as the stateless server numbers it)."""
        body = wire_bytes(sealed)
        try:
            resp = self.http.post(
                self.url, content=body, headers={"content-type": self.content_type}, timeout=timeout_s
            )
        except httpx.TimeoutException:
            raise BusTimeout(
                f"no answer from {self.url} within {timeout_s:.0f} s",
                hint="the cloud may be overloaded; raise --step-timeout",
            ) from None
        except httpx.HTTPError as exc:
            raise ClusterError(f"cannot reach the cloud at {self.url}: {exc}", hint="is the cluster running?") from None
        return self._reply(resp, session_id, length), now_us()

    def _reply(self, resp: httpx.Response, session_id: str, length: int) -> StepReply | ErrorReply:
        try:
            reply = decode_reply(resp.content)
        except ProtocolError:
            raise SessionError(f"cloud answered {resp.status_code}: {resp.text[:200]}") from None
        if isinstance(reply, ReplyBatch):
            raise ProtocolError(f"{self.url} answered a batch of {len(reply.items)} replies to one stateless step")
        return reply

    def collect(self, session_ids: Sequence[str], cfg: EdgeConfig) -> list[Arrival]:
        return [self._arrival(sid, *self._futures.pop(sid), cfg) for sid in session_ids]

    def _arrival(self, session_id: str, future: Future, sent: int, cfg: EdgeConfig) -> Arrival:
        try:
            reply, received = future.result(timeout=cfg.step_timeout_s + 5)
        except FutureTimeout:
            return Arrival(session_id, Failure.of(BusTimeout(f"session {session_id}: no stateless reply in time")))
        except Exception as exc:
            return Arrival(session_id, Failure.of(exc))
        if isinstance(reply, ErrorReply):
            refused = SessionError(f"cloud refused session {session_id}: {reply.code}: {reply.message}")
            return Arrival(session_id, Failure.of(refused))
        return Arrival(session_id, reply, sent, received)  # timed by the thread that received it

    def close(self, sessions: Sequence[Closing]) -> None:
        for c in sessions:
            self._prompt.pop(c.session_id, None)
            self._futures.pop(c.session_id, None)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.http.close()


class OpenAILink(StatelessLink):
    """An OpenAI-compatible completions server (vLLM) driven per step: the setup a user would pick
    instead of CoGenesis. Each step POSTs the whole sequence as token ids with ``max_tokens=1`` and
    ``logprobs=k`` (a ``CompletionsRequest``, sealed by the gate as JSON and sent as sealed); the
    server's prefix cache avoids most of the recompute. Untraced (the server does not report its own
    time), so only round trips are measured."""

    content_type = "application/json"

    def __init__(self, base_url: str, model: str, tokenizer, max_concurrency: int = 256) -> None:
        super().__init__(base_url, tokenizer, max_concurrency)
        self.url = f"{base_url.rstrip('/')}/v1/completions"
        self.model = model

    def _seal(
        self, session_id: str, tokens: list[int], prompt_text: str, gate: OutboundGate, cfg: EdgeConfig
    ) -> Sealed:
        body = CompletionsRequest(model=self.model, prompt=tokens, logprobs=cfg.top_k)
        return gate.seal_json(body, prompt_text=prompt_text)

    def _reply(self, resp: httpx.Response, session_id: str, length: int) -> StepReply:
        if resp.status_code != 200:
            raise SessionError(f"{self.url} answered {resp.status_code}: {resp.text[:200]}")
        try:
            top = resp.json()["choices"][0]["logprobs"]["top_logprobs"][0]  # {"token_id:123": logprob}
            pairs = sorted(((int(k.split(":", 1)[1]), float(v)) for k, v in top.items()), key=lambda p: -p[1])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ProtocolError(f"unexpected completions reply from {self.url}: {exc!r}") from None
        return StepReply(
            session_id=session_id,
            step=length,
            replica="openai",
            ids=pack_ids([i for i, _ in pairs]),
            logprobs=pack_logprobs([lp for _, lp in pairs]),
        )
