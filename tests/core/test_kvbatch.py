"""Batched steps over separate per-session caches equal running each session alone."""

import pytest
import torch

from cogenesis.core.kvbatch import batched_forward, kv_bytes, kv_crop, kv_len


def test_rows_with_different_pasts_and_lengths_match_single_runs(model, alone):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21], [30, 31, 32, 33]]
    lp, caches = batched_forward(model, [None, None, None], prompts)  # ragged prefill
    for b, p in enumerate(prompts):
        assert torch.allclose(lp[b, -1], alone(model, p)[-1], atol=1e-4)
        assert kv_len(caches[b]) == len(p)
    steps = [[40], [41, 42, 43], [44, 45]]  # ragged extension of ragged pasts
    lp2, caches2 = batched_forward(model, caches, steps, keep_last=1)
    for b, (p, s) in enumerate(zip(prompts, steps)):
        assert torch.allclose(lp2[b, -1], alone(model, p + s)[-1], atol=1e-4)
        assert kv_len(caches2[b]) == len(p) + len(s)
    lp3, _ = batched_forward(model, caches2, [[50], [51], [52]])
    for b, (p, s, t) in enumerate(zip(prompts, steps, [[50], [51], [52]])):
        assert torch.allclose(lp3[b, -1], alone(model, p + s + t)[-1], atol=1e-4)


def test_keep_last_returns_each_rows_last_positions(model, alone):
    lp, _ = batched_forward(model, [None, None], [[1, 2, 3, 4], [7, 8, 9]], keep_last=3)
    assert lp.shape[:2] == (2, 3)
    assert torch.allclose(lp[0], alone(model, [1, 2, 3, 4])[-3:], atol=1e-4)
    assert torch.allclose(lp[1], alone(model, [7, 8, 9])[-3:], atol=1e-4)


def test_crop_drops_draft_positions(model, alone):
    _, (kv,) = batched_forward(model, [None], [[1, 2, 3, 4, 5]])
    cropped = kv_crop(kv, 3)
    assert kv_len(cropped) == 3 and kv_bytes(cropped) * 5 == kv_bytes(kv) * 3
    lp, _ = batched_forward(model, [cropped], [[9]])
    assert torch.allclose(lp[0, -1], alone(model, [1, 2, 3, 9])[-1], atol=1e-4)
    assert kv_crop(kv, 0) is None and kv_crop(None, 0) is None


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="one cache per row"):
        batched_forward(model, [None], [[1], [2]])
    with pytest.raises(ValueError, match="at least one new token"):
        batched_forward(model, [None], [[]])
    with pytest.raises(ValueError, match="keep_last"):
        batched_forward(model, [None, None], [[1], [1, 2]], keep_last=2)


def test_packed_batch_steps_and_drops_rows(model, alone):
    from cogenesis.core.kvbatch import PackedBatch

    prompts = [[5, 6, 7, 8, 9], [20, 21], [30, 31, 32]]
    batch = PackedBatch(model)
    lp = batch.prefill(prompts)
    seqs = [list(p) for p in prompts]
    for b, s in enumerate(seqs):
        assert torch.allclose(lp[b], alone(model, s)[-1], atol=1e-4)
    for t in ([40, 41, 42], [43, 44, 45]):
        lp = batch.step(t)
        for b, s in enumerate(seqs):
            s.append(t[b])
            assert torch.allclose(lp[b], alone(model, s)[-1], atol=1e-4)
    batch.keep([2, 1])  # row 0 (the longest) finished: its padding columns go too
    seqs = [seqs[2], seqs[1]]
    assert len(batch) == 2 and batch.mask.shape[1] == max(len(s) for s in seqs)
    lp = batch.step([50, 51])
    for b, s in enumerate(seqs):
        assert torch.allclose(lp[b], alone(model, s + [[50, 51][b]])[-1], atol=1e-4)
    with pytest.raises(ValueError, match="one token per row"):
        batch.step([1, 2, 3])
