"""A simulated edge client: one user's private record, both CoGenesis modes.

Everything the client sends goes through its ``OutboundGate``; the private record never leaves
this object. Logs name sessions and sizes, never text. Logits sessions run in ``cogenesis.edge_sim.logits``
(many clients stepped together), sketch sessions in ``cogenesis.edge_sim.sketch``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from cogenesis.core.config import EdgeConfig
from cogenesis.core.data import Record
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
    ttft_s: float | None = None  # time to first generated token
    round_trips: int = 0  # cloud exchanges (sketch: 1; logits: open + steps)
    sketch: str | None = None  # the cloud's outline (public: written from the public instruction)
    error: str | None = None
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive generated tokens
    stopped: bool = False  # ended early by the caller's time budget, with what it wrote (logits)
    # logits mode: the exchange with the cloud
    fused_steps: int = 0  # positions whose token came from the fused distribution
    accepted_draft_tokens: int = 0  # the cloud's lookahead drafts the edge accepted
    rtt_us: list[int] = field(default_factory=list)  # per reply: sent -> received
    overhead_us: list[int] = field(default_factory=list)  # per reply: bus + serialization, not model time
    # sketch mode
    sketch_seconds: float | None = None  # the outline request to the cloud
    edge_seconds: float | None = None  # the local generation from the outline (a pool's batched decode)
    simulated: bool = False  # written by a device profile (no small model ran; no text)

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
        return out


class EdgeClient:
    def __init__(self, index: int, record: Record, engine: EdgeEngine, cfg: EdgeConfig) -> None:
        self.index = index
        self.record = record
        self.engine = engine
        self.cfg = cfg
        self.gate = OutboundGate(record.public_instruction, record.private_fields())
        seed = cfg.sampling.seed
        self.seed = None if seed is None else seed + index
