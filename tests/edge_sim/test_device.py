"""The lockstep pool's packed device: a session left out of a step sits it out and keeps its row."""

import pytest
import torch

from cogenesis.core.models import load_causal_lm
from cogenesis.edge_sim.device import PackedDevice


@pytest.fixture(scope="module")
def model(tiny_small):
    return load_causal_lm(str(tiny_small))[0]


def alone(model, ids):
    """Log-probs after ``ids``, the sequence run on its own: what a packed row must give, however it was stepped."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)


class _Key:  # sessions are keys by identity, as the session loop's are
    def __init__(self, prompt):
        self.seq = list(prompt)


def test_a_session_left_out_of_steps_goes_on_where_it_stopped(model):
    a, b, c = _Key([5, 6, 7, 8, 9]), _Key([20, 21]), _Key([30, 31, 32])
    device = PackedDevice(model, pad_id=0)
    for k, lp in zip([a, b, c], device.prefill([a, b, c], [a.seq, b.seq, c.seq])):
        assert torch.allclose(lp, alone(model, k.seq), atol=1e-4)
    plan = [  # who steps in each pass: b sits out two passes, a one, then they come back in another order
        [a, b, c],
        [a, c],
        [c],
        [c, b, a],
        [b],
    ]
    for n, keys in enumerate(plan):
        tokens = [40 + 3 * n + i for i in range(len(keys))]
        lps = device.step(keys, tokens)
        assert len(lps) == len(keys)
        for k, t, lp in zip(keys, tokens, lps):
            k.seq.append(t)
            assert torch.allclose(lp, alone(model, k.seq), atol=1e-4), (n, k.seq)
    assert device.rows == [a, b, c]


def test_released_rows_go_and_the_rest_go_on(model):
    a, b, c = _Key([5, 6, 7]), _Key([20, 21, 22, 23]), _Key([30])
    device = PackedDevice(model, pad_id=0)
    device.prefill([a, b, c], [a.seq, b.seq, c.seq])
    device.step([a], [50])  # b and c sit out
    a.seq.append(50)
    device.release([a, _Key([1])])  # a key it never held is ignored
    assert device.rows == [b, c] and len(device.batch) == 2
    for k, lp in zip([c, b], device.step([c, b], [60, 61])):
        k.seq.append(60 if k is c else 61)
        assert torch.allclose(lp, alone(model, k.seq), atol=1e-4)
    with pytest.raises(ValueError, match="does not hold"):
        device.step([a], [1])
    with pytest.raises(ValueError, match="all of its sessions at once"):
        device.prefill([a], [[1, 2]])
