"""Benchmark accounting: what a variant measured, ratios, and the report's table and plot."""

import pytest

from cogenesis.apps.bench.exchange import ExchangeBenchOptions, ratios
from cogenesis.apps.bench.report import markdown_table, plot
from cogenesis.apps.bench.stats import Run, pct, summarize
from cogenesis.core.errors import ConfigError


def test_percentiles():
    assert pct([], 50) is None
    assert pct([1, 2, 3, 4], 50) == 2.5
    assert pct(range(101), 99) == 99


def test_summarize_separates_prefill_from_decode():
    # two sessions: first tokens at 2 s (after prefill), 11 tokens each, done at 4 s and 7 s
    runs = [
        Run(
            tokens=11,
            first_token_s=2.0,
            end_s=4.0,
            completed=True,
            round_trips=11,
            rtt_us=(1000, 3000),
            overhead_us=(500, 700),
        ),
        Run(tokens=11, first_token_s=2.0, end_s=7.0, completed=True, round_trips=11),
    ]
    r = summarize("cogenesis", runs, wall_s=7.0)
    assert r.tokens == 22 and r.tokens_per_s == pytest.approx(22 / 7)
    assert r.decode_tokens_per_s == pytest.approx(20 / 5)  # tokens after the first, from 2 s to 7 s
    assert r.session_p50_s == pytest.approx(5.5) and r.ttft_p50_s == 2.0
    assert r.overhead_p50_ms == pytest.approx(0.6) and r.rtt_p50_ms == pytest.approx(2.0)
    assert r.tokens_per_round_trip == pytest.approx(1.0)


def test_failed_and_stopped_sessions_are_counted_apart():
    runs = [
        Run(tokens=5, first_token_s=1.0, end_s=3.0, completed=False),  # stopped by the budget
        Run(tokens=0, first_token_s=None, end_s=1.0, completed=False, failed=True),
        Run(tokens=8, first_token_s=1.0, end_s=2.0, completed=True),
    ]
    r = summarize("stateless", runs, wall_s=3.0, truncated=True)
    assert (r.sessions, r.completed, r.failed, r.tokens, r.truncated) == (3, 1, 1, 13, True)
    assert r.session_p50_s == 2.0  # latency only of sessions that finished
    assert r.overhead_p50_ms is None  # untraced


def _result(variant, n, tps):
    return summarize(variant, [Run(tokens=2, first_token_s=0.0, end_s=2 / tps, completed=True)] * n, 2 / tps)


def test_ratios_compare_decode_throughput_per_session_count():
    results = [_result("large-only", 4, 100.0), _result("stateless", 4, 5.0), _result("cogenesis", 4, 50.0)]
    (row,) = ratios(results)
    assert row["sessions"] == 4 and row["variant"] == "cogenesis"
    assert row["vs_large_only"] == pytest.approx(0.5) and row["vs_stateless"] == pytest.approx(10.0)
    assert row["vs_vllm"] is None


def test_table_and_plot(tmp_path):
    results = [_result(v, n, t) for n in (1, 4) for v, t in (("large-only", 20.0), ("cogenesis", 10.0))]
    report = {
        "options": {"max_new_tokens": 2, "top_k": 10},
        "machine": {"cpus": 2},
        "results": [r.to_json() for r in results],
        "ratios": ratios(results),
    }
    table = markdown_table(report)
    assert table.splitlines()[0].startswith("| N | variant | decode tok/s")
    assert len(table.splitlines()) == 2 + 4 and "| 0.50 |" in table
    plot(report, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"sessions": ()}, "sessions"),
        ({"sessions": (0,)}, "sessions"),
        ({"top_k": 51}, "top-k"),
        ({"top_k": 21, "with_vllm": True}, "max_logprobs"),
        ({"budget_s": 0}, "budget"),
        ({"variants": ("nope",)}, "unknown variant"),
        ({"lookahead": 0}, "lookahead"),
        ({"threads": 0}, "threads"),
    ],
)
def test_bad_options_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        ExchangeBenchOptions(**kw)
