"""One forward pass over many sequences, each with its own KV cache (continuous batching).

Sessions keep their caches separately (``KV``: per layer a (keys, values) pair, [1, H, L, D]),
so they can join and leave between steps. For a step, the caches are packed into one
left-padded batch, every row's new tokens are left-padded to the longest, one forward pass runs,
and each row's cache is cut back out (a view into the batch's tensors where the row's span is
contiguous, as in every single-token step, so memory is shared until the next step replaces it).
Padding is masked; positions continue per row, so a row's result equals running it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (keys, values), each [1, H, L, D]


def kv_len(kv: KV | None) -> int:
    return 0 if not kv else kv[0][0].shape[2]


def kv_crop(kv: KV | None, length: int) -> KV | None:
    """The first ``length`` positions of a cache (drops rejected draft tokens)."""
    if kv is None or length == kv_len(kv):
        return kv
    if length == 0:
        return None
    return tuple((k[:, :, :length], v[:, :, :length]) for k, v in kv)


def kv_bytes(kv: KV | None) -> int:
    return 0 if not kv else sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


def _pack(pasts: Sequence[KV | None], lmax: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    if lmax == 0:
        return None
    ref = next(p for p in pasts if p)
    packed = []
    for layer, (k0, v0) in enumerate(ref):
        _, heads, _, dim = k0.shape
        keys = k0.new_zeros(len(pasts), heads, lmax, dim)  # [B, H, Lmax, D]
        values = v0.new_zeros(len(pasts), v0.shape[1], lmax, v0.shape[3])
        for b, past in enumerate(pasts):
            if past:
                n = past[layer][0].shape[2]
                keys[b, :, lmax - n :] = past[layer][0][0]
                values[b, :, lmax - n :] = past[layer][1][0]
        packed.append((keys, values))
    return packed


def cached_pass(
    model, ids: torch.Tensor, mask, pos: torch.Tensor, cache, keep_last: int = 1
) -> tuple[torch.Tensor, Any]:
    """One forward pass over ``ids`` [B, N] at positions ``pos`` on top of ``cache`` (any object the model takes as
    ``past_key_values``); returns the log-probs of the last ``keep_last`` positions [B, keep_last, V] (float32) and
    the cache the model returned."""
    with torch.inference_mode():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep_last,
        )
    return out.logits[:, -keep_last:].float().log_softmax(-1), out.past_key_values


def batched_forward(
    model, pasts: Sequence[KV | None], new_tokens: Sequence[Sequence[int]], keep_last: int = 1, pad_id: int = 0
) -> tuple[torch.Tensor, list[KV]]:
    """Extend every row by its new tokens in one forward pass.

    Args:
        pasts: B caches (None = empty).
        new_tokens: B non-empty token lists (lengths may differ).
        keep_last: positions of log-probs to return per row (its last ``keep_last`` tokens).
    Returns:
        logprobs [B, keep_last, V] (float32) and the B extended caches.
    """
    from transformers import DynamicCache

    if len(pasts) != len(new_tokens) or not pasts:
        raise ValueError(f"need one cache per row: {len(pasts)} caches, {len(new_tokens)} token lists")
    if any(len(t) == 0 for t in new_tokens):
        raise ValueError("every row needs at least one new token")
    past_lens = [kv_len(p) for p in pasts]
    lens = [len(t) for t in new_tokens]
    lmax, nmax = max(past_lens), max(lens)
    if keep_last > min(lens):
        raise ValueError(f"keep_last={keep_last} exceeds the shortest row's {min(lens)} new tokens")
    ids = torch.full((len(pasts), nmax), pad_id, dtype=torch.long)  # [B, Nmax]
    mask = torch.zeros(len(pasts), lmax + nmax, dtype=torch.long)  # [B, Lmax + Nmax]
    pos = torch.zeros(len(pasts), nmax, dtype=torch.long)
    for b, (toks, pl, n) in enumerate(zip(new_tokens, past_lens, lens)):
        ids[b, nmax - n :] = torch.tensor(list(toks), dtype=torch.long)
        mask[b, lmax - pl : lmax] = 1
        mask[b, lmax + nmax - n :] = 1
        pos[b, nmax - n :] = torch.arange(pl, pl + n)
    packed = _pack(pasts, lmax)
    cache = DynamicCache(ddp_cache_data=packed) if packed else None
    logprobs, full = cached_pass(model, ids, mask, pos, cache, keep_last)  # [B, keep_last, V]
    layers = [(layer.keys, layer.values) for layer in full.layers] if hasattr(full, "layers") else list(full)
    caches = []
    for b, (pl, n) in enumerate(zip(past_lens, lens)):
        if n == nmax:  # the row's past and new tokens are adjacent: a view, no copy
            caches.append(tuple((k[b : b + 1, :, lmax - pl :], v[b : b + 1, :, lmax - pl :]) for k, v in layers))
            continue
        keep = torch.cat([torch.arange(lmax - pl, lmax), torch.arange(lmax + nmax - n, lmax + nmax)])
        caches.append(tuple((k[b : b + 1, :, keep], v[b : b + 1, :, keep]) for k, v in layers))
    return logprobs, caches


class PackedBatch:
    """A batch whose rows stay together across steps (the edge pool's lockstep sessions).

    The cache is kept packed ([B, H, L, D], left-padded) between steps, so a step costs one
    forward pass and no re-packing; finished rows are dropped with ``keep``.
    """

    def __init__(self, model, pad_id: int = 0) -> None:
        self.model = model
        self.pad_id = pad_id
        self.cache: Any = None  # a transformers Cache once prefilled
        self.mask: torch.Tensor | None = None  # [B, L] 1 = real token
        self.lengths: list[int] = []

    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Start the batch from ragged prompts; returns log-probs [B, V] after each prompt."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prefill needs at least one non-empty prompt")
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        self.mask = torch.zeros(len(prompts), width, dtype=torch.long)
        pos = torch.zeros(len(prompts), width, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            self.mask[b, width - len(p) :] = 1
            pos[b, width - len(p) :] = torch.arange(len(p))
        self.lengths = [len(p) for p in prompts]
        return self._forward(ids, pos)

    def step(self, tokens: Sequence[int], sitting_out: Sequence[int] = ()) -> torch.Tensor:
        """One token per row; returns log-probs [B, V].

        Rows in ``sitting_out`` (a session waiting for the cloud) take no token: theirs is ignored, its column is
        masked and their positions do not advance, so they go on later exactly where they stopped; their row of
        the result is meaningless."""
        if self.mask is None or len(tokens) != self.mask.shape[0]:
            raise ValueError(f"step needs one token per row ({0 if self.mask is None else self.mask.shape[0]})")
        out = set(sitting_out)
        column = torch.tensor([[0 if b in out else 1] for b in range(len(tokens))], dtype=torch.long)
        self.mask = torch.cat([self.mask, column], dim=1)
        pos = torch.tensor(self.lengths, dtype=torch.long)[:, None]
        self.lengths = [n if b in out else n + 1 for b, n in enumerate(self.lengths)]
        ids = [self.pad_id if b in out else int(t) for b, t in enumerate(tokens)]
        return self._forward(torch.tensor(ids, dtype=torch.long)[:, None], pos)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in this order), e.g. after sessions finish."""
        if list(rows) == list(range(len(self.lengths))):
            return
        assert self.cache is not None and self.mask is not None, "keep() before prefill()"
        idx = torch.tensor(list(rows), dtype=torch.long)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask[idx]
        self.lengths = [self.lengths[i] for i in rows]
        if len(rows):
            first = int((self.mask.sum(0) > 0).nonzero()[0])  # drop columns that are padding for every row
            if first:
                self.mask = self.mask[:, first:]
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def __len__(self) -> int:
        return len(self.lengths)

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logprobs, self.cache = cached_pass(self.model, ids, self.mask, pos, self.cache)
        return logprobs[:, -1]  # [B, V]
