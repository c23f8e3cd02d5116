"""Training the learned fusion: the candidate set, the loss, and a real training run on tiny models."""

import json
import math

import pytest
import torch

from cogenesis.apps import fusion_train as ft
from cogenesis.core.config import FusionConfig
from cogenesis.core.errors import ConfigError, DataError
from cogenesis.core.fusion import candidate_mask, fuse_constant
from cogenesis.core.fusion_net import Fuser, load
from cogenesis.core.models import load_causal_lm
from cogenesis.edge_sim.engine import EdgeEngine

V, K = 50, 4


def _positions(n: int, seed: int, records: int = 5, gold_from=None) -> tuple[ft.Positions, torch.Tensor]:
    """Random positions from full distributions (returned too), gold drawn from ``gold_from`` (default: small)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randn(n, V, generator=g).mul(2).log_softmax(-1)
    large = torch.randn(n, V, generator=g).mul(2).log_softmax(-1)
    src = small if gold_from is None else gold_from(small, large)
    gold = torch.multinomial(src.exp(), 1, generator=g)[:, 0]
    s, lg = small.topk(K, dim=-1), large.topk(K, dim=-1)
    pos = ft.Positions(
        s.indices,
        s.values,
        lg.indices,
        lg.values,
        small.gather(1, lg.indices),
        gold,
        small.gather(1, gold[:, None])[:, 0],
        torch.arange(n) % records,
    )
    return pos, small


def test_candidate_nll_equals_the_runtime_fusion_where_gold_is_a_candidate():
    pos, small = _positions(200, 0)
    runtime = fuse_constant(small, pos.l_ids, pos.l_lp, 0.3)  # [N, V], the device's distribution
    inside = candidate_mask(small, pos.l_ids).gather(1, pos.gold[:, None])[:, 0]
    assert inside.any() and (~inside).any()
    expected = -runtime.gather(1, pos.gold[:, None])[:, 0]
    got = ft.fused_nll(pos, 0.3)
    assert torch.allclose(got[inside], expected[inside], atol=1e-4)
    assert torch.isfinite(got).all()  # the gold token is always a candidate in training


def test_candidates_are_unique_and_the_target_is_the_gold_token():
    pos, _ = _positions(100, 1)
    z_small, z_large, valid, target = ft.candidates(pos)
    ids = torch.cat([pos.s_ids, pos.l_ids, pos.gold[:, None]], dim=1)
    for row in range(100):
        kept = ids[row][valid[row]].tolist()
        assert len(kept) == len(set(kept)) == len(set(ids[row].tolist()))
        assert ids[row, target[row]] == pos.gold[row] and valid[row, target[row]]
    unlisted = ~(ids[:, :, None] == pos.l_ids[:, None, :]).any(-1)
    assert torch.all(z_large[unlisted] <= -20.0)  # unlisted by the cloud: the floor (or lower)


@pytest.mark.parametrize("side", ["small", "large"])
def test_training_learns_which_side_to_trust(side):
    # gold tokens are (nearly always) the top token of one side: the network should learn to trust that side
    sharpen = (lambda s, lg: (s * 20).log_softmax(-1)) if side == "small" else (lambda s, lg: (lg * 20).log_softmax(-1))
    pos, _ = _positions(3000, 2, records=20, gold_from=sharpen)
    result = ft.train(pos, V, K, ft.TrainOptions(epochs=40, patience=40, lr=1e-2, seed=0))
    best = result.history[result.best_epoch]["dev_nll"]
    assert best < result.baselines["constant_w0.5"]
    assert best < result.history[0]["dev_nll"]
    with torch.no_grad():
        w = float(result.net.weight(pos.s_ids, pos.s_lp, pos.l_ids, pos.l_lp).mean())
    assert w > 0.5 if side == "small" else w < 0.5


def test_split_keeps_records_together():
    pos, _ = _positions(100, 3, records=10)
    tr, dev = ft.split(pos, 0.2, seed=0)
    assert len(tr) + len(dev) == 100
    assert not set(tr.record.tolist()) & set(dev.record.tolist())
    with pytest.raises(DataError, match="at least 2 records"):
        ft.split(pos.select(pos.record == 0), 0.2, 0)


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        ({"variant": "big"}, "--variant"),
        ({"dev_fraction": 1.0}, "--dev-fraction"),
        ({"epochs": 0}, "--epochs"),
        ({"lr": -1.0}, "--lr"),
    ],
)
def test_bad_options(kwargs, flag):
    with pytest.raises(ConfigError, match=flag):
        ft.TrainOptions(**kwargs).validate()


@pytest.mark.parametrize("variant", ["compact", "paper"])
def test_extract_and_train_on_tiny_models(tiny_large, tiny_small, sample_records, tmp_path, variant):
    large, ltok = load_causal_lm(str(tiny_large))
    small, stok = load_causal_lm(str(tiny_small))
    seen = []
    pos = ft.extract(
        small,
        large,
        stok,
        ltok,
        EdgeEngine(small, stok, 256),
        sample_records[:4],
        5,
        24,
        lambda s, d, n: seen.append((s, d, n)),
    )
    assert seen[-1] == ("extract", 4, 4) and len(pos) == 4 * 24
    assert torch.equal(pos.s_lp, pos.s_lp.sort(dim=-1, descending=True).values)
    result = ft.train(
        pos,
        small.config.vocab_size,
        5,
        ft.TrainOptions(variant=variant, epochs=15, patience=15, batch_size=16, dev_fraction=0.25),
    )
    train_losses = [h["train_nll"] for h in result.history[1:]]
    assert train_losses[-1] < train_losses[0]  # the loss decreases
    path, json_path = ft.save_result(result, tmp_path / "f.pt", {"data": "sample"})
    net, meta = load(path, k=5, vocab=small.config.vocab_size)
    assert meta["best_epoch"] == result.best_epoch and meta["data"] == "sample"
    assert json.loads(json_path.read_text()) == {**meta, "checkpoint": str(path)}
    fuser = Fuser(FusionConfig(method="learned", checkpoint=str(path)), k=5, vocab=small.config.vocab_size)
    lp = torch.randn(2, small.config.vocab_size).log_softmax(-1)
    top = lp.topk(5)
    assert math.isclose(float(fuser(lp, top.indices, top.values).exp().sum(-1)[0]), 1.0, abs_tol=1e-4)


def test_extract_needs_gold_answers(tiny_large, tiny_small, sample_records):
    from dataclasses import replace

    large, ltok = load_causal_lm(str(tiny_large))
    small, stok = load_causal_lm(str(tiny_small))
    no_gold = [replace(r, gold=None) for r in sample_records[:2]]
    with pytest.raises(DataError, match="gold answer"):
        ft.extract(small, large, stok, ltok, EdgeEngine(small, stok, 256), no_gold, 5, 8)
