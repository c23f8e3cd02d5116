"""``cogenesis bench exchange``: logits mode's step exchange against its references, side by side.

For each session count N, in one process tree on this machine, with the same models and records:

- ``large-only``: the large model's own batched greedy decode of the N cloud prompts (transformers,
  batch N, no exchange, no small model): the compute reference.
- ``stateless``: the official code's protocol. Every step re-sends the whole public sequence over
  HTTP to the Serve app, which keeps no state and computes each request alone (batch 1).
- ``cogenesis``: logits mode through Ray Serve + Redis: session KV caches on the replica, one
  batched forward pass per round, binary messages, lookahead 0.
- ``cogenesis-lookahead``: the same with lookahead n (default 4): drafts accepted by the edge save
  round trips.
- ``cogenesis-gateway``: ``cogenesis`` as devices run it: every session is a device with its own token and
  WebSocket to the gateway, which relays to the same bus and replicas (lookahead 0). Against ``cogenesis`` (a
  trusted worker on the bus) it measures the gateway's extra hop: its step exchange overhead and tokens/s.
- ``vllm`` (``--with-vllm``): a vLLM OpenAI-compatible server driven per step (max_tokens=1,
  logprobs=k, prefix caching), the setup a user would pick instead.

On one machine the edge and the replica split the cores (``threads`` each, default half of them):
run concurrently with every core each, they slow each other ~5x (OpenMP threads spinning on
shared cores). large-only, the single-model reference, gets the whole machine, and so does the
edge pool's prefill of its clients' private contexts (the cloud is idle then).

Every variant but large-only runs the same edge pool: the small model (with the private context,
trimmed to ``edge_prompt_tokens``) steps all N sessions in one batch and fuses greedily with the
cloud's top-k. ``ignore_eos`` makes every session write exactly ``max_new_tokens``, so the work is
identical across variants. A time budget per (variant, N) stops slow baselines; a stopped
variant is marked truncated and its throughput is over the time it ran.

The exchange overhead per step (bus + serialization) needs no clock shared by edge and replica: it
is the round trip the edge timed, less the model and queue time the replica measured on its own clock
(``StepReply.exchange_overhead_us``); a reply already waiting when the edge looked counts at most
the time it took to fetch.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import httpx

from cogenesis.apps.bench.stats import Run, VariantResult, ratio, summarize
from cogenesis.core.auth import bearer_header
from cogenesis.core.errors import ConfigError
from cogenesis.core.protocol import MAX_TOP_K

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

VARIANTS = ("large-only", "stateless", "cogenesis", "cogenesis-lookahead", "cogenesis-gateway")
BENCH_TOKEN_TTL_S = 24 * 3600.0


@dataclass(frozen=True)
class ExchangeBenchOptions:
    sessions: tuple[int, ...] = (1, 16, 64, 256)  # session counts to sweep
    max_new_tokens: int = 64  # tokens every session writes
    lookahead: int = 4  # draft length of the cogenesis-lookahead variant
    top_k: int = 10  # cloud top-k per step
    edge_prompt_tokens: int = 512  # the small model's prompt budget (private context trimmed to fit)
    budget_s: float = 300.0  # wall-clock budget per (variant, N)
    variants: tuple[str, ...] = VARIANTS
    with_vllm: bool = False
    vllm_python: str | None = None  # python of a venv where vllm imports
    data: str | None = None
    large_model: str = "embedded:large"
    small_model: str = "embedded:small"
    json_path: str = "out/bench-exchange.json"
    step_timeout_s: float = 600.0  # one reply; generous because the edge prefill of N contexts comes first
    threads: int = max(1, (os.cpu_count() or 2) // 2)  # torch threads of the edge, and of the replica
    reference_threads: int = os.cpu_count() or 2  # torch threads of large-only: the whole machine

    def __post_init__(self) -> None:
        if not self.sessions or min(self.sessions) < 1 or max(self.sessions) > 4096:
            raise ConfigError(f"--sessions {list(self.sessions)}: each count must be in 1..4096")
        if not 1 <= self.max_new_tokens <= 4096:
            raise ConfigError(f"--max-new-tokens {self.max_new_tokens} is outside 1..4096")
        if not 1 <= self.lookahead <= 16:
            raise ConfigError(f"--lookahead {self.lookahead} is outside 1..16")
        top = 20 if self.with_vllm else MAX_TOP_K  # vLLM's max_logprobs is 20
        if not 1 <= self.top_k <= top:
            raise ConfigError(
                f"--top-k {self.top_k} is outside 1..{top}" + (" (vLLM's max_logprobs)" if self.with_vllm else "")
            )
        if self.threads < 1 or self.reference_threads < 1:
            raise ConfigError(f"--threads {self.threads} must be at least 1")
        if self.budget_s <= 0:
            raise ConfigError(f"--budget {self.budget_s} must be positive (seconds per variant and N)")
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ConfigError(f"unknown variant(s) {sorted(unknown)}", hint=f"choose from {', '.join(VARIANTS)}")


@dataclass
class _Ctx:
    opts: ExchangeBenchOptions
    records: list
    small: PreTrainedModel
    large: PreTrainedModel
    tok: PreTrainedTokenizerBase
    large_path: str
    redis_url: str = ""
    http_url: str = ""
    gateway_url: str = ""
    secrets_dir: str | None = None
    vllm_url: str = ""
    results: list[VariantResult] = field(default_factory=list)


def run_exchange_bench(opts: ExchangeBenchOptions, console, progress: Callable[[str], None] | None = None) -> dict:
    import torch

    from cogenesis.apps.demo import pick_records
    from cogenesis.cluster.local import LocalCluster
    from cogenesis.core.config import CloudConfig, validate
    from cogenesis.core.models import check_same_tokenizer, load_causal_lm, resolve_model

    say = progress or (lambda m: None)
    say("preparing models")
    large_path = resolve_model(opts.large_model, say)
    small_path = resolve_model(opts.small_model, say)
    torch.set_num_threads(opts.threads)
    small, tok = load_causal_lm(small_path)
    large, large_tok = load_causal_lm(large_path)
    check_same_tokenizer(large_tok, tok)
    ctx = _Ctx(opts, pick_records(opts.data, max(opts.sessions)), small, large, tok, large_path)
    n_max = max(opts.sessions)
    cloud = validate(
        CloudConfig,
        {
            "large_model": large_path,
            "torch_threads": opts.threads,
            "replica_cpus": 0.5,
            "max_sessions": max(1024, 2 * n_max),
            "max_ongoing_requests": max(256, n_max),
            "session_idle_s": max(300.0, opts.step_timeout_s),
        },
        "the bench's cloud",
    )
    cluster = LocalCluster(cloud)
    vllm = None
    plan = [(n, v) for n in opts.sessions for v in _variants(opts)]
    t_start = time.time()
    try:
        say("starting Redis, Ray and the Serve app")
        info = cluster.start(say)
        ctx.redis_url, ctx.http_url = info.redis_url, info.http_url
        ctx.gateway_url, ctx.secrets_dir = info.gateway_url or "", info.secrets_dir
        if opts.with_vllm:
            from cogenesis.apps.bench.vllm_server import VLLMServer

            say("starting the vLLM server")
            vllm = VLLMServer(large_path, python=opts.vllm_python, threads=opts.threads).start()
            ctx.vllm_url = vllm.url
        say("warming up every variant")
        for variant in _variants(opts):
            _run_variant(ctx, variant, 1, max_new_tokens=4)
        for i, (n, variant) in enumerate(plan):
            say(f"[{i + 1}/{len(plan)}] {variant} with {n} session(s)")
            result = _run_variant(ctx, variant, n)
            ctx.results.append(result)
            console.print(_one_line(result))
    finally:
        say("shutting down")
        if vllm is not None:
            vllm.stop()
        cluster.stop()
    report = {
        "benchmark": "exchange",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t_start)),
        "options": {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.__dict__.items()},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "edge_threads": opts.threads,
            "replica_threads": opts.threads,
            "large_only_threads": opts.reference_threads,
            "python": platform.python_version(),
        },
        "models": {"large": large_path, "small": small_path},
        "results": [r.to_json() for r in ctx.results],
        "ratios": ratios(ctx.results),
        "gateway_hop": gateway_hop(ctx.results),
    }
    write_report(report, Path(opts.json_path))
    return report


def _variants(opts: ExchangeBenchOptions) -> tuple[str, ...]:
    return tuple(opts.variants) + (("vllm",) if opts.with_vllm else ())


def _token(ctx: _Ctx, role: Literal["admin", "worker"]) -> str | None:
    """The cluster's worker or admin token (None: a cluster without secrets, whose routes are open)."""
    from cogenesis.core.secrets import stored_token

    return stored_token(role, ctx.secrets_dir) if ctx.secrets_dir else None


def _device_tokens(ctx: _Ctx):
    """Each bench session's device token (``bench-{index}``), minted with the cluster's key."""
    from cogenesis.core.auth import mint
    from cogenesis.core.secrets import cluster_key

    key = cluster_key(ctx.secrets_dir)
    return lambda index: mint(key, f"bench-{index}", "device", BENCH_TOKEN_TTL_S)


def _run_variant(ctx: _Ctx, variant: str, n: int, max_new_tokens: int | None = None) -> VariantResult:
    opts = ctx.opts
    tokens = max_new_tokens or opts.max_new_tokens
    records = ctx.records[:n]
    if variant == "large-only":
        return _large_only(ctx, records, tokens)
    from cogenesis.cluster.bus import EdgeBus
    from cogenesis.edge_sim.gateway_link import DeviceLinks
    from cogenesis.edge_sim.links import BusLink, OpenAILink, StatelessLink

    link: BusLink | StatelessLink | DeviceLinks
    if variant == "stateless":
        link = StatelessLink(ctx.http_url, ctx.tok, max_concurrency=n, token=_token(ctx, "worker"))
    elif variant == "vllm":
        link = OpenAILink(ctx.vllm_url, ctx.large_path, ctx.tok, max_concurrency=n)
    elif variant == "cogenesis-gateway":
        if not ctx.gateway_url:
            raise ConfigError("the cogenesis-gateway variant needs the cluster's gateway (gateway.enabled)")
        link = DeviceLinks(ctx.gateway_url, _device_tokens(ctx), reconnect_s=opts.step_timeout_s)
    else:
        link = BusLink(EdgeBus(ctx.redis_url, secrets=ctx.secrets_dir))
    lookahead = opts.lookahead if variant == "cogenesis-lookahead" else 0
    before = _cloud_stats(ctx) if variant.startswith("cogenesis") else None
    try:
        return _edge_pool(ctx, variant, records, tokens, link, lookahead, before)
    finally:
        if isinstance(link, BusLink):
            link.bus.close()
        else:
            link.shutdown()


def _edge_pool(ctx: _Ctx, variant: str, records, tokens: int, link, lookahead: int, before) -> VariantResult:
    from cogenesis.core.config import EdgeConfig, validate
    from cogenesis.edge_sim.client import EdgeClient
    from cogenesis.edge_sim.engine import EdgeEngine
    from cogenesis.edge_sim.logits import run_logits_sessions

    opts = ctx.opts
    cfg = validate(
        EdgeConfig,
        {
            "top_k": opts.top_k,
            "lookahead": lookahead,
            "max_new_tokens": tokens,
            "ignore_eos": True,
            "max_prompt_tokens": opts.edge_prompt_tokens,
            "step_timeout_s": opts.step_timeout_s,
            "torch_threads": opts.threads,
            "prefill_threads": opts.reference_threads,
            "sampling": {"temperature": 0.0, "top_p": 1.0, "seed": 0},
        },
        "the bench's edge",
    )
    engine = EdgeEngine(ctx.small, ctx.tok, opts.edge_prompt_tokens)
    clients = [EdgeClient(i, rec, engine, cfg) for i, rec in enumerate(records)]
    t0 = time.perf_counter()
    results = run_logits_sessions(clients, engine, link, cfg, stop_at=t0 + opts.budget_s)
    wall = time.perf_counter() - t0
    runs = [
        Run(
            tokens=r.tokens,
            first_token_s=r.ttft_s,
            end_s=r.seconds,
            completed=r.error is None and not r.stopped,
            failed=r.error is not None,
            round_trips=r.round_trips,
            rtt_us=tuple(r.rtt_us),
            overhead_us=tuple(r.overhead_us),
        )
        for r in results
    ]
    errors = sorted({r.error for r in results if r.error})
    extra: dict[str, object] = {
        "lookahead": lookahead,
        "accepted_draft_tokens": sum(r.accepted_draft_tokens for r in results),
    }
    if errors:
        extra["errors"] = errors[:5]
    if before is not None:
        after = _cloud_stats(ctx)
        batches = after["batches"] - before["batches"]
        rows = after["batch_rows"] - before["batch_rows"]
        extra["cloud_batches"] = batches
        extra["cloud_mean_batch_size"] = round(rows / batches, 2) if batches else None
        extra["cloud_evictions"] = after["evictions"] - before["evictions"]
    truncated = any(r.stopped for r in results)
    return summarize(variant, runs, wall, truncated, extra)


def _large_only(ctx: _Ctx, records, tokens: int) -> VariantResult:
    """The large model's own batched greedy decode of the cloud prompts (no exchange), on every core."""
    from cogenesis.core import prompts
    from cogenesis.core.kvbatch import PackedBatch
    from cogenesis.core.models import torch_threads

    batch = PackedBatch(ctx.large, ctx.tok.pad_token_id)  # load_causal_lm gives every tokenizer a pad token
    prompt_ids = [prompts.cloud_prompt_ids(ctx.tok, r.public_instruction) for r in records]
    with torch_threads(ctx.opts.reference_threads):
        stop_at = time.perf_counter() + ctx.opts.budget_s
        t0 = time.perf_counter()
        nxt = batch.prefill(prompt_ids).argmax(-1)  # [B]
        first = time.perf_counter() - t0
        written = 1
        while written < tokens and time.perf_counter() < stop_at:
            nxt = batch.step(nxt.tolist()).argmax(-1)
            written += 1
        wall = time.perf_counter() - t0
    runs = [Run(tokens=written, first_token_s=first, end_s=wall, completed=written == tokens) for _ in records]
    return summarize("large-only", runs, wall, truncated=written < tokens)


def _cloud_stats(ctx: _Ctx) -> dict:
    return httpx.get(f"{ctx.http_url}/v1/stats", headers=bearer_header(_token(ctx, "admin")), timeout=30).json()


def ratios(results: list[VariantResult]) -> list[dict]:
    """Per N: each cogenesis variant's decode tokens/s over large-only's and over stateless's."""
    out = []
    for n in sorted({r.sessions for r in results}):
        by = {r.variant: r for r in results if r.sessions == n}
        ref, base = by.get("large-only"), by.get("stateless")
        for name, r in by.items():
            if not name.startswith("cogenesis"):
                continue
            out.append(
                {
                    "sessions": n,
                    "variant": name,
                    "vs_large_only": _r(ratio(r.decode_tokens_per_s, ref.decode_tokens_per_s if ref else None)),
                    "vs_stateless": _r(ratio(r.decode_tokens_per_s, base.decode_tokens_per_s if base else None)),
                    "vs_vllm": _r(ratio(r.decode_tokens_per_s, by["vllm"].decode_tokens_per_s))
                    if "vllm" in by
                    else None,
                    "e2e_vs_large_only": _r(ratio(r.tokens_per_s, ref.tokens_per_s if ref else None)),
                    "e2e_vs_stateless": _r(ratio(r.tokens_per_s, base.tokens_per_s if base else None)),
                }
            )
    return out


def gateway_hop(results: list[VariantResult]) -> list[dict]:
    """Per N: what the gateway adds to a step, ``cogenesis-gateway`` (devices) against ``cogenesis`` (the bus
    directly): the step exchange overhead p50/p99 of each (ms) and the tokens/s ratio."""
    out = []
    for n in sorted({r.sessions for r in results}):
        by = {r.variant: r for r in results if r.sessions == n}
        bus, gateway = by.get("cogenesis"), by.get("cogenesis-gateway")
        if bus is None or gateway is None:
            continue
        out.append(
            {
                "sessions": n,
                "overhead_p50_ms": {"bus": bus.overhead_p50_ms, "gateway": gateway.overhead_p50_ms},
                "overhead_p99_ms": {"bus": bus.overhead_p99_ms, "gateway": gateway.overhead_p99_ms},
                "tokens_per_s": {"bus": round(bus.tokens_per_s, 2), "gateway": round(gateway.tokens_per_s, 2)},
                "decode_vs_bus": _r(ratio(gateway.decode_tokens_per_s, bus.decode_tokens_per_s)),
                "e2e_vs_bus": _r(ratio(gateway.tokens_per_s, bus.tokens_per_s)),
            }
        )
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _one_line(r: VariantResult) -> str:
    dec = f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-"
    over = f"{r.overhead_p50_ms:.2f}/{r.overhead_p99_ms:.2f} ms" if r.overhead_p50_ms is not None else "-"
    flag = " [truncated by the budget]" if r.truncated else ""
    fail = f" [red]{r.failed} failed[/]" if r.failed else ""
    return (
        f"  {r.variant:<20} N={r.sessions:<4} decode {dec:>7} tok/s  e2e {r.tokens_per_s:7.1f} tok/s  "
        f"overhead p50/p99 {over}{flag}{fail}"
    )


def write_report(report: dict, json_path: Path) -> None:
    from cogenesis.apps.bench.report import markdown_table, plot

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(markdown_table(report) + "\n")
    plot(report, json_path.with_suffix(".png"))
