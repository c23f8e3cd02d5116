"""Fusing the device's and the cloud's next-token distributions. Pure functions, no state.

Shapes: B = batch (sessions), V = vocabulary, K = top-k from the cloud.
The device has its small model's full distribution ``small_lp`` [B, V]; the cloud sends only
its top-K ``(large_ids, large_lp)`` [B, K]. Fusion runs over the candidate set = union of the
small model's top-K and the large model's top-K; every other token is masked out (-inf).
Large-model log-probabilities missing from its top-K are set to a finite floor, as the paper's
authors advise, so a candidate proposed only by the small model is not vetoed outright.

Methods (``fuse`` dispatches on the name):
- ``constant``: fused = w * z_small + (1 - w) * z_large with a fixed w (the paper's baseline).
- ``entropy``: the same mixture with w = H_large / (H_small + H_large), the entropies of each
  side's renormalised top-K: the more certain side gets the larger weight.
- ``contrast``: proxy-tuning style, fused = z_large + alpha * (z_small_ctx - z_small_plain), where
  z_small_plain is the small model *without* the private context (a second pass on the device).
- ``learned``: w = sigmoid(MLP(features)) per position, by a ``FusionNet`` trained with
  ``cogenesis train-fusion`` (``cogenesis.apps.fusion_train``).

``restrict=False`` returns the same mixture over the whole vocabulary (no candidate mask): the
distribution the evaluation scores gold tokens under; sampling always uses the restricted one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cogenesis.core.fusion_net import FusionNet

DEFAULT_FLOOR = -20.0
METHODS = ("constant", "entropy", "contrast", "learned")


def _check_batch(small_lp: torch.Tensor, large_ids: torch.Tensor, large_lp: torch.Tensor) -> None:
    if small_lp.dim() != 2:
        raise ValueError(f"small_lp must be [B, V], got shape {tuple(small_lp.shape)}")
    if large_ids.shape != large_lp.shape or large_ids.dim() != 2:
        raise ValueError(f"large_ids {tuple(large_ids.shape)} and large_lp {tuple(large_lp.shape)} must both be [B, K]")
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


def mix(
    z_small: torch.Tensor, z_large: torch.Tensor, weight: torch.Tensor | float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """log_softmax(w * z_small + (1 - w) * z_large) over the slots where ``mask`` is True.

    z_small, z_large: [B, N] log-probabilities over the same N slots (N = V, or a candidate list);
    weight: a float or [B] per row in [0, 1]; mask: [B, N] bool (None = every slot).
    Returns [B, N] normalised log-probabilities, -inf outside the mask.
    """
    w = torch.as_tensor(weight, dtype=torch.float32)
    w = w[:, None] if w.dim() == 1 else w
    small = z_small.float().clamp(min=torch.finfo(torch.float32).min)  # -inf * 0 would be NaN
    mixed = w * small + (1.0 - w) * z_large.float()
    if mask is not None:
        mixed = mixed.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(mixed, dim=-1)


def topk_entropy(topk_lp: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row's renormalised top-K: [B, K] log-probs -> [B], in [0, ln K]."""
    lp = torch.log_softmax(topk_lp.float().nan_to_num(neginf=-1e4), dim=-1)
    return (-(lp.exp() * lp).sum(dim=-1)).clamp(min=0.0)


def entropy_weight(small_topk_lp: torch.Tensor, large_topk_lp: torch.Tensor) -> torch.Tensor:
    """w_small = H_large / (H_small + H_large) per row -> [B] in [0, 1] (0.5 when both are certain)."""
    h_small, h_large = topk_entropy(small_topk_lp), topk_entropy(large_topk_lp)
    total = h_small + h_large
    return torch.where(total > 1e-6, h_large / total.clamp(min=1e-6), torch.full_like(total, 0.5))


def _mix_with_cloud(
    small_lp: torch.Tensor,
    large_ids: torch.Tensor,
    large_lp: torch.Tensor,
    weight: torch.Tensor | float,
    floor: float,
    restrict: bool,
) -> torch.Tensor:
    """``mix`` of the device's distribution with the cloud's floored top-K, over candidates if ``restrict``."""
    large_dense = dense_large_logprobs(large_ids, large_lp, small_lp.shape[1], floor)
    return mix(small_lp, large_dense, weight, candidate_mask(small_lp, large_ids) if restrict else None)


def fuse_constant(
    small_lp: torch.Tensor,
    large_ids: torch.Tensor,
    large_lp: torch.Tensor,
    weight: float = 0.5,
    floor: float = DEFAULT_FLOOR,
    restrict: bool = True,
) -> torch.Tensor:
    """The paper's fixed-weight fusion: fused = w * z_small + (1 - w) * z_large over candidates.

    Args:
        small_lp: [B, V] small-model log-probabilities (log-softmax over the full vocabulary).
        large_ids, large_lp: [B, K] the cloud's top-K token ids and log-probabilities.
        weight: w in [0, 1]; 1 = small model only, 0 = large model only (within candidates).
        restrict: mask everything outside the candidate union (False: the whole vocabulary).
    Returns:
        [B, V] normalised log-probabilities, -inf outside the candidate set.
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    _check_batch(small_lp, large_ids, large_lp)
    return _mix_with_cloud(small_lp, large_ids, large_lp, weight, floor, restrict)


def fuse_entropy(
    small_lp: torch.Tensor,
    large_ids: torch.Tensor,
    large_lp: torch.Tensor,
    floor: float = DEFAULT_FLOOR,
    restrict: bool = True,
) -> torch.Tensor:
    """Mixture with a per-row weight from the two top-K entropies (``entropy_weight``)."""
    _check_batch(small_lp, large_ids, large_lp)
    w = entropy_weight(small_lp.float().topk(large_ids.shape[1], dim=-1).values, large_lp)
    return _mix_with_cloud(small_lp, large_ids, large_lp, w, floor, restrict)


def fuse_contrast(
    small_lp: torch.Tensor,
    plain_lp: torch.Tensor,
    large_ids: torch.Tensor,
    large_lp: torch.Tensor,
    alpha: float = 1.0,
    floor: float = DEFAULT_FLOOR,
    restrict: bool = True,
) -> torch.Tensor:
    """Proxy-tuning: z_large + alpha * (z_small_ctx - z_small_plain), normalised over candidates.

    ``plain_lp`` [B, V]: the small model's log-probs at the same position *without* the private
    context; the difference is what the context changes, applied to the large model's view.
    """
    _check_batch(small_lp, large_ids, large_lp)
    if plain_lp.shape != small_lp.shape:
        raise ValueError(f"plain_lp {tuple(plain_lp.shape)} must have small_lp's shape {tuple(small_lp.shape)}")
    if alpha < 0:
        raise ValueError(f"contrast alpha must be >= 0, got {alpha}")
    lowest = torch.finfo(torch.float32).min / 4  # keep -inf out of the difference (inf - inf is NaN)
    delta = small_lp.float().clamp(min=lowest) - plain_lp.float().clamp(min=lowest)
    large_dense = dense_large_logprobs(large_ids, large_lp, small_lp.shape[1], floor)
    fused = large_dense + alpha * delta.clamp(min=floor, max=-floor)  # a bounded edit of the large view
    if restrict:
        fused = fused.masked_fill(~candidate_mask(small_lp, large_ids), float("-inf"))
    return torch.log_softmax(fused, dim=-1)


def fuse_learned(
    small_lp: torch.Tensor, large_ids: torch.Tensor, large_lp: torch.Tensor, net: FusionNet, restrict: bool = True
) -> torch.Tensor:
    """The paper's fusion network: w = sigmoid(MLP(top-K of both sides)) per row, then ``mix``."""
    _check_batch(small_lp, large_ids, large_lp)
    if large_ids.shape[1] != net.k:
        raise ValueError(f"the fusion network was trained on top-{net.k}, the cloud sent top-{large_ids.shape[1]}")
    small_top = small_lp.float().topk(net.k, dim=-1)
    with torch.no_grad():
        w = net.weight(small_top.indices, small_top.values, large_ids.long(), large_lp.float())
    return _mix_with_cloud(small_lp, large_ids, large_lp, w, net.floor, restrict)


def fuse(
    method: str,
    small_lp: torch.Tensor,
    large_ids: torch.Tensor,
    large_lp: torch.Tensor,
    *,
    weight: float = 0.5,
    floor: float = DEFAULT_FLOOR,
    alpha: float = 1.0,
    plain_lp: torch.Tensor | None = None,
    net: FusionNet | None = None,
    restrict: bool = True,
) -> torch.Tensor:
    """One entry point for every method (see the module docstring); [B, V] log-probabilities."""
    if method == "constant":
        return fuse_constant(small_lp, large_ids, large_lp, weight, floor, restrict)
    if method == "entropy":
        return fuse_entropy(small_lp, large_ids, large_lp, floor, restrict)
    if method == "contrast":
        if plain_lp is None:
            raise ValueError("contrast fusion needs the small model's log-probs without the context (plain_lp)")
        return fuse_contrast(small_lp, plain_lp, large_ids, large_lp, alpha, floor, restrict)
    if method == "learned":
        if net is None:
            raise ValueError("learned fusion needs a trained FusionNet (--fusion-checkpoint)")
        return fuse_learned(small_lp, large_ids, large_lp, net, restrict)
    raise ValueError(f"unknown fusion method {method!r}: use one of {', '.join(METHODS)}")
