"""Cloud engines: the large model's open/step/close/sketch, independent of Serve and Redis.

``TransformersCloudEngine`` keeps one KV cache per logits session, so a step costs the new
token(s) only, never a re-prefill. It is not thread-safe: its owner serialises calls.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np
import torch

from cogenesis import prompts
from cogenesis.errors import SessionError, UnknownSession
from cogenesis.protocol import MAX_TOP_K, SketchReply, SketchRequest
from deployments.audit import AuditLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopK:
    """The large model's next-token top-k after ``context_len`` tokens."""

    ids: np.ndarray  # [K] int32, best first
    logprobs: np.ndarray  # [K] float32
    context_len: int
    compute_ms: float


class CloudEngine(Protocol):
    def open(self, session_id: str, instruction: str, top_k: int) -> TopK: ...
    def step(self, session_id: str, step: int, tokens: Sequence[int]) -> TopK: ...
    def close(self, session_id: str) -> bool: ...
    def sketch(self, requests: Sequence[SketchRequest]) -> list[SketchReply]: ...
    def stats(self) -> dict: ...


@dataclass
class _Session:
    ids: list[int]
    top_k: int
    cache: object = None  # transformers Cache holding every token in ``ids`` but the last step's input
    step: int = 0
    last: TopK | None = None
    last_used: float = field(default_factory=time.monotonic)


class TransformersCloudEngine:
    """Large model on transformers (CPU by default) with per-session KV caches."""

    def __init__(self, model, tokenizer, audit: AuditLog | None = None, max_sessions: int = 1024,
                 session_idle_s: float = 300.0, sketch_style: str = "zero-shot") -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self.audit = audit
        self.max_sessions = max_sessions
        self.session_idle_s = session_idle_s
        self.vocab = model.config.vocab_size
        self.sketch_style = sketch_style
        self._sketch_prefix = tokenizer(prompts.SKETCH_PREFIX, add_special_tokens=False).input_ids
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self.tokens_served = 0

    # ---- logits mode ---------------------------------------------------------------------

    def _forward(self, session: _Session, new_ids: list[int]) -> TopK:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([new_ids]), past_key_values=session.cache, use_cache=True)
        session.cache = out.past_key_values
        lp = out.logits[0, -1].float().log_softmax(-1)  # [V]
        top = lp.topk(session.top_k)
        session.ids.extend(new_ids)
        self.tokens_served += len(new_ids)
        return TopK(top.indices.numpy().astype(np.int32), top.values.numpy(), len(session.ids),
                    (time.perf_counter() - t0) * 1000)

    def open(self, session_id: str, instruction: str, top_k: int) -> TopK:
        if not instruction.strip():
            raise SessionError("empty instruction", hint="send the general instruction the cloud should follow")
        if not 1 <= top_k <= MAX_TOP_K:
            raise SessionError(f"top_k={top_k} is outside 1..{MAX_TOP_K}")
        if session_id in self._sessions:
            session = self._sessions[session_id]
            if session.step == 0 and session.last is not None:
                return session.last  # replayed open
            raise SessionError(f"session {session_id} is already open")
        self._evict()
        ids = prompts.render(self.tok, prompts.cloud_messages(instruction))
        if self.audit:
            self.audit.write("open", session_id, self.tok.decode(ids))
        session = _Session(ids=[], top_k=top_k)
        session.last = self._forward(session, ids)
        self._sessions[session_id] = session
        return session.last

    def step(self, session_id: str, step: int, tokens: Sequence[int]) -> TopK:
        session = self._sessions.get(session_id)
        if session is None:
            raise UnknownSession(f"unknown session {session_id}",
                               hint="open the session first; it may have been closed after being idle")
        self._sessions.move_to_end(session_id)
        session.last_used = time.monotonic()
        if step == session.step and session.last is not None:
            return session.last  # replayed step: same answer, no second forward pass
        if step != session.step + 1:
            raise SessionError(f"session {session_id}: step {step} out of order (expected {session.step + 1})")
        toks = [int(t) for t in tokens]
        if not toks or min(toks) < 0 or max(toks) >= self.vocab:
            raise SessionError(f"session {session_id}: step {step} carries invalid token ids",
                               hint=f"send 1+ token ids in 0..{self.vocab - 1}")
        if self.audit:
            self.audit.write("step", session_id, self.tok.decode(session.ids + toks), step=step,
                             appended=self.tok.decode(toks))
        session.last = self._forward(session, toks)
        session.step = step
        return session.last

    def close(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def _evict(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self._sessions.items() if now - v.last_used > self.session_idle_s]:
            log.info("closing idle session %s", sid)
            del self._sessions[sid]
        while len(self._sessions) >= self.max_sessions:
            sid, _ = self._sessions.popitem(last=False)
            log.warning("session limit %d reached: closed least recently used session %s", self.max_sessions, sid)

    # ---- sketch mode -----------------------------------------------------------------------

    def sketch(self, requests: Sequence[SketchRequest]) -> list[SketchReply]:
        """Write outlines for a batch of public instructions; one generate call per sampling setting."""
        replies: dict[str, SketchReply] = {}
        groups: dict[tuple, list[SketchRequest]] = {}
        for r in requests:
            if not r.instruction.strip():
                raise SessionError(f"sketch {r.request_id}: empty instruction",
                                   hint="send the general instruction to outline")
            if not (1 <= r.max_tokens <= 4096 and r.temperature >= 0 and 0 < r.top_p <= 1
                    and 0 < r.repetition_penalty <= 10):
                raise SessionError(f"sketch {r.request_id}: invalid decoding settings", hint=(
                    "max_tokens 1..4096, temperature >= 0, top_p in (0, 1], repetition_penalty in (0, 10]"))
            groups.setdefault((r.max_tokens, r.temperature, r.top_p, r.repetition_penalty), []).append(r)
        for (max_tokens, temperature, top_p, penalty), group in groups.items():
            for r, text, n, ms in zip(group, *self._generate(group, max_tokens, temperature, top_p, penalty)):
                replies[r.request_id] = SketchReply(request_id=r.request_id, sketch=text, tokens=n, compute_ms=ms)
        return [replies[r.request_id] for r in requests]

    def _generate(self, group: list[SketchRequest], max_tokens: int, temperature: float, top_p: float,
                  repetition_penalty: float):
        t0 = time.perf_counter()
        prompts_ids = [prompts.render(self.tok, prompts.sketch_messages(r.instruction, r.kind, self.sketch_style))
                       + self._sketch_prefix for r in group]
        if self.audit:
            for r, ids in zip(group, prompts_ids):
                self.audit.write("sketch", r.request_id, self.tok.decode(ids))
        width = max(map(len, prompts_ids))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts_ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_ids])
        if group[0].seed is not None:
            torch.manual_seed(group[0].seed)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        sampling["repetition_penalty"] = repetition_penalty
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                                      pad_token_id=pad, eos_token_id=self.tok.eos_token_id, **sampling)
        new = out[:, width:]
        texts, counts = [], []
        for row in new.tolist():
            n = next((i for i, t in enumerate(row) if t in (self.tok.eos_token_id, pad)), len(row))
            raw = prompts.SKETCH_PREFIX + self.tok.decode(row[:n], skip_special_tokens=True)
            texts.append(prompts.clean_sketch(raw))
            counts.append(n)
        self.tokens_served += sum(counts)
        ms = (time.perf_counter() - t0) * 1000
        return texts, counts, [ms] * len(group)

    def stats(self) -> dict:
        return {"active_sessions": len(self._sessions), "tokens_served": self.tokens_served}


def build_engine(cfg) -> TransformersCloudEngine:
    """The default engine for a CloudConfig: transformers on CPU, model resolved from the spec."""
    from cogenesis.models import load_causal_lm, resolve_model

    model, tok = load_causal_lm(resolve_model(cfg.large_model))
    audit = AuditLog(cfg.audit_log) if cfg.audit_log else None
    return TransformersCloudEngine(model, tok, audit=audit, max_sessions=cfg.max_sessions,
                                   session_idle_s=cfg.session_idle_s, sketch_style=cfg.sketch_style)
