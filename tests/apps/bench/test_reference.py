"""The bench's in-process references on tiny models (no cluster): model sizes, KV bytes, the batched greedy
decodes of large-only and compute-limit, and the report they make."""

import json

import pytest

from cogenesis.apps.bench import exchange
from cogenesis.apps.bench.exchange import ExchangeBenchOptions, greedy_decode, matmul_gflops, model_shape


@pytest.fixture(scope="module")
def large(tiny_large):
    from cogenesis.core.models import load_causal_lm

    return load_causal_lm(str(tiny_large))


def test_model_shape_counts_the_multiplied_weights_and_measures_kv_bytes(large):
    model, tok = large
    shape = model_shape(model, tok.pad_token_id)
    cfg = model.config  # the tiny llama: 2 layers of 64, 2 KV heads of 16, tied 49,152 x 64 embeddings
    total = sum(p.numel() for p in model.parameters())  # the tied head once
    assert shape.params == total  # the embeddings are looked up, the (tied) head multiplied: the same count
    assert (shape.layers, shape.hidden) == (cfg.num_hidden_layers, cfg.hidden_size) == (2, 64)
    assert shape.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers x (K, V) x heads x head dim x fp32
    assert shape.flops_per_token(100) == 2 * total + 4 * 2 * 64 * 100


def test_greedy_decode_stops_at_its_decode_budget(large):
    model, tok = large
    prompts = [[1, 2, 3], [4, 5]]
    whole = greedy_decode(model, tok.pad_token_id, prompts, tokens=5, threads=1, decode_budget_s=60)
    assert (whole.rows, whole.written, len(whole.steps_s)) == (2, 5, 4) and whole.decode_tokens_per_s > 0
    cut = greedy_decode(model, tok.pad_token_id, prompts, tokens=10_000, threads=1, decode_budget_s=0.2)
    assert 1 <= cut.written < 10_000 and cut.wall_s - cut.prefill_s < 2  # the prefill is never cut


def test_matmul_gflops_is_measured():
    assert matmul_gflops(1, seconds=0.02, n=64) > 0


def test_references_run_without_a_cluster_and_are_reported(tiny_large, tiny_small, tmp_path, monkeypatch):
    from rich.console import Console

    monkeypatch.setattr(exchange, "MATMUL_SECONDS", 0.02)
    monkeypatch.setattr(exchange, "MATMUL_SIZE", 64)
    out = tmp_path / "bench.json"
    opts = ExchangeBenchOptions(
        sessions=(3, 4),
        max_new_tokens=4,
        edge_prompt_tokens=128,
        variants=("large-only", "compute-limit", "cogenesis"),
        real_max_sessions=2,  # cogenesis is skipped at both counts: nothing needs the cluster
        large_model=str(tiny_large),
        small_model=str(tiny_small),
        json_path=str(out),
        threads=1,
        reference_threads=2,
    )
    monkeypatch.setattr("cogenesis.cluster.local.LocalCluster", _no_cluster)
    report = exchange.run_exchange_bench(opts, Console(quiet=True))
    assert json.loads(out.read_text()) == report
    assert {(r["sessions"], r["variant"]) for r in report["results"]} == {
        (n, v) for n in (3, 4) for v in ("large-only", "compute-limit")
    }
    assert [(s["sessions"], s["variant"]) for s in report["skipped"]] == [(3, "cogenesis"), (4, "cogenesis")]
    assert set(report["machine"]["matmul_gflops"]) == {"1", "2"} and report["machine"]["large_only_threads"] == 1
    models = report["models"]
    assert models["large_kv_bytes_per_token"] == 512 and models["small_kv_bytes_per_token"] == 256
    assert models["large_kv_bytes_per_session"] > 512 * 4 and models["small_flops_per_token"] > 0
    for r in report["results"]:
        assert r["tokens"] == 4 * r["sessions"] and not r["truncated"] and r["step_p50_ms"] > 0, r
        assert r["extra"]["prefill_s"] > 0 and r["achieved_gflops"] > 0 and r["share_of_peak"] is not None
        if r["variant"] == "compute-limit":
            x = r["extra"]
            limit = 1 / (1 / x["large_decode_tps"] + 1 / x["small_decode_tps"])
            assert x["shared_limit_tps"] == pytest.approx(limit, rel=0.01)
            assert r["decode_tokens_per_s"] == pytest.approx(x["shared_limit_tps"], rel=0.01)
            assert x["threads"] == 2 and x["small_batch"] == min(r["sessions"], 2) and x["small_batches"] == 2
        else:
            assert r["extra"]["threads"] == 1
    assert out.with_suffix(".md").read_text().startswith("| N | variant |")
    assert (tmp_path / "bench-scaling.png").read_bytes()[:4] == b"\x89PNG"


def _no_cluster(*args, **kwargs):
    raise AssertionError("the in-process references need no cluster")


@pytest.mark.parametrize("lookahead", [0, 3])
def test_the_isolated_pool_writes_large_onlys_greedy_text(large, sample_records, lookahead):
    """cogenesis-isolated (an instant device at temperature 0) and large-only write the same tokens."""
    import torch

    from cogenesis.apps.engine_link import EngineLink
    from cogenesis.core import prompts
    from cogenesis.core.config import EdgeConfig
    from cogenesis.deployments.engine import TransformersCloudEngine
    from cogenesis.edge_sim.client import EdgeClient
    from cogenesis.edge_sim.device import InstantDevice
    from cogenesis.edge_sim.engine import EdgeEngine
    from cogenesis.edge_sim.logits import run_logits_sessions

    model, tok = large
    records = sample_records[:3]
    cfg = EdgeConfig(
        top_k=5,
        lookahead=lookahead,
        max_new_tokens=6,
        ignore_eos=True,
        sampling={"temperature": 0.0, "top_p": 1.0, "seed": 0},
    )
    engine = EdgeEngine(None, tok, cfg.max_prompt_tokens)
    clients = [EdgeClient(i, rec, engine, cfg) for i, rec in enumerate(records)]
    link = EngineLink(TransformersCloudEngine(model, tok))
    results = run_logits_sessions(clients, engine, link, cfg, device=InstantDevice())
    cloud_ids = [prompts.cloud_prompt_ids(tok, r.public_instruction) for r in records]
    for r, ids in zip(results, cloud_ids):  # the large model's own greedy decode of the cloud prompt
        out = list(ids)
        with torch.inference_mode():
            for _ in range(6):
                out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
        assert r.error is None and r.ids == out[len(ids) :], (r.ids, out[len(ids) :])
    if lookahead:
        assert sum(r.accepted_draft_tokens for r in results) > 0
