"""Typed, versioned, binary messages between edge and cloud.

Every message that crosses a process boundary is one of the frozen ``msgspec`` structs below,
packed with msgpack. Token ids travel as little-endian int32 bytes and log-probabilities as
float16 bytes, so a top-10 reply is ~60 bytes of payload instead of a JSON map.

Logits-mode exchange (one session, pinned to one cloud replica)::

    edge                                   cloud replica
    OpenSession(prompt=general instruction) ->  prefill, keep KV cache
                                            <-  StepReply(step=0, top-k after the prompt)
    StepRequest(step=1, tokens=[t1])        ->  extend cache by t1
                                            <-  StepReply(step=1, top-k after t1)
    ...
    CloseSession                            ->  free the KV cache

Steps are numbered; a replayed step is answered from the replica's last reply (idempotence),
a gap is an error.

Nothing in an edge's message identifies the device or reads its clock: session and request ids are
random per session, and a request carries a time budget (``budget_ms``), not a deadline: the
receiver counts it from the request's arrival on its own clock. Outline seeds are fresh per request.

Tracing: the edge times each round trip on its own clock; a reply carries only durations the replica
measured on its clock: how long it held the request (``server_us``), how much of that was in (or
waiting for) the model (``model_us``), and how long the request had waited for the replica before it
was read (``queue_us``). The exchange overhead of a step, the time on the bus and in serialization,
is the round trip less the model and queue time (``StepReply.exchange_overhead_us``).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal, TypeVar, Union

import msgspec
import numpy as np

from cogenesis.core.errors import (
    AuthError,
    BusTimeout,
    Busy,
    ClusterError,
    ConfigError,
    DataError,
    Forbidden,
    ModelError,
    PrivacyViolation,
    ProtocolError,
    RateLimited,
    ReplicaLost,
    SessionError,
    TooLarge,
)

PROTOCOL_VERSION = 3  # 3: resumable opens, busy refusals with retry-after, outline budgets and progress
# 2: budgets instead of deadlines, no edge clock, replica-clock durations only
MAX_TOP_K = 50


def now_ms() -> int:
    return int(time.time() * 1000)


def now_us() -> int:
    """Wall clock in microseconds (this process's tracing clock; it never goes on the wire)."""
    return time.time_ns() // 1000


def deadline_in(seconds: float) -> int:
    """Absolute deadline (unix ms) ``seconds`` from now, on this process's clock (a local wait's)."""
    return now_ms() + int(seconds * 1000)


def budget_of(seconds: float) -> int:
    """A request's time budget: ``seconds`` in whole ms, counted by the receiver from the request's arrival."""
    return max(0, int(seconds * 1000))


BudgetMs = Annotated[int, msgspec.Meta(ge=0)]


def pack_ids(ids) -> bytes:
    """Token ids -> little-endian int32 bytes."""
    return np.asarray(ids, dtype="<i4").tobytes()


def unpack_ids(buf: bytes) -> np.ndarray:
    if len(buf) % 4:
        raise ProtocolError(f"token-id payload of {len(buf)} bytes is not a multiple of 4 (int32)")
    return np.frombuffer(buf, dtype="<i4")


def wire_logprobs(values) -> np.ndarray:
    """Log-probabilities (any shape) in their wire form: little-endian float16, NaN and -inf at the -65504 floor.
    One call packs a whole batch's rows; ``pack_logprobs`` is its bytes."""
    return np.clip(
        np.nan_to_num(np.asarray(values, dtype=np.float32), nan=-65504.0, neginf=-65504.0), -65504.0, 65504.0
    ).astype("<f2")


def pack_logprobs(values) -> bytes:
    """Log-probabilities -> little-endian float16 bytes (enough for sampling; -65504 floor)."""
    return wire_logprobs(values).tobytes()


def unpack_logprobs(buf: bytes) -> np.ndarray:
    if len(buf) % 2:
        raise ProtocolError(f"logprob payload of {len(buf)} bytes is not a multiple of 2 (float16)")
    return np.frombuffer(buf, dtype="<f2").astype(np.float32)


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    v: int = PROTOCOL_VERSION


# ---- logits mode -------------------------------------------------------------------------


class OpenSession(_Msg, frozen=True, tag="open"):
    """Edge -> cloud: start a logits session from the context-free general instruction."""

    session_id: str
    instruction: str  # general instruction only; the edge's gate checks it carries nothing private
    top_k: int
    budget_ms: BudgetMs  # the edge waits this long for the reply; the replica counts it from arrival
    lookahead: int = 0  # draft tokens the replica proposes after every reply (0 = none)
    reply_to: str = ""  # reply list key suffix, random per edge link ("" = the session id)
    # resuming a session another replica held (it died, or Redis lost the exchange): the ids the session had
    # released so far (int32, every one already passed the edge's gate); the replica prefills instruction +
    # these and answers as step ``resume_step`` (the step the edge is waiting for), then steps go on from there
    resume: bytes = b""
    resume_step: int = 0


class StepRequest(_Msg, frozen=True, tag="step"):
    """Edge -> owning replica: extend the session by ``tokens`` and return the next top-k."""

    session_id: str
    step: int  # 1, 2, ...; step 0 is the reply to OpenSession
    tokens: bytes  # int32 ids appended since the previous step
    budget_ms: BudgetMs  # the edge waits this long for the reply; the replica counts it from arrival
    reply_to: str = ""  # reply list key suffix ("" = the session id)


class CloseSession(_Msg, frozen=True, tag="close"):
    """Edge -> owning replica: free the session's KV cache. No reply (but ``forbidden`` from another list)."""

    session_id: str
    reply_to: str = ""  # the reply list the session was opened with ("" = the session id): only its owner closes it


class StepReply(_Msg, frozen=True, tag="reply"):
    """Cloud -> edge: the large model's next-token top-k for ``step``, and optionally a draft.

    With lookahead n, ``draft`` holds the replica's own greedy continuation d1..dn and the top-k
    rows cover n + 1 positions: after the step's tokens, then after d1, after d1 d2, ...
    """

    session_id: str
    step: int
    replica: str
    ids: bytes  # int32 [positions x k] top-k token ids, best first per row
    logprobs: bytes  # float16 [positions x k] log-probabilities, same order
    draft: bytes = b""  # int32 [positions - 1] draft tokens
    prompt_tokens: int = 0  # context length the replica conditioned on (after this step)
    compute_ms: float = 0.0  # time the replica spent in the model for this reply
    # tracing: durations on the replica's clock (0 = untraced)
    server_us: int = 0  # read by the replica -> reply posted
    model_us: int = 0  # the part of server_us spent in (or waiting for) the model
    queue_us: int = 0  # the request's wait for the replica before it was read (while it served others)

    @property
    def traced(self) -> bool:
        """The replica measured its durations (a reply from an untraced peer, such as vLLM, has none)."""
        return self.server_us > 0

    def exchange_overhead_us(self, rtt_us: int, fetch_us: int | None = None) -> int:
        """Time this step spent on the bus and in serialization, not in (or waiting for) the model.

        ``rtt_us``: the round trip on the edge's clock (sent -> reply received); the replica's model and
        queue time are taken off it. ``fetch_us``: for a reply that was already waiting when the edge
        looked for it (it arrived unobserved while the edge computed), how long fetching it took: the
        exchange cost the edge no more than that. 0 when the reply is untraced."""
        if not self.traced:
            return 0
        overhead = rtt_us - self.model_us - self.queue_us
        if fetch_us is not None:
            overhead = min(overhead, fetch_us)
        return max(0, overhead)

    def top_k(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, logprobs), each [positions, k]."""
        ids, lps, draft = unpack_ids(self.ids), unpack_logprobs(self.logprobs), unpack_ids(self.draft)
        rows = draft.size + 1
        if ids.shape != lps.shape or ids.size % rows or not ids.size:
            raise ProtocolError(f"reply has {ids.size} ids and {lps.size} logprobs for {rows} position(s)")
        return ids.reshape(rows, -1), lps.reshape(rows, -1)

    def drafts(self) -> np.ndarray:
        return unpack_ids(self.draft)


class ErrorReply(_Msg, frozen=True, tag="error"):
    """Cloud -> edge: the request could not be served. ``code`` is machine-readable."""

    session_id: str
    step: int
    # unknown_session | bad_request | too_large | forbidden | deadline | busy | rate_limited | replica_lost |
    # unavailable | internal (``ERROR_REPLY_CODES``)
    code: str
    message: str
    retry_after_ms: int = 0  # busy, rate_limited: when the replica (or gateway) suggests trying again


ERROR_REPLY_CODES = frozenset(
    {
        "unknown_session",  # the replica does not hold the session (closed, swept, evicted; the edge resumes it)
        "bad_request",  # malformed, out of order, or not a message this route takes
        "too_large",  # past a limit of ``CloudConfig.limits``
        "forbidden",  # the session belongs to another device (or another reply list)
        "deadline",  # the request's budget ran out before it was served
        "busy",  # the replica refused admission (``retry_after_ms``)
        "rate_limited",  # the gateway refused: the device is over its rate (``retry_after_ms``)
        "replica_lost",  # the replica holding the session stopped (the gateway says so; the edge resumes)
        "unavailable",  # the gateway cannot reach the bus right now
        "internal",
    }
)


class StatelessRequest(_Msg, frozen=True, tag="stateless"):
    """Edge -> cloud over HTTP: the official code's protocol, the benchmark's baseline. Every step
    re-sends the whole public sequence (prompt + generated ids); the cloud keeps no state."""

    session_id: str
    tokens: bytes  # int32 ids: the cloud prompt and every token generated so far
    top_k: int
    budget_ms: BudgetMs  # the edge waits this long for the reply; the server counts it from arrival


class StepBatch(_Msg, frozen=True, tag="batch"):
    """Edge pool -> one replica: a round's StepRequests and CloseSessions in one stream entry.

    Each item is one message exactly as the client's outbound gate sealed it (msgpack bytes)."""

    items: list[bytes]


class ReplyBatch(_Msg, frozen=True, tag="replies"):
    """Replica -> edge pool: every reply of one served batch that goes to the same reply list."""

    items: list[StepReply | ErrorReply]


# ---- what an edge's failures leave it as ----------------------------------------------------

# What a failure leaves an edge process as (a fleet pool's counts on Redis, a Locust report): a code from
# this fixed set, never its message, which stays in the device's own log.
ErrorCode = Literal[
    "timeout",
    "privacy",
    "cloud_error",
    "busy",
    "replica_lost",
    "unreachable",
    "bad_reply",
    "setup",
    "stuck",
    "unauthorized",
    "forbidden",
    "rate_limited",
    "internal",
]


def error_code(exc: BaseException) -> ErrorCode:
    """The code of an error: ``timeout`` (no reply in time), ``privacy`` (the gate refused), ``busy`` (the cloud
    refused admission until the edge's admission timeout), ``replica_lost`` (its replica died more often than the
    edge resumes a session), ``cloud_error`` (the cloud refused or failed), ``unreachable`` (Redis or the cloud
    could not be reached), ``bad_reply``
    (a malformed message), ``setup`` (config, data or model), ``internal`` (anything else); a fleet pool
    adds ``stuck`` (a session still running past the duration, grace and step timeout)."""
    codes: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], ErrorCode], ...] = (
        (BusTimeout, "timeout"),
        (PrivacyViolation, "privacy"),
        (TooLarge, "cloud_error"),
        (ProtocolError, "bad_reply"),
        (AuthError, "unauthorized"),
        (Forbidden, "forbidden"),
        (RateLimited, "rate_limited"),
        (Busy, "busy"),
        (ReplicaLost, "replica_lost"),
        (SessionError, "cloud_error"),
        (ClusterError, "unreachable"),
        ((ConfigError, DataError, ModelError), "setup"),
    )
    return next((code for kind, code in codes if isinstance(exc, kind)), "internal")


# ---- sketch mode (HTTP through the Serve ingress) ----------------------------------------


class SketchRequest(_Msg, frozen=True, tag="sketch"):
    """Edge -> cloud: write an outline for the general instruction."""

    request_id: str
    instruction: str
    kind: Literal["context_aware", "paper"] = (
        "context_aware"  # task family: context_aware | paper (selects the sketch examples)
    )
    max_tokens: int = 160
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.3
    seed: int | None = None  # fresh per request when the outline is sampled, never a device's own seed
    # how long the edge waits for the whole outline, counted by the replica from the request's arrival; it
    # scales with max_tokens (``EdgeConfig.sketch_budget_s``); None: no budget of its own
    budget_ms: BudgetMs | None = None


class SketchProgress(_Msg, frozen=True, tag="sketch_progress"):
    """Cloud -> edge, streamed (server-sent events) while an outline is written: the outline so far."""

    request_id: str
    tokens: int
    text: str


class SketchReply(_Msg, frozen=True, tag="sketch_reply"):
    request_id: str
    sketch: str
    tokens: int
    compute_ms: float = 0.0


class CompletionsRequest(msgspec.Struct, frozen=True):
    """Edge -> an OpenAI-compatible completions server (vLLM, the benchmark's per-step peer): the next
    token's top-k log-probabilities after ``prompt`` (the whole public sequence, as token ids). JSON in
    the server's schema: no type tag, no version, no session id."""

    model: str
    prompt: list[int]
    logprobs: int  # top-k
    max_tokens: int = 1
    temperature: float = 0.0
    return_tokens_as_token_ids: bool = True


EdgeToCloud = Union[OpenSession, StepRequest, CloseSession, StepBatch]  # noqa: UP007 (a runtime alias msgspec decodes)
CloudToEdge = Union[StepReply, ErrorReply, ReplyBatch]  # noqa: UP007

_encoder = msgspec.msgpack.Encoder()
_request_decoder: msgspec.msgpack.Decoder[EdgeToCloud] = msgspec.msgpack.Decoder(EdgeToCloud)
_reply_decoder: msgspec.msgpack.Decoder[CloudToEdge] = msgspec.msgpack.Decoder(CloudToEdge)
_M = TypeVar("_M", bound=_Msg)


def encode(msg: _Msg) -> bytes:
    return _encoder.encode(msg)


def _check_version(msg: _M) -> _M:
    if msg.v != PROTOCOL_VERSION:
        raise ProtocolError(
            f"message version {msg.v} is not supported (this build speaks v{PROTOCOL_VERSION})",
            hint="run the same cogenesis-serve version on edge and cloud",
        )
    return msg


def decode_request(buf: bytes) -> OpenSession | StepRequest | CloseSession | StepBatch:
    """Decode an edge -> cloud message; malformed input raises ProtocolError, never crashes."""
    try:
        msg = _request_decoder.decode(buf)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed edge->cloud message: {exc}") from None
    return _check_version(msg)


def decode_reply(buf: bytes) -> StepReply | ErrorReply | ReplyBatch:
    try:
        msg = _reply_decoder.decode(buf)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed cloud->edge message: {exc}") from None
    return _check_version(msg)


def decode_replies(buf: bytes) -> list[StepReply | ErrorReply]:
    """Decode a reply list entry: one reply or a ReplyBatch of them."""
    msg = decode_reply(buf)
    return list(msg.items) if isinstance(msg, ReplyBatch) else [msg]


def _decode_as(decode, buf: bytes, typ: type[_M]) -> _M:
    try:
        msg = decode(buf, type=typ)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed {typ.__name__}: {exc}") from None
    return _check_version(msg)


def decode_msgpack(buf: bytes, typ: type[_M]) -> _M:
    """Decode a msgpack HTTP body into ``typ`` (the stateless baseline)."""
    return _decode_as(msgspec.msgpack.decode, buf, typ)


def decode_json(buf: bytes, typ: type[_M]) -> _M:
    """Decode a JSON HTTP body into ``typ`` (sketch mode)."""
    return _decode_as(msgspec.json.decode, buf, typ)
