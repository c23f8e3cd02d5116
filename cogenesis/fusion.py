"""Fusing the device's and the cloud's next-token distributions. Pure functions, no state.

Shapes: B = batch (sessions), V = vocabulary, K = top-k from the cloud.
The device has its small model's full distribution ``small_lp`` [B, V]; the cloud sends only
its top-K ``(large_ids, large_lp)`` [B, K]. Fusion runs over the candidate set = union of the
small model's top-K and the large model's top-K; every other token is masked out (-inf).
Large-model log-probabilities missing from its top-K are set to a finite floor, as the paper's
authors advise, so a candidate proposed only by the small model is not vetoed outright.
"""

from __future__ import annotations

import torch

DEFAULT_FLOOR = -20.0


def _check_batch(small_lp: torch.Tensor, large_ids: torch.Tensor, large_lp: torch.Tensor) -> None:
    if small_lp.dim() != 2:
        raise ValueError(f"small_lp must be [B, V], got shape {tuple(small_lp.shape)}")
    if large_ids.shape != large_lp.shape or large_ids.dim() != 2:
        raise ValueError(
            f"large_ids {tuple(large_ids.shape)} and large_lp {tuple(large_lp.shape)} must both be [B, K]"
        )
    if large_ids.shape[0] != small_lp.shape[0]:
        raise ValueError(f"batch mismatch: small {small_lp.shape[0]} vs large {large_ids.shape[0]}")
    vocab = small_lp.shape[1]
    if large_ids.numel() and (int(large_ids.min()) < 0 or int(large_ids.max()) >= vocab):
        raise ValueError(f"large_ids out of range for vocabulary of {vocab}")


def dense_large_logprobs(
    large_ids: torch.Tensor, large_lp: torch.Tensor, vocab: int, floor: float = DEFAULT_FLOOR
) -> torch.Tensor:
    """Scatter the cloud's top-K into a dense [B, V] tensor; unlisted tokens get ``floor``.

    The floor is lowered to the smallest listed logprob when that is below it, so an unlisted
    token never outranks a listed one.
    """
    # large_ids, large_lp: [B, K] -> [B, V]; non-finite entries count as unlisted (the floor)
    large_lp = large_lp.float()
    large_lp = torch.where(torch.isfinite(large_lp), large_lp, torch.tensor(floor))
    row_floor = torch.minimum(large_lp.min(dim=-1, keepdim=True).values, torch.tensor(floor))
    dense = row_floor.expand(large_ids.shape[0], vocab).clone()
    dense.scatter_(1, large_ids.long(), large_lp)
    return dense


def candidate_mask(small_lp: torch.Tensor, large_ids: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Boolean [B, V]: the union of the small model's top-k and the cloud's top-K ids."""
    k = k or large_ids.shape[1]
    mask = torch.zeros_like(small_lp, dtype=torch.bool)
    mask.scatter_(1, small_lp.topk(k, dim=-1).indices, True)
    mask.scatter_(1, large_ids.long(), True)
    return mask


def fuse_constant(
    small_lp: torch.Tensor,
    large_ids: torch.Tensor,
    large_lp: torch.Tensor,
    weight: float = 0.5,
    floor: float = DEFAULT_FLOOR,
) -> torch.Tensor:
    """The paper's fixed-weight fusion: fused = w * z_small + (1 - w) * z_large over candidates.

    Args:
        small_lp: [B, V] small-model log-probabilities (log-softmax over the full vocabulary).
        large_ids, large_lp: [B, K] the cloud's top-K token ids and log-probabilities.
        weight: w in [0, 1]; 1 = small model only, 0 = large model only (within candidates).
    Returns:
        [B, V] normalised log-probabilities, -inf outside the candidate set.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    _check_batch(small_lp, large_ids, large_lp)
    large_dense = dense_large_logprobs(large_ids, large_lp, small_lp.shape[1], floor)
    small = small_lp.float().clamp(min=torch.finfo(torch.float32).min)  # -inf * 0 would be NaN
    mixed = weight * small + (1.0 - weight) * large_dense  # [B, V]
    mixed = mixed.masked_fill(~candidate_mask(small_lp, large_ids), float("-inf"))
    return torch.log_softmax(mixed, dim=-1)
