"""Model specs, layer pruning (on a tiny real model), quality measurement, tokenizer checks."""

import json

import pytest
import torch

from cogenesis.core import models as m
from cogenesis.core.errors import ModelError


def test_resolve_model_specs(tmp_path, tiny_large):
    assert m.resolve_model(str(tiny_large)) == str(tiny_large.resolve())
    assert m.resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    with pytest.raises(ModelError, match="unknown embedded model"):
        m.resolve_model("embedded:huge")
    with pytest.raises(ModelError, match="no config.json"):
        m.resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="neither an embedded model"):
        m.resolve_model("./no/such/dir")


def test_load_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="cannot load model"):
        m.load_causal_lm(str(tmp_path))


def test_keep_layers_does_not_touch_the_source_model(tiny_large):
    model, _ = m.load_causal_lm(str(tiny_large))
    before = [id(layer) for layer in model.model.layers]
    pruned = m._keep_layers(model, [1])
    assert len(pruned.model.layers) == 1 and pruned.config.num_hidden_layers == 1
    assert [id(layer) for layer in model.model.layers] == before
    assert model.config.num_hidden_layers == 2
    assert model.model.layers[0].self_attn.layer_idx == 0 and model.model.layers[1].self_attn.layer_idx == 1
    assert pruned.model.layers[0].self_attn.layer_idx == 0
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert not torch.allclose(model(ids).logits, pruned(ids).logits)


def test_prune_layers_writes_a_loadable_model_and_its_derivation(tiny_large, tmp_path):
    out = m.prune_layers(tiny_large, tmp_path / "small", [0], {"search": "test"})
    model, tok = m.load_causal_lm(str(out))
    assert model.config.num_hidden_layers == 1
    record = json.loads((out / m.DERIVATION_FILE).read_text())
    assert record["kept_layers"] == [0] and record["source_layers"] == 2 and record["search"] == "test"
    with pytest.raises(ModelError, match="not within"):
        m.prune_layers(tiny_large, tmp_path / "bad", [5])


def test_measure_quality_and_greedy_search(tiny_large):
    model, tok = m.load_causal_lm(str(tiny_large))
    texts = ["The quick brown fox jumps over the lazy dog.", "A short note about pottery classes on Sunday."]
    same = m.measure_quality(model, model, tok, texts)
    assert same.top1_agreement == 1.0 and same.ppl == pytest.approx(same.reference_ppl)
    assert same.ppl > 1000  # random weights over a 49k vocabulary
    keep = m.greedy_layer_search(model, tok, texts, keep=1)
    assert len(keep) == 1 and keep[0] in (0, 1)
    with pytest.raises(ModelError, match="no text"):
        m.measure_quality(model, model, tok, [""])


def test_tokenizer_mismatch_is_refused(tokenizer_dir):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(tokenizer_dir)
    b = AutoTokenizer.from_pretrained(tokenizer_dir)
    m.check_same_tokenizer(a, b)
    b.add_tokens(["<private-extra-token>"])
    with pytest.raises(ModelError, match="different tokenizers"):
        m.check_same_tokenizer(a, b)
