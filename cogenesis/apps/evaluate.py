"""``cogenesis eval``: the paper's Table 1 on any model pair, on records in the CoGenesis format.

Settings (each writes an answer per record, and is scored on the gold answer):
- ``large_with_context``: the large model given everything (a reference: the context is not private here);
- ``large_without_context``: the large model given the public instruction only;
- ``small_with_context``: the device's small model alone, with the private context;
- ``sketch``: the cloud outlines the public instruction, the small model writes from outline + context;
- ``logits_<method>``: logits-mode collaboration with fusion ``method`` (``cogenesis.core.fusion``).

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
from typing import TYPE_CHECKING, Any

import torch

from cogenesis.apps.engine_link import EngineLink
from cogenesis.apps.engine_outlines import EngineOutlines
from cogenesis.apps.scoring import Judge, exposure, rouge_l
from cogenesis.apps.teacher import gold_ids, nll, teacher_forced
from cogenesis.core.config import EdgeConfig, validate
from cogenesis.core.data import Record, load_records
from cogenesis.core.errors import ConfigError, DataError
from cogenesis.core.fusion import METHODS, candidate_mask
from cogenesis.core.fusion_net import Fuser
from cogenesis.core.models import check_same_tokenizer, load_causal_lm, resolve_model
from cogenesis.core.prompts import cloud_prompt_ids
from cogenesis.core.schedules import Schedule
from cogenesis.deployments.audit import AuditLog
from cogenesis.deployments.engine import TransformersCloudEngine
from cogenesis.edge_sim.client import EdgeClient
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.logits import run_logits_sessions, schedule_of
from cogenesis.edge_sim.sketch import write_sketches

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

BASE_SETTINGS = ("large_with_context", "large_without_context", "small_with_context", "sketch")
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
            },
            "flags",
        )

    def settings(self) -> tuple[str, ...]:
        return tuple(b for b in BASE_SETTINGS if b in self.base) + tuple(f"logits_{m}" for m in self.fusions)


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
    judge: dict[str, list[float]] = field(default_factory=dict)


def _fusion_cfg(base: EdgeConfig, method: str, checkpoint: str | None) -> EdgeConfig:
    fusion = base.fusion.model_copy(
        update={"method": method, "checkpoint": checkpoint if method == "learned" else None}
    )
    return base.model_copy(update={"fusion": fusion})


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
        TransformersCloudEngine(large, ltok, audit=audit),
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
    cfgs: dict[str, EdgeConfig]  # per fusion method
    fusers: dict[str, Fuser]  # per fusion method
    sched: Schedule
    settings: tuple[str, ...]
    acc: dict[str, _Acc]
    outputs: list[dict]
    sent_by: dict[str, tuple[str, int]] = field(default_factory=dict)  # cloud request/session id -> (setting, record)
    received: dict[tuple[str, int], list[str]] = field(default_factory=dict)  # texts given to the large model directly
    sketches: dict[int, str] = field(default_factory=dict)
    generated: int = 0  # (setting, batch) generations done

    @classmethod
    def start(
        cls, opts: EvalOptions, base: EdgeConfig, records: list[Record], models: _Models, progress: Progress
    ) -> _Eval:
        cfgs = {m: _fusion_cfg(base, m, opts.fusion_checkpoint) for m in opts.fusions}
        vocab = models.small.config.vocab_size
        settings = opts.settings()
        return cls(
            opts,
            base,
            records,
            [r.gold for r in records if r.gold],
            models,
            progress,
            cfgs,
            {m: Fuser(c.fusion, c.top_k, vocab) for m, c in cfgs.items()},
            schedule_of(base),
            settings,
            {s: _Acc() for s in settings},
            [{"tid": r.tid} for r in records],
        )

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
    for method in ev.opts.fusions:
        texts[f"logits_{method}"] = _generate_logits(ev, method, idx, recs)
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


def _generate_logits(ev: _Eval, method: str, idx: list[int], recs: list[Record]) -> list[str]:
    """Logits sessions of the batch through the edge's session loop and the in-process cloud."""
    setting, cfg, small_eng = f"logits_{method}", ev.cfgs[method], ev.models.small_eng
    clients = [EdgeClient(i, r, small_eng, cfg) for i, r in zip(idx, recs)]
    link = EngineLink(ev.models.cloud)
    results = run_logits_sessions(clients, small_eng, link, cfg)
    for sid, client in link.opened.items():
        ev.sent_by[sid] = (setting, client)
    acc = ev.acc[setting]
    for res in results:
        acc.failed += res.error is not None
        acc.round_trips += res.round_trips
        acc.generated += res.tokens
    return [res.text if res.error is None else "" for res in results]


# ---- 2. what the cloud model received: the engine's audit log, plus the direct prompts --------------------------


def _score_exposure(ev: _Eval) -> None:
    for line in ev.models.audit_path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry["id"] in ev.sent_by:
            ev.received.setdefault(ev.sent_by[entry["id"]], []).append(entry["text"])
    for s in ev.settings:
        for i, r in enumerate(ev.records):
            ev.acc[s].exposure.append(exposure(r, ev.received.get((s, i), [])))


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
    own = {"large_without_context": l_noctx, "small_with_context": s_ctx}
    if "large_with_context" in ev.settings:
        own["large_with_context"] = teacher_forced(m.large, m.large_eng.prompt_ids(r), target)
    if "sketch" in ev.settings and i in ev.sketches:
        own["sketch"] = teacher_forced(m.small, m.small_eng.prompt_ids(r, sketch=ev.sketches[i]), target)
    own.update(_fused_logprobs(ev, r, target, s_ctx, l_noctx))
    return own


def _fused_logprobs(
    ev: _Eval, r: Record, target: list[int], s_ctx: torch.Tensor, l_noctx: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Every fusion method's distribution where the schedule fuses (the small model's elsewhere); counts how
    often the gold token was a candidate."""
    m = ev.models
    need_plain = any(f.needs_plain for f in ev.fusers.values())
    plain = teacher_forced(m.small, cloud_prompt_ids(m.stok, r.public_instruction), target) if need_plain else None
    top = l_noctx.topk(ev.opts.top_k, dim=-1)
    fuse_rows = torch.tensor([ev.sched.fuses(t, s_ctx[t]) for t in range(len(target))])
    gold = torch.tensor(target)
    in_cands = candidate_mask(s_ctx, top.indices).gather(1, gold[:, None])[:, 0]
    own = {}
    for method, fuser in ev.fusers.items():
        fused = fuser(s_ctx, top.indices, top.values, plain, restrict=False)
        own[f"logits_{method}"] = torch.where(fuse_rows[:, None], fused, s_ctx)
        ev.acc[f"logits_{method}"].covered += int((in_cands & fuse_rows).sum())
        ev.acc[f"logits_{method}"].fused_tokens += int(fuse_rows.sum())
    return own


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


def _report(opts: EvalOptions, base: EdgeConfig, settings, acc: dict[str, _Acc], n: int, seconds: float) -> dict:
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
        },
        "settings": rows,
    }
