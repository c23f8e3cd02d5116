"""Unit tests for cogenesis.core.fusion: fixed-weight fusion of the small model's full distribution
with the cloud's top-K, over the candidate set (union of both top-Ks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cogenesis.core.fusion import DEFAULT_FLOOR, candidate_mask, dense_large_logprobs, fuse_constant
from cogenesis.core.protocol import pack_ids, pack_logprobs, unpack_ids, unpack_logprobs

B, V, K = 3, 24, 4


def _inputs(seed: int = 0, b: int = B, v: int = V, k: int = K):
    g = torch.Generator().manual_seed(seed)
    small_lp = torch.log_softmax(torch.randn(b, v, generator=g) * 2.0, dim=-1)
    large_logits = torch.randn(b, v, generator=g) * 2.0
    top = torch.log_softmax(large_logits, dim=-1).topk(k, dim=-1)
    return small_lp, top.indices, top.values


def _expected_mask(small_lp, large_ids, k):
    mask = torch.zeros_like(small_lp, dtype=torch.bool)
    for b in range(small_lp.shape[0]):
        for t in small_lp[b].topk(k).indices.tolist():
            mask[b, t] = True
        for t in large_ids[b].tolist():
            mask[b, t] = True
    return mask


@pytest.mark.parametrize("weight", [0.0, 0.25, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_output_is_normalised(weight, seed):
    small_lp, ids, lps = _inputs(seed)
    fused = fuse_constant(small_lp, ids, lps, weight)
    assert fused.shape == (B, V)
    assert not torch.isnan(fused).any()
    torch.testing.assert_close(fused.exp().sum(-1), torch.ones(B), atol=1e-5, rtol=0)


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 3, 7])
def test_minus_inf_exactly_outside_candidate_union(weight, seed):
    small_lp, ids, lps = _inputs(seed)
    fused = fuse_constant(small_lp, ids, lps, weight)
    expected = _expected_mask(small_lp, ids, K)
    assert torch.equal(torch.isfinite(fused), expected)
    assert torch.equal(torch.isneginf(fused), ~expected)
    # the union is strictly bigger than either top-k on this random data, so both sides matter
    assert (expected.sum(-1) > K).all()


def test_candidate_mask_is_union_of_both_topks():
    small_lp = torch.log_softmax(torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0]]), -1)
    large_ids = torch.tensor([[7, 6]])
    mask = candidate_mask(small_lp, large_ids)  # k defaults to K = 2
    assert mask.tolist() == [[True, True, False, False, False, False, True, True]]
    mask3 = candidate_mask(small_lp, large_ids, k=3)
    assert mask3.tolist() == [[True, True, True, False, False, False, True, True]]


def test_weight_one_reproduces_small_ranking_on_candidates():
    small_lp, ids, lps = _inputs(11)
    fused = fuse_constant(small_lp, ids, lps, 1.0)
    mask = _expected_mask(small_lp, ids, K)
    for b in range(B):
        cand = mask[b].nonzero().squeeze(-1)
        # exactly the small model renormalised over the candidates
        expected = small_lp[b, cand] - torch.logsumexp(small_lp[b, cand], 0)
        torch.testing.assert_close(fused[b, cand], expected, atol=1e-5, rtol=0)
        assert fused[b, cand].argsort(descending=True).tolist() == small_lp[b, cand].argsort(descending=True).tolist()


def test_weight_zero_ranks_large_topk_by_large_logprob():
    small_lp, ids, lps = _inputs(5)
    # make the small model disagree strongly with the large model's order
    small_lp = small_lp.clone()
    small_lp.scatter_(1, ids, torch.tensor([[-9.0, -5.0, -3.0, -1.0]] * B))
    small_lp = torch.log_softmax(small_lp, -1)
    fused = fuse_constant(small_lp, ids, lps, 0.0)
    for b in range(B):
        listed = fused[b, ids[b]]
        # large top-k arrives best first: fused order must be the same
        assert listed.argsort(descending=True).tolist() == list(range(K))
        # differences between listed tokens are exactly the large model's
        torch.testing.assert_close(listed - listed[0], lps[b] - lps[b, 0], atol=1e-5, rtol=0)
    assert fused.argmax(-1).tolist() == ids[:, 0].tolist()


def test_mid_weight_matches_formula():
    small_lp, ids, lps = _inputs(9)
    w = 0.3
    fused = fuse_constant(small_lp, ids, lps, w)
    dense = torch.full((B, V), DEFAULT_FLOOR)
    dense = torch.minimum(dense, lps.min(-1, keepdim=True).values.expand(B, V)).clone()
    dense.scatter_(1, ids, lps)
    mixed = w * small_lp + (1 - w) * dense
    mixed[~_expected_mask(small_lp, ids, K)] = float("-inf")
    torch.testing.assert_close(fused, torch.log_softmax(mixed, -1), atol=1e-5, rtol=0)


def test_fusion_moves_between_the_two_models():
    # small prefers token 0, large prefers token 1
    small_lp = torch.log_softmax(torch.tensor([[4.0, 0.0, -1.0, -2.0, -3.0]]), -1)
    ids = torch.tensor([[1, 0]])
    lps = torch.tensor([[-0.05, -3.0]])
    assert fuse_constant(small_lp, ids, lps, 1.0).argmax().item() == 0
    assert fuse_constant(small_lp, ids, lps, 0.0).argmax().item() == 1
    p1 = [fuse_constant(small_lp, ids, lps, w)[0, 1].exp().item() for w in (1.0, 0.75, 0.5, 0.25, 0.0)]
    assert all(a < b for a, b in zip(p1, p1[1:])), p1  # monotone in the weight


# ---- floor -------------------------------------------------------------------------------------


def test_dense_large_uses_floor_for_unlisted_tokens():
    ids = torch.tensor([[2, 0]])
    lps = torch.tensor([[-0.1, -2.0]])
    dense = dense_large_logprobs(ids, lps, 5, floor=-7.0)
    assert dense[0].tolist() == pytest.approx([-2.0, -7.0, -0.1, -7.0, -7.0])


def test_dense_large_lowers_floor_below_listed_minimum():
    ids = torch.tensor([[2, 0], [1, 3]])
    lps = torch.tensor([[-0.1, -30.0], [-0.5, -1.0]])
    dense = dense_large_logprobs(ids, lps, 5, floor=-20.0)
    # row 0: a listed token is below the floor -> unlisted get that minimum, never more
    assert dense[0].tolist() == pytest.approx([-30.0, -30.0, -0.1, -30.0, -30.0])
    # row 1: the floor applies per row
    assert dense[1].tolist() == pytest.approx([-20.0, -0.5, -20.0, -1.0, -20.0])


@pytest.mark.parametrize("floor", [-20.0, -2.0, -0.5, 0.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_unlisted_candidates_never_outrank_listed_at_weight_zero(floor, seed):
    small_lp, ids, lps = _inputs(seed)
    fused = fuse_constant(small_lp, ids, lps, 0.0, floor=floor)
    mask = _expected_mask(small_lp, ids, K)
    for b in range(B):
        listed = torch.zeros(V, dtype=torch.bool)
        listed[ids[b]] = True
        only_small = mask[b] & ~listed
        assert only_small.any()
        assert fused[b, only_small].max() <= fused[b, listed].min() + 1e-6
        # ... and every small-only candidate is treated alike by the large side
        torch.testing.assert_close(fused[b, only_small], fused[b, only_small][:1].expand(int(only_small.sum())))


def test_small_only_candidate_is_not_vetoed_with_finite_floor():
    small_lp = torch.log_softmax(torch.tensor([[6.0, 0.0, 0.0, -1.0, -1.0, -1.0]]), -1)
    ids = torch.tensor([[1, 2]])
    lps = torch.tensor([[-0.7, -0.8]])
    fused = fuse_constant(small_lp, ids, lps, 0.5, floor=-4.0)
    assert torch.isfinite(fused[0, 0])
    assert fused[0, 0].exp().item() > 0.05  # the small model's strong favourite keeps real mass
    # a lower floor penalises it more
    lower = fuse_constant(small_lp, ids, lps, 0.5, floor=-40.0)
    assert lower[0, 0] < fused[0, 0]


# ---- wire format -------------------------------------------------------------------------------


def test_accepts_wire_dtypes_int32_ids_and_float16_logprobs():
    small_lp, ids, lps = _inputs(4, b=1)
    wire_ids = torch.from_numpy(unpack_ids(pack_ids(ids[0].numpy())).copy())[None]
    wire_lps = torch.from_numpy(unpack_logprobs(pack_logprobs(lps[0].numpy())).copy())[None]
    assert wire_ids.dtype == torch.int32
    fused = fuse_constant(small_lp, wire_ids, wire_lps, 0.5)
    ref = fuse_constant(small_lp, ids, lps, 0.5)
    torch.testing.assert_close(fused, ref, atol=2e-3, rtol=0)
    fused16 = fuse_constant(small_lp, ids, lps.half(), 0.5)
    assert fused16.dtype == torch.float32
    assert torch.equal(torch.isfinite(fused16), torch.isfinite(ref))


def test_does_not_modify_inputs():
    small_lp, ids, lps = _inputs(2)
    copies = small_lp.clone(), ids.clone(), lps.clone()
    fuse_constant(small_lp, ids, lps, 0.4)
    assert torch.equal(small_lp, copies[0]) and torch.equal(ids, copies[1]) and torch.equal(lps, copies[2])


def test_rows_are_independent():
    small_lp, ids, lps = _inputs(8)
    batched = fuse_constant(small_lp, ids, lps, 0.6)
    for b in range(B):
        single = fuse_constant(small_lp[b : b + 1], ids[b : b + 1], lps[b : b + 1], 0.6)
        torch.testing.assert_close(batched[b : b + 1], single)


def test_weight_one_ignores_large_logprobs_even_minus_inf():
    """A float16 logprob below -65504 arrives as -inf (see pack_logprobs); with weight=1 the
    large model must have no influence, so the result must still be finite on candidates."""
    small_lp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0, -2.0]]), -1)
    ids = torch.tensor([[4, 3]])
    lps = torch.from_numpy(unpack_logprobs(pack_logprobs([-0.5, -1e6])).copy())[None]
    fused = fuse_constant(small_lp, ids, lps, 1.0)
    assert not torch.isnan(fused).any()
    assert fused.argmax().item() == 0


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [-0.01, 1.01, 2.0, -1.0, math.nan])
def test_weight_outside_unit_interval_raises(weight):
    small_lp, ids, lps = _inputs()
    with pytest.raises(ValueError, match="weight"):
        fuse_constant(small_lp, ids, lps, weight)


def test_small_must_be_2d():
    small_lp, ids, lps = _inputs(b=1)
    with pytest.raises(ValueError, match="small_lp"):
        fuse_constant(small_lp[0], ids, lps)
    with pytest.raises(ValueError, match="small_lp"):
        fuse_constant(small_lp[None], ids, lps)


def test_large_ids_and_logprobs_shapes_must_match():
    small_lp, ids, lps = _inputs()
    with pytest.raises(ValueError, match="large_ids"):
        fuse_constant(small_lp, ids, lps[:, :-1])
    with pytest.raises(ValueError, match="large_ids"):
        fuse_constant(small_lp, ids[0], lps[0])


def test_batch_mismatch_raises():
    small_lp, ids, lps = _inputs()
    with pytest.raises(ValueError, match="batch"):
        fuse_constant(small_lp[:2], ids, lps)


@pytest.mark.parametrize("bad_id", [V, V + 100, -1])
def test_out_of_range_ids_raise(bad_id):
    small_lp, ids, lps = _inputs()
    ids = ids.clone()
    ids[1, 2] = bad_id
    with pytest.raises(ValueError, match="out of range"):
        fuse_constant(small_lp, ids, lps)


def test_last_vocab_id_is_in_range():
    small_lp, ids, lps = _inputs(b=1)
    ids = ids.clone()
    ids[0, -1] = V - 1
    fused = fuse_constant(small_lp, ids, lps)
    assert torch.isfinite(fused[0, V - 1])
    np.testing.assert_allclose(fused.exp().sum().item(), 1.0, atol=1e-5)


# ---- every method: entropy, contrast, learned (and the shared mixture) ------------------------------

from cogenesis.core.fusion import (  # noqa: E402
    METHODS,
    entropy_weight,
    fuse,
    fuse_contrast,
    fuse_entropy,
    fuse_learned,
    mix,
    topk_entropy,
)
from cogenesis.core.fusion_net import FusionNet  # noqa: E402


def _case(seed: int, b: int = 3, v: int = 40, k: int = 5):
    g = torch.Generator().manual_seed(seed)
    small = (torch.randn(b, v, generator=g) * 2).log_softmax(-1)
    plain = (torch.randn(b, v, generator=g) * 2).log_softmax(-1)
    top = (torch.randn(b, v, generator=g) * 2).log_softmax(-1).topk(k, dim=-1)
    return small, plain, top.indices, top.values


def _net(k: int = 5, vocab: int = 40, variant: str = "compact", seed: int = 0) -> FusionNet:
    torch.manual_seed(seed)
    return FusionNet(variant, k=k, vocab=vocab, hidden=8).eval()


def _all(small, plain, ids, lps, restrict=True):
    return {
        m: fuse(m, small, ids, lps, plain_lp=plain, net=_net(ids.shape[1], small.shape[1]), restrict=restrict)
        for m in METHODS
    }


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("restrict", [True, False])
def test_every_method_is_a_distribution(seed, restrict):
    small, plain, ids, lps = _case(seed)
    for method, fused in _all(small, plain, ids, lps, restrict).items():
        assert torch.allclose(fused.exp().sum(-1), torch.ones(3), atol=1e-5), method
        assert not fused.isnan().any(), method


@pytest.mark.parametrize("seed", range(3))
def test_every_method_masks_exactly_outside_candidates(seed):
    small, plain, ids, lps = _case(seed)
    cands = candidate_mask(small, ids)
    for method, fused in _all(small, plain, ids, lps).items():
        assert torch.isinf(fused[~cands]).all() and torch.isfinite(fused[cands]).all(), method
    for method, fused in _all(small, plain, ids, lps, restrict=False).items():
        assert torch.isfinite(fused).all(), method  # the evaluation's whole-vocabulary form


def test_unrestricted_agrees_with_restricted_on_candidate_ratios():
    small, plain, ids, lps = _case(7)
    cands = candidate_mask(small, ids)
    for method in METHODS:
        r = fuse(method, small, ids, lps, plain_lp=plain, net=_net(), restrict=True)
        u = fuse(method, small, ids, lps, plain_lp=plain, net=_net(), restrict=False)
        renorm = u.masked_fill(~cands, float("-inf")).log_softmax(-1)
        assert torch.allclose(renorm[cands], r[cands], atol=1e-5), method


def test_mix_bounds_and_per_row_weights():
    z_s, z_l = torch.randn(2, 6).log_softmax(-1), torch.randn(2, 6).log_softmax(-1)
    assert torch.allclose(mix(z_s, z_l, 1.0), z_s, atol=1e-6)
    assert torch.allclose(mix(z_s, z_l, 0.0), z_l, atol=1e-6)
    rows = mix(z_s, z_l, torch.tensor([1.0, 0.0]))
    assert torch.allclose(rows[0], z_s[0], atol=1e-6) and torch.allclose(rows[1], z_l[1], atol=1e-6)


def test_topk_entropy_is_that_of_the_renormalised_topk():
    assert topk_entropy(torch.full((1, 4), -3.0)).item() == pytest.approx(math.log(4))
    assert topk_entropy(torch.tensor([[0.0, -50.0, -50.0]])).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([0.5, 0.3, 0.2])
    assert topk_entropy(p.log()[None] - 1.0).item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)


def test_entropy_weight_trusts_the_more_certain_side():
    certain, unsure = torch.tensor([[0.0, -30.0, -30.0]]), torch.full((1, 3), -1.0)
    assert entropy_weight(certain, unsure).item() > 0.99  # small certain: w_small -> 1
    assert entropy_weight(unsure, certain).item() < 0.01
    assert entropy_weight(unsure, unsure).item() == pytest.approx(0.5)
    assert entropy_weight(certain, certain).item() == pytest.approx(0.5)  # both certain: no preference
    w = entropy_weight(torch.randn(50, 5).log_softmax(-1), torch.randn(50, 5).log_softmax(-1))
    assert ((w >= 0) & (w <= 1)).all()


def test_entropy_fusion_is_the_mixture_with_the_entropy_weight():
    small, _, ids, lps = _case(3)
    w = entropy_weight(small.topk(5, dim=-1).values, lps)
    assert not torch.allclose(w, torch.full_like(w, 0.5))  # a real per-row weight, not the constant one
    expected = mix(small, dense_large_logprobs(ids, lps, 40), w, candidate_mask(small, ids))
    assert torch.allclose(fuse_entropy(small, ids, lps), expected, atol=1e-6)


def test_contrast_without_a_context_effect_is_the_large_view():
    small, _, ids, lps = _case(4)
    large_only = dense_large_logprobs(ids, lps, 40).masked_fill(~candidate_mask(small, ids), float("-inf"))
    expected = large_only.log_softmax(-1)
    assert torch.allclose(fuse_contrast(small, small, ids, lps), expected, atol=1e-5)  # ctx == plain
    assert torch.allclose(fuse_contrast(small, _case(5)[1], ids, lps, alpha=0.0), expected, atol=1e-5)


def test_contrast_adds_the_context_delta_to_the_large_logprobs():
    small, plain, ids, lps = _case(6)
    cands = candidate_mask(small, ids)
    raw = dense_large_logprobs(ids, lps, 40) + 0.7 * (small - plain).clamp(-20, 20)
    expected = raw.masked_fill(~cands, float("-inf")).log_softmax(-1)
    assert torch.allclose(fuse_contrast(small, plain, ids, lps, alpha=0.7), expected, atol=1e-5)


def test_contrast_input_errors():
    small, plain, ids, lps = _case(0)
    with pytest.raises(ValueError, match="shape"):
        fuse_contrast(small, plain[:, :-1], ids, lps)
    with pytest.raises(ValueError, match="alpha"):
        fuse_contrast(small, plain, ids, lps, alpha=-1.0)


def test_learned_fusion_with_a_fixed_output_is_constant_fusion():
    small, _, ids, lps = _case(8)
    net = _net()
    with torch.no_grad():  # make the network answer w = 0.3 whatever its input
        net.head[-1].weight.zero_()
        net.head[-1].bias.fill_(math.log(0.3 / 0.7))
    assert torch.allclose(fuse_learned(small, ids, lps, net), fuse_constant(small, ids, lps, 0.3), atol=1e-5)


@pytest.mark.parametrize("variant", ["compact", "paper"])
def test_learned_weight_stays_in_the_unit_interval(variant):
    net = _net(variant=variant)
    small, _, ids, lps = _case(9, b=20)
    top = small.topk(5, dim=-1)
    extreme = torch.full_like(lps, float("-inf"))  # clamped to the floor, never NaN
    for l_lp in (lps, extreme, lps * 100):
        w = net.weight(top.indices, top.values, ids, l_lp)
        assert ((w > 0) & (w < 1)).all() and not w.isnan().any()


def test_learned_fusion_needs_the_topk_it_was_trained_on():
    small, _, ids, lps = _case(0)
    with pytest.raises(ValueError, match="top-4"):
        fuse_learned(small, ids, lps, _net(k=4))


def test_fuse_dispatch_errors():
    small, _, ids, lps = _case(0)
    with pytest.raises(ValueError, match="unknown fusion method"):
        fuse("average", small, ids, lps)
    with pytest.raises(ValueError, match="plain_lp"):
        fuse("contrast", small, ids, lps)
    with pytest.raises(ValueError, match="FusionNet"):
        fuse("learned", small, ids, lps)
