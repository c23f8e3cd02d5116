"""A persistent store of KV slots: the replica's batch stays packed across steps.

Every layer's keys and values live in one tensor each, [S, Hkv, C + 1, D]. A session owns a slot (a row)
from its first token until it leaves; its tokens sit at positions 0..len-1 of that row, so a row's unused
tail is never attended, and column C is scratch where padding writes. A forward pass writes every row's
new keys and values in place, at that row's own positions, and attends over the rows' slots:

- when the rows are a run of consecutive slots in order (a lockstep batch, what a steady step looks like,
  since free slots are reused lowest first), the model reads a view of the store: no copy at all;
- otherwise their slots are gathered (one ``index_select`` per layer, the size of what the step reads).

Joining takes a free slot and writes only its own tokens; leaving frees the slot; dropping rejected draft
tokens or evicting a session only changes a length. Nothing re-packs the other sessions: the store copies
rows only when it grows (slots or positions, by at least a quarter, so growth is amortized).

Positions continue per row and every query sees exactly its row's tokens up to itself, so a row's
log-probs equal running it alone (``tests/core/test_kvslots.py`` checks this against ``batched_forward``).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

from cogenesis.core.kvbatch import KV, cached_pass

GROW = 1.25  # growth factor of slots and positions (at least)
ALIGN = 32  # positions are allocated in multiples of this


class SlotStore:
    """Per-slot KV caches of one model, packed in place (see the module docstring). Not thread-safe."""

    def __init__(self, model, slots: int = 8, capacity: int = 128) -> None:
        cfg = model.config
        self.model = model
        self.n_layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.dtype = next(model.parameters()).dtype
        self.capacity = _align(capacity)
        self.keys = [self._zeros(slots, self.capacity) for _ in range(self.n_layers)]
        self.values = [self._zeros(slots, self.capacity) for _ in range(self.n_layers)]
        self.lengths = [0] * slots
        self.min_slots, self.min_capacity = slots, self.capacity  # what ``trim`` never goes below
        self._free = list(range(slots))  # a heap: the lowest free slot first
        self._used: set[int] = set()
        self.grown = 0  # times the store grew (the only copies of rows it makes)

    # ---- slots ------------------------------------------------------------------------------------

    @property
    def token_bytes(self) -> int:
        """KV bytes one token takes (every layer, keys and values)."""
        return 2 * self.n_layers * self.kv_heads * self.head_dim * self.keys[0].element_size()

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def reserved_bytes(self) -> int:
        """What the store holds in memory (every slot at full capacity)."""
        return self.slots * (self.capacity + 1) * self.token_bytes

    def used_bytes(self) -> int:
        """What its sessions' tokens take."""
        return sum(self.lengths[s] for s in self._used) * self.token_bytes

    def alloc(self) -> int:
        """A free slot (the lowest), empty."""
        if not self._free:
            self._grow(slots=max(self.slots + 1, int(self.slots * GROW) + 1))
        slot = heapq.heappop(self._free)
        self._used.add(slot)
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Give the slot back (its contents are garbage from now on)."""
        self._check(slot)
        self._used.discard(slot)
        self.lengths[slot] = 0
        heapq.heappush(self._free, slot)

    def length(self, slot: int) -> int:
        self._check(slot)
        return self.lengths[slot]

    def crop(self, slot: int, length: int) -> None:
        """Keep the slot's first ``length`` tokens (drops rejected draft tokens): no copy."""
        self._check(slot)
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot crop slot {slot} of {self.lengths[slot]} tokens to {length}")
        self.lengths[slot] = length

    def write(self, slot: int, kv: KV) -> None:
        """Fill an empty slot with a cache computed elsewhere (a shared prompt head)."""
        self._check(slot)
        n = kv[0][0].shape[2]
        if self.lengths[slot]:
            raise ValueError(f"slot {slot} is not empty")
        self._reserve(n)
        for layer, (k, v) in enumerate(kv):
            self.keys[layer][slot, :, :n] = k[0]
            self.values[layer][slot, :, :n] = v[0]
        self.lengths[slot] = n

    def read(self, slot: int) -> KV:
        """The slot's cache as per-layer (keys, values) [1, H, L, D] views (tests, debugging)."""
        n = self.length(slot)
        return tuple((k[slot : slot + 1, :, :n], v[slot : slot + 1, :, :n]) for k, v in zip(self.keys, self.values))

    def trim(self, ahead: int = 0) -> bool:
        """Give memory back after a burst: when the slots in use all sit in the lower half of the store, the slots
        above them go; when every row in use, ``ahead`` positions more, fits in half the positions, the positions
        beyond go. Rows are not moved (the store is copied once, at its smaller size). Returns whether it shrank."""
        top = max(self._used, default=-1) + 1
        need = _align(max((self.lengths[s] for s in self._used), default=0) + ahead)
        slots = max(top, self.min_slots) if 2 * max(top, 1) <= self.slots else self.slots
        capacity = max(need, self.min_capacity) if 2 * need <= self.capacity else self.capacity
        if (slots, capacity) == (self.slots, self.capacity):
            return False
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                new = self._zeros(slots, capacity)
                new[:, :, :capacity] = old[:slots, :, :capacity]
                store[layer] = new
        self.lengths = self.lengths[:slots]
        self._free = [s for s in range(slots) if s not in self._used]
        heapq.heapify(self._free)
        self.capacity = capacity
        return True

    # ---- a forward pass ------------------------------------------------------------------------------

    def forward(
        self, slots: Sequence[int], new_tokens: Sequence[Sequence[int]], keep_last: int = 1, pad_id: int = 0, model=None
    ) -> torch.Tensor:
        """Extend each slot by its new tokens in one forward pass (the slots' caches grow in place).

        Args:
            slots: B distinct slots (in use).
            new_tokens: B non-empty token lists (lengths may differ; each row is left-padded to the longest).
            keep_last: positions of log-probs to return per row (its last ``keep_last`` tokens).
            model: what to call instead of the store's model (a wrapper of it).
        Returns:
            log-probs [B, keep_last, V] (float32).
        """
        if len(slots) != len(new_tokens) or not slots:
            raise ValueError(f"need one token list per slot: {len(slots)} slots, {len(new_tokens)} token lists")
        if len(set(slots)) != len(slots):
            raise ValueError("a slot appears twice in one pass")
        lens = [len(t) for t in new_tokens]
        if min(lens) == 0:
            raise ValueError("every row needs at least one new token")
        if keep_last > min(lens):
            raise ValueError(f"keep_last={keep_last} exceeds the shortest row's {min(lens)} new tokens")
        for s in slots:
            self._check(s)
        b, nmax = len(slots), max(lens)
        past = torch.tensor([self.lengths[s] for s in slots], dtype=torch.long)  # [B]
        n = torch.tensor(lens, dtype=torch.long)
        self._reserve(int((past + n).max()))
        width = int((past + n).max())  # keys the pass attends: every row's past and new tokens
        ids = torch.full((b, nmax), pad_id, dtype=torch.long)
        for row, toks in enumerate(new_tokens):
            ids[row, nmax - len(toks) :] = torch.as_tensor(list(toks), dtype=torch.long)
        col = torch.arange(nmax)[None, :]  # [1, Nmax]
        offset = col - (nmax - n)[:, None]  # [B, Nmax] index among the row's new tokens; < 0 for padding
        real = offset >= 0
        pos = past[:, None] + offset.clamp(min=0)  # padding sits at the row's next position (never written)
        where = torch.where(real, pos, torch.full_like(pos, self.capacity))  # padding writes to the scratch column
        mask = (torch.arange(width)[None, None, :] <= pos[:, :, None])[:, None]  # [B, 1, Nmax, W]
        index = torch.as_tensor(list(slots), dtype=torch.long)
        start = int(slots[0])
        run = list(slots) == list(range(start, start + b))
        cache = _SlotCache(self, index, where, None if not run else slice(start, start + b), width)
        logprobs, _ = cached_pass(self.model if model is None else model, ids, mask, pos, cache, keep_last)
        for s, k in zip(slots, lens):
            self.lengths[s] += k
        return logprobs

    # ---- internals ------------------------------------------------------------------------------------

    def _zeros(self, slots: int, capacity: int) -> torch.Tensor:
        return torch.zeros(slots, self.kv_heads, capacity + 1, self.head_dim, dtype=self.dtype)

    def _check(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not in use")

    def reserve(self, length: int) -> None:
        """Make room for rows of ``length`` tokens now (a caller that knows what is coming grows the store once, at a
        moment it chooses, instead of in the middle of a later step)."""
        self._reserve(length)

    def _reserve(self, length: int) -> None:
        if length > self.capacity:
            self._grow(capacity=max(length, int(self.capacity * GROW)))

    def _grow(self, slots: int | None = None, capacity: int | None = None) -> None:
        s, c = slots or self.slots, _align(capacity or self.capacity)
        keep = min(self.capacity, c)
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                new = self._zeros(s, c)
                new[: old.shape[0], :, :keep] = old[:, :, :keep]
                store[layer] = new
        for slot in range(self.slots, s):
            heapq.heappush(self._free, slot)
        self.lengths += [0] * (s - self.slots)
        self.capacity = c
        self.grown += 1


class _SlotCache:
    """What the model sees as its ``past_key_values`` for one pass over a ``SlotStore``: each layer's ``update``
    writes the new keys and values into the rows' slots and returns the keys and values to attend."""

    def __init__(
        self, store: SlotStore, index: torch.Tensor, where: torch.Tensor, run: slice | None, width: int
    ) -> None:
        self.store, self.index, self.where, self.run, self.width = store, index, where, run, width
        self._rows = index[:, None]  # [B, 1] with where [B, Nmax]: advanced indexing picks [B, Nmax, H, D]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.store.keys[layer_idx], self.store.values[layer_idx]
        keys[self._rows, :, self.where] = key_states.transpose(1, 2)
        values[self._rows, :, self.where] = value_states.transpose(1, 2)
        if self.run is not None:  # consecutive slots: attend a view of the store
            return keys[self.run, :, : self.width], values[self.run, :, : self.width]
        w = self.width
        return keys[:, :, :w].index_select(0, self.index), values[:, :, :w].index_select(0, self.index)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.store.n_layers


def _align(n: int) -> int:
    return max(ALIGN, -(-n // ALIGN) * ALIGN)
