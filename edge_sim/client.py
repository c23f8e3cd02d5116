"""A simulated edge client: one user's private record, both CoGenesis modes.

Everything the client sends goes through its ``OutboundGate``; the private record never leaves
this object. Logs name sessions and sizes, never text.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import httpx
import msgspec
import torch

from cluster.bus import EdgeBus, Sealed
from cogenesis.config import EdgeConfig
from cogenesis.data import Record
from cogenesis.errors import BusTimeout, ClusterError, SessionError
from cogenesis.fusion import fuse_constant
from cogenesis.protocol import (
    CloseSession,
    OpenSession,
    SketchReply,
    SketchRequest,
    StepRequest,
    deadline_in,
    pack_ids,
)
from cogenesis.sampling import sample
from edge_sim.engine import EdgeEngine
from edge_sim.gate import OutboundGate

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
        out = {"client": self.client, "tid": self.tid, "mode": self.mode, "text": self.text,
               "tokens": self.tokens, "seconds": round(self.seconds, 3), "round_trips": self.round_trips}
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
        req = SketchRequest(request_id=uuid.uuid4().hex, instruction=self.record.public_instruction,
                            kind=self.record.kind, max_tokens=self.cfg.sketch_max_tokens,
                            temperature=self.cfg.sketch.temperature, top_p=self.cfg.sketch.top_p,
                            repetition_penalty=self.cfg.sketch.repetition_penalty, seed=self.seed)
        sealed = self.gate.seal_json(req)
        t0 = time.perf_counter()
        reply = post_sealed(http, f"{http_url}/v1/sketch", sealed, self.cfg.step_timeout_s)
        parsed = msgspec.json.decode(reply, type=SketchReply)
        return parsed.sketch, parsed.tokens, time.perf_counter() - t0

    def sketch_prompt(self, sketch: str) -> list[int]:
        return self.engine.prompt_ids(self.record, sketch=sketch)

    # ---- logits mode --------------------------------------------------------------------------

    def run_logits(self, bus: EdgeBus) -> SessionResult:
        """One logits session: the cloud sees the public instruction and the tokens chosen here."""
        cfg, engine = self.cfg, self.engine
        session_id = uuid.uuid4().hex
        gen = torch.Generator().manual_seed(self.seed) if self.seed is not None else None
        t0 = time.perf_counter()
        bus.send_open(self.gate.seal(OpenSession(session_id=session_id, instruction=self.record.public_instruction,
                                                 top_k=cfg.top_k, deadline_ms=deadline_in(cfg.step_timeout_s))),
                      session_id)
        state = engine.prefill(engine.prompt_ids(self.record))  # overlaps with the cloud's prefill
        reply = bus.wait_reply(session_id, 0, deadline_in(cfg.step_timeout_s))
        replica = reply.replica
        out: list[int] = []
        ttft = None
        round_trips = 1
        try:
            for step in range(1, cfg.max_new_tokens + 1):
                ids, lps = (row[0] for row in reply.top_k())
                fused = fuse_constant(state.logprobs[None], torch.from_numpy(ids.astype("int64"))[None],
                                      torch.from_numpy(lps)[None], cfg.fusion.weight, cfg.fusion.floor)
                token = int(sample(fused, cfg.sampling.temperature, cfg.sampling.top_p, gen)[0])
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                if token in engine.stop_ids:
                    break
                out.append(token)
                if step == cfg.max_new_tokens:
                    break
                deadline = deadline_in(cfg.step_timeout_s)
                bus.send_to(replica, self.gate.seal(StepRequest(session_id=session_id, step=step,
                                                                tokens=pack_ids([token]), deadline_ms=deadline)))
                state = engine.step(state, token)  # the small model runs while the cloud works
                reply = bus.wait_reply(session_id, step, deadline)
                round_trips += 1
        finally:
            bus.send_to(replica, self.gate.seal(CloseSession(session_id=session_id)))
        text = engine.tok.decode(out, skip_special_tokens=True).strip()
        log.info("client %d logits session %s: %d tokens in %.2f s", self.index, session_id[:8], len(out),
                 time.perf_counter() - t0)
        return SessionResult(self.index, self.record.tid, "logits", text, len(out), time.perf_counter() - t0,
                             ttft_s=ttft, round_trips=round_trips)


def post_sealed(http: httpx.Client, url: str, sealed: Sealed, timeout_s: float) -> bytes:
    """POST a gate-sealed body; errors become CoGenesisErrors that say what happened."""
    try:
        resp = http.post(url, content=sealed.payload, headers={"content-type": "application/json"}, timeout=timeout_s)
    except httpx.TimeoutException:
        raise BusTimeout(f"no answer from {url} within {timeout_s:.0f} s",
                         hint="the cloud may be overloaded; raise --step-timeout or add replicas") from None
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

