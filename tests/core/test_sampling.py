"""Unit tests for cogenesis.core.sampling: greedy, temperature and nucleus (top-p) sampling."""

from __future__ import annotations

import math

import pytest
import torch

from cogenesis.core.sampling import check_sampling, sample, top_p_filter


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _nucleus_reference(logits_row: torch.Tensor, top_p: float) -> set[int]:
    """Brute force: the smallest top-probability prefix whose mass reaches top_p."""
    probs = torch.softmax(logits_row.double(), -1)
    order = probs.argsort(descending=True).tolist()
    kept, mass = set(), 0.0
    for t in order:
        kept.add(t)
        mass += probs[t].item()
        if mass >= top_p:
            break
    return kept


# ---- greedy -------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = torch.randn(6, 11, generator=_gen(0))
    out = sample(logits, temperature=0.0, top_p=0.9)
    assert out.shape == (6,)
    assert out.tolist() == logits.argmax(-1).tolist()


def test_greedy_ignores_generator_and_top_p():
    logits = torch.log_softmax(torch.tensor([[0.1, 2.0, 1.9, -1.0]]), -1)
    for seed in range(5):
        assert sample(logits, 0.0, 0.05, _gen(seed)).item() == 1
        assert sample(logits, 0.0, 1.0, _gen(seed)).item() == 1


def test_greedy_skips_masked_tokens():
    logits = torch.tensor([[float("-inf"), -3.0, -0.5, float("-inf")]])
    assert sample(logits, 0.0).item() == 2


# ---- top_p_filter -------------------------------------------------------------------------------


def test_top_p_filter_small_example():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    out = top_p_filter(logits, 0.7)  # 0.5 + 0.3 = 0.8 >= 0.7 -> keep {1, 3}
    assert torch.isfinite(out).tolist() == [[False, True, False, True]]
    # kept logits are unchanged
    assert out[0, 1] == logits[0, 1] and out[0, 3] == logits[0, 3]


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.77, 0.9, 0.99])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_top_p_filter_keeps_smallest_nucleus(top_p, seed):
    logits = torch.randn(5, 17, generator=_gen(seed)) * 2.0
    out = top_p_filter(logits, top_p)
    for b in range(logits.shape[0]):
        kept = set(torch.isfinite(out[b]).nonzero().squeeze(-1).tolist())
        assert kept == _nucleus_reference(logits[b], top_p)
        assert logits[b].argmax().item() in kept


def test_top_p_filter_always_keeps_top_token():
    # one token holds 99.9% of the mass, tiny top_p: that token (only) survives
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 10.0]])
    out = top_p_filter(logits, 1e-6)
    assert torch.isfinite(out).tolist() == [[True, False, False, False], [False, False, False, True]]


def test_top_p_filter_scale_invariant_inputs_any_scale():
    logits = torch.randn(2, 9, generator=_gen(5))
    a = torch.isfinite(top_p_filter(logits, 0.6))
    b = torch.isfinite(top_p_filter(logits + 123.0, 0.6))  # shift-invariant (logits vs logprobs)
    assert torch.equal(a, b)


def test_top_p_one_is_identity():
    logits = torch.randn(3, 8, generator=_gen(1))
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_filter_keeps_minus_inf_masked():
    logits = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf"), -0.1]])
    out = top_p_filter(logits, 0.99)
    assert torch.isneginf(out[0, 1]) and torch.isneginf(out[0, 3])
    assert torch.isfinite(out[0, [0, 2, 4]]).all()


def test_top_p_filter_uniform_boundary():
    logits = torch.zeros(1, 4)
    assert int(torch.isfinite(top_p_filter(logits, 0.25)).sum()) == 1
    assert int(torch.isfinite(top_p_filter(logits, 0.6)).sum()) == 3


# ---- stochastic sampling -------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(4, 30, generator=_gen(2))
    a = [sample(logits, 1.0, 0.95, g).tolist() for g in [_gen(42)] for _ in range(25)]
    b = [sample(logits, 1.0, 0.95, g).tolist() for g in [_gen(42)] for _ in range(25)]
    c = [sample(logits, 1.0, 0.95, g).tolist() for g in [_gen(43)] for _ in range(25)]
    assert a == b
    assert a != c


def test_sample_shape_and_dtype():
    out = sample(torch.randn(7, 5, generator=_gen(0)), 0.8, 0.9, _gen(0))
    assert out.shape == (7,)
    assert out.dtype == torch.int64
    assert ((out >= 0) & (out < 5)).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_empirical_frequencies_match_tempered_softmax(temperature):
    logits = torch.tensor([1.0, 0.3, -0.4, -1.5])
    n = 40_000
    draws = sample(logits.expand(n, 4), temperature, 1.0, _gen(7))
    freq = torch.bincount(draws, minlength=4).double() / n
    expected = torch.softmax(logits.double() / temperature, -1)
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)


def test_temperature_changes_the_distribution():
    logits = torch.tensor([1.0, 0.3, -0.4, -1.5])
    n = 20_000
    cold = torch.bincount(sample(logits.expand(n, 4), 0.5, 1.0, _gen(1)), minlength=4).double() / n
    hot = torch.bincount(sample(logits.expand(n, 4), 2.0, 1.0, _gen(1)), minlength=4).double() / n
    assert cold[0] > hot[0] + 0.1
    assert hot[3] > cold[3] + 0.05


def test_sampling_respects_nucleus_and_renormalises():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20_000
    draws = sample(probs.log().expand(n, 4), 1.0, 0.6, _gen(3))
    counts = torch.bincount(draws, minlength=4)
    assert counts[2] == 0 and counts[3] == 0  # outside the nucleus {0, 1}
    assert abs(counts[0].item() / n - 0.625) < 0.015


def test_very_low_temperature_concentrates_on_argmax():
    logits = torch.tensor([[0.0, 0.2, 0.1]])
    draws = [sample(logits, 1e-3, 1.0, g).item() for g in [_gen(0)] for _ in range(50)]
    assert set(draws) == {1}


def test_never_samples_masked_tokens():
    logits = torch.tensor([0.0, float("-inf"), 0.0, float("-inf")])
    draws = sample(logits.expand(2000, 4), 1.0, 1.0, _gen(9))
    assert set(draws.tolist()) == {0, 2}


# ---- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.7, 0.9), (5.0, 1e-6)])
def test_valid_settings_pass(temperature, top_p):
    check_sampling(temperature, top_p)


@pytest.mark.parametrize("temperature", [-0.01, -1.0, -math.inf])
def test_negative_temperature_raises(temperature):
    with pytest.raises(ValueError, match="temperature"):
        check_sampling(temperature, 0.9)
    with pytest.raises(ValueError, match="temperature"):
        sample(torch.zeros(1, 3), temperature, 0.9)


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.0001, 2.0, math.nan])
def test_invalid_top_p_raises(top_p):
    with pytest.raises(ValueError, match="top_p"):
        check_sampling(0.7, top_p)
    with pytest.raises(ValueError, match="top_p"):
        sample(torch.zeros(1, 3), 0.7, top_p)


def test_nan_temperature_raises_value_error():
    with pytest.raises(ValueError, match="temperature"):
        sample(torch.zeros(1, 3), math.nan, 0.9)
