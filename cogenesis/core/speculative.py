"""Accepting the cloud's draft tokens without changing the fused distribution.

The replica proposes d (its greedy continuation, so its proposal probability p(d) is 1) and the
device's target distribution is q (the fused, temperature/top-p shaped distribution). The
speculative-sampling rule accepts d with probability min(1, q(d) / p(d)); on rejection it samples
from the residual max(0, q - p) renormalised. The result is distributed exactly as q, and an
accepted draft means the cloud's top-k for the next position is already in hand.
"""

from __future__ import annotations

import torch


def accept_draft(
    q: torch.Tensor, draft: int, p_draft: float = 1.0, generator: torch.Generator | None = None
) -> tuple[int, bool]:
    """One position of speculative sampling.

    Args:
        q: [V] target probabilities (sums to 1; one-hot for greedy decoding).
        draft: the proposed token id.
        p_draft: the proposal's probability of ``draft`` (1 for a greedy draft).
    Returns:
        (token, accepted).
    """
    if q.dim() != 1:
        raise ValueError(f"q must be [V], got shape {tuple(q.shape)}")
    if not 0 < p_draft <= 1:
        raise ValueError(f"p_draft must be in (0, 1], got {p_draft}")
    qd = float(q[draft])
    u = float(torch.rand((), generator=generator))
    if u < min(1.0, qd / p_draft):
        return draft, True
    residual = q.clone()
    residual[draft] = max(0.0, qd - p_draft)  # max(0, q - p): p is p_draft at ``draft``, 0 elsewhere
    total = float(residual.sum())
    if total <= 0:  # q was concentrated on the draft: nothing else to choose
        return draft, True
    return int(torch.multinomial(residual / total, 1, generator=generator)), False
