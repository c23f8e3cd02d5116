"""Benchmark accounting: what a variant measured, ratios, and the report's table and plot."""

from dataclasses import replace

import pytest

from cogenesis.apps.bench.exchange import (
    DEFAULT_VARIANTS,
    VARIANTS,
    ExchangeBenchOptions,
    achieved,
    compute_use,
    kv_budget_mb,
    plan_runs,
    ratios,
)
from cogenesis.apps.bench.report import markdown_table, plot, scaling_path
from cogenesis.apps.bench.stats import Run, decode_flops_per_token, pct, shared_limit, summarize
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


def test_decode_counts_only_what_was_written_once_every_session_had_its_first_token():
    # an early session writes 5 tokens (at 1, 2, 3, 4, 5 s) while a late one waits for its first (at 3 s); from 3 s
    # to 5 s the early one writes 2 and the late one 2 (at 4 and 5 s): 4 tokens in 2 s, not the 5 + 2 after firsts
    early = Run(tokens=5, first_token_s=1.0, end_s=5.0, completed=True, step_s=(1.0, 1.0, 1.0, 1.0))
    late = Run(tokens=3, first_token_s=3.0, end_s=5.0, completed=True, step_s=(1.0, 1.0))
    r = summarize("cogenesis-isolated", [early, late], wall_s=5.0)
    assert r.decode_tokens_per_s == pytest.approx(4 / 2)
    assert r.step_p50_ms == pytest.approx(1000.0)  # the gaps ending in the decode phase only


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
        ({"prefill_budget_s": 0}, "--prefill-budget"),
        ({"prefill_budget_s": -5.0}, "--prefill-budget"),
        ({"decode_budget_s": 0}, "--decode-budget"),
        ({"decode_budget_s": float("nan")}, "--decode-budget"),
        ({"real_max_sessions": 0}, "--real-max-sessions"),
        ({"variants": ("nope",)}, "unknown variant"),
        ({"lookahead": 0}, "lookahead"),
        ({"threads": 0}, "threads"),
    ],
)
def test_bad_options_are_named(kw, match):
    with pytest.raises(ConfigError, match=match):
        ExchangeBenchOptions(**kw)


def test_step_latency_percentiles_come_from_every_sessions_token_gaps():
    runs = [
        Run(tokens=3, first_token_s=0.0, end_s=1.0, completed=True, step_s=(0.010, 0.020)),
        Run(tokens=3, first_token_s=0.0, end_s=1.0, completed=True, step_s=(0.030, 0.040)),
        Run(
            tokens=0, first_token_s=None, end_s=1.0, completed=False, failed=True, step_s=(9.0,)
        ),  # failed: not counted
    ]
    r = summarize("cogenesis", runs, wall_s=1.0)
    assert r.step_p50_ms == pytest.approx(25.0) and r.step_p99_ms == pytest.approx(39.7)
    untimed = Run(tokens=1, first_token_s=0.0, end_s=1.0, completed=True)
    assert summarize("x", [untimed], 1.0).step_p50_ms is None


def test_shared_limit_adds_the_two_models_time_per_token():
    assert shared_limit(100.0, 100.0) == pytest.approx(50.0)
    assert shared_limit(300.0, 150.0) == pytest.approx(100.0)  # 1 / (1/300 + 1/150)
    assert shared_limit(None, 10.0) is None and shared_limit(10.0, 0.0) is None


def test_decode_flops_per_token():
    assert decode_flops_per_token(params=1000, layers=2, hidden=8, mean_context=10) == 2 * 1000 + 4 * 2 * 8 * 10
    # SmolLM2-135M-like: ~135M multiplied weights (tied head included), 30 layers x 576, 200 tokens of context
    assert decode_flops_per_token(134_515_008, 30, 576, 200) == pytest.approx(2.83e8, rel=0.01)


def test_compute_use_and_achieved_share_of_peak():
    assert compute_use("large-only", 3.0, 2.0, threads=1, reference_threads=2) == (3.0, 1)
    assert compute_use("cogenesis-isolated-lookahead", 3.0, 2.0, threads=1, reference_threads=2) == (3.0, 1)
    for variant in ("compute-limit", "cogenesis", "stateless", "cogenesis-gateway"):  # both models, every core
        assert compute_use(variant, 3.0, 2.0, threads=1, reference_threads=2) == (5.0, 2)
    gflops, share = achieved(100.0, 2e9, peak_gflops=400.0)
    assert gflops == pytest.approx(200.0) and share == pytest.approx(0.5)
    assert achieved(None, 2e9, 400.0) == (None, None) and achieved(1.0, 1e9, None) == (1.0, None)


def test_ratios_against_the_shared_limit_and_large_only_at_the_same_threads():
    limit = replace(
        _result("compute-limit", 4, 80.0), decode_tokens_per_s=80.0
    )  # its decode tok/s: the limit (others: 2 x t)
    results = [
        _result("large-only", 4, 100.0),
        limit,
        _result("cogenesis-isolated", 4, 50.0),
        _result("cogenesis", 4, 30.0),
    ]
    rows = {q["variant"]: q for q in ratios(results)}
    assert set(rows) == {"cogenesis-isolated", "cogenesis"}  # the references get no ratio of their own
    assert rows["cogenesis-isolated"]["vs_large_only"] == pytest.approx(0.5)
    assert rows["cogenesis-isolated"]["vs_shared_limit"] == pytest.approx(1.25)
    assert rows["cogenesis"]["vs_shared_limit"] == pytest.approx(0.75)
    assert rows["cogenesis"]["vs_stateless"] is None
    (alone,) = ratios([_result("cogenesis", 1, 10.0)])
    assert alone["vs_shared_limit"] is None and alone["vs_large_only"] is None


def test_real_device_variants_above_the_cap_are_skipped_with_a_reason():
    opts = ExchangeBenchOptions(sessions=(16, 256), variants=VARIANTS, real_max_sessions=64)
    plan, skipped = plan_runs(opts)
    assert plan[: len(VARIANTS)] == [(16, v) for v in VARIANTS]
    assert [v for n, v in plan if n == 256] == [
        "large-only",
        "compute-limit",
        "cogenesis-isolated",
        "cogenesis-isolated-lookahead",
    ]
    assert {(s["sessions"], s["variant"]) for s in skipped} == {
        (256, v) for v in ("cogenesis", "cogenesis-lookahead", "stateless", "cogenesis-gateway")
    }
    assert all("--real-max-sessions 64" in s["reason"] for s in skipped)
    measured = plan_runs(opts, small_kv_bytes_per_token=36_864)[1][0]["reason"]  # SmolLM2 pruned to 24 layers
    assert "20.2 MiB a session of 512 + 64 tokens" in measured
    assert plan_runs(replace(opts, real_max_sessions=256))[1] == []


def test_defaults():
    opts = ExchangeBenchOptions()
    assert opts.sessions == (1, 16, 64, 256, 1024) and opts.real_max_sessions == 64
    assert (opts.prefill_budget_s, opts.decode_budget_s) == (300.0, 120.0)
    assert opts.variants == DEFAULT_VARIANTS and VARIANTS[: len(DEFAULT_VARIANTS)] == DEFAULT_VARIANTS
    assert set(VARIANTS) - set(DEFAULT_VARIANTS) == {"stateless", "cogenesis-gateway"}  # by --variants only
    assert opts.threads <= opts.reference_threads


def test_the_replicas_kv_budget_admits_every_session():
    # 1,024 sessions of 168 tokens at 45 KiB a token (SmolLM2-135M, fp32): 7.4 GiB, x 1.25 headroom
    mb = kv_budget_mb(1024, 168, 46_080)
    assert mb >= 1024 * 168 * 46_080 / (1 << 20) * 1.25 and mb == int(mb)
    assert kv_budget_mb(1, 100, 1000) == 2048  # never below the config's default


def test_table_has_step_latency_shared_limit_and_share_of_peak_columns(tmp_path):
    limit = replace(_result("compute-limit", 4, 80.0), decode_tokens_per_s=80.0)
    iso = replace(_result("cogenesis-isolated", 4, 50.0), share_of_peak=0.125)
    results = [_result("large-only", 4, 100.0), limit, iso]
    report = {
        "options": {"max_new_tokens": 2, "top_k": 10},
        "machine": {"cpus": 2},
        "results": [r.to_json() for r in results],
        "ratios": ratios(results),
        "skipped": [{"sessions": 1024, "variant": "cogenesis", "reason": "too many"}],
    }
    lines = markdown_table(report).splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    for col in ("step p50 ms", "step p99 ms", "share of peak", "× large-only", "× shared limit", "× stateless"):
        assert col in head
    row = dict(zip(head, (c.strip() for c in lines[4].strip("|").split("|"))))
    assert row["variant"] == "cogenesis-isolated" and row["× shared limit"] == "1.25" and row["× large-only"] == "0.50"
    assert row["share of peak"] == "12.5%"
    assert lines[-1] == "- cogenesis with 1024 sessions: too many"


def test_scaling_figure_is_written_beside_the_plot(tmp_path):
    results = [
        replace(_result(v, n, t), step_p50_ms=10.0 * n, step_p99_ms=20.0 * n)
        for n in (1, 16, 64)
        for v, t in (("large-only", 20.0), ("compute-limit", 15.0), ("cogenesis-isolated", 10.0), ("cogenesis", 5.0))
    ]
    report = {"options": {}, "machine": {}, "results": [r.to_json() for r in results], "ratios": ratios(results)}
    plot(report, tmp_path / "b.png")
    assert scaling_path(tmp_path / "b.png") == tmp_path / "b-scaling.png"
    for p in (tmp_path / "b.png", tmp_path / "b-scaling.png"):
        assert p.read_bytes()[:4] == b"\x89PNG"


def test_cli_flags_map_to_the_options(monkeypatch):
    from cogenesis.apps.cli import build_parser
    from cogenesis.apps.commands import bench

    args = build_parser().parse_args(["bench", "exchange"])
    assert (args.sessions, args.prefill_budget, args.decode_budget, args.real_max_sessions) == (
        "1,16,64,256,1024",
        300.0,
        120.0,
        64,
    )
    assert args.variants.split(",") == list(DEFAULT_VARIANTS)
    seen = {}

    def fake_run(opts, console, progress=None):
        seen["opts"] = opts
        return {"results": [], "ratios": []}

    monkeypatch.setattr("cogenesis.apps.bench.exchange.run_exchange_bench", fake_run)
    argv = ["bench", "exchange", "--prefill-budget", "60", "--decode-budget", "30", "--real-max-sessions", "16"]
    args = build_parser().parse_args(argv + ["--variants", "large-only,cogenesis"])
    assert bench.run_exchange(args) == 0
    opts = seen["opts"]
    assert (opts.prefill_budget_s, opts.decode_budget_s, opts.real_max_sessions) == (60.0, 30.0, 16)
    assert opts.variants == ("large-only", "cogenesis")


def test_bad_budgets_on_the_command_line_are_one_clear_error(capsys):
    from cogenesis.apps.cli import main

    assert main(["bench", "exchange", "--decode-budget", "0"]) != 0
    assert "--decode-budget 0.0 must be positive" in capsys.readouterr().err
