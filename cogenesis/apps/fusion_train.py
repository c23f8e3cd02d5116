"""``cogenesis train-fusion``: train the learned fusion weight (``cogenesis.core.fusion_net.FusionNet``).

1. Extract: for each record with a gold answer, teacher-force it through the small model *with*
   the private context and the large model *without* it (the cloud's view), and keep, per gold
   position, what fusion would have: the small model's top-K, the large model's top-K, the small
   model's log-probs at the large top-K ids, and the gold token with the small model's log-prob.
2. Train: the fused distribution over the candidate set (small top-K + large top-K + the gold
   token, so the loss is always finite) is ``fusion.mix`` with w from the network; minimise the
   cross-entropy of the gold token. Records are split into train/dev; the best dev epoch is kept
   and training stops after ``patience`` epochs without improvement.
3. Save a checkpoint with the network's config and what it was trained on.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cogenesis.apps.teacher import gold_ids, teacher_forced
from cogenesis.core.data import Record
from cogenesis.core.errors import ConfigError, DataError
from cogenesis.core.fusion import DEFAULT_FLOOR, mix
from cogenesis.core.fusion_net import VARIANTS, FusionNet, save
from cogenesis.core.prompts import cloud_prompt_ids

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _quiet(stage: str, done: int, total: int) -> None:
    pass


@dataclass
class Positions:
    """Extracted teacher-forced positions, N rows; ``record`` says which record each came from."""

    s_ids: torch.Tensor  # [N, K] small top-K ids (with context)
    s_lp: torch.Tensor  # [N, K]
    l_ids: torch.Tensor  # [N, K] large top-K ids (without context)
    l_lp: torch.Tensor  # [N, K]
    s_at_l: torch.Tensor  # [N, K] small log-probs at l_ids
    gold: torch.Tensor  # [N]
    s_gold: torch.Tensor  # [N] small log-prob of the gold token
    record: torch.Tensor  # [N] record index

    def __len__(self) -> int:
        return self.gold.shape[0]

    def select(self, rows: torch.Tensor) -> Positions:
        return Positions(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))

    @staticmethod
    def cat(parts: list[Positions]) -> Positions:
        return Positions(*(torch.cat([getattr(p, f) for p in parts]) for f in Positions.__dataclass_fields__))


def extract(
    small,
    large,
    small_tok,
    large_tok,
    edge_engine,
    records: list[Record],
    k: int,
    max_gold_tokens: int,
    progress: Progress = _quiet,
) -> Positions:
    """Teacher-forced top-K of both models on every record's gold answer (see the module docstring)."""
    parts = []
    usable = [r for r in records if r.gold]
    if not usable:
        raise DataError("no record has a gold answer to train on", hint="pass a CoGenesis file with assistant answers")
    for i, record in enumerate(usable):
        target = gold_ids(small_tok, record, max_gold_tokens)
        if not target or gold_ids(large_tok, record, max_gold_tokens) != target:
            raise DataError(
                f"record {record.tid}: the two models tokenize the gold answer differently",
                hint="logits fusion needs one shared vocabulary",
            )
        s_lp = teacher_forced(small, edge_engine.prompt_ids(record), target)  # [T, V]
        l_lp = teacher_forced(large, cloud_prompt_ids(large_tok, record.public_instruction), target)
        s_top, l_top = s_lp.topk(k, dim=-1), l_lp.topk(k, dim=-1)
        gold = torch.tensor(target, dtype=torch.long)
        parts.append(
            Positions(
                s_top.indices,
                s_top.values,
                l_top.indices,
                l_top.values,
                s_lp.gather(1, l_top.indices),
                gold,
                s_lp.gather(1, gold[:, None])[:, 0],
                torch.full((len(target),), i, dtype=torch.long),
            )
        )
        progress("extract", i + 1, len(usable))
    return Positions.cat(parts)


def candidates(p: Positions, floor: float = DEFAULT_FLOOR):
    """The fusion candidate set of each position plus its gold token, as [N, C] slots (C = 2K + 1).

    Returns (z_small, z_large, valid, target): the small model's log-probs at each slot, the large
    model's as the device sees them (its top-K value, else the floor, as ``dense_large_logprobs``),
    which slots are first occurrences of their id, and the slot index of the gold token.
    """
    ids = torch.cat([p.s_ids, p.l_ids, p.gold[:, None]], dim=1)  # [N, C]
    z_small = torch.cat([p.s_lp, p.s_at_l, p.s_gold[:, None]], dim=1).float()
    hit = ids[:, :, None] == p.l_ids[:, None, :]  # [N, C, K]
    row_floor = torch.minimum(p.l_lp.float().min(dim=-1).values, torch.tensor(floor))[:, None]
    listed = p.l_lp.float().gather(1, hit.float().argmax(dim=-1))  # large value where listed
    z_large = torch.where(hit.any(dim=-1), listed, row_floor.expand_as(listed))
    same = ids[:, :, None] == ids[:, None, :]  # [N, C, C]
    earlier = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril(-1)
    valid = ~(same & earlier).any(dim=-1)
    target = (ids == p.gold[:, None]).float().argmax(dim=-1)  # first slot holding the gold id
    return z_small, z_large, valid, target


def fused_nll(p: Positions, weight: torch.Tensor | float, floor: float = DEFAULT_FLOOR) -> torch.Tensor:
    """Per-position NLL [N] of the gold token under the candidate-set mixture with ``weight``."""
    z_small, z_large, valid, target = candidates(p, floor)
    return -mix(z_small, z_large, weight, valid).gather(1, target[:, None])[:, 0]


def net_nll(net: FusionNet, p: Positions) -> torch.Tensor:
    w = net.weight(p.s_ids, p.s_lp, p.l_ids, p.l_lp)
    return fused_nll(p, w, net.floor)


@dataclass
class TrainOptions:
    variant: str = "compact"
    hidden: int = 64
    epochs: int = 100
    patience: int = 5
    batch_size: int = 256
    lr: float = 2e-3
    dev_fraction: float = 0.2
    seed: int = 0
    floor: float = DEFAULT_FLOOR

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"--variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
        if not 0.0 < self.dev_fraction < 1.0:
            raise ConfigError(f"--dev-fraction must be in (0, 1), got {self.dev_fraction}")
        for name in ("hidden", "epochs", "patience", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")


@dataclass
class TrainResult:
    net: FusionNet
    history: list[dict] = field(default_factory=list)  # per epoch: train_nll, dev_nll
    best_epoch: int = 0
    baselines: dict = field(default_factory=dict)  # dev NLL of fixed weights, for comparison
    train_positions: int = 0
    dev_positions: int = 0
    seconds: float = 0.0


def split(p: Positions, dev_fraction: float, seed: int) -> tuple[Positions, Positions]:
    """Train/dev by record (a record's positions stay together)."""
    ids = sorted(set(p.record.tolist()))
    if len(ids) < 2:
        raise DataError(
            "training needs at least 2 records with gold answers (one for the dev split)", hint="raise --limit"
        )
    random.Random(seed).shuffle(ids)
    n_dev = min(len(ids) - 1, max(1, round(len(ids) * dev_fraction)))
    dev = torch.isin(p.record, torch.tensor(ids[:n_dev]))
    return p.select(~dev), p.select(dev)


def train(p: Positions, vocab: int, k: int, opts: TrainOptions, progress: Progress = _quiet) -> TrainResult:
    opts.validate()
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    tr, dev = split(p, opts.dev_fraction, opts.seed)
    net = FusionNet(
        opts.variant, k=k, vocab=vocab if opts.variant == "paper" else 0, hidden=opts.hidden, floor=opts.floor
    )
    optim = torch.optim.Adam(net.parameters(), lr=opts.lr)
    result = TrainResult(net, train_positions=len(tr), dev_positions=len(dev))
    with torch.no_grad():
        result.baselines = {
            f"constant_w{w:g}": round(float(fused_nll(dev, w, opts.floor).mean()), 4)
            for w in (0.0, 0.25, 0.5, 0.75, 1.0)
        }
        best = float(net_nll(net, dev).mean())
    result.history.append({"epoch": 0, "train_nll": None, "dev_nll": round(best, 4)})
    best_state, since_best = {k_: v.clone() for k_, v in net.state_dict().items()}, 0
    gen = torch.Generator().manual_seed(opts.seed)
    for epoch in range(1, opts.epochs + 1):
        net.train()
        order = torch.randperm(len(tr), generator=gen)
        total, seen = 0.0, 0
        for start in range(0, len(tr), opts.batch_size):
            batch = tr.select(order[start : start + opts.batch_size])
            loss = net_nll(net, batch).mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
        net.eval()
        with torch.no_grad():
            dev_nll = float(net_nll(net, dev).mean())
        result.history.append({"epoch": epoch, "train_nll": round(total / seen, 4), "dev_nll": round(dev_nll, 4)})
        log.info("fusion epoch %d: train NLL %.4f, dev NLL %.4f", epoch, total / seen, dev_nll)
        progress("train", epoch, opts.epochs)
        if dev_nll < best - 1e-4:
            best, since_best, result.best_epoch = dev_nll, 0, epoch
            best_state = {k_: v.clone() for k_, v in net.state_dict().items()}
        else:
            since_best += 1
            if since_best >= opts.patience:
                break
    net.load_state_dict(best_state)
    net.eval()
    result.seconds = time.perf_counter() - t0
    return result


def save_result(result: TrainResult, path: str | Path, meta: dict) -> tuple[Path, Path]:
    """Write the checkpoint and, beside it (.json), a summary holding the same facts; returns both paths."""
    summary = {
        **meta,
        "parameters": result.net.n_parameters(),
        "best_epoch": result.best_epoch,
        "dev_nll": result.history[result.best_epoch]["dev_nll"],
        "dev_baselines": result.baselines,
        "history": result.history,
        "train_positions": result.train_positions,
        "dev_positions": result.dev_positions,
        "seconds": round(result.seconds, 2),
    }
    path = save(result.net, path, summary)
    json_path = path.with_suffix(".json")
    json_path.write_text(json.dumps({**summary, "checkpoint": str(path)}, indent=1))
    return path, json_path
