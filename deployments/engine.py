"""Cloud engines: the large model's open/step/close/sketch, independent of Serve and Redis.

``TransformersCloudEngine`` keeps one KV cache per logits session and serves every pending step
of every session in one batched forward pass (``cogenesis.core.kvbatch``): continuous batching, with
sessions joining and leaving between steps. Caches live under a byte budget; the least recently
used are evicted and recomputed from the session's token ids on their next step, so results never
depend on the cache. With lookahead n, each reply also carries the replica's own greedy draft of
n tokens with the top-k at every draft position. Not thread-safe: its owner serialises calls.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from cogenesis.core import prompts
from cogenesis.core.config import CloudConfig
from cogenesis.core.errors import ConfigError, SessionError, UnknownSession
from cogenesis.core.kvbatch import KV, batched_forward, kv_bytes, kv_crop
from cogenesis.core.protocol import MAX_TOP_K, SketchReply, SketchRequest
from cogenesis.deployments.audit import AuditLog

log = logging.getLogger(__name__)

MAX_LOOKAHEAD = 16


@dataclass(frozen=True)
class TopK:
    """The large model's top-k at 1 + len(draft) consecutive positions after ``context_len`` tokens."""

    ids: np.ndarray  # [P, K] int32, best first per row
    logprobs: np.ndarray  # [P, K] float32
    draft: np.ndarray  # [P - 1] int32 greedy draft tokens
    context_len: int
    compute_ms: float


@dataclass(frozen=True)
class OpenArgs:
    session_id: str
    instruction: str
    top_k: int
    lookahead: int = 0


@dataclass(frozen=True)
class StepArgs:
    session_id: str
    step: int
    tokens: tuple[int, ...]


class CloudEngine(Protocol):
    """Everything a replica calls on its model. Not thread-safe: the replica serialises calls."""

    def open_many(self, requests: Sequence[OpenArgs]) -> list[TopK | SessionError]: ...
    def step_many(self, requests: Sequence[StepArgs]) -> list[TopK | SessionError]: ...
    def close(self, session_id: str) -> bool: ...
    def sketch(self, requests: Sequence[SketchRequest]) -> list[SketchReply]: ...
    def stateless_top_k(self, token_ids: Sequence[int], top_k: int) -> TopK: ...
    def stats(self) -> dict: ...
    def set_yield_point(self, yield_point: Callable[[], None]) -> None:
        """Install what long calls (outlines) run every few tokens, so waiting steps can go first."""
        ...

    def shutdown(self) -> None:
        """Release what the engine holds outside the process (files); the replica is going away."""
        ...


EngineFactory = Callable[[CloudConfig], CloudEngine]


def load_engine_factory(path: str) -> EngineFactory:
    """The engine factory at ``module:function`` (``CloudConfig.engine_factory``), imported here."""
    module_name, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"cannot load the engine factory {path!r}: {exc}",
            hint="set engine_factory to module:function, a function taking a CloudConfig and returning a CloudEngine",
        ) from None
    if not callable(factory):
        raise ConfigError(f"the engine factory {path!r} is not callable", hint="point engine_factory at a function")
    return factory


@dataclass
class _Session:
    ids: list[int]  # confirmed tokens: prompt + what the edge sent
    top_k: int
    lookahead: int
    kv: KV | None = None  # covers ids + draft; None after eviction
    draft: list[int] = field(default_factory=list)
    step: int = 0
    last: TopK | None = None
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class EngineStats:
    tokens_served: int = 0  # tokens fed to the model for logits sessions (incl. recompute)
    steps: int = 0
    batches: int = 0
    batch_sizes: int = 0
    evictions: int = 0
    recomputes: int = 0
    draft_tokens: int = 0
    sketch_tokens: int = 0
    prefix_hits: int = 0  # opens (and recomputes) that started from the cached prompt head
    prefix_tokens_saved: int = 0


class TransformersCloudEngine:
    """Large model on transformers (CPU by default) with per-session KV caches and batched steps."""

    def __init__(
        self,
        model,
        tokenizer,
        audit: AuditLog | None = None,
        max_sessions: int = 1024,
        session_idle_s: float = 300.0,
        sketch_style: str = "zero-shot",
        kv_budget_bytes: int = 2 << 30,
    ) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self.audit = audit
        self.max_sessions = max_sessions
        self.session_idle_s = session_idle_s
        self.kv_budget_bytes = kv_budget_bytes
        self.vocab = model.config.vocab_size
        self.sketch_style = sketch_style
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._sketch_prefix = tokenizer(prompts.SKETCH_PREFIX, add_special_tokens=False).input_ids
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self.counters = EngineStats()
        self._yield_point: Callable[[], None] = lambda: None  # called every few outline tokens
        self._head: tuple[list[int], KV | None] | None = None  # the cloud prompt's fixed head and its KV

    # ---- logits mode: batched ------------------------------------------------------------------

    def open_many(self, requests: Sequence[OpenArgs]) -> list[TopK | SessionError]:
        """Prefill every new session in one batched pass; errors are returned per request."""
        results: list[TopK | SessionError | None] = [None] * len(requests)
        fresh: list[tuple[int, _Session, list[int]]] = []
        for i, r in enumerate(requests):
            try:
                existing = self._check_open(r)
            except SessionError as exc:
                results[i] = exc
                continue
            if existing is not None:
                results[i] = existing  # replayed open
                continue
            self._evict_idle()
            ids = prompts.cloud_prompt_ids(self.tok, r.instruction)
            if self.audit:
                self.audit.write("open", r.session_id, self.tok.decode(ids))
            session = _Session(ids=[], top_k=r.top_k, lookahead=r.lookahead)
            self._sessions[r.session_id] = session
            fresh.append((i, session, self._resume(session, ids)))
        for (i, _, _), top in zip(fresh, self._advance([(s, ids) for _, s, ids in fresh])):
            results[i] = top
        return results  # type: ignore[return-value]

    def _resume(self, session: _Session, ids: list[int]) -> list[int]:
        """Start ``session`` from the cached prompt head when ``ids`` begin with it (prefix caching:
        every session's prompt opens with the same system prompt, computed once); returns the tokens
        still to feed."""
        head, kv = self._prompt_head()
        if kv is not None and len(ids) > len(head) and ids[: len(head)] == head:
            session.ids, session.kv = list(head), kv  # shared, never written in place: steps build new tensors
            self.counters.prefix_hits += 1
            self.counters.prefix_tokens_saved += len(head)
            return ids[len(head) :]
        session.ids, session.kv = [], None
        return ids

    def _prompt_head(self) -> tuple[list[int], KV | None]:
        if self._head is None:
            a, b = (prompts.cloud_prompt_ids(self.tok, x) for x in ("Write a poem.", "Summarize this."))
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            if n >= 2:
                _, caches = batched_forward(self.model, [None], [a[:n]], pad_id=self.pad_id)
                self._head = (a[:n], caches[0])
            else:
                self._head = ([], None)
        return self._head

    def _check_open(self, r: OpenArgs) -> TopK | None:
        if not r.instruction.strip():
            raise SessionError("empty instruction", hint="send the general instruction the cloud should follow")
        if not 1 <= r.top_k <= MAX_TOP_K:
            raise SessionError(f"top_k={r.top_k} is outside 1..{MAX_TOP_K}")
        if not 0 <= r.lookahead <= MAX_LOOKAHEAD:
            raise SessionError(f"lookahead={r.lookahead} is outside 0..{MAX_LOOKAHEAD}")
        session = self._sessions.get(r.session_id)
        if session is None:
            return None
        if session.step == 0 and session.last is not None:
            return session.last
        raise SessionError(f"session {r.session_id} is already open")

    def step_many(self, requests: Sequence[StepArgs]) -> list[TopK | SessionError]:
        """Serve every step in one batched pass (a session appearing twice is served in order)."""
        results: list[TopK | SessionError | None] = [None] * len(requests)
        waves: list[list[int]] = []
        for i, r in enumerate(requests):  # each wave holds a session at most once
            for wave in waves:
                if all(requests[j].session_id != r.session_id for j in wave):
                    wave.append(i)
                    break
            else:
                waves.append([i])
        for wave in waves:
            work: list[tuple[int, _Session, list[int]]] = []
            for i in wave:
                try:
                    outcome = self._prepare_step(requests[i])
                except SessionError as exc:
                    results[i] = exc
                    continue
                if isinstance(outcome, TopK):
                    results[i] = outcome
                else:
                    work.append((i, *outcome))
            for (i, session, _), top in zip(work, self._advance([(s, feed) for _, s, feed in work])):
                session.step = requests[i].step
                results[i] = top
        return results  # type: ignore[return-value]

    def _prepare_step(self, r: StepArgs) -> TopK | tuple[_Session, list[int]]:
        """Validate a step; returns a replayed reply, or (session, tokens to feed)."""
        session = self._sessions.get(r.session_id)
        if session is None:
            raise UnknownSession(
                f"unknown session {r.session_id}",
                hint="open the session first; it may have been closed after being idle",
            )
        self._sessions.move_to_end(r.session_id)
        session.last_used = time.monotonic()
        if r.step == session.step and session.last is not None:
            return session.last  # replayed step: same answer, no second forward pass
        if r.step != session.step + 1:
            raise SessionError(f"session {r.session_id}: step {r.step} out of order (expected {session.step + 1})")
        toks = list(r.tokens)
        if not toks or min(toks) < 0 or max(toks) >= self.vocab:
            raise SessionError(
                f"session {r.session_id}: step {r.step} carries invalid token ids",
                hint=f"send 1+ token ids in 0..{self.vocab - 1}",
            )
        if self.audit:
            self.audit.write(
                "step", r.session_id, self.tok.decode(session.ids + toks), step=r.step, appended=self.tok.decode(toks)
            )
        self.counters.steps += 1
        if session.kv is None:  # evicted (or never cached): recompute from the confirmed prefix
            self.counters.recomputes += 1
            session.draft = []
            return session, self._resume(session, session.ids + toks)
        agree = 0
        while agree < min(len(toks), len(session.draft)) and toks[agree] == session.draft[agree]:
            agree += 1
        agree = min(agree, len(toks) - 1)  # always feed at least one token
        session.kv = kv_crop(session.kv, len(session.ids) + agree)
        session.ids.extend(toks[:agree])
        session.draft = []
        return session, toks[agree:]

    def _advance(self, work: Sequence[tuple[_Session, list[int]]]) -> list[TopK]:
        """Feed each session its tokens (one batched pass per feed length class), then draft."""
        if not work:
            return []
        t0 = time.perf_counter()
        tops: dict[int, torch.Tensor] = {}
        # single-token steps and multi-token prefills are batched separately (no padding waste)
        for group in (
            [j for j, (_, f) in enumerate(work) if len(f) == 1],
            [j for j, (_, f) in enumerate(work) if len(f) > 1],
        ):
            if not group:
                continue
            lp, caches = batched_forward(
                self.model, [work[j][0].kv for j in group], [work[j][1] for j in group], pad_id=self.pad_id
            )
            self.counters.batches += 1
            self.counters.batch_sizes += len(group)
            for row, j in enumerate(group):
                session, feed = work[j]
                session.kv = caches[row]
                session.ids.extend(feed)
                self.counters.tokens_served += len(feed)
                tops[j] = lp[row, -1]
        rows = {j: [tops[j]] for j in tops}
        drafting = [j for j, (s, _) in enumerate(work) if s.lookahead > 0]
        for _ in range(max((work[j][0].lookahead for j in drafting), default=0)):
            drafting = [j for j in drafting if len(work[j][0].draft) < work[j][0].lookahead]
            if not drafting:
                break
            nxt = [int(rows[j][-1].argmax()) for j in drafting]
            lp, caches = batched_forward(
                self.model, [work[j][0].kv for j in drafting], [[t] for t in nxt], pad_id=self.pad_id
            )
            self.counters.batches += 1
            self.counters.batch_sizes += len(drafting)
            self.counters.draft_tokens += len(drafting)
            for row, (j, tok) in enumerate(zip(drafting, nxt)):
                work[j][0].kv = caches[row]
                work[j][0].draft.append(tok)
                rows[j].append(lp[row, -1])
        ms = (time.perf_counter() - t0) * 1000
        out = []
        for j, (session, _) in enumerate(work):
            top = torch.stack(rows[j]).topk(session.top_k, dim=-1)  # [P, K]
            session.last = TopK(
                top.indices.numpy().astype(np.int32),
                top.values.numpy(),
                np.asarray(session.draft, dtype=np.int32),
                len(session.ids),
                ms,
            )
            out.append(session.last)
        self._enforce_budget()
        return out

    def _enforce_budget(self) -> None:
        total = sum(kv_bytes(s.kv) for s in self._sessions.values())
        for sid, session in self._sessions.items():  # least recently used first
            if total <= self.kv_budget_bytes:
                break
            if session.kv is not None:
                total -= kv_bytes(session.kv)
                session.kv, session.draft = None, []
                self.counters.evictions += 1
                log.info("KV budget: evicted session %s (recomputed on its next step)", sid)

    def close(self, session_id: str) -> bool:
        return self._sessions.pop(session_id, None) is not None

    def _evict_idle(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self._sessions.items() if now - v.last_used > self.session_idle_s]:
            log.info("closing idle session %s", sid)
            del self._sessions[sid]
        while len(self._sessions) >= self.max_sessions:
            sid, _ = self._sessions.popitem(last=False)
            log.warning("session limit %d reached: closed least recently used session %s", self.max_sessions, sid)

    # ---- single-request conveniences -------------------------------------------------------------

    def open(self, session_id: str, instruction: str, top_k: int, lookahead: int = 0) -> TopK:
        return _raise_or(self.open_many([OpenArgs(session_id, instruction, top_k, lookahead)])[0])

    def step(self, session_id: str, step: int, tokens: Sequence[int]) -> TopK:
        return _raise_or(self.step_many([StepArgs(session_id, step, tuple(int(t) for t in tokens))])[0])

    def stateless_top_k(self, token_ids: Sequence[int], top_k: int) -> TopK:
        """The official code's protocol: the whole sequence, no state, batch 1 (benchmark baseline)."""
        if not 1 <= top_k <= MAX_TOP_K:
            raise SessionError(f"top_k={top_k} is outside 1..{MAX_TOP_K}")
        if not token_ids or min(token_ids) < 0 or max(token_ids) >= self.vocab:
            raise SessionError(
                "stateless request carries invalid token ids",
                hint=f"send the prompt's and generated ids, each in 0..{self.vocab - 1}",
            )
        t0 = time.perf_counter()
        lp, _ = batched_forward(self.model, [None], [list(token_ids)], pad_id=self.pad_id)
        top = lp[0, -1:].topk(top_k, dim=-1)
        return TopK(
            top.indices.numpy().astype(np.int32),
            top.values.numpy(),
            np.zeros(0, np.int32),
            len(token_ids),
            (time.perf_counter() - t0) * 1000,
        )

    # ---- sketch mode -----------------------------------------------------------------------------

    def sketch(self, requests: Sequence[SketchRequest]) -> list[SketchReply]:
        """Write outlines for a batch of public instructions; one generate call per decoding setting."""
        replies: dict[str, SketchReply] = {}
        groups: dict[tuple, list[SketchRequest]] = {}
        for r in requests:
            if not r.instruction.strip():
                raise SessionError(
                    f"sketch {r.request_id}: empty instruction", hint="send the general instruction to outline"
                )
            if not (
                1 <= r.max_tokens <= 4096 and r.temperature >= 0 and 0 < r.top_p <= 1 and 0 < r.repetition_penalty <= 10
            ):
                raise SessionError(
                    f"sketch {r.request_id}: invalid decoding settings",
                    hint=("max_tokens 1..4096, temperature >= 0, top_p in (0, 1], repetition_penalty in (0, 10]"),
                )
            groups.setdefault((r.max_tokens, r.temperature, r.top_p, r.repetition_penalty), []).append(r)
        for (max_tokens, temperature, top_p, penalty), group in groups.items():
            for r, text, n, ms in zip(group, *self._generate(group, max_tokens, temperature, top_p, penalty)):
                replies[r.request_id] = SketchReply(request_id=r.request_id, sketch=text, tokens=n, compute_ms=ms)
        return [replies[r.request_id] for r in requests]

    def _generate(
        self, group: list[SketchRequest], max_tokens: int, temperature: float, top_p: float, repetition_penalty: float
    ):
        t0 = time.perf_counter()
        prompts_ids = [
            prompts.render(self.tok, prompts.sketch_messages(r.instruction, r.kind, self.sketch_style))
            + self._sketch_prefix
            for r in group
        ]
        if self.audit:
            for r, ids in zip(group, prompts_ids):
                self.audit.write("sketch", r.request_id, self.tok.decode(ids))
        width = max(map(len, prompts_ids))
        pad = self.pad_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts_ids])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts_ids])
        if group[0].seed is not None:
            torch.manual_seed(group[0].seed)
        sampling: dict[str, bool | float] = (
            dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        )
        sampling["repetition_penalty"] = repetition_penalty
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                pad_token_id=pad,
                eos_token_id=self.tok.eos_token_id,
                logits_processor=LogitsProcessorList([_YieldEachToken(self._yield_point)]),
                **sampling,
            )
        new = out[:, width:]
        texts, counts = [], []
        for row in new.tolist():
            n = next((i for i, t in enumerate(row) if t in (self.tok.eos_token_id, pad)), len(row))
            raw = prompts.SKETCH_PREFIX + self.tok.decode(row[:n], skip_special_tokens=True)
            texts.append(prompts.clean_sketch(raw))
            counts.append(n)
        self.counters.sketch_tokens += sum(counts)
        ms = (time.perf_counter() - t0) * 1000
        return texts, counts, [ms] * len(group)

    def set_yield_point(self, yield_point: Callable[[], None]) -> None:
        self._yield_point = yield_point

    def shutdown(self) -> None:
        if self.audit:
            self.audit.close()

    def stats(self) -> dict:
        c = self.counters
        return {
            "active_sessions": len(self._sessions),
            "tokens_served": c.tokens_served + c.sketch_tokens,
            "steps": c.steps,
            "batches": c.batches,
            "batch_rows": c.batch_sizes,
            "mean_batch_size": round(c.batch_sizes / c.batches, 2) if c.batches else 0.0,
            "kv_bytes": sum(kv_bytes(s.kv) for s in self._sessions.values()),
            "evictions": c.evictions,
            "recomputes": c.recomputes,
            "draft_tokens": c.draft_tokens,
            "prefix_hits": c.prefix_hits,
            "prefix_tokens_saved": c.prefix_tokens_saved,
        }


class _YieldEachToken(LogitsProcessor):
    """Calls ``yield_point`` every ``every`` generated tokens (changes no scores): waiting steps run
    between them. Every token would make an outline wait one step pass per token under load."""

    def __init__(self, yield_point, every: int = 4) -> None:
        self.yield_point = yield_point
        self.every = every
        self.n = 0

    def __call__(self, input_ids, scores):
        self.n += 1
        if self.n % self.every == 0:
            self.yield_point()
        return scores


def _raise_or(result: TopK | SessionError) -> TopK:
    if isinstance(result, SessionError):
        raise result
    return result


def build_engine(cfg: CloudConfig) -> TransformersCloudEngine:
    """The default engine for a CloudConfig: transformers on CPU, model resolved from the spec."""
    from cogenesis.core.models import load_causal_lm, resolve_model

    torch.set_num_threads(cfg.torch_threads)
    model, tok = load_causal_lm(resolve_model(cfg.large_model))
    audit = AuditLog(cfg.audit_log) if cfg.audit_log else None
    return TransformersCloudEngine(
        model,
        tok,
        audit=audit,
        max_sessions=cfg.max_sessions,
        session_idle_s=cfg.session_idle_s,
        sketch_style=cfg.sketch_style,
        kv_budget_bytes=int(cfg.kv_budget_mb * (1 << 20)),
    )
