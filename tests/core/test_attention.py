"""Grouped SDPA attention: same outputs as transformers' own sdpa on padded GQA batches."""

import pytest
import torch

from cogenesis.core.attention import ATTN_IMPLEMENTATION, sdpa_grouped_attention
from cogenesis.core.models import load_causal_lm


def test_padded_batch_matches_transformers_sdpa(tiny_large):
    from transformers import AutoModelForCausalLM

    ours, _ = load_causal_lm(str(tiny_large))
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny_large), attn_implementation="sdpa").eval()
    assert ours.config._attn_implementation == ATTN_IMPLEMENTATION
    assert ours.config.num_attention_heads != ours.config.num_key_value_heads  # the grouped path is exercised
    ids = torch.tensor([[2, 2, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.inference_mode():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = theirs(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(a[0, 2:], b[0, 2:], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)


def test_head_counts_must_group():
    q, kv = torch.zeros(1, 5, 1, 8), torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        sdpa_grouped_attention(torch.nn.Module(), q, kv, kv, None)
