"""The learned fusion network: the paper's function class, parameter counts, checkpoints."""

import pytest
import torch

from cogenesis.core.config import FusionConfig
from cogenesis.core.errors import ConfigError
from cogenesis.core.fusion_net import Fuser, FusionNet, load, save

V, K = 60, 4


def _top(seed: int, b: int = 5):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, V, generator=g).mul(3).log_softmax(-1).topk(K, dim=-1)
    lg = torch.randn(b, V, generator=g).mul(3).log_softmax(-1).topk(K, dim=-1)
    return s.indices, s.values, lg.indices, lg.values


def test_paper_variant_is_a_linear_layer_over_both_dense_floored_vectors():
    torch.manual_seed(0)
    net = FusionNet("paper", k=K, vocab=V, hidden=8, floor=-20.0)
    s_ids, s_lp, l_ids, l_lp = _top(1)
    dense_s = torch.full((5, V), -20.0).scatter(1, s_ids, s_lp)  # the paper's input: top-k, floor elsewhere
    dense_l = torch.full((5, V), -20.0).scatter(1, l_ids, l_lp)
    weight = torch.cat([net.small_in.weight, net.large_in.weight]).T  # [H, 2V]
    bias = net.bias - (-20.0) * weight.sum(dim=1)  # the floor background folded into the bias
    hidden = torch.cat([dense_s, dense_l], dim=-1) @ weight.T + bias
    expected = torch.sigmoid(net.head(hidden).squeeze(-1))
    assert torch.allclose(net.weight(s_ids, s_lp, l_ids, l_lp), expected, atol=1e-4)


def test_compact_variant_has_a_few_thousand_parameters_and_no_vocabulary():
    net = FusionNet("compact", k=10, hidden=64)
    assert 1000 < net.n_parameters() < 5000
    assert FusionNet("paper", k=10, vocab=V, hidden=64).n_parameters() > 2 * V * 64


def test_compact_features_ignore_token_identity():
    net = FusionNet("compact", k=K, hidden=8)
    s_ids, s_lp, l_ids, l_lp = _top(2)
    assert torch.equal(net.weight(s_ids, s_lp, l_ids, l_lp), net.weight(s_ids.flip(0), s_lp, l_ids, l_lp))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"variant": "huge"}, "variant"),
        ({"variant": "paper", "vocab": 0}, "vocabulary"),
        ({"k": 0}, "k >= 1"),
        ({"floor": 1.0}, "floor < 0"),
    ],
)
def test_bad_networks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusionNet(**kwargs)


def test_wrong_input_width_is_refused():
    net = FusionNet("compact", k=K, hidden=8)
    s_ids, s_lp, l_ids, l_lp = _top(3)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        net.weight(s_ids[:, :2], s_lp[:, :2], l_ids, l_lp)


@pytest.mark.parametrize("variant", ["compact", "paper"])
def test_checkpoint_round_trip(tmp_path, variant):
    torch.manual_seed(1)
    net = FusionNet(variant, k=K, vocab=V, hidden=8).eval()
    path = save(net, tmp_path / "f.pt", {"trained_on": "test"})
    loaded, meta = load(path, k=K, vocab=V)
    assert meta == {"trained_on": "test"} and loaded.config() == net.config()
    args = _top(4)
    assert torch.equal(loaded.weight(*args), net.weight(*args))


def test_checkpoint_errors_say_what_to_do(tmp_path):
    path = save(FusionNet("paper", k=K, vocab=V, hidden=8), tmp_path / "f.pt")
    with pytest.raises(ConfigError, match="top-4, this run uses top-10") as info:
        load(path, k=10)
    assert "--top-k 4" in info.value.hint
    with pytest.raises(ConfigError, match="vocabulary of 60"):
        load(path, vocab=100)
    with pytest.raises(ConfigError, match="does not exist") as info:
        load(tmp_path / "missing.pt")
    assert "train-fusion" in info.value.hint
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a fusion checkpoint"):
        load(tmp_path / "junk.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="cogenesis-fusion/1"):
        load(tmp_path / "other.pt")


def test_fuser_builds_each_method(tmp_path):
    path = save(FusionNet("compact", k=K, hidden=8), tmp_path / "f.pt")
    learned = Fuser(FusionConfig(method="learned", checkpoint=str(path)), k=K, vocab=V)
    assert learned.net is not None and not learned.needs_plain
    assert Fuser(FusionConfig(method="contrast"), k=K).needs_plain
    small = torch.randn(2, V).log_softmax(-1)
    top = torch.randn(2, V).log_softmax(-1).topk(K)
    out = learned(small, top.indices, top.values)
    assert torch.allclose(out.exp().sum(-1), torch.ones(2), atol=1e-5)
    with pytest.raises(ConfigError, match="top-4"):
        Fuser(FusionConfig(method="learned", checkpoint=str(path)), k=10)
