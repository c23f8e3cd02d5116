"""``cogenesis eval``: the paper's Table 1 on any model pair, on records in the CoGenesis format.

Settings (each writes an answer per record, and is scored on the gold answer):
- ``large_with_context``: the large model given everything (a reference: the context is not private here);
- ``large_without_context``: the large model given the public instruction only;
- ``small_with_context``: the device's small model alone, with the private context;
- ``sketch``: the cloud outlines the public instruction, the small model writes from outline + context;
- ``logits_<method>``: logits-mode collaboration with fusion ``method`` (``cogenesis.core.fusion``).

The cloud is the real ``TransformersCloudEngine`` called in-process (``cogenesis.edge_sim.links.EngineLink``):
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
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cogenesis.apps.scoring import Judge, exposure, rouge_l
from cogenesis.apps.teacher import gold_ids, nll, teacher_forced
from cogenesis.core.config import EdgeConfig, validate
from cogenesis.core.data import Record, load_records
from cogenesis.core.errors import ConfigError, DataError
from cogenesis.core.fusion import METHODS, candidate_mask
from cogenesis.core.fusion_net import Fuser
from cogenesis.core.prompts import cloud_prompt_ids
from cogenesis.core.protocol import SketchRequest
from cogenesis.edge_sim.gate import OutboundGate

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
    from cogenesis.core.models import check_same_tokenizer, load_causal_lm, resolve_model
    from cogenesis.deployments.audit import AuditLog
    from cogenesis.deployments.engine import TransformersCloudEngine
    from cogenesis.edge_sim.client import EdgeClient
    from cogenesis.edge_sim.engine import EdgeEngine
    from cogenesis.edge_sim.links import EngineLink
    from cogenesis.edge_sim.logits import run_logits_sessions, schedule_of

    base = opts.validate()
    records = [r for r in load_records(opts.data, opts.limit) if r.gold]
    if not records:
        raise DataError(f"no record in {opts.data} has a gold answer", hint="eval scores against the gold answers")
    t0 = time.perf_counter()
    progress("loading models", 0, 1)
    large, ltok = load_causal_lm(resolve_model(opts.large_model))
    small, stok = load_causal_lm(resolve_model(opts.small_model))
    check_same_tokenizer(ltok, stok)
    cfgs = {m: _fusion_cfg(base, m, opts.fusion_checkpoint) for m in opts.fusions}
    fusers = {m: Fuser(c.fusion, c.top_k, small.config.vocab_size) for m, c in cfgs.items()}
    sched = schedule_of(base)
    small_eng = EdgeEngine(small, stok, opts.edge_prompt_tokens)
    large_eng = EdgeEngine(large, ltok, opts.edge_prompt_tokens)  # the large model given the device's prompt
    work = Path(tempfile.mkdtemp(prefix="cogenesis-eval-"))
    audit_path = work / "cloud-audit.jsonl"
    audit = AuditLog(str(audit_path))
    cloud = TransformersCloudEngine(large, ltok, audit=audit)
    settings = opts.settings()
    acc = {s: _Acc() for s in settings}
    outputs: list[dict] = [{"tid": r.tid} for r in records]
    sent_by: dict[str, tuple[str, int]] = {}  # cloud request/session id -> (setting, record index)
    received: dict[tuple[str, int], list[str]] = {}  # texts the large model got outside the engine
    sketches: dict[int, str] = {}
    samp = base.sampling
    total_batches = math.ceil(len(records) / opts.batch)
    steps, done = total_batches * len(settings), 0

    # ---- 1. generation, a batch of records at a time -------------------------------------------------
    for b, start in enumerate(range(0, len(records), opts.batch)):
        idx = list(range(start, min(start + opts.batch, len(records))))
        recs = [records[i] for i in idx]
        seeds = [None if samp.seed is None else samp.seed + i for i in idx]

        def gen(engine, prompt_lists):
            out = engine.generate(prompt_lists, opts.max_new_tokens, samp.temperature, samp.top_p, seeds)  # noqa: B023 (used within the iteration)
            return [engine.tok.decode(o, skip_special_tokens=True).strip() for o in out]

        stage = f"generating (batch {b + 1}/{total_batches})"
        direct = {
            "large_with_context": (large_eng, [large_eng.prompt_ids(r) for r in recs]),
            "large_without_context": (large_eng, [cloud_prompt_ids(ltok, r.public_instruction) for r in recs]),
            "small_with_context": (small_eng, [small_eng.prompt_ids(r) for r in recs]),
        }
        texts = {}
        for setting, (engine, prompt_lists) in direct.items():
            if setting not in settings:
                continue
            if engine is large_eng:  # the large model receives its prompt as it is
                for i, ids in zip(idx, prompt_lists):
                    received[(setting, i)] = [ltok.decode(ids)]
            texts[setting] = gen(engine, prompt_lists)
            done += 1
            progress(stage, done, steps)
        if "sketch" in settings:
            _sketch_batch(cloud, base, idx, recs, seeds, sent_by, sketches)
            texts["sketch"] = gen(small_eng, [small_eng.prompt_ids(r, sketch=sketches[i]) for i, r in zip(idx, recs)])
            done += 1
            progress(stage, done, steps)
        for method in opts.fusions:
            setting = f"logits_{method}"
            clients = [EdgeClient(i, r, small_eng, cfgs[method]) for i, r in zip(idx, recs)]
            link = EngineLink(cloud)
            results = run_logits_sessions(clients, small_eng, link, cfgs[method])
            for sid, client in link.opened.items():
                sent_by[sid] = (setting, client)
            texts[setting] = []
            for res in results:
                acc[setting].failed += res.error is not None
                acc[setting].round_trips += res.round_trips
                acc[setting].generated += res.tokens
                texts[setting].append(res.text if res.error is None else "")
            done += 1
            progress(stage, done, steps)
        for setting, outs in texts.items():
            for i, text in zip(idx, outs):
                acc[setting].rouge.append(rouge_l(text, records[i].gold))
                acc[setting].words.append(len(text.split()))
                outputs[i][setting] = text
        for i in idx:
            if i in sketches:
                outputs[i]["sketch_outline"] = sketches[i]
    audit.close()

    # ---- 2. what the cloud model received: the engine's audit log, plus the direct prompts ---------------
    for line in audit_path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry["id"] in sent_by:
            received.setdefault(sent_by[entry["id"]], []).append(entry["text"])
    for s in settings:
        for i, r in enumerate(records):
            acc[s].exposure.append(exposure(r, received.get((s, i), [])))

    # ---- 3. teacher-forced NLL of the gold answers ------------------------------------------------------
    need_plain = any(f.needs_plain for f in fusers.values())
    for i, r in enumerate(records):
        target = gold_ids(stok, r, opts.max_gold_tokens)
        if not target:
            continue
        s_ctx = teacher_forced(small, small_eng.prompt_ids(r), target)
        l_noctx = teacher_forced(large, cloud_prompt_ids(ltok, r.public_instruction), target)
        own = {"large_without_context": l_noctx, "small_with_context": s_ctx}
        if "large_with_context" in settings:
            own["large_with_context"] = teacher_forced(large, large_eng.prompt_ids(r), target)
        if "sketch" in settings:
            own["sketch"] = teacher_forced(small, small_eng.prompt_ids(r, sketch=sketches[i]), target)
        plain = teacher_forced(small, cloud_prompt_ids(stok, r.public_instruction), target) if need_plain else None
        top = l_noctx.topk(opts.top_k, dim=-1)
        fuse_rows = torch.tensor([sched.fuses(t, s_ctx[t]) for t in range(len(target))])
        gold = torch.tensor(target)
        in_cands = candidate_mask(s_ctx, top.indices).gather(1, gold[:, None])[:, 0]
        for m, fuser in fusers.items():
            fused = fuser(s_ctx, top.indices, top.values, plain, restrict=False)
            own[f"logits_{m}"] = torch.where(fuse_rows[:, None], fused, s_ctx)
            acc[f"logits_{m}"].covered += int((in_cands & fuse_rows).sum())
            acc[f"logits_{m}"].fused_tokens += int(fuse_rows.sum())
        for s, lp in own.items():
            if s not in acc:
                continue
            acc[s].nll_sum += float(nll(lp, target).sum())
            acc[s].tokens += len(target)
        progress("scoring gold answers (teacher forced)", i + 1, len(records))

    # ---- 4. optional LLM judge ----------------------------------------------------------------------------
    if opts.judge_url:
        judge = Judge(opts.judge_url, opts.judge_model, opts.judge_api_key)
        try:
            for n, (i, s) in enumerate((i, s) for i in range(len(records)) for s in settings):
                for name, rating in judge.score(records[i], outputs[i][s]).items():
                    if rating is not None:
                        acc[s].judge.setdefault(name, []).append(rating)
                progress("judging", n + 1, len(records) * len(settings))
        finally:
            judge.close()

    report = _report(opts, base, settings, acc, len(records), time.perf_counter() - t0)
    if opts.outputs_path:
        Path(opts.outputs_path).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.outputs_path).write_text(
            "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in outputs), encoding="utf-8"
        )
        report["outputs"] = opts.outputs_path
    audit_path.unlink(missing_ok=True)
    work.rmdir()
    return report


def _sketch_batch(
    cloud, base: EdgeConfig, idx: list[int], recs: list[Record], seeds, sent_by: dict, sketches: dict
) -> None:
    """Outlines for a batch from the cloud engine, each request sealed by its client's gate first."""
    requests = []
    for i, r, seed in zip(idx, recs, seeds):
        req = SketchRequest(
            request_id=uuid.uuid4().hex,
            instruction=r.public_instruction,
            kind=r.kind,
            max_tokens=base.sketch_max_tokens,
            temperature=base.sketch.temperature,
            top_p=base.sketch.top_p,
            repetition_penalty=base.sketch.repetition_penalty,
            seed=seed,
        )
        OutboundGate(r.public_instruction, r.private_fields()).seal_json(req)  # what the client would send
        requests.append(req)
        sent_by[req.request_id] = ("sketch", i)
    for i, reply in zip(idx, cloud.sketch(requests)):
        sketches[i] = reply.sketch


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
