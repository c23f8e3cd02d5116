"""``cogenesis bench exchange`` end to end on tiny models: every variant runs and is reported."""

import json

import pytest

from cogenesis.apps.bench.exchange import IN_PROCESS, VARIANTS, ExchangeBenchOptions, run_exchange_bench

pytestmark = pytest.mark.slow


def test_bench_runs_every_variant_and_writes_its_report(tiny_large, tiny_small, tmp_path):
    from rich.console import Console

    out = tmp_path / "bench.json"
    opts = ExchangeBenchOptions(
        sessions=(1, 3),
        max_new_tokens=4,
        lookahead=2,
        top_k=5,
        edge_prompt_tokens=128,
        prefill_budget_s=120,
        decode_budget_s=120,
        variants=VARIANTS,
        large_model=str(tiny_large),
        small_model=str(tiny_small),
        json_path=str(out),
        threads=1,
    )
    report = run_exchange_bench(opts, Console(quiet=True))
    assert json.loads(out.read_text()) == report
    got = {(r["sessions"], r["variant"]) for r in report["results"]}
    assert got == {(n, v) for n in (1, 3) for v in opts.variants}
    for r in report["results"]:
        assert r["failed"] == 0 and not r["truncated"] and r["tokens"] == 4 * r["sessions"], r
        assert r["step_p50_ms"] is not None and r["achieved_gflops"] > 0 and r["share_of_peak"] is not None, r
        if r["variant"] not in IN_PROCESS:
            assert r["overhead_p50_ms"] is not None and r["overhead_p50_ms"] >= 0
    la = [r for r in report["results"] if r["variant"] == "cogenesis-lookahead"]
    assert all(r["tokens_per_round_trip"] >= 1 for r in la)
    assert {(q["sessions"], q["variant"]) for q in report["ratios"]} == {
        (n, v) for n in (1, 3) for v in VARIANTS if v.startswith("cogenesis")
    }
    assert all(q["vs_shared_limit"] and q["vs_large_only"] for q in report["ratios"])
    assert set(report["machine"]["matmul_gflops"]) == {"1", str(opts.reference_threads)}
    for r in report["results"]:  # the time to first token by its cause
        assert ("prefill_s" in r["extra"]) == (r["variant"] in IN_PROCESS), r
        assert ("ttft_cloud_wait_s" in r["extra"]) != (r["variant"] in IN_PROCESS), r
    assert report["models"]["large_kv_bytes_per_token"] > 0 and report["cloud"]["kv_budget_mb"] >= 2048
    hops = {h["sessions"]: h for h in report["gateway_hop"]}  # the gateway's extra hop, beside the bus
    assert set(hops) == {1, 3}
    assert all(h["overhead_p50_ms"]["gateway"] is not None and h["e2e_vs_bus"] for h in hops.values()), hops
    assert out.with_suffix(".md").read_text().startswith("| N | variant |")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
