"""Teacher forcing: a model's next-token distribution at every position of a gold answer.

Shared by ``cogenesis train-fusion`` (top-k of both models on gold answers) and ``cogenesis eval``
(negative log-likelihood of the gold answer under each setting's distribution).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cogenesis.core.data import Record


def gold_ids(tokenizer, record: Record, max_tokens: int) -> list[int]:
    """The record's gold answer as token ids (at most ``max_tokens``; empty without a gold answer)."""
    if not record.gold:
        return []
    return list(tokenizer(record.gold.strip(), add_special_tokens=False).input_ids)[:max_tokens]


def teacher_forced(model, prompt_ids: Sequence[int], target_ids: Sequence[int]) -> torch.Tensor:
    """Log-probs [T, V] of the next token before each of ``target_ids`` (T of them), given the prompt.

    Row t is the distribution that predicts target_ids[t] after prompt + target_ids[:t].
    """
    if not prompt_ids or not target_ids:
        raise ValueError("teacher forcing needs a non-empty prompt and target")
    ids = torch.tensor([list(prompt_ids) + list(target_ids)], dtype=torch.long)
    t = len(target_ids)
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=t + 1).logits[0, :t]  # [T, V]
    return logits.float().log_softmax(-1)


def nll(lp: torch.Tensor, target_ids: Sequence[int]) -> torch.Tensor:
    """Per-token negative log-likelihood [T] of ``target_ids`` under rows of ``lp`` [T, V]."""
    return -lp.gather(1, torch.tensor(list(target_ids), dtype=torch.long)[:, None])[:, 0]
