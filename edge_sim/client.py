"""A simulated edge client: one user's private record, both CoGenesis modes.

Everything the client sends goes through its ``OutboundGate``; the private record never leaves
this object. Logs name sessions and sizes, never text. Logits sessions run in ``cogenesis.edge_sim.logits``
(many clients stepped together); sketch requests are made here.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import httpx
import msgspec

from cogenesis.cluster.bus import Sealed
from cogenesis.core.config import EdgeConfig
from cogenesis.core.data import Record
from cogenesis.core.errors import BusTimeout, ClusterError, SessionError
from cogenesis.core.protocol import SketchReply, SketchRequest
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
    extra: dict = field(default_factory=dict)

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

    # ---- sketch mode --------------------------------------------------------------------------

    def request_sketch(self, http: httpx.Client, http_url: str) -> tuple[str, int, float]:
        """Ask the cloud for an outline of the public instruction. Returns (sketch, tokens, seconds)."""
        req = SketchRequest(
            request_id=uuid.uuid4().hex,
            instruction=self.record.public_instruction,
            kind=self.record.kind,
            max_tokens=self.cfg.sketch_max_tokens,
            temperature=self.cfg.sketch.temperature,
            top_p=self.cfg.sketch.top_p,
            repetition_penalty=self.cfg.sketch.repetition_penalty,
            seed=self.seed,
        )
        sealed = self.gate.seal_json(req)
        t0 = time.perf_counter()
        reply = post_sealed(http, f"{http_url}/v1/sketch", sealed, self.cfg.step_timeout_s)
        parsed = msgspec.json.decode(reply, type=SketchReply)
        return parsed.sketch, parsed.tokens, time.perf_counter() - t0

    def sketch_prompt(self, sketch: str) -> list[int]:
        return self.engine.prompt_ids(self.record, sketch=sketch)


def post_sealed(http: httpx.Client, url: str, sealed: Sealed, timeout_s: float) -> bytes:
    """POST a gate-sealed body; errors become CoGenesisErrors that say what happened."""
    try:
        resp = http.post(url, content=sealed.payload, headers={"content-type": "application/json"}, timeout=timeout_s)
    except httpx.TimeoutException:
        raise BusTimeout(
            f"no answer from {url} within {timeout_s:.0f} s",
            hint="the cloud may be overloaded; raise --step-timeout or add replicas",
        ) from None
    except httpx.HTTPError as exc:
        raise ClusterError(f"cannot reach the cloud at {url}: {exc}", hint="is the cluster running?") from None
    if resp.status_code != 200:
        try:
            body = resp.json()
            detail = body.get("error") or body.get("detail") or resp.text[:200]
            detail = f"{detail} ({body['hint']})" if body.get("hint") else detail
        except ValueError:
            detail = resp.text[:200]
        raise SessionError(f"cloud answered {resp.status_code}: {detail}")
    return resp.content
