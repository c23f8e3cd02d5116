"""``cogenesis eval``: the paper's Table 1 on any model pair, on records in the CoGenesis format.

Settings (each writes an answer per record, and is scored on the gold answer):
- ``large_with_context``: the large model given everything (a reference: the context is not private here);
- ``large_without_context``: the large model given the public instruction only;
- ``small_with_context``: the device's small model alone, with the private context;
- ``sketch``: the cloud outlines the public instruction, the small model writes from outline + context;
- ``logits_<method>``: logits-mode collaboration with fusion ``method`` (``cogenesis.core.fusion``);
  with ``span_policies``, ``logits_<method>/<policy>`` for each span policy instead (the price of privacy).

The cloud is the real ``TransformersCloudEngine`` called in-process (``cogenesis.apps.engine_link.EngineLink``):
sketch and logits sessions run the same engine, session loop, fusion and outbound gates as the
cluster, without Redis and Serve. Its audit log is what the cloud model received.

Metrics per setting:
- NLL/token: teacher-forced negative log-likelihood of the gold answer under the setting's own
  next-token distribution (sketch: the small model conditioned on the outline; logits: the fused
  distribution over the whole vocabulary, as sampling's candidate restriction is a truncation like
  top-p; ``coverage`` says how often the gold token was inside the candidate set);
- ROUGE-L F1 of the generated answer against the gold one; length in words;
- exposure: share of the record's private word 4-grams found in what the cloud model received;
- optionally the paper's three LLM-judge ratings (``--judge-url``).

With ``span_policies`` (the price of privacy: what each policy of the device's stream gate,
``cogenesis.edge_sim.gate.TokenStream``, costs in quality and saves in exposure, on the same records),
each ``logits_<method>/<policy>`` row also counts the record's private spans (``PrivateSpans``) in what
the small model wrote and in the token stream the cloud received (its steps in the audit log), the spans
the cloud got the placeholder for, the tokens held back and the sessions refused. Its NLL runs the gold
answer through the session's stream gate: positions written while tokens are held (and, under
``refuse``, every position from the refusal on) take the small model's distribution, the others fuse
with the large model conditioned on what the cloud received (placeholders in place of private spans).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import torch

from cogenesis.apps.engine_link import EngineLink
from cogenesis.apps.engine_outlines import EngineOutlines
from cogenesis.apps.scoring import Judge, exposure, rouge_l
from cogenesis.apps.teacher import gold_ids, nll, teacher_forced
from cogenesis.core.config import EdgeConfig, PrivacyConfig, validate
from cogenesis.core.data import Record, load_records
from cogenesis.core.errors import ConfigError, DataError, PrivacyViolation
from cogenesis.core.fusion import METHODS, candidate_mask
from cogenesis.core.fusion_net import Fuser
from cogenesis.core.models import check_same_tokenizer, load_causal_lm, resolve_model
from cogenesis.core.privacy import PrivateSpans
from cogenesis.core.prompts import cloud_prompt_ids
from cogenesis.core.schedules import Schedule
from cogenesis.deployments.audit import AuditLog
from cogenesis.deployments.engine import TransformersCloudEngine
from cogenesis.edge_sim.client import EdgeClient
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.gate import OutboundGate
from cogenesis.edge_sim.logits import run_logits_sessions, schedule_of
from cogenesis.edge_sim.sketch import write_sketches

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

BASE_SETTINGS = ("large_with_context", "large_without_context", "small_with_context", "sketch")
SPAN_POLICIES: tuple[str, ...] = get_args(PrivacyConfig.model_fields["span_policy"].annotation)
SEES_CONTEXT = {
    "large_with_context": "yes (reference)",
    "large_without_context": "no",
    "small_with_context": "nothing sent",
    "sketch": "no",
}
Progress = Callable[[str, int, int], None]


def _quiet(stage: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class EvalOptions:
    data: str
    limit: int | None = 20
    base: tuple[str, ...] = BASE_SETTINGS  # which non-logits settings to run
    fusions: tuple[str, ...] = ("constant", "entropy", "contrast")
    fusion_checkpoint: str | None = None
    fusion_weight: float = 0.5
    contrast_alpha: float = 1.0
    schedule: dict = field(default_factory=lambda: {"kind": "every"})
    privacy: dict = field(default_factory=dict)  # PrivacyConfig fields of the device's gate
    span_policies: tuple[str, ...] = ()  # run each logits setting under each of these span policies
    top_k: int = 10
    max_new_tokens: int = 128
    max_gold_tokens: int = 384
    edge_prompt_tokens: int = 1536
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    batch: int = 8
    large_model: str = "embedded:large"
    small_model: str = "embedded:small"
    json_path: str = "out/eval.json"
    outputs_path: str | None = None
    judge_url: str | None = None
    judge_model: str = "gpt-4-1106-preview"
    judge_api_key: str | None = None

    def validate(self) -> EdgeConfig:
        """Check the options (before loading anything); returns the base edge config."""
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if self.batch < 1:
            raise ConfigError(f"--batch must be at least 1, got {self.batch}")
        if self.max_gold_tokens < 1:
            raise ConfigError(f"--max-gold-tokens must be at least 1, got {self.max_gold_tokens}")
        unknown = [b for b in self.base if b not in BASE_SETTINGS]
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}", hint=f"use some of {', '.join(BASE_SETTINGS)}"
            )
        if not self.base and not self.fusions:
            raise ConfigError("nothing to evaluate: no settings and no fusion methods")
        bad = [m for m in self.fusions if m not in METHODS]
        if bad:
            raise ConfigError(f"unknown fusion method(s) {', '.join(bad)}", hint=f"use some of {', '.join(METHODS)}")
        if "learned" in self.fusions and not self.fusion_checkpoint:
            raise ConfigError(
                "--fusions includes 'learned' but no --fusion-checkpoint was given",
                hint="train one with `cogenesis train-fusion --data PATH`, or drop 'learned'",
            )
        bad_policies = [p for p in self.span_policies if p not in SPAN_POLICIES]
        if bad_policies:
            raise ConfigError(
                f"unknown span policy(ies) {', '.join(bad_policies)}", hint=f"use some of {', '.join(SPAN_POLICIES)}"
            )
        if self.span_policies and not self.fusions:
            raise ConfigError("--span-policies compares logits settings, but no fusion method was given")
        return validate(
            EdgeConfig,
            {
                "small_model": self.small_model,
                "top_k": self.top_k,
                "max_new_tokens": self.max_new_tokens,
                "max_prompt_tokens": self.edge_prompt_tokens,
                "schedule": self.schedule,
                "sampling": {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed},
                "fusion": {"weight": self.fusion_weight, "alpha": self.contrast_alpha},
                "privacy": self.privacy,
            },
            "flags",
        )

    def logits_settings(self) -> dict[str, tuple[str, str | None]]:
        """Each logits setting: its fusion method and span policy (None: the configured one)."""
        if not self.span_policies:
            return {f"logits_{m}": (m, None) for m in self.fusions}
        return {f"logits_{m}/{p}": (m, p) for m in self.fusions for p in self.span_policies}

    def settings(self) -> tuple[str, ...]:
        return tuple(b for b in BASE_SETTINGS if b in self.base) + tuple(self.logits_settings())


@dataclass
class _Acc:
    """One setting's running totals."""

    nll_sum: float = 0.0
    tokens: int = 0
    covered: int = 0
    fused_tokens: int = 0
    rouge: list[float] = field(default_factory=list)
    words: list[int] = field(default_factory=list)
    exposure: list[float] = field(default_factory=list)
    failed: int = 0
    round_trips: int = 0  # logits: cloud exchanges (open + steps)
    generated: int = 0  # logits: tokens written
    held_total: int = 0  # logits: tokens the stream gate held back (written without fusion, no round trip)
    judge: dict[str, list[float]] = field(default_factory=dict)
    # a span policy's setting (the price of privacy)
    refused: int = 0  # sessions the gate ended (span policy refuse)
    held: list[int] = field(default_factory=list)  # per session: tokens not sent as written
    replaced: list[int] = field(default_factory=list)  # per session: private spans sent as the placeholder
    spans_written: list[int] = field(default_factory=list)  # per record: private spans in what the device wrote
    spans_sent: list[int] = field(default_factory=list)  # per record: private spans in the token stream sent


def _logits_cfg(base: EdgeConfig, method: str, policy: str | None, checkpoint: str | None) -> EdgeConfig:
    fusion = base.fusion.model_copy(
        update={"method": method, "checkpoint": checkpoint if method == "learned" else None}
    )
    privacy = base.privacy if policy is None else base.privacy.model_copy(update={"span_policy": policy})
    return base.model_copy(update={"fusion": fusion, "privacy": privacy})


def run_eval(opts: EvalOptions, progress: Progress = _quiet) -> dict:
    """Generate every setting's answers, score them, and return the report (see the module's docstring)."""
    base = opts.validate()
    records = [r for r in load_records(opts.data, opts.limit) if r.gold]
    if not records:
        raise DataError(f"no record in {opts.data} has a gold answer", hint="eval scores against the gold answers")
    t0 = time.perf_counter()
    progress("loading models", 0, 1)
    models = _load_models(opts)
    ev = _Eval.start(opts, base, records, models, progress)
    for b, start in enumerate(range(0, len(records), opts.batch)):
        _generate_batch(ev, list(range(start, min(start + opts.batch, len(records)))), b)
    models.audit.close()
    _score_exposure(ev)
    _score_gold(ev)
    if opts.judge_url:
        _judge(ev, opts.judge_url)
    report = _report(opts, base, ev.settings, ev.acc, len(records), time.perf_counter() - t0)
    if opts.outputs_path:
        _write_outputs(ev.outputs, Path(opts.outputs_path))
        report["outputs"] = opts.outputs_path
    models.audit_path.unlink(missing_ok=True)
    models.audit_path.parent.rmdir()
    return report


# ---- 0. models and the run's state ---------------------------------------------------------------------------


@dataclass
class _Models:
    """The two models as eval uses them: the device's engine, the large model on the device's prompt,
    and the cloud engine called in-process (its audit log is what the cloud model received)."""

    large: PreTrainedModel
    small: PreTrainedModel
    ltok: Any  # transformers tokenizers (one vocabulary)
    stok: Any
    small_eng: EdgeEngine
    large_eng: EdgeEngine
    cloud: TransformersCloudEngine
    audit: AuditLog
    audit_path: Path


def _load_models(opts: EvalOptions) -> _Models:
    large, ltok = load_causal_lm(resolve_model(opts.large_model))
    small, stok = load_causal_lm(resolve_model(opts.small_model))
    check_same_tokenizer(ltok, stok)
    audit_path = Path(tempfile.mkdtemp(prefix="cogenesis-eval-")) / "cloud-audit.jsonl"
    audit = AuditLog(str(audit_path))
    return _Models(
        large,
        small,
        ltok,
        stok,
        EdgeEngine(small, stok, opts.edge_prompt_tokens),
        EdgeEngine(large, ltok, opts.edge_prompt_tokens),  # the large model given the device's prompt
        TransformersCloudEngine(
            large, ltok, audit=audit, active_window_s=0
        ),  # lockstep: evict + recompute, never refuse
        audit,
        audit_path,
    )


@dataclass
class _Eval:
    """One run's state, carried from generation to scoring."""

    opts: EvalOptions
    base: EdgeConfig
    records: list[Record]
    golds: list[str]
    models: _Models
    progress: Progress
    logits: dict[str, tuple[str, str | None]]  # logits setting -> (fusion method, span policy or None)
    cfgs: dict[str, EdgeConfig]  # per logits setting
    fusers: dict[str, Fuser]  # per fusion method
    sched: Schedule
    settings: tuple[str, ...]
    acc: dict[str, _Acc]
    outputs: list[dict]
    sent_by: dict[str, tuple[str, int]] = field(default_factory=dict)  # cloud request/session id -> (setting, record)
    received: dict[tuple[str, int], list[str]] = field(default_factory=dict)  # texts given to the large model directly
    sketches: dict[int, str] = field(default_factory=dict)
    streams: dict[tuple[str, int], dict[int, str]] = field(default_factory=dict)  # (setting, record) -> step -> text
    span_sets: dict[int, PrivateSpans] = field(default_factory=dict)  # record -> its private spans
    generated: int = 0  # (setting, batch) generations done

    @classmethod
    def start(
        cls, opts: EvalOptions, base: EdgeConfig, records: list[Record], models: _Models, progress: Progress
    ) -> _Eval:
        logits = opts.logits_settings()
        cfgs = {s: _logits_cfg(base, m, p, opts.fusion_checkpoint) for s, (m, p) in logits.items()}
        vocab = models.small.config.vocab_size
        settings = opts.settings()
        return cls(
            opts,
            base,
            records,
            [r.gold for r in records if r.gold],
            models,
            progress,
            logits,
            cfgs,
            {m: Fuser(cfgs[s].fusion, cfgs[s].top_k, vocab) for s, (m, _) in logits.items()},
            schedule_of(base),
            settings,
            {s: _Acc() for s in settings},
            [{"tid": r.tid} for r in records],
        )

    def policy(self, setting: str) -> str | None:
        """The span policy a setting compares (None: not a span-policy setting)."""
        return self.logits[setting][1] if setting in self.logits else None

    def spans(self, i: int) -> PrivateSpans:
        """Record ``i``'s private spans, as its device's gate knows them."""
        if i not in self.span_sets:
            self.span_sets[i] = OutboundGate.of_record(self.records[i], self.base.privacy).spans
        return self.span_sets[i]

    def generation_done(self, batch: int) -> None:
        batches = math.ceil(len(self.records) / self.opts.batch)
        self.generated += 1
        self.progress(f"generating (batch {batch + 1}/{batches})", self.generated, batches * len(self.settings))


# ---- 1. generation, a batch of records at a time -------------------------------------------------------------


def _generate_batch(ev: _Eval, idx: list[int], batch: int) -> None:
    recs = [ev.records[i] for i in idx]
    seeds = [None if ev.base.sampling.seed is None else ev.base.sampling.seed + i for i in idx]
    texts = _generate_direct(ev, idx, recs, seeds, batch)
    if "sketch" in ev.settings:
        texts["sketch"] = _generate_sketch(ev, idx, recs)
        ev.generation_done(batch)
    for setting in ev.logits:
        texts[setting] = _generate_logits(ev, setting, idx, recs)
        ev.generation_done(batch)
    for setting, outs in texts.items():
        for i, text in zip(idx, outs):
            ev.acc[setting].rouge.append(rouge_l(text, ev.golds[i]))
            ev.acc[setting].words.append(len(text.split()))
            ev.outputs[i][setting] = text
    for i in idx:
        if i in ev.sketches:
            ev.outputs[i]["sketch_outline"] = ev.sketches[i]


def _generate(ev: _Eval, engine: EdgeEngine, prompt_lists: list[list[int]], seeds: list[int | None]) -> list[str]:
    samp = ev.base.sampling
    out = engine.generate(prompt_lists, ev.opts.max_new_tokens, samp.temperature, samp.top_p, seeds)
    return [engine.tok.decode(o, skip_special_tokens=True).strip() for o in out]


def _generate_direct(
    ev: _Eval, idx: list[int], recs: list[Record], seeds: list[int | None], batch: int
) -> dict[str, list[str]]:
    """The settings without an exchange: each model given its prompt as it is."""
    m = ev.models
    direct = {
        "large_with_context": (m.large_eng, [m.large_eng.prompt_ids(r) for r in recs]),
        "large_without_context": (m.large_eng, [cloud_prompt_ids(m.ltok, r.public_instruction) for r in recs]),
        "small_with_context": (m.small_eng, [m.small_eng.prompt_ids(r) for r in recs]),
    }
    texts = {}
    for setting, (engine, prompt_lists) in direct.items():
        if setting not in ev.settings:
            continue
        if engine is m.large_eng:  # the large model receives its prompt as it is
            for i, ids in zip(idx, prompt_lists):
                ev.received[(setting, i)] = [m.ltok.decode(ids)]
        texts[setting] = _generate(ev, engine, prompt_lists, seeds)
        ev.generation_done(batch)
    return texts


def _generate_sketch(ev: _Eval, idx: list[int], recs: list[Record]) -> list[str]:
    """Sketch sessions of the batch through the edge's sketch path and the in-process cloud."""
    small_eng = ev.models.small_eng
    clients = [EdgeClient(i, r, small_eng, ev.base) for i, r in zip(idx, recs)]
    outlines = EngineOutlines(ev.models.cloud)
    results = write_sketches(clients, outlines, small_eng, ev.base)
    for rid, client in outlines.asked.items():
        ev.sent_by[rid] = ("sketch", client)
    for res in results:
        ev.acc["sketch"].failed += res.error is not None
        if res.sketch is not None:
            ev.sketches[res.client] = res.sketch
    return [res.text if res.error is None else "" for res in results]


def _generate_logits(ev: _Eval, setting: str, idx: list[int], recs: list[Record]) -> list[str]:
    """Logits sessions of the batch through the edge's session loop and the in-process cloud."""
    cfg, small_eng = ev.cfgs[setting], ev.models.small_eng
    clients = [EdgeClient(i, r, small_eng, cfg) for i, r in zip(idx, recs)]
    link = EngineLink(ev.models.cloud)
    results = run_logits_sessions(clients, small_eng, link, cfg)
    for sid, client in link.opened.items():
        ev.sent_by[sid] = (setting, client)
    acc = ev.acc[setting]
    policy = ev.policy(setting) is not None
    for i, res in zip(idx, results):
        refused = policy and res.error_code == "privacy"
        acc.refused += refused
        acc.failed += res.error is not None and not refused
        acc.round_trips += res.round_trips
        acc.generated += res.tokens
        acc.held_total += res.held_tokens
        if policy:
            acc.held.append(res.held_tokens)
            acc.replaced.append(res.private_spans)
            acc.spans_written.append(len(ev.spans(i).find(res.text)))
    return [res.text if res.error is None else "" for res in results]


# ---- 2. what the cloud model received: the engine's audit log, plus the direct prompts --------------------------


def _score_exposure(ev: _Eval) -> None:
    for line in ev.models.audit_path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry["id"] in ev.sent_by:
            sender = ev.sent_by[entry["id"]]
            ev.received.setdefault(sender, []).append(entry["text"])
            if entry["kind"] == "step" and isinstance(entry.get("appended"), str):
                ev.streams.setdefault(sender, {})[int(entry["step"])] = entry["appended"]
    for s in ev.settings:
        for i, r in enumerate(ev.records):
            ev.acc[s].exposure.append(exposure(r, ev.received.get((s, i), [])))
            if ev.policy(s) is not None:  # the token stream the cloud received, step after step
                steps = ev.streams.get((s, i), {})
                ev.acc[s].spans_sent.append(len(ev.spans(i).find("".join(steps[k] for k in sorted(steps)))))


# ---- 3. teacher-forced NLL of the gold answers ----------------------------------------------------------------


def _score_gold(ev: _Eval) -> None:
    for i, r in enumerate(ev.records):
        target = gold_ids(ev.models.stok, r, ev.opts.max_gold_tokens)
        if not target:
            continue
        for s, lp in _gold_logprobs(ev, i, r, target).items():
            if s not in ev.acc:
                continue
            ev.acc[s].nll_sum += float(nll(lp, target).sum())
            ev.acc[s].tokens += len(target)
        ev.progress("scoring gold answers (teacher forced)", i + 1, len(ev.records))


def _gold_logprobs(ev: _Eval, i: int, r: Record, target: list[int]) -> dict[str, torch.Tensor]:
    """Each setting's own next-token log-probs along the gold answer [T, V]."""
    m = ev.models
    s_ctx = teacher_forced(m.small, m.small_eng.prompt_ids(r), target)
    l_noctx = teacher_forced(m.large, cloud_prompt_ids(m.ltok, r.public_instruction), target)
    own: dict[str, torch.Tensor] = {"large_without_context": l_noctx, "small_with_context": s_ctx}
    if "large_with_context" in ev.settings:
        own["large_with_context"] = teacher_forced(m.large, m.large_eng.prompt_ids(r), target)
    if "sketch" in ev.settings and i in ev.sketches:
        own["sketch"] = teacher_forced(m.small, m.small_eng.prompt_ids(r, sketch=ev.sketches[i]), target)
    need_plain = any(f.needs_plain for f in ev.fusers.values())
    plain = teacher_forced(m.small, cloud_prompt_ids(m.stok, r.public_instruction), target) if need_plain else None
    schedule = torch.tensor([ev.sched.fuses(t, s_ctx[t]) for t in range(len(target))])
    for setting, (method, policy) in ev.logits.items():
        if policy is None:  # the cloud sees the gold answer as it is, and fuses where the schedule says
            large, fuse_rows = l_noctx, schedule
        else:
            large, fuse_rows = _gated_rows(ev, r, target, ev.cfgs[setting].privacy)
            fuse_rows = fuse_rows & schedule
        own[setting] = _fused_logprobs(ev, setting, ev.fusers[method], target, s_ctx, plain, large, fuse_rows)
    return own


def _fused_logprobs(
    ev: _Eval,
    setting: str,
    fuser: Fuser,
    target: list[int],
    s_ctx: torch.Tensor,
    plain: torch.Tensor | None,
    large: torch.Tensor,
    fuse_rows: torch.Tensor,
) -> torch.Tensor:
    """The fused distribution where ``fuse_rows`` (the cloud's rows ``large`` [T, V]), the small model's
    elsewhere; counts how often the gold token was a candidate where fused."""
    top = large.topk(ev.opts.top_k, dim=-1)
    gold = torch.tensor(target)
    in_cands = candidate_mask(s_ctx, top.indices).gather(1, gold[:, None])[:, 0]
    fused = fuser(s_ctx, top.indices, top.values, plain, restrict=False)
    ev.acc[setting].covered += int((in_cands & fuse_rows).sum())
    ev.acc[setting].fused_tokens += int(fuse_rows.sum())
    return torch.where(fuse_rows[:, None], fused, s_ctx)


def _gated_rows(ev: _Eval, r: Record, target: list[int], privacy: PrivacyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The gold answer through the session's stream gate under ``privacy``'s span policy: per position, the
    large model's distribution after what the cloud had received by then [T, V], and whether the position
    is fused [T] (not while tokens are held back, nor from a refusal on)."""
    m = ev.models
    stream = OutboundGate.of_record(r, privacy).stream(m.stok)
    released: list[int] = []
    seen: list[int | None] = []  # per position: how many released ids the cloud had (None: not fused)
    ended = False
    for token in target:
        seen.append(None if ended or stream.holding else len(released))
        if not ended:
            try:
                released += stream.push(token)
            except PrivacyViolation:  # span policy refuse: the session ends here
                ended = True
    pad = m.ltok.eos_token_id if m.ltok.eos_token_id is not None else 0  # the row after it is never read
    rows = teacher_forced(m.large, cloud_prompt_ids(m.ltok, r.public_instruction), [*released, pad])
    at = torch.tensor([j if j is not None else 0 for j in seen])
    return rows[at], torch.tensor([j is not None for j in seen])


# ---- 4. optional LLM judge --------------------------------------------------------------------------------------


def _judge(ev: _Eval, url: str) -> None:
    judge = Judge(url, ev.opts.judge_model, ev.opts.judge_api_key)
    n = len(ev.records)
    try:
        for done, (i, s) in enumerate((i, s) for i in range(n) for s in ev.settings):
            for name, rating in judge.score(ev.records[i], ev.outputs[i][s]).items():
                if rating is not None:
                    ev.acc[s].judge.setdefault(name, []).append(rating)
            ev.progress("judging", done + 1, n * len(ev.settings))
    finally:
        judge.close()


def _write_outputs(outputs: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in outputs), encoding="utf-8")


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def _price_of_privacy(policy: str, a: _Acc) -> dict:
    """A span policy's row: what the small model wrote and what the cloud received of the private spans."""
    return {
        "span_policy": policy,
        "private_spans_written": _mean([float(x) for x in a.spans_written]),
        "private_spans_sent": _mean([float(x) for x in a.spans_sent]),
        "spans_replaced": _mean([float(x) for x in a.replaced]),
        "held_tokens": _mean([float(x) for x in a.held]),
        "refused": a.refused,
    }


def _report(opts: EvalOptions, base: EdgeConfig, settings, acc: dict[str, _Acc], n: int, seconds: float) -> dict:
    policies = {s: p for s, (_, p) in opts.logits_settings().items() if p is not None}
    rows = []
    for s in settings:
        a = acc[s]
        mean_nll = a.nll_sum / a.tokens if a.tokens else None
        row = {
            "setting": s,
            "cloud_sees_context": SEES_CONTEXT.get(s, "no"),
            "nll_per_token": round(mean_nll, 4) if mean_nll is not None else None,
            "perplexity": round(math.exp(mean_nll), 2) if mean_nll is not None else None,
            "rouge_l": _mean(a.rouge),
            "words": _mean([float(w) for w in a.words]),
            "exposure": _mean(a.exposure),
            "failed": a.failed,
            "gold_tokens": a.tokens,
        }
        if s.startswith("logits_"):
            row["coverage"] = round(a.covered / a.fused_tokens, 4) if a.fused_tokens else None
            row["round_trips_per_token"] = round(a.round_trips / a.generated, 3) if a.generated else None
            row["held_share"] = round(a.held_total / a.generated, 3) if a.generated else None
        if s in policies:
            row.update(_price_of_privacy(policies[s], a))
        if a.judge:
            row["judge"] = {name: _mean(v) for name, v in a.judge.items()}
        rows.append(row)
    options = {k: v for k, v in asdict(opts).items() if k != "judge_api_key"}
    return {
        "records": n,
        "seconds": round(seconds, 1),
        "options": options,
        "edge": {
            "top_k": base.top_k,
            "schedule": base.schedule.model_dump(),
            "sampling": base.sampling.model_dump(),
            "fusion": base.fusion.model_dump(),
            "sketch": base.sketch.model_dump(),
            "privacy": base.privacy.model_dump(),
        },
        "settings": rows,
    }
