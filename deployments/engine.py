"""Cloud engines: the large model's open/step/close/outlines, independent of Serve and Redis.

``TransformersCloudEngine`` keeps every logits session's KV cache in a slot of one persistent store
(``cogenesis.core.kvslots``) and serves every pending step of every session in one batched forward pass
over those slots: continuous batching, with sessions joining and leaving between steps, and no cache
copied or re-packed for a step. Outlines (sketch mode) ride in the same passes: an
outline is a session the engine decodes itself, one token per pass, so outlines and logits steps
share the batch and neither waits for the other. Caches live under a byte budget; caches of
sessions idle for a while are evicted and recomputed from the session's token ids on their next
step, so results never depend on the cache; an active session's cache is never dropped (opens are
refused ``Busy`` instead). With lookahead n, each reply also carries the replica's own greedy draft
of n tokens with the top-k at every draft position. Not thread-safe: its owner serialises calls.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np
import torch

from cogenesis.core import prompts
from cogenesis.core.config import CloudConfig
from cogenesis.core.errors import Busy, ConfigError, SessionError, UnknownSession
from cogenesis.core.kvbatch import KV, batched_forward
from cogenesis.core.kvslots import SlotStore
from cogenesis.core.protocol import MAX_TOP_K, SketchReply, SketchRequest, wire_logprobs
from cogenesis.deployments.audit import AuditLog

log = logging.getLogger(__name__)

MAX_LOOKAHEAD = 16
MAX_OUTLINE_TOKENS = 4096
RESERVE_AHEAD = 80  # KV positions a new session's slot gets beyond its prompt (it writes that far without growth)
# bounds of a Busy refusal's retry-after: soon enough to not idle, late enough to not hammer
RETRY_MIN_S, RETRY_MAX_S = 0.5, 10.0


class SessionTooLarge(SessionError):
    """An open (prompt + resume ids) or a step would take a session past ``max_session_tokens``
    (``CloudConfig.limits``): the step loop answers it ``too_large``, and no forward pass runs for it."""


@dataclass(frozen=True)
class TopK:
    """The large model's top-k at 1 + len(draft) consecutive positions after ``context_len`` tokens."""

    ids: np.ndarray  # [P, K] int32, best first per row
    logprobs: np.ndarray  # [P, K] float32
    draft: np.ndarray  # [P - 1] int32 greedy draft tokens
    context_len: int
    compute_ms: float
    wire: tuple[bytes, bytes] | None = None  # ids and logprobs already in wire form (packed once for a whole pass)


class _Row(NamedTuple):
    """One position's top-k of a pass: ids [K] int32, log-probs [K] float32 and the same in wire form (float16)."""

    ids: np.ndarray
    logprobs: np.ndarray
    wire: np.ndarray


@dataclass(frozen=True)
class OpenArgs:
    """An open. ``resume`` (the ids the session had released so far) and ``resume_step`` rebuild a
    session another replica held (or this one lost): the reply is the top-k after all those tokens."""

    session_id: str
    instruction: str
    top_k: int
    lookahead: int = 0
    resume: tuple[int, ...] = ()
    resume_step: int = 0

    @property
    def is_resume(self) -> bool:
        return bool(self.resume) or self.resume_step > 0


@dataclass(frozen=True)
class StepArgs:
    session_id: str
    step: int
    tokens: tuple[int, ...]


@dataclass(frozen=True)
class OutlineEvent:
    """What happened to an outline since the last ``outline_events()``: progress (``reply`` and ``error``
    None; ``text`` is the outline so far, cleaned like the final one), done (``reply`` set) or failed
    (``error`` set)."""

    request_id: str
    tokens: int
    text: str
    reply: SketchReply | None = None
    error: SessionError | None = None


class CloudEngine(Protocol):
    """Everything a replica calls on its model. Not thread-safe: the replica serialises calls."""

    def open_many(self, requests: Sequence[OpenArgs]) -> list[TopK | SessionError]:
        """Prefill new (or resumed) sessions; an element is ``Busy`` when the replica cannot take it."""
        ...

    def step_many(self, requests: Sequence[StepArgs]) -> list[TopK | SessionError]:
        """Serve steps in one batched pass; every active outline advances one token in it (also when
        ``requests`` is empty)."""
        ...

    def close(self, session_id: str) -> bool: ...
    def submit_outlines(self, requests: Sequence[SketchRequest]) -> list[SessionError | None]:
        """Validate and queue outlines: None = accepted, ``Busy`` = queue full, else invalid."""
        ...

    def outline_events(self) -> list[OutlineEvent]:
        """What happened to outlines since the last call (at most one event per outline)."""
        ...

    def outlines_pending(self) -> int: ...
    def cancel_outline(self, request_id: str) -> None: ...
    def sweep_idle(self) -> list[str]:
        """Close sessions idle longer than ``session_idle_s``; returns their ids."""
        ...

    def sketch(self, requests: Sequence[SketchRequest]) -> list[SketchReply]:
        """Blocking convenience: outlines for ``requests``, in order (eval, tests)."""
        ...

    def stateless_top_k(self, token_ids: Sequence[int], top_k: int) -> TopK: ...
    def stats(self) -> dict: ...
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
    slot: int | None = None  # its KV slot, covering ids + draft; None after eviction
    draft: list[int] = field(default_factory=list)
    step: int = 0
    last: TopK | None = None
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class _Outline:
    """An outline the engine decodes itself, one token per pass."""

    request: SketchRequest
    prompt: list[int]  # the sketch prompt, primed with SKETCH_PREFIX
    generator: torch.Generator | None  # None: greedy
    ids: list[int] = field(default_factory=list)  # what its slot covers
    slot: int | None = None
    feed: list[int] = field(
        default_factory=list
    )  # next pass's tokens: the prompt (after a cached head), then the last one written
    out: list[int] = field(default_factory=list)  # tokens written
    started: float = 0.0  # perf_counter when it joined the batch
    result: OutlineEvent | None = None  # done or failed


@dataclass
class EngineStats:
    tokens_served: int = 0  # tokens fed to the model for logits sessions (incl. recompute)
    steps: int = 0
    batches: int = 0
    batch_sizes: int = 0  # rows of every batch: logits sessions and outlines
    evictions: int = 0
    recomputes: int = 0
    draft_tokens: int = 0
    sketch_tokens: int = 0
    outlines_done: int = 0
    prefix_hits: int = 0  # opens, recomputes and outlines that started from a cached prompt head
    prefix_tokens_saved: int = 0
    busy_opens: int = 0  # opens refused Busy (sessions or KV budget)


class _KeepLogits:
    """The model, keeping its last call's raw last-position logits: an outline's repetition penalty acts
    on logits (as in transformers), which the log-probs ``batched_forward`` returns cannot give back."""

    def __init__(self, model) -> None:
        self.model = model
        self.logits: torch.Tensor | None = None  # [B, V] float32

    def __call__(self, **kwargs):
        out = self.model(**kwargs)
        self.logits = out.logits[:, -1].float()
        return out


def next_token(
    logits: torch.Tensor,
    seen: Sequence[int],
    temperature: float,
    top_p: float,
    repetition_penalty: float,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> int:
    """One decoding step on raw logits [V], as ``model.generate`` does it: repetition penalty over every
    id the model conditions on (transformers' RepetitionPenaltyLogitsProcessor), then greedy when
    ``temperature`` is 0, else temperature, top-k (0: off), top-p and a draw from ``generator``."""
    scores = logits.float().clone()
    if repetition_penalty != 1.0 and len(seen):
        idx = torch.tensor(sorted(set(seen)), dtype=torch.long)
        s = scores[idx]
        scores[idx] = torch.where(s < 0, s * repetition_penalty, s / repetition_penalty)
    if temperature <= 0:
        return int(scores.argmax())
    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.numel():
        scores = scores.masked_fill(scores < scores.topk(top_k).values[-1], -float("inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort()
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[-1] = False  # keep at least the best token
        scores = scores.masked_fill(drop.scatter(0, order, drop), -float("inf"))
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


def _clamp_retry(seconds: float) -> float:
    return round(min(RETRY_MAX_S, max(RETRY_MIN_S, seconds)), 2)


class TransformersCloudEngine:
    """Large model on transformers (CPU by default) with per-session KV caches and batched steps.

    Admission: a session counts as *active* while it was used (opened, stepped, replayed) within the
    last ``active_window_s`` seconds. An open is refused ``Busy`` when ``max_sessions`` are open after
    idle ones were swept, or when its prompt's KV does not fit the budget next to what active sessions
    and outlines hold (when nothing active holds KV it is admitted, so an oversize prompt is not refused
    forever). Caches of sessions that are not active may be evicted (and recomputed on their next step);
    outlines' caches count in the budget and are never evicted.
    """

    def __init__(
        self,
        model,
        tokenizer,
        audit: AuditLog | None = None,
        max_sessions: int = 1024,
        session_idle_s: float = 300.0,
        sketch_style: str = "zero-shot",
        kv_budget_bytes: int = 2 << 30,
        max_outlines: int = 16,
        max_outline_queue: int = 256,
        active_window_s: float = 10.0,
        max_session_tokens: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.max_session_tokens = max_session_tokens  # None: unbounded (the step loop checks it too)
        self.tok = tokenizer
        self.audit = audit
        self.max_sessions = max_sessions
        self.session_idle_s = session_idle_s
        self.kv_budget_bytes = kv_budget_bytes
        self.max_outlines = max_outlines
        self.max_outline_queue = max_outline_queue
        self.active_window_s = active_window_s
        self.vocab = model.config.vocab_size
        self.sketch_style = sketch_style
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._stop_ids = {tokenizer.eos_token_id, self.pad_id}
        gen_top_k = getattr(getattr(model, "generation_config", None), "top_k", None)
        self._sample_top_k = 50 if gen_top_k is None else int(gen_top_k)  # what generate() samples with
        self._sketch_prefix = tokenizer(prompts.SKETCH_PREFIX, add_special_tokens=False).input_ids
        self._sessions: OrderedDict[str, _Session] = OrderedDict()  # least recently used first
        self._queued: OrderedDict[str, _Outline] = OrderedDict()
        self._active: OrderedDict[str, _Outline] = OrderedDict()
        self._dirty: dict[str, None] = {}  # active outlines with tokens not yet reported (ordered set)
        self._finished: dict[str, OutlineEvent] = {}  # done/failed, not yet reported
        self._pass_s = 0.0  # moving average of a pass's seconds (for an outline Busy's retry-after)
        self.counters = EngineStats()
        self._heads: dict[str, tuple[list[int], KV | None]] = {}  # prompt kind -> its fixed head and KV
        self.store = SlotStore(self.model)  # every session's and outline's KV, one slot each

    # ---- logits mode: batched ------------------------------------------------------------------

    def open_many(self, requests: Sequence[OpenArgs]) -> list[TopK | SessionError]:
        """Prefill every new (or resumed) session in one batched pass; errors are returned per request.

        Idle sessions are swept first; beyond ``max_sessions`` or the KV budget an open is answered
        ``Busy`` (no active session is evicted to make room)."""
        if not requests:
            return []
        self.sweep_idle(trim=False)
        results: list[TopK | SessionError | None] = [None] * len(requests)
        fresh: list[tuple[int, _Session, list[int]]] = []
        now = time.monotonic()
        protected = self._protected_kv(now)  # KV that admission must leave in place
        for i, r in enumerate(requests):
            try:
                outcome = self._check_open(r)
            except SessionError as exc:
                results[i] = exc
                continue
            if isinstance(outcome, TopK):
                results[i] = outcome  # replayed open, or a resume this replica already holds
                continue
            ids = outcome
            old = self._sessions.get(r.session_id)
            freed = self._held(old.slot) if old is not None and self._is_active(old, now) else 0
            try:
                needed = self._admit(r, old is not None, len(ids), protected - freed, now)
            except Busy as exc:
                self.counters.busy_opens += 1
                results[i] = exc
                continue
            protected += needed - freed
            if old is not None:
                self._drop(r.session_id)  # a resume that does not match: rebuilt from its ids
            if self.audit:
                self.audit.write("open", r.session_id, self.tok.decode(ids))
            session = _Session(ids=[], top_k=r.top_k, lookahead=r.lookahead, step=r.resume_step)
            self._sessions[r.session_id] = session
            fresh.append((i, session, self._start(session, ids)))
        for (i, _, _), top in zip(fresh, self._advance([(s, ids) for _, s, ids in fresh])):
            results[i] = top
        return results  # type: ignore[return-value]

    def _check_open(self, r: OpenArgs) -> TopK | list[int]:
        """Validate an open; returns the reply it replays, or the ids to prefill (prompt + resume)."""
        if not r.instruction.strip():
            raise SessionError("empty instruction", hint="send the general instruction the cloud should follow")
        if not 1 <= r.top_k <= MAX_TOP_K:
            raise SessionError(f"top_k={r.top_k} is outside 1..{MAX_TOP_K}")
        if not 0 <= r.lookahead <= MAX_LOOKAHEAD:
            raise SessionError(f"lookahead={r.lookahead} is outside 0..{MAX_LOOKAHEAD}")
        if r.resume_step < 0:
            raise SessionError(f"session {r.session_id}: resume_step={r.resume_step} is negative")
        if r.resume and (min(r.resume) < 0 or max(r.resume) >= self.vocab):
            raise SessionError(
                f"session {r.session_id}: the resume carries invalid token ids",
                hint=f"send the ids the session released, each in 0..{self.vocab - 1}",
            )
        session = self._sessions.get(r.session_id)
        held = session is not None and session.last is not None  # else new, or never answered: start over
        if held and not r.is_resume:
            assert session is not None
            if session.step == 0:
                return self._touch(r.session_id, session)  # a replayed open
            raise SessionError(f"session {r.session_id} is already open")
        ids = prompts.cloud_prompt_ids(self.tok, r.instruction) + list(r.resume)
        if self.max_session_tokens is not None and len(ids) > self.max_session_tokens:
            raise SessionTooLarge(
                f"session {r.session_id}: the prompt and resume ids are {len(ids)} tokens; at most "
                f"{self.max_session_tokens} are taken (max_session_tokens)",
                hint="start a new session with a shorter instruction or history",
            )
        if (
            held
            and session is not None
            and session.ids == ids
            and session.step == r.resume_step
            and (session.top_k, session.lookahead) == (r.top_k, r.lookahead)
        ):
            return self._touch(r.session_id, session)  # a repeated resume: same answer, no recompute
        return ids  # a new session, or a resume that replaces what this replica holds

    def _touch(self, session_id: str, session: _Session) -> TopK:
        self._sessions.move_to_end(session_id)
        session.last_used = time.monotonic()
        assert session.last is not None
        return session.last

    def _admit(self, r: OpenArgs, replaces: bool, n_ids: int, protected: int, now: float) -> int:
        """Raise ``Busy`` when the replica cannot take this open; returns the KV bytes it will need."""
        if not replaces and len(self._sessions) >= self.max_sessions:
            lru = next(iter(self._sessions.values()))
            raise Busy(
                f"session {r.session_id}: {len(self._sessions)} sessions are open (max_sessions={self.max_sessions})",
                retry_after_s=_clamp_retry(self.session_idle_s - (now - lru.last_used)),
            )
        needed = (n_ids + r.lookahead) * self.store.token_bytes
        if protected > 0 and protected + needed > self.kv_budget_bytes:
            ages = [
                now - s.last_used for s in self._sessions.values() if s.slot is not None and self._is_active(s, now)
            ]
            raise Busy(
                f"session {r.session_id}: the KV budget ({self.kv_budget_bytes >> 20} MiB) is held by active sessions",
                retry_after_s=_clamp_retry(self.active_window_s - max(ages) if ages else 1.0),
            )
        return needed

    def _is_active(self, session: _Session, now: float) -> bool:
        return now - session.last_used <= self.active_window_s

    def _protected_kv(self, now: float) -> int:
        """KV bytes that stay whatever comes: active sessions' and outlines'."""
        return sum(self._held(s.slot) for s in self._sessions.values() if self._is_active(s, now)) + sum(
            self._held(o.slot) for o in self._active.values()
        )

    def _held(self, slot: int | None) -> int:
        """KV bytes a slot's tokens take (0: none)."""
        return 0 if slot is None else self.store.length(slot) * self.store.token_bytes

    def _release(self, slot: int | None) -> None:
        if slot is not None:
            self.store.free(slot)

    def _drop(self, session_id: str) -> bool:
        """Forget a session and free its slot."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        self._release(session.slot)
        return True

    def _start(self, session: _Session, ids: list[int]) -> list[int]:
        """Start ``session`` in a fresh slot, from the cached prompt head when ``ids`` begin with it; returns the
        tokens still to feed."""
        self._release(session.slot)
        session.slot, session.ids, feed = self._from_head(ids, "cloud")
        return feed

    def _from_head(self, ids: list[int], kind: str) -> tuple[int, list[int], list[int]]:
        """A fresh slot for ``ids``. Prefix caching: every prompt of a kind opens with the same fixed text (the
        system prompt, the sketch instructions), computed once and copied into the slot. Returns (the slot, the
        ids it covers, the ids still to feed)."""
        head, kv = self._prompt_head(kind)
        slot = self.store.alloc()
        self.store.reserve(len(ids) + RESERVE_AHEAD)  # the store grows while prompts prefill, not mid-decode
        if kv is not None and len(ids) > len(head) and ids[: len(head)] == head:
            self.counters.prefix_hits += 1
            self.counters.prefix_tokens_saved += len(head)
            self.store.write(slot, kv)
            return slot, list(head), ids[len(head) :]
        return slot, [], ids

    def _prompt_head(self, kind: str = "cloud") -> tuple[list[int], KV | None]:
        """The fixed head of a prompt kind ("cloud", or "sketch:<SketchRequest.kind>") and its KV."""
        if kind not in self._heads:
            a, b = (self._prompt_ids(x, kind) for x in ("Write a poem.", "Summarize this."))
            n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            if n >= 2:
                _, caches = batched_forward(self.model, [None], [a[:n]], pad_id=self.pad_id)
                self._heads[kind] = (a[:n], caches[0])
            else:
                self._heads[kind] = ([], None)
        return self._heads[kind]

    def _prompt_ids(self, instruction: str, kind: str) -> list[int]:
        if kind == "cloud":
            return prompts.cloud_prompt_ids(self.tok, instruction)
        sketch_kind = kind.partition(":")[2]
        messages = prompts.sketch_messages(instruction, sketch_kind, self.sketch_style)
        return prompts.render(self.tok, messages) + self._sketch_prefix

    def step_many(self, requests: Sequence[StepArgs]) -> list[TopK | SessionError]:
        """Serve every step in one batched pass (a session appearing twice is served in order); every
        active outline advances by one token in the first pass, also when ``requests`` is empty."""
        results: list[TopK | SessionError | None] = [None] * len(requests)
        waves: list[list[int]] = []
        seen: dict[str, int] = {}  # session -> how many waves hold it
        for i, r in enumerate(requests):  # each wave holds a session at most once: its n-th step goes in wave n
            n = seen.get(r.session_id, 0)
            seen[r.session_id] = n + 1
            if n == len(waves):
                waves.append([])
            waves[n].append(i)
        self._activate_outlines()
        outlines = list(self._active.values())
        if outlines and not waves:
            waves = [[]]
        for n, wave in enumerate(waves):
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
            riding = outlines if n == 0 else []
            try:
                tops = self._advance([(s, feed) for _, s, feed in work], riding)
            except Exception as exc:
                self._fail_outlines(riding, exc)  # each outline gets an answer, and a failing one cannot repeat
                raise
            for (i, session, _), top in zip(work, tops):
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
        if self.max_session_tokens is not None and len(session.ids) + len(toks) > self.max_session_tokens:
            raise SessionTooLarge(
                f"session {r.session_id}: step {r.step} would make it {len(session.ids) + len(toks)} tokens; at most "
                f"{self.max_session_tokens} are taken (max_session_tokens)",
                hint="end the session: it reached the replica's limit",
            )
        if self.audit:
            self.audit.write(
                "step", r.session_id, self.tok.decode(session.ids + toks), step=r.step, appended=self.tok.decode(toks)
            )
        self.counters.steps += 1
        if session.slot is None:  # evicted (or never cached): recompute from the confirmed prefix
            self.counters.recomputes += 1
            session.draft = []
            return session, self._start(session, session.ids + toks)
        agree = 0
        while agree < min(len(toks), len(session.draft)) and toks[agree] == session.draft[agree]:
            agree += 1
        agree = min(agree, len(toks) - 1)  # always feed at least one token
        self.store.crop(session.slot, len(session.ids) + agree)
        session.ids.extend(toks[:agree])
        session.draft = []
        return session, toks[agree:]

    def _advance(self, work: Sequence[tuple[_Session, list[int]]], outlines: Sequence[_Outline] = ()) -> list[TopK]:
        """Feed each session its tokens and each outline its pending tokens (one batched pass over their slots
        per feed length class: single tokens together, prefills together), write each outline's next token,
        then draft. Top-k extraction runs once per pass over all of its rows."""
        if not work and not outlines:
            return []
        t0 = time.perf_counter()
        held = [s.slot for s, _ in work] + [o.slot for o in outlines]
        slots = [slot for slot in held if slot is not None]
        assert len(slots) == len(held), "every session and outline in a pass holds a slot"
        feeds = [f for _, f in work] + [o.feed for o in outlines]
        n_work = len(work)
        k_max = max((s.top_k for s, _ in work), default=1)
        rows: dict[int, list[_Row]] = {}  # session -> its top-k rows
        nxt: dict[int, int] = {}  # session -> the greedy token after its last row (the next draft token)
        written: dict[int, torch.Tensor] = {}  # outline index -> raw logits after its feed
        # single-token feeds and multi-token prefills are batched separately (no padding waste)
        for group in (
            [j for j, f in enumerate(feeds) if len(f) == 1],
            [j for j, f in enumerate(feeds) if len(f) > 1],
        ):
            if not group:
                continue
            group.sort(key=lambda j: slots[j])  # rows in slot order: a run of slots is read in place
            keep = _KeepLogits(self.model) if any(j >= n_work for j in group) else None
            lp = self.store.forward(
                [slots[j] for j in group], [feeds[j] for j in group], pad_id=self.pad_id, model=keep
            )[:, -1]  # [B, V]
            self.counters.batches += 1
            self.counters.batch_sizes += len(group)
            mine = [row for row, j in enumerate(group) if j < n_work]
            if mine:
                self._take_rows(lp, mine, [group[row] for row in mine], k_max, rows, nxt)
            for row, j in enumerate(group):
                if j < n_work:
                    session, feed = work[j]
                    session.ids.extend(feed)
                    self.counters.tokens_served += len(feed)
                else:
                    assert keep is not None and keep.logits is not None
                    outline = outlines[j - n_work]
                    outline.ids.extend(outline.feed)
                    written[j - n_work] = keep.logits[row]
        for k, outline in enumerate(outlines):
            self._write_token(outline, written[k])
        drafting = [j for j, (s, _) in enumerate(work) if s.lookahead > 0]
        for _ in range(max((work[j][0].lookahead for j in drafting), default=0)):
            drafting = sorted(
                (j for j in drafting if len(work[j][0].draft) < work[j][0].lookahead), key=lambda j: slots[j]
            )
            if not drafting:
                break
            toks = [nxt[j] for j in drafting]
            lp = self.store.forward([slots[j] for j in drafting], [[t] for t in toks], pad_id=self.pad_id)[:, -1]
            self.counters.batches += 1
            self.counters.batch_sizes += len(drafting)
            self.counters.draft_tokens += len(drafting)
            for j, tok in zip(drafting, toks):
                work[j][0].draft.append(tok)
            self._take_rows(lp, range(len(drafting)), drafting, k_max, rows, nxt)
        seconds = time.perf_counter() - t0
        self._pass_s = seconds if not self._pass_s else 0.8 * self._pass_s + 0.2 * seconds
        out = []
        for j, (session, _) in enumerate(work):
            k = session.top_k
            its = rows[j]
            if len(its) == 1:
                ids, lps, wire = its[0].ids[None, :k], its[0].logprobs[None, :k], its[0].wire[None, :k]
            else:
                ids, lps = np.stack([r.ids[:k] for r in its]), np.stack([r.logprobs[:k] for r in its])
                wire = np.stack([r.wire[:k] for r in its])
            session.last = TopK(
                ids,
                lps,
                np.asarray(session.draft, dtype=np.int32),
                len(session.ids),
                seconds * 1000,
                wire=(ids.astype("<i4").tobytes(), wire.tobytes()),
            )
            out.append(session.last)
        self._enforce_budget()
        return out

    @staticmethod
    def _take_rows(
        lp: torch.Tensor,
        picks: Sequence[int],
        sessions: Sequence[int],
        k_max: int,
        rows: dict[int, list[_Row]],
        nxt: dict[int, int],
    ) -> None:
        """The top-k (of ``k_max``, best first, also in wire form) and greedy next token of rows ``picks`` of ``lp``
        [B, V], one tensor operation for all of them, appended to each session's rows."""
        sel = lp if len(picks) == lp.shape[0] else lp[torch.as_tensor(list(picks), dtype=torch.long)]
        top = sel.topk(k_max, dim=-1)
        ids, values = top.indices.numpy().astype(np.int32), top.values.numpy()
        wire = wire_logprobs(values)
        greedy = ids[:, 0].tolist()  # the best of a sorted top-k: the argmax
        for i, j in enumerate(sessions):
            rows.setdefault(j, []).append(_Row(ids[i], values[i], wire[i]))
            nxt[j] = greedy[i]

    def _enforce_budget(self) -> None:
        """Evict caches of sessions that are not active (least recently used first) while over budget;
        active sessions and outlines keep theirs (admission keeps them within the budget)."""
        total = self._kv_total()
        if total <= self.kv_budget_bytes:
            return
        now = time.monotonic()
        for sid, session in self._sessions.items():  # least recently used first
            if total <= self.kv_budget_bytes:
                break
            if session.slot is not None and not self._is_active(session, now):
                total -= self._held(session.slot)
                self._release(session.slot)
                session.slot, session.draft = None, []
                self.counters.evictions += 1
                log.info("KV budget: evicted the cache of idle session %s (recomputed on its next step)", sid)

    def _kv_total(self) -> int:
        return self.store.used_bytes()

    def close(self, session_id: str) -> bool:
        return self._drop(session_id)

    def sweep_idle(self, trim: bool = True) -> list[str]:
        """Close sessions idle longer than ``session_idle_s`` (their edge vanished): frees their KV. ``trim``: then
        shrink the KV store when a burst of sessions is over (the step loop's periodic sweep; not before opens,
        which would grow it again)."""
        now = time.monotonic()
        gone = [sid for sid, s in self._sessions.items() if now - s.last_used > self.session_idle_s]
        for sid in gone:
            log.info("closing idle session %s", sid)
            self._drop(sid)
        if trim and self.store.trim(RESERVE_AHEAD):  # a burst is over: its KV memory goes back
            log.info("KV store trimmed to %d slots of %d positions", self.store.slots, self.store.capacity)
        return gone

    # ---- single-request conveniences -------------------------------------------------------------

    def open(
        self,
        session_id: str,
        instruction: str,
        top_k: int,
        lookahead: int = 0,
        resume: Sequence[int] = (),
        resume_step: int = 0,
    ) -> TopK:
        args = OpenArgs(session_id, instruction, top_k, lookahead, tuple(int(t) for t in resume), resume_step)
        return _raise_or(self.open_many([args])[0])

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

    # ---- sketch mode: outlines in the batch ----------------------------------------------------------

    def submit_outlines(self, requests: Sequence[SketchRequest]) -> list[SessionError | None]:
        """Validate and queue outlines (None = accepted). Beyond ``max_outlines`` active plus
        ``max_outline_queue`` waiting, an outline is refused ``Busy``."""
        results: list[SessionError | None] = []
        for r in requests:
            try:
                self._check_outline(r)
                if self.outlines_pending() >= self.max_outlines + self.max_outline_queue:
                    raise Busy(
                        f"outline {r.request_id}: {self.outlines_pending()} outlines are pending",
                        retry_after_s=self._outline_retry_s(),
                    )
            except SessionError as exc:
                results.append(exc)
                continue
            self._enqueue(r)
            results.append(None)
        return results

    def _check_outline(self, r: SketchRequest) -> None:
        if not r.instruction.strip():
            raise SessionError(
                f"sketch {r.request_id}: empty instruction", hint="send the general instruction to outline"
            )
        if not (
            1 <= r.max_tokens <= MAX_OUTLINE_TOKENS
            and r.temperature >= 0
            and 0 < r.top_p <= 1
            and 0 < r.repetition_penalty <= 10
        ):
            raise SessionError(
                f"sketch {r.request_id}: invalid decoding settings",
                hint=f"max_tokens 1..{MAX_OUTLINE_TOKENS}, temperature >= 0, top_p in (0, 1], "
                "repetition_penalty in (0, 10]",
            )
        if r.request_id in self._queued or r.request_id in self._active:
            raise SessionError(
                f"sketch {r.request_id} is already pending", hint="give every outline its own request id"
            )

    def _enqueue(self, r: SketchRequest) -> _Outline:
        generator = None
        if r.temperature > 0:
            generator = torch.Generator()
            if r.seed is not None:
                generator.manual_seed(r.seed)
            else:
                generator.seed()  # fresh per outline
        outline = _Outline(r, self._prompt_ids(r.instruction, f"sketch:{r.kind}"), generator)
        self._queued[r.request_id] = outline
        return outline

    def _outline_retry_s(self) -> float:
        """About when a queue slot frees: the active outline closest to done finishes."""
        left = min((o.request.max_tokens - len(o.out) for o in self._active.values()), default=1)
        return _clamp_retry(left * (self._pass_s or 0.1))

    def _activate_outlines(self) -> None:
        while self._queued and len(self._active) < self.max_outlines:
            rid, outline = self._queued.popitem(last=False)
            self._active[rid] = outline
            try:
                if self.audit:
                    self.audit.write("sketch", rid, self.tok.decode(outline.prompt))
                outline.slot, outline.ids, outline.feed = self._from_head(
                    outline.prompt, f"sketch:{outline.request.kind}"
                )
            except Exception as exc:  # its prompt head's pass failed: answer it, as a failed pass does
                self._fail_outlines([outline], exc)
                raise
            outline.started = time.perf_counter()

    def _write_token(self, outline: _Outline, logits: torch.Tensor) -> None:
        r = outline.request
        token = next_token(
            logits, outline.ids, r.temperature, r.top_p, r.repetition_penalty, self._sample_top_k, outline.generator
        )
        if token not in self._stop_ids:
            outline.out.append(token)
            self.counters.sketch_tokens += 1
        if token in self._stop_ids or len(outline.out) >= r.max_tokens:
            text = self._outline_text(outline)
            reply = SketchReply(
                request_id=r.request_id,
                sketch=text,
                tokens=len(outline.out),
                compute_ms=(time.perf_counter() - outline.started) * 1000,
            )
            self._finish(outline, OutlineEvent(r.request_id, len(outline.out), text, reply=reply))
            self.counters.outlines_done += 1
        else:
            outline.feed = [token]
            self._dirty[r.request_id] = None

    def _outline_text(self, outline: _Outline) -> str:
        return prompts.clean_sketch(prompts.SKETCH_PREFIX + self.tok.decode(outline.out, skip_special_tokens=True))

    def _finish(self, outline: _Outline, event: OutlineEvent, publish: bool = True) -> None:
        rid = outline.request.request_id
        self._active.pop(rid, None)
        self._queued.pop(rid, None)
        self._dirty.pop(rid, None)
        self._release(outline.slot)
        outline.slot, outline.result = None, event
        if publish:
            self._finished[rid] = event

    def _fail_outlines(self, outlines: Sequence[_Outline], exc: Exception) -> None:
        for outline in outlines:
            rid = outline.request.request_id
            log.warning("outline %s failed in a batched pass: %s", rid, type(exc).__name__)
            error = SessionError(
                f"sketch {rid}: the model failed ({type(exc).__name__})",
                hint="retry the request; if it persists, check the replica's log",
            )
            self._finish(outline, OutlineEvent(rid, len(outline.out), "", error=error))

    def outline_events(self) -> list[OutlineEvent]:
        """Progress of active outlines (one per outline, the latest) and outlines done or failed, since the
        last call. Texts are decoded here, so unread progress costs nothing."""
        events = [
            OutlineEvent(rid, len(o.out), self._outline_text(o))
            for rid in self._dirty
            if (o := self._active.get(rid)) is not None
        ]
        events.extend(self._finished.values())
        self._dirty.clear()
        self._finished.clear()
        return events

    def outlines_pending(self) -> int:
        return len(self._active) + len(self._queued)

    def cancel_outline(self, request_id: str) -> None:
        """Forget an outline (its client left or its budget ran out): frees its KV and its batch slot."""
        outline = self._active.get(request_id) or self._queued.get(request_id)
        if outline is not None:
            error = SessionError(f"sketch {request_id} was cancelled")
            self._finish(outline, OutlineEvent(request_id, len(outline.out), "", error=error), publish=False)
        self._finished.pop(request_id, None)

    def sketch(self, requests: Sequence[SketchRequest]) -> list[SketchReply]:
        """Outlines for ``requests``, in order: queue them all (the queue cap guards the HTTP path, not
        this in-process caller), then run passes until they are done. Raises the first invalid request's
        ``SessionError`` before any work."""
        for i, r in enumerate(requests):
            self._check_outline(r)
            if any(q.request_id == r.request_id for q in requests[:i]):
                raise SessionError(
                    f"sketch {r.request_id} is already pending", hint="give every outline its own request id"
                )
        mine = [self._enqueue(r) for r in requests]
        try:
            while any(o.result is None for o in mine):
                self.step_many([])
        finally:
            for o in mine:
                self._dirty.pop(o.request.request_id, None)
                self._finished.pop(o.request.request_id, None)
                if o.result is None:
                    self.cancel_outline(o.request.request_id)
        replies = []
        for o in mine:
            assert o.result is not None
            if o.result.error is not None:
                raise o.result.error
            assert o.result.reply is not None
            replies.append(o.result.reply)
        return replies

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
            "kv_bytes": self._kv_total(),
            "kv_reserved_bytes": self.store.reserved_bytes(),
            "kv_slots": self.store.slots,
            "evictions": c.evictions,
            "recomputes": c.recomputes,
            "draft_tokens": c.draft_tokens,
            "prefix_hits": c.prefix_hits,
            "prefix_tokens_saved": c.prefix_tokens_saved,
            "outlines_active": len(self._active),
            "outlines_queued": len(self._queued),
            "outlines_done": c.outlines_done,
            "busy_opens": c.busy_opens,
        }


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
        max_outlines=cfg.sketch_max_batch,
        max_outline_queue=cfg.sketch_max_queue,
        max_session_tokens=cfg.limits.max_session_tokens,
    )
