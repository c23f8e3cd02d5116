"""Next-token sampling: temperature, nucleus (top-p), greedy. Pure functions over [B, V]."""

from __future__ import annotations

import math

import torch


def check_sampling(temperature: float, top_p: float) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) every token outside the smallest set whose probability mass >= top_p.

    logits: [B, V] (any scale; -inf entries stay masked). The most likely token always survives.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # [B, V]
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p  # mass before this token already >= p
    drop = torch.zeros_like(drop_sorted).scatter(1, sorted_idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sampling_probs(logprobs: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution ``sample`` draws from: [B, V] -> [B, V] probabilities (one-hot when greedy)."""
    check_sampling(temperature, top_p)
    if temperature == 0:
        return torch.nn.functional.one_hot(logprobs.argmax(dim=-1), logprobs.shape[-1]).float()
    return top_p_filter(logprobs.float() / temperature, top_p).softmax(dim=-1)


def sample(
    logprobs: torch.Tensor,
    temperature: float = 0.7,
    top_p: float = 0.9,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of [B, V] log-probabilities (or logits). Returns ids [B].

    temperature == 0 is greedy (argmax); otherwise softmax(logits / T) restricted to top-p.
    """
    check_sampling(temperature, top_p)
    if temperature == 0:
        return logprobs.argmax(dim=-1)
    logits = top_p_filter(logprobs.float() / temperature, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
