"""Attention for batched CPU decoding: SDPA that keeps grouped KV heads grouped.

transformers' own "sdpa" attention passes ``enable_gqa`` to torch only when there is no attention
mask; every padded batch has one, so it copies each layer's keys and values once per query group
(``repeat_kv``) on every step. With SmolLM2's 9 query heads over 3 KV heads and 64 edge sessions
of ~576 tokens, that copy dominated the small model's step: 2.47 s vs 0.67 s per step without it,
identical log-probs (measured on this machine, one thread). ``load_causal_lm`` selects this
implementation by name (``ATTN_IMPLEMENTATION``); the masks are transformers' own SDPA masks.
"""

from __future__ import annotations

import torch

ATTN_IMPLEMENTATION = "cogenesis_sdpa"


def sdpa_grouped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, H, Q, D]; key, value [B, Hkv, K, D] with H a multiple of Hkv -> output [B, Q, H, D]."""
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} key/value heads")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = bool(query.shape[2] > 1 and attention_mask is None and is_causal)
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=is_causal,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``ATTN_IMPLEMENTATION`` known to transformers (idempotent); returns its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, sdpa_grouped_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
