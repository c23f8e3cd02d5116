"""A simulated edge client: one user's private record, both CoGenesis modes.

Everything the client sends goes through its ``OutboundGate``; the private record never leaves
this object. Logs name sessions and sizes, never text. Logits sessions run in ``cogenesis.edge_sim.logits``
(many clients stepped together), sketch sessions in ``cogenesis.edge_sim.sketch``.

A failed session keeps its message on the device (``SessionResult.error``, local logs); what may leave
the device process (a fleet pool's counts on Redis, a Locust report) is its ``ErrorCode``. What a session
wrote (``text``, and its token ids ``ids``: exact, where decoding and re-encoding the text is not) stays on
the device too: those reports carry counts only.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from cogenesis.core.config import EdgeConfig
from cogenesis.core.data import Record
from cogenesis.core.protocol import ErrorCode
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.gate import OutboundGate

log = logging.getLogger(__name__)


@dataclass
class SessionResult:
    client: int
    tid: str
    mode: str  # "sketch" | "logits"
    text: str
    tokens: int
    seconds: float
    ids: list[int] = field(default_factory=list)  # the token ids written (empty: failed, or a profile's outline)
    ttft_s: float | None = None  # time to first generated token
    round_trips: int = 0  # cloud exchanges (sketch: 1; logits: open + steps)
    sketch: str | None = None  # the cloud's outline (public: written from the public instruction)
    error: str | None = None  # what went wrong, for the user (stays on the device)
    error_code: ErrorCode | None = None  # ... as the code that may leave it (set exactly when ``error`` is)
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive generated tokens
    # logits mode: the time to first token by cause (None: not opened), the same for the sessions opened together
    ttft_device_prefill_s: float | None = None  # the device's prefill of the private prompts
    ttft_cloud_wait_s: float | None = None  # the wait for the cloud's first replies after that prefill
    stopped: bool = False  # ended early by the caller's time budget, with what it wrote (logits)
    # logits mode: the exchange with the cloud
    fused_steps: int = 0  # positions whose token came from the fused distribution
    accepted_draft_tokens: int = 0  # the cloud's lookahead drafts the edge accepted
    rtt_us: list[int] = field(default_factory=list)  # per reply: sent -> received
    overhead_us: list[int] = field(default_factory=list)  # per reply: bus + serialization, not model time
    held_tokens: int = 0  # tokens the stream gate did not send as written (held back, then released or replaced)
    private_spans: int = 0  # private spans the small model wrote that the cloud got a placeholder for
    span_policy: str | None = None  # the span policy that acted (None: no private span was written)
    # sketch mode
    sketch_seconds: float | None = None  # the outline request to the cloud
    edge_seconds: float | None = None  # the local generation from the outline (a pool's batched decode)
    simulated: bool = False  # written by a device profile (no small model ran; no text)
    # faults survived
    resumes: int = 0  # times the session was re-opened by replay (its replica died, or Redis lost the exchange)
    busy_retries: int = 0  # opens (or outline requests) retried after the cloud refused them busy

    def __post_init__(self) -> None:
        if (self.error is None) != (self.error_code is None):
            raise ValueError("a failed SessionResult has both an error message and an error code, a good one neither")

    def to_json(self) -> dict:
        out = {
            "client": self.client,
            "tid": self.tid,
            "mode": self.mode,
            "text": self.text,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "round_trips": self.round_trips,
        }
        if self.ttft_s is not None:
            out["ttft_s"] = round(self.ttft_s, 3)
        if self.sketch is not None:
            out["sketch"] = self.sketch
        if self.error is not None:
            out["error"] = self.error
        if self.resumes:
            out["resumes"] = self.resumes
        if self.busy_retries:
            out["busy_retries"] = self.busy_retries
        if self.held_tokens or self.span_policy:  # numbers and the policy's name only, never text
            out["privacy"] = {
                "held_tokens": self.held_tokens,
                "private_spans": self.private_spans,
                "span_policy": self.span_policy,
            }
        return out


BACKOFF_FIRST_S = 0.5  # the first retry after a busy refusal waits at least this long ...
BACKOFF_CAP_S = 15.0  # ... doubled on each refusal, up to this


def busy_delay(retry_after_s: float | None, tries: int, rng: random.Random) -> float:
    """How long to wait before asking again after the cloud refused busy for the ``tries``-th time (0 first).

    At least what the cloud asked (``retry_after_s``), else an exponential backoff (``BACKOFF_FIRST_S``
    doubled per refusal, capped at ``BACKOFF_CAP_S``), whichever is longer; times a random 1 to 1.5, so
    the sessions it refused together do not all come back at once."""
    backoff = min(BACKOFF_CAP_S, BACKOFF_FIRST_S * 2 ** min(tries, 32))
    return max(retry_after_s or 0.0, backoff) * rng.uniform(1.0, 1.5)


class EdgeClient:
    def __init__(self, index: int, record: Record, engine: EdgeEngine, cfg: EdgeConfig) -> None:
        self.index = index
        self.record = record
        self.engine = engine
        self.cfg = cfg
        self.gate = OutboundGate.of_record(record, cfg.privacy)
        seed = cfg.sampling.seed
        # the device's own sampling seed (reproducible runs); it never leaves the device: an outline
        # request carries a fresh seed of its own (``cogenesis.edge_sim.sketch.sketch_request``)
        self.seed = None if seed is None else seed + index
