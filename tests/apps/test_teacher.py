"""Teacher forcing equals step-by-step decoding."""

import pytest
import torch

from cogenesis.apps.teacher import gold_ids, nll, teacher_forced
from cogenesis.core.models import load_causal_lm
from cogenesis.core.prompts import cloud_prompt_ids


def test_teacher_forced_rows_are_the_incremental_next_token_distributions(tiny_small):
    model, tok = load_causal_lm(str(tiny_small))
    prompt, target = [1, 5, 9, 200], [7, 8, 3000]
    lp = teacher_forced(model, prompt, target)
    assert lp.shape == (3, model.config.vocab_size)
    for t in range(3):
        with torch.inference_mode():
            ref = model(input_ids=torch.tensor([prompt + target[:t]])).logits[0, -1].float().log_softmax(-1)
        assert torch.allclose(lp[t], ref, atol=1e-4)
    assert torch.allclose(nll(lp, target), -lp[torch.arange(3), torch.tensor(target)])
    with pytest.raises(ValueError, match="non-empty"):
        teacher_forced(model, prompt, [])


def test_gold_and_cloud_prompt(tiny_small, sample_records):
    _, tok = load_causal_lm(str(tiny_small))
    r = sample_records[0]
    assert len(gold_ids(tok, r, 10)) == 10
    assert tok.decode(gold_ids(tok, r, 10_000)).strip() == r.gold.strip()
    cloud = tok.decode(cloud_prompt_ids(tok, r.public_instruction))
    assert r.public_instruction in cloud
    assert all(f not in cloud for f in r.private_fields())
