"""The slot store: passes over slots equal running each session alone; joins, leaves and crops touch no other row."""

import pytest
import torch

from cogenesis.core.kvbatch import batched_forward
from cogenesis.core.kvslots import SlotStore


def test_ragged_prefills_and_steps_match_single_runs(model, alone):
    store = SlotStore(model, slots=2, capacity=4)  # small: the pass grows it (slots and positions)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    slots = [store.alloc() for _ in prompts]
    assert slots == [0, 1, 2]
    lp = store.forward(slots, prompts)
    for b, p in enumerate(prompts):
        assert torch.allclose(lp[b, -1], alone(model, p)[-1], atol=1e-4)
        assert store.length(slots[b]) == len(p)
    steps = [[40], [41, 42, 43], [44, 45]]
    lp = store.forward(slots, steps, keep_last=1)
    seqs = [p + s for p, s in zip(prompts, steps)]
    for b, s in enumerate(seqs):
        assert torch.allclose(lp[b, -1], alone(model, s)[-1], atol=1e-4)
    for _ in range(40):  # single-token steps past the initial capacity
        lp = store.forward(slots, [[s[-1] % 97 + 3] for s in seqs])
        for s in seqs:
            s.append(s[-1] % 97 + 3)
    for b, s in enumerate(seqs):
        assert torch.allclose(lp[b, -1], alone(model, s)[-1], atol=1e-4)
    assert store.grown >= 2 and store.used_bytes() == sum(map(len, seqs)) * store.token_bytes


def test_subsets_in_any_order_equal_single_runs_and_the_rest_stays(model, alone):
    store = SlotStore(model, slots=4, capacity=32)
    prompts = [[5, 6, 7], [20, 21, 22, 23], [30, 31], [40, 41, 42, 43, 44]]
    slots = [store.alloc() for _ in prompts]
    store.forward(slots, prompts)
    before = [tuple(k.clone() for k, _ in store.read(s)) for s in slots]
    lp = store.forward([slots[3], slots[1]], [[50], [51]])  # not a run: gathered
    assert torch.allclose(lp[0, -1], alone(model, prompts[3] + [50])[-1], atol=1e-4)
    assert torch.allclose(lp[1, -1], alone(model, prompts[1] + [51])[-1], atol=1e-4)
    for b in (0, 2):  # rows that sat the pass out are untouched
        assert store.length(slots[b]) == len(prompts[b])
        assert all(torch.equal(k, k0) for (k, _), k0 in zip(store.read(slots[b]), before[b]))
    lp = store.forward(slots[:3], [[60], [61], [62]])  # a run of consecutive slots: read in place
    seqs = [prompts[0] + [60], prompts[1] + [51, 61], prompts[2] + [62]]
    for b, s in enumerate(seqs):
        assert torch.allclose(lp[b, -1], alone(model, s)[-1], atol=1e-4)


def test_crop_free_and_reuse(model, alone):
    store = SlotStore(model, slots=2, capacity=32)
    a, b = store.alloc(), store.alloc()
    store.forward([a, b], [[1, 2, 3, 4, 5], [7, 8]])
    store.crop(a, 3)  # rejected draft tokens
    lp = store.forward([a], [[9]])
    assert torch.allclose(lp[0, -1], alone(model, [1, 2, 3, 9])[-1], atol=1e-4)
    store.free(a)
    assert store.alloc() == a and store.length(a) == 0  # the lowest free slot, empty
    lp = store.forward([a, b], [[11, 12], [13]])
    assert torch.allclose(lp[0, -1], alone(model, [11, 12])[-1], atol=1e-4)
    assert torch.allclose(lp[1, -1], alone(model, [7, 8, 13])[-1], atol=1e-4)


def test_write_a_shared_head_then_extend(model, alone):
    _, (head,) = batched_forward(model, [None], [[3, 4, 5, 6]])
    store = SlotStore(model, slots=1, capacity=32)
    s = store.alloc()
    store.write(s, head)
    lp = store.forward([s], [[7, 8]], keep_last=2)
    assert torch.allclose(lp[0], alone(model, [3, 4, 5, 6, 7, 8])[-2:], atol=1e-4)
    with pytest.raises(ValueError, match="not empty"):
        store.write(s, head)


def test_bad_arguments(model):
    store = SlotStore(model, slots=2, capacity=32)
    a = store.alloc()
    with pytest.raises(ValueError, match="one token list per slot"):
        store.forward([a], [[1], [2]])
    with pytest.raises(ValueError, match="at least one new token"):
        store.forward([a], [[]])
    with pytest.raises(ValueError, match="not in use"):
        store.forward([1], [[1]])
    with pytest.raises(ValueError, match="twice"):
        store.forward([a, a], [[1], [2]])
    with pytest.raises(ValueError, match="keep_last"):
        store.forward([a], [[1]], keep_last=2)
    with pytest.raises(ValueError, match="cannot crop"):
        store.crop(a, 5)


def test_trim_gives_a_bursts_memory_back_and_keeps_the_rows_in_use(model, alone):
    store = SlotStore(model, slots=2, capacity=32)
    slots = [store.alloc() for _ in range(9)]  # a burst: the store grows to hold 9
    store.forward(slots, [[3 + i, 4, 5] for i in range(9)])
    grown = store.reserved_bytes()
    for s in slots[2:]:
        store.free(s)
    assert store.trim() and store.slots == 2 and store.reserved_bytes() < grown
    lp = store.forward(slots[:2], [[9], [10]])  # the rows in use are where they were
    assert torch.allclose(lp[0, -1], alone(model, [3, 4, 5, 9])[-1], atol=1e-4)
    assert torch.allclose(lp[1, -1], alone(model, [4, 4, 5, 10])[-1], atol=1e-4)
    assert store.alloc() == 2 and store.trim() is False  # a slot in use at the top: nothing to drop


def test_trim_keeps_what_the_slots_in_use_need(model, alone):
    store = SlotStore(model, slots=2, capacity=32)
    a, b = store.alloc(), store.alloc()
    store.forward([a, b], [[1] * 100, [2]])  # positions grow past 100
    assert store.capacity == 128
    store.free(a)
    assert not store.trim(ahead=70)  # b with 70 positions ahead (96 aligned) does not fit in half of 128
    assert store.trim() and store.capacity == 32 and store.length(b) == 1
    lp = store.forward([b], [[7]])
    assert torch.allclose(lp[0, -1], alone(model, [2, 7])[-1], atol=1e-4)
