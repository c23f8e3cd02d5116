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
a gap is an error. Every request carries an absolute deadline (unix ms).

Tracing: requests carry ``sent_us`` (the edge's clock when it began sending) and replies carry how
long the request travelled to the replica (``bus_in_us``), how long the replica held it
(``server_us``), and how much of that was model time (``model_us``). On one host (one clock) the
edge gets the exchange overhead of a step, the time on the bus and in serialization, as
``bus_in_us + server_us - model_us + (received - posted_us)`` (see ``exchange_overhead_us``).
"""

from __future__ import annotations

import time
from typing import Literal, TypeVar, Union

import msgspec
import numpy as np

from cogenesis.core.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_TOP_K = 50


def now_ms() -> int:
    return int(time.time() * 1000)


def now_us() -> int:
    """Wall clock in microseconds (the tracing clock; comparable across processes on one host)."""
    return time.time_ns() // 1000


def deadline_in(seconds: float) -> int:
    """Absolute deadline (unix ms) ``seconds`` from now."""
    return now_ms() + int(seconds * 1000)


def pack_ids(ids) -> bytes:
    """Token ids -> little-endian int32 bytes."""
    return np.asarray(ids, dtype="<i4").tobytes()


def unpack_ids(buf: bytes) -> np.ndarray:
    if len(buf) % 4:
        raise ProtocolError(f"token-id payload of {len(buf)} bytes is not a multiple of 4 (int32)")
    return np.frombuffer(buf, dtype="<i4")


def pack_logprobs(values) -> bytes:
    """Log-probabilities -> little-endian float16 bytes (enough for sampling; -65504 floor)."""
    return (
        np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32), nan=-65504.0, neginf=-65504.0), -65504.0, 65504.0)
        .astype("<f2")
        .tobytes()
    )


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
    deadline_ms: int
    lookahead: int = 0  # draft tokens the replica proposes after every reply (0 = none)
    sent_us: int = 0  # tracing: edge clock when sending began (0 = not traced)
    reply_to: str = ""  # reply list key suffix shared by an edge pool's sessions ("" = the session id)


class StepRequest(_Msg, frozen=True, tag="step"):
    """Edge -> owning replica: extend the session by ``tokens`` and return the next top-k."""

    session_id: str
    step: int  # 1, 2, ...; step 0 is the reply to OpenSession
    tokens: bytes  # int32 ids appended since the previous step
    deadline_ms: int
    sent_us: int = 0  # tracing: edge clock when sending began (0 = not traced)
    reply_to: str = ""  # reply list key suffix ("" = the session id)


class CloseSession(_Msg, frozen=True, tag="close"):
    """Edge -> owning replica: free the session's KV cache. No reply."""

    session_id: str


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
    bus_in_us: int = 0  # tracing: request sent -> read by the replica, less time the replica was busy
    server_us: int = 0  # tracing: read by the replica -> reply posted
    model_us: int = 0  # tracing: the part of server_us spent in (or waiting for) the model
    posted_us: int = 0  # tracing: replica clock when the reply was posted

    def exchange_overhead_us(self, received_us: int, waited_from_us: int = 0) -> int:
        """Time this step spent on the bus and in serialization, not in (or waiting for) a model.

        ``received_us``: when the edge had the reply decoded; ``waited_from_us``: when the edge
        began waiting for it (a reply that sat in Redis while the edge was busy computing is not bus
        time; one a background thread received before the edge began waiting counts in full).
        Meaningful when edge and replica share a clock (one host); 0 when the reply is untraced."""
        if not self.posted_us:
            return 0
        # a reply taken in while the edge was busy (a receiving thread) travelled posted -> received
        since = self.posted_us if received_us <= waited_from_us else max(self.posted_us, waited_from_us)
        bus_out = received_us - since
        return max(0, self.bus_in_us + self.server_us - self.model_us + bus_out)

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
    code: str  # unknown_session | bad_request | deadline | internal
    message: str


class StatelessRequest(_Msg, frozen=True, tag="stateless"):
    """Edge -> cloud over HTTP: the official code's protocol, the benchmark's baseline. Every step
    re-sends the whole public sequence (prompt + generated ids); the cloud keeps no state."""

    session_id: str
    tokens: bytes  # int32 ids: the cloud prompt and every token generated so far
    top_k: int
    deadline_ms: int
    sent_us: int = 0


class StepBatch(_Msg, frozen=True, tag="batch"):
    """Edge pool -> one replica: a round's StepRequests and CloseSessions in one stream entry.

    Each item is one message exactly as the client's outbound gate sealed it (msgpack bytes)."""

    items: list[bytes]


class ReplyBatch(_Msg, frozen=True, tag="replies"):
    """Replica -> edge pool: every reply of one served batch that goes to the same reply list."""

    items: list[StepReply | ErrorReply]


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
    seed: int | None = None


class SketchReply(_Msg, frozen=True, tag="sketch_reply"):
    request_id: str
    sketch: str
    tokens: int
    compute_ms: float = 0.0


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
