"""Fixtures of the core's KV tests: the tiny large model, and a session's log-probs computed alone."""

import pytest
import torch

from cogenesis.core.models import load_causal_lm


@pytest.fixture(scope="module")
def model(tiny_large):
    return load_causal_lm(str(tiny_large))[0]


@pytest.fixture(scope="session")
def alone():
    """``alone(model, ids)``: log-probs [T, V] after each of ``ids``, the sequence run by itself (no cache)."""

    def run(model, ids):
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)

    return run
