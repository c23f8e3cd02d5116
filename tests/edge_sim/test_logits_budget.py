"""The logits loop's per-phase time budgets, its time to first token by cause, and the instant device."""

import time

import pytest
from test_logits import _ScriptedLink, cfg
from transformers import AutoTokenizer

from cogenesis.core.errors import ConfigError
from cogenesis.edge_sim.client import EdgeClient
from cogenesis.edge_sim.device import InstantDevice
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.logits import run_logits_sessions


class _SlowLink(_ScriptedLink):
    """``_ScriptedLink`` whose answers take time: ``open_s`` for a round with an open in it, ``step_s`` for others."""

    def __init__(self, open_s: float = 0.0, step_s: float = 0.0) -> None:
        super().__init__()
        self.open_s, self.step_s = open_s, step_s

    def collect(self, session_ids, cfg):
        opening = any(self.asked.get(sid) == 0 for sid in session_ids)
        time.sleep(self.open_s if opening else self.step_s)
        return super().collect(session_ids, cfg)


class _SlowPrefill(InstantDevice):
    def prefill(self, keys, prompts):
        time.sleep(0.15)
        return super().prefill(keys, prompts)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _run(tok, records, link, device=None, max_new_tokens=3, **kw):
    config = cfg(top_k=2, max_new_tokens=max_new_tokens, ignore_eos=True)
    engine = EdgeEngine(None, tok, config.max_prompt_tokens)  # no small model
    clients = [EdgeClient(i, rec, engine, config) for i, rec in enumerate(records)]
    return run_logits_sessions(clients, engine, link, config, device=device or InstantDevice(), **kw)


def test_the_instant_device_takes_no_time_and_writes_the_clouds_top_1(tok, sample_records):
    device = InstantDevice()
    assert device.simulated and device.prefill(["a", "b"], [[1], [2, 3]]) == [None, None]
    assert device.step(["a"], [5]) == [None] and device.release(["a"]) is None and device.network() is None
    link = _ScriptedLink()
    t0 = time.perf_counter()
    results = _run(tok, sample_records[:2], link, device, max_new_tokens=5)
    assert time.perf_counter() - t0 < 5
    for r in results:  # greedy over the cloud's top-k: its top-1 (id 7) every time
        assert r.error is None and r.ids == [7] * 5 and r.round_trips == 5 and not r.stopped
    assert r.ttft_device_prefill_s is not None and r.ttft_cloud_wait_s is not None


def test_the_decode_budget_stops_sessions_from_their_last_first_token(tok, sample_records):
    link = _SlowLink(open_s=0.3, step_s=0.005)
    results = _run(tok, sample_records[:2], link, max_new_tokens=4096, decode_budget_s=0.2)
    for r in results:
        assert r.error is None and r.stopped and 1 < r.tokens < 4096, r
        assert r.ttft_s >= 0.3  # the prefill phase was not cut by the decode budget
        assert 0.2 <= r.seconds - r.ttft_s < 1.5, (r.seconds, r.ttft_s)


def test_stop_at_stays_a_hard_stop(tok, sample_records):
    link = _SlowLink(step_s=0.005)
    stop_at = time.perf_counter() + 0.2
    (r,) = _run(tok, sample_records[:1], link, max_new_tokens=4096, stop_at=stop_at, decode_budget_s=100.0)
    assert r.stopped and r.tokens < 4096 and r.seconds < 1.5


def test_the_prefill_budget_cuts_only_the_prefill_phase(tok, sample_records):
    (cut,) = _run(tok, sample_records[:1], _SlowLink(open_s=0.4), prefill_budget_s=0.1, decode_budget_s=10.0)
    assert cut.stopped and cut.tokens == 0 and cut.error is None and cut.ttft_s is None
    # once every session has its first token, the prefill budget no longer applies
    (whole,) = _run(
        tok, sample_records[:1], _SlowLink(open_s=0.05, step_s=0.01), max_new_tokens=40, prefill_budget_s=0.2
    )
    assert not whole.stopped and whole.tokens == 40 and whole.seconds > 0.2


def test_time_to_first_token_by_cause(tok, sample_records):
    results = _run(tok, sample_records[:2], _SlowLink(open_s=0.25), _SlowPrefill())
    for r in results:
        assert 0.15 <= r.ttft_device_prefill_s < 0.25
        assert 0.25 <= r.ttft_cloud_wait_s < 0.5
        assert r.ttft_s >= r.ttft_device_prefill_s + r.ttft_cloud_wait_s


@pytest.mark.parametrize("kw", [{"decode_budget_s": -1.0}, {"prefill_budget_s": -0.5}])
def test_negative_budgets_are_refused(tok, sample_records, kw):
    with pytest.raises(ConfigError, match="negative"):
        _run(tok, sample_records[:1], _ScriptedLink(), **kw)
