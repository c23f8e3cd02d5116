"""``cogenesis bench exchange``: logits mode's step exchange against its references, side by side.

For each session count N, in one process tree on this machine, with the same models and records:

- ``large-only``: the large model's own batched greedy decode of the N cloud prompts (transformers,
  batch N, no exchange, no small model), at the replica's threads (``threads``): the reference that
  ``cogenesis-isolated`` is compared with at the same batch size and the same threads.
- ``compute-limit`` (runs no cluster): the large model's own batched greedy decode of the cloud prompts
  and the small model's own batched greedy decode of the edge prompts of the same records (private context
  trimmed to ``edge_prompt_tokens``), each on every core (``reference_threads``). Every fused token costs
  one large and one small token of compute, so two models sharing the cores can reach at most
  ``shared_limit_tps = 1 / (1/large + 1/small)`` decode tokens/s: its decode tokens/s, and the ``× shared
  limit`` ratio of every cogenesis variant. Above ``real_max_sessions`` the small model decodes its N
  sessions in batches of ``real_max_sessions`` one after the other (its KV for all N at once would not fit
  this machine's memory), so its rate there is that batch size's.
- ``cogenesis-isolated``: logits mode through Ray Serve + Redis (the edge loop over the bus, lookahead 0)
  with a device that takes no compute on this machine (``InstantDevice``: no pass time, no RTT, tokens
  sampled from the cloud's top-k; at temperature 0 the cloud's top-1, so it writes the large model's greedy
  text). What it measures is the cloud alone: bus, replica, batching, against ``large-only``.
- ``cogenesis-isolated-lookahead``: the same with lookahead n (default 4).
- ``cogenesis``: logits mode as a whole with real devices: the edge pool's small model (below) fuses with
  the cloud's top-k through Ray Serve + Redis: session KV caches on the replica, one batched forward pass
  per round, binary messages, lookahead 0.
- ``cogenesis-lookahead``: the same with lookahead n: drafts accepted by the edge save round trips.
- ``stateless`` (``--variants``): the official code's protocol. Every step re-sends the whole public
  sequence over HTTP to the Serve app, which keeps no state and computes each request alone (batch 1).
- ``cogenesis-gateway`` (``--variants``): ``cogenesis`` as devices run it: every session is a device with
  its own token and WebSocket to the gateway, which relays to the same bus and replicas (lookahead 0).
  Against ``cogenesis`` (a trusted worker on the bus) it measures the gateway's extra hop: its step exchange
  overhead and tokens/s.
- ``vllm`` (``--with-vllm``): a vLLM OpenAI-compatible server driven per step (max_tokens=1,
  logprobs=k, prefix caching), the setup a user would pick instead.

On one machine the edge and the replica split the cores (``threads`` each, default half of them):
run concurrently with every core each, they slow each other ~5x (OpenMP threads spinning on
shared cores). large-only runs at the replica's threads; compute-limit and the edge pool's prefill of its
clients' private contexts (the cloud is idle then) get the whole machine.

The real-device variants (``cogenesis``, ``cogenesis-lookahead``, ``stateless``, ``cogenesis-gateway``,
``vllm``) run the same edge pool: the small model (with the private context, trimmed to
``edge_prompt_tokens``) steps all N sessions in one batch on this machine and fuses greedily with the cloud's
top-k. Its KV cache is ~16 MiB a session for 512-token prompts, so they are skipped above
``real_max_sessions`` (default 64) sessions, with the reason recorded in the report. ``ignore_eos`` makes
every session write exactly ``max_new_tokens``, so the work is identical across variants.

Limits. Each (variant, N) has two time budgets: ``prefill_budget_s`` from the start until every session has
its first token, and ``decode_budget_s`` from that moment (large-only and compute-limit: their prefill is
one batched pass, never cut; their decode stops at ``decode_budget_s``). A variant stopped by a budget is
marked truncated and its throughput is over the time it ran. The cluster's replica admits
``max(sessions)`` sessions: its KV budget is sized from the large model's measured KV bytes per token.

Figures besides throughput: the step latency p50/p99 (the gaps between a session's tokens; large-only and
compute-limit: each batched step's time), the time to first token by cause (the device's prefill and the
wait for the cloud's first replies), and how near the hardware each variant runs: this machine's fp32
matmul GFLOP/s, measured at the start at 1 thread and at the threads the variants use, against the
achieved GFLOP/s (decode tokens/s × model FLOPs per token: the large model's, plus the small model's
where real devices run on this machine, which then use every core).

The exchange overhead per step (bus + serialization) needs no clock shared by edge and replica: it
is the round trip the edge timed, less the model and queue time the replica measured on its own clock
(``StepReply.exchange_overhead_us``); a reply already waiting when the edge looked counts at most
the time it took to fetch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import httpx

from cogenesis.apps.bench.stats import (
    Run,
    VariantResult,
    decode_flops_per_token,
    pct,
    ratio,
    shared_limit,
    summarize,
)
from cogenesis.apps.bench.variants import DEFAULT_VARIANTS, VARIANTS
from cogenesis.core.auth import bearer_header
from cogenesis.core.errors import ConfigError
from cogenesis.core.protocol import MAX_TOP_K

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from cogenesis.core.data import Record

log = logging.getLogger(__name__)

IN_PROCESS = frozenset({"large-only", "compute-limit"})  # no cluster, no exchange
ISOLATED = frozenset({"cogenesis-isolated", "cogenesis-isolated-lookahead"})  # InstantDevice: no edge compute
REAL_DEVICE = frozenset({"cogenesis", "cogenesis-lookahead", "stateless", "cogenesis-gateway", "vllm"})
WITH_LOOKAHEAD = frozenset({"cogenesis-lookahead", "cogenesis-isolated-lookahead"})
BENCH_TOKEN_TTL_S = 24 * 3600.0
KV_HEADROOM = 1.25  # the replica's KV budget over what max(sessions) sessions need
MATMUL_SIZE = 1024  # the peak measurement: fp32 (n x n) @ (n x n), repeated for MATMUL_SECONDS
MATMUL_SECONDS = 1.0


@dataclass(frozen=True)
class ExchangeBenchOptions:
    sessions: tuple[int, ...] = (1, 16, 64, 256, 1024)  # session counts to sweep
    max_new_tokens: int = 64  # tokens every session writes
    lookahead: int = 4  # draft length of the lookahead variants
    top_k: int = 10  # cloud top-k per step
    edge_prompt_tokens: int = 512  # the small model's prompt budget (private context trimmed to fit)
    prefill_budget_s: float = 300.0  # per (variant, N): from the start until every session has its first token
    decode_budget_s: float = 120.0  # ... from the moment every session has its first token
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    real_max_sessions: int = 64  # real-device variants above this many sessions are skipped
    with_vllm: bool = False
    vllm_python: str | None = None  # python of a venv where vllm imports
    data: str | None = None
    large_model: str = "embedded:large"
    small_model: str = "embedded:small"
    json_path: str = "out/bench-exchange.json"
    step_timeout_s: float = 600.0  # one reply; generous because the edge prefill of N contexts comes first
    threads: int = max(1, (os.cpu_count() or 2) // 2)  # torch threads of the edge, of the replica and large-only
    reference_threads: int = os.cpu_count() or 2  # torch threads of compute-limit: the whole machine

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
        for flag, budget in (("--prefill-budget", self.prefill_budget_s), ("--decode-budget", self.decode_budget_s)):
            if not budget > 0:  # NaN too
                raise ConfigError(f"{flag} {budget} must be positive (seconds per variant and N)")
        if self.real_max_sessions < 1:
            raise ConfigError(f"--real-max-sessions {self.real_max_sessions} must be at least 1")
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ConfigError(f"unknown variant(s) {sorted(unknown)}", hint=f"choose from {', '.join(VARIANTS)}")


@dataclass(frozen=True)
class ModelShape:
    """What a model's decode costs: its multiplied weights (the LM head included), layers and hidden size."""

    params: int
    layers: int
    hidden: int
    kv_bytes_per_token: int

    def flops_per_token(self, mean_context: float) -> float:
        return decode_flops_per_token(self.params, self.layers, self.hidden, mean_context)


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
    peak_gflops: dict[int, float] = field(default_factory=dict)  # threads -> measured fp32 matmul GFLOP/s
    shapes: dict[str, ModelShape] = field(default_factory=dict)  # "large", "small"
    results: list[VariantResult] = field(default_factory=list)
    _cloud_ids: dict[int, list[int]] = field(default_factory=dict)  # id(record) -> its cloud prompt
    _edge_ids: dict[int, list[int]] = field(default_factory=dict)  # id(record) -> its edge prompt

    def cloud_ids(self, records: Sequence[Record]) -> list[list[int]]:
        from cogenesis.core import prompts

        for r in records:
            if id(r) not in self._cloud_ids:
                self._cloud_ids[id(r)] = prompts.cloud_prompt_ids(self.tok, r.public_instruction)
        return [self._cloud_ids[id(r)] for r in records]

    def edge_ids(self, records: Sequence[Record]) -> list[list[int]]:
        """The small model's prompts: each record's private context, trimmed to ``edge_prompt_tokens``."""
        from cogenesis.edge_sim.engine import EdgeEngine

        engine = EdgeEngine(self.small, self.tok, self.opts.edge_prompt_tokens)
        for r in records:
            if id(r) not in self._edge_ids:
                self._edge_ids[id(r)] = engine.prompt_ids(r)
        return [self._edge_ids[id(r)] for r in records]


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
    ctx.shapes = {"large": model_shape(large, tok.pad_token_id), "small": model_shape(small, tok.pad_token_id)}
    say("measuring this machine's matmul throughput")
    for threads in sorted({1, opts.threads, opts.reference_threads}):
        ctx.peak_gflops[threads] = matmul_gflops(threads)
    models = _models_report(ctx, large_path, small_path)
    plan, skipped = plan_runs(opts, ctx.shapes["small"].kv_bytes_per_token)
    for s in skipped:
        console.print(f"  {s['variant']:<20} N={s['sessions']:<4} skipped: {s['reason']}")
    cluster_needed = any(v not in IN_PROCESS for _, v in plan)
    cloud_tokens = max(map(len, ctx.cloud_ids(ctx.records))) + opts.max_new_tokens + opts.lookahead
    cloud = validate(
        CloudConfig,
        {
            "large_model": large_path,
            "torch_threads": opts.threads,
            "replica_cpus": 0.5,
            "kv_budget_mb": kv_budget_mb(n_max, cloud_tokens, ctx.shapes["large"].kv_bytes_per_token),
            "max_sessions": max(1024, 2 * n_max),
            "max_ongoing_requests": max(256, n_max),
            "session_idle_s": max(300.0, opts.step_timeout_s),
        },
        "the bench's cloud",
    )
    cluster = LocalCluster(cloud) if cluster_needed else None
    vllm = None
    t_start = time.time()
    try:
        if cluster is not None:
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
        for variant in dict.fromkeys(v for _, v in plan):
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
        if cluster is not None:
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
            "large_only_threads": opts.threads,
            "compute_limit_threads": opts.reference_threads,
            "matmul_gflops": {str(t): round(g, 1) for t, g in sorted(ctx.peak_gflops.items())},
            "python": platform.python_version(),
        },
        "cloud": {"kv_budget_mb": cloud.kv_budget_mb, "max_sessions": cloud.max_sessions},
        "models": models,
        "results": [r.to_json() for r in ctx.results],
        "skipped": skipped,
        "ratios": ratios(ctx.results),
        "gateway_hop": gateway_hop(ctx.results),
    }
    write_report(report, Path(opts.json_path))
    return report


def plan_runs(
    opts: ExchangeBenchOptions, small_kv_bytes_per_token: int | None = None
) -> tuple[list[tuple[int, str]], list[dict]]:
    """The (N, variant) runs in order, and those skipped with their reason: the real-device variants above
    ``real_max_sessions`` (the edge pool holds every session's small-model KV on this machine)."""
    per_session = "~16 MiB a session for 512-token prompts"
    if small_kv_bytes_per_token:
        mib = small_kv_bytes_per_token * (opts.edge_prompt_tokens + opts.max_new_tokens) / (1 << 20)
        per_session = f"{mib:.1f} MiB a session of {opts.edge_prompt_tokens} + {opts.max_new_tokens} tokens"
    plan, skipped = [], []
    for n in opts.sessions:
        for variant in _variants(opts):
            if variant in REAL_DEVICE and n > opts.real_max_sessions:
                skipped.append(
                    {
                        "sessions": n,
                        "variant": variant,
                        "reason": f"a real-device variant above --real-max-sessions {opts.real_max_sessions}: the "
                        f"edge pool holds the small model's KV of all {n} sessions on this machine "
                        f"({per_session})",
                    }
                )
            else:
                plan.append((n, variant))
    return plan, skipped


def kv_budget_mb(sessions: int, tokens_per_session: int, kv_bytes_per_token: int) -> float:
    """The replica's KV budget (MiB) that admits ``sessions`` sessions of ``tokens_per_session`` tokens each (cloud
    prompt + max_new_tokens + lookahead), with ``KV_HEADROOM``; never below the config's default (2 GiB)."""
    need = sessions * tokens_per_session * kv_bytes_per_token * KV_HEADROOM / (1 << 20)
    return float(max(2048, math.ceil(need)))


def matmul_gflops(threads: int, seconds: float | None = None, n: int | None = None, windows: int = 5) -> float:
    """This machine's fp32 matmul throughput (GFLOP/s) at ``threads`` torch threads: (n x n) @ (n x n) (default
    ``MATMUL_SIZE``) repeated for ``seconds`` (default ``MATMUL_SECONDS``) after a warm-up; the best of
    ``windows`` equal windows (a peak: a moment's interference from another process does not lower it)."""
    import torch

    from cogenesis.core.models import torch_threads

    seconds = MATMUL_SECONDS if seconds is None else seconds
    n = MATMUL_SIZE if n is None else n
    with torch_threads(threads), torch.inference_mode():
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        out = torch.empty(n, n)
        for _ in range(3):
            torch.mm(a, b, out=out)
        best = 0.0
        for _ in range(windows):
            count, t0 = 0, time.perf_counter()
            while True:
                torch.mm(a, b, out=out)
                count += 1
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds / windows:
                    break
            best = max(best, 2.0 * n**3 * count / elapsed / 1e9)
    return best


def model_shape(model, pad_id: int | None) -> ModelShape:
    """A decoder's ``ModelShape``; its KV bytes per token measured on a one-token ``batched_forward``."""
    from cogenesis.core.kvbatch import batched_forward, kv_bytes

    total = sum(p.numel() for p in model.parameters())  # a tied LM head is counted once, with the embeddings
    embeddings = model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings()
    params = total - embeddings + (head.weight.numel() if head is not None else 0)
    pad = pad_id if pad_id is not None else 0
    _, caches = batched_forward(model, [None], [[pad]], pad_id=pad)
    return ModelShape(params, model.config.num_hidden_layers, model.config.hidden_size, kv_bytes(caches[0]))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _models_report(ctx: _Ctx, large_path: str, small_path: str) -> dict:
    """Each model's size, KV bytes per token and per session (its mean prompt + max_new_tokens), and its FLOPs per
    decoded token at its mean context (prompt + half of max_new_tokens)."""
    records, tokens = ctx.records, ctx.opts.max_new_tokens
    prompt = {
        "large": _mean([len(p) for p in ctx.cloud_ids(records)]),
        "small": _mean(list(map(len, ctx.edge_ids(records)))),
    }
    out: dict = {"large": large_path, "small": small_path}
    for name, shape in ctx.shapes.items():
        out[f"{name}_params"] = shape.params
        out[f"{name}_layers"] = shape.layers
        out[f"{name}_hidden"] = shape.hidden
        out[f"{name}_prompt_tokens_mean"] = round(prompt[name], 1)
        out[f"{name}_kv_bytes_per_token"] = shape.kv_bytes_per_token
        out[f"{name}_kv_bytes_per_session"] = round(shape.kv_bytes_per_token * (prompt[name] + tokens))
        out[f"{name}_flops_per_token"] = round(shape.flops_per_token(prompt[name] + tokens / 2))
    return out


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
        return _with_compute(ctx, _large_only(ctx, records, tokens), records, tokens)
    if variant == "compute-limit":
        return _with_compute(ctx, _compute_limit(ctx, records, tokens), records, tokens)
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
    else:  # cogenesis, cogenesis-lookahead and the isolated variants: the bus
        link = BusLink(EdgeBus(ctx.redis_url, secrets=ctx.secrets_dir))
    lookahead = opts.lookahead if variant in WITH_LOOKAHEAD else 0
    before = _cloud_stats(ctx) if variant.startswith("cogenesis") else None
    try:
        result = _edge_pool(ctx, variant, records, tokens, link, lookahead, before)
    finally:
        if isinstance(link, BusLink):
            link.bus.close()
        else:
            link.shutdown()
    return _with_compute(ctx, result, records, tokens)


def _edge_pool(ctx: _Ctx, variant: str, records, tokens: int, link, lookahead: int, before) -> VariantResult:
    from cogenesis.core.config import EdgeConfig, validate
    from cogenesis.edge_sim.client import EdgeClient
    from cogenesis.edge_sim.device import InstantDevice
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
    isolated = variant in ISOLATED
    # an isolated pool runs no small model at all: its device samples the cloud's top-k, instantly
    engine = EdgeEngine(None if isolated else ctx.small, ctx.tok, opts.edge_prompt_tokens)
    device = InstantDevice() if isolated else None
    clients = [EdgeClient(i, rec, engine, cfg) for i, rec in enumerate(records)]
    t0 = time.perf_counter()
    results = run_logits_sessions(
        clients,
        engine,
        link,
        cfg,
        device=device,
        prefill_budget_s=opts.prefill_budget_s,
        decode_budget_s=opts.decode_budget_s,
    )
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
            step_s=tuple(r.itl_s),
        )
        for r in results
    ]
    errors = sorted({r.error for r in results if r.error})
    extra: dict[str, object] = {
        "lookahead": lookahead,
        "device": "instant" if isolated else "real",
        "accepted_draft_tokens": sum(r.accepted_draft_tokens for r in results),
        "ttft_device_prefill_s": _r(
            pct([r.ttft_device_prefill_s for r in results if r.ttft_device_prefill_s is not None], 50)
        ),
        "ttft_cloud_wait_s": _r(pct([r.ttft_cloud_wait_s for r in results if r.ttft_cloud_wait_s is not None], 50)),
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


@dataclass(frozen=True)
class Decode:
    """A model's own batched greedy decode: tokens written per row, its prefill, each step's time, the wall time."""

    rows: int
    written: int
    prefill_s: float
    steps_s: tuple[float, ...]
    wall_s: float

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after each row's first over the time after the prefill (``summarize``'s decode tokens/s)."""
        span = self.wall_s - self.prefill_s
        return self.rows * (self.written - 1) / span if self.written > 1 and span > 0 else None


def greedy_decode(
    model, pad_id: int, prompts: Sequence[Sequence[int]], tokens: int, threads: int, decode_budget_s: float
) -> Decode:
    """Decode ``tokens`` greedily for every prompt in one packed batch at ``threads`` torch threads: the prefill (one
    pass, never cut), then one batched step a token until ``tokens`` or ``decode_budget_s`` after the prefill."""
    from cogenesis.core.kvbatch import PackedBatch
    from cogenesis.core.models import torch_threads

    batch = PackedBatch(model, pad_id)
    steps: list[float] = []
    with torch_threads(threads):
        t0 = time.perf_counter()
        nxt = batch.prefill(prompts).argmax(-1)  # [B]
        first = time.perf_counter() - t0
        stop_at = t0 + first + decode_budget_s
        written = 1
        while written < tokens and time.perf_counter() < stop_at:
            ts = time.perf_counter()
            nxt = batch.step(nxt.tolist()).argmax(-1)
            steps.append(time.perf_counter() - ts)
            written += 1
        wall = time.perf_counter() - t0
    return Decode(len(prompts), written, first, tuple(steps), wall)


def _large_only(ctx: _Ctx, records, tokens: int) -> VariantResult:
    """The large model's own batched greedy decode of the cloud prompts (no exchange), at the replica's threads."""
    opts = ctx.opts
    d = greedy_decode(
        ctx.large, ctx.tok.pad_token_id, ctx.cloud_ids(records), tokens, opts.threads, opts.decode_budget_s
    )
    runs = [
        Run(
            tokens=d.written, first_token_s=d.prefill_s, end_s=d.wall_s, completed=d.written == tokens, step_s=d.steps_s
        )
        for _ in records
    ]
    extra = {"threads": opts.threads, "prefill_s": _r(d.prefill_s)}
    return summarize("large-only", runs, d.wall_s, truncated=d.written < tokens, extra=extra)


def _compute_limit(ctx: _Ctx, records, tokens: int) -> VariantResult:
    """What two models sharing every core can reach: the large model's own batched decode of the cloud prompts and
    the small model's of the edge prompts, one after the other on all cores; its decode tokens/s is the shared limit.
    Above ``real_max_sessions`` sessions the small model decodes one batch of ``real_max_sessions`` (its KV for all N
    would not fit this machine), and its rate is that batch's: N sessions take ceil(N / batch) such batches, so its
    step time for all N rows and its prefill are that batch's times that many."""
    opts = ctx.opts
    pad, threads = ctx.tok.pad_token_id, opts.reference_threads
    large = greedy_decode(ctx.large, pad, ctx.cloud_ids(records), tokens, threads, opts.decode_budget_s)
    size = min(len(records), opts.real_max_sessions)
    batches = math.ceil(len(records) / size)
    small = greedy_decode(ctx.small, pad, ctx.edge_ids(records[:size]), tokens, threads, opts.decode_budget_s)
    small_tokens = small.rows * (small.written - 1)
    small_span = small.wall_s - small.prefill_s
    large_tps = large.decode_tokens_per_s
    small_tps = small_tokens / small_span if small_tokens and small_span > 0 else None
    limit = shared_limit(large_tps, small_tps)
    written = min(large.written, small.written)
    steps = tuple(a + b * batches for a, b in zip(large.steps_s, small.steps_s))  # a fused token: a step of each
    prefill = large.prefill_s + small.prefill_s * batches
    wall = large.wall_s + small.wall_s * batches
    runs = [Run(tokens=written, first_token_s=prefill, end_s=wall, completed=written == tokens, step_s=steps)] * len(
        records
    )
    extra = {
        "threads": threads,
        "large_decode_tps": _r(large_tps),
        "small_decode_tps": _r(small_tps),
        "shared_limit_tps": _r(limit),
        "small_batch": size,
        "prefill_s": _r(prefill),
        "large_prefill_s": _r(large.prefill_s),
        "small_prefill_s": _r(small.prefill_s * batches),
        "small_batches": batches,
    }
    result = summarize("compute-limit", runs, wall, truncated=written < tokens, extra=extra)
    return replace(result, decode_tokens_per_s=limit)


def _with_compute(ctx: _Ctx, result: VariantResult, records, tokens: int) -> VariantResult:
    """The result with how near the hardware it ran: its achieved GFLOP/s and their share of the measured peak."""
    if not ctx.shapes or not ctx.peak_gflops:
        return result
    large = ctx.shapes["large"].flops_per_token(_mean([len(p) for p in ctx.cloud_ids(records)]) + tokens / 2)
    small = 0.0
    if uses_small_model(result.variant):
        small = ctx.shapes["small"].flops_per_token(_mean([len(p) for p in ctx.edge_ids(records)]) + tokens / 2)
    flops, threads = compute_use(result.variant, large, small, ctx.opts.threads, ctx.opts.reference_threads)
    gflops, share = achieved(result.decode_tokens_per_s, flops, ctx.peak_gflops.get(threads))
    return replace(result, achieved_gflops=gflops, share_of_peak=share)


def compute_use(
    variant: str, large_flops: float, small_flops: float, threads: int, reference_threads: int
) -> tuple[float, int]:
    """The FLOPs a variant computes on this machine per decoded token, and the torch threads they ran on: the large
    model's alone at the replica's threads (large-only, the isolated variants); both models' on every core
    (compute-limit, and the real-device variants, whose edge pool shares the machine with the replica)."""
    if not uses_small_model(variant):
        return large_flops, threads
    return large_flops + small_flops, reference_threads


def uses_small_model(variant: str) -> bool:
    """Whether the small model runs on this machine in this variant (not in large-only and the isolated ones)."""
    return variant != "large-only" and variant not in ISOLATED


def achieved(
    decode_tps: float | None, flops_per_token: float, peak_gflops: float | None
) -> tuple[float | None, float | None]:
    """Achieved GFLOP/s (decode tokens/s x FLOPs per token) and their share of the peak (None: not measured)."""
    if not decode_tps:
        return None, None
    gflops = decode_tps * flops_per_token / 1e9
    return gflops, (gflops / peak_gflops if peak_gflops else None)


def _cloud_stats(ctx: _Ctx) -> dict:
    return httpx.get(f"{ctx.http_url}/v1/stats", headers=bearer_header(_token(ctx, "admin")), timeout=30).json()


def ratios(results: list[VariantResult]) -> list[dict]:
    """Per N: each cogenesis variant's decode tokens/s over large-only's (same threads), over the shared limit
    (compute-limit: two models sharing every core) and over stateless's."""
    out = []
    for n in sorted({r.sessions for r in results}):
        by = {r.variant: r for r in results if r.sessions == n}
        ref, base, limit = by.get("large-only"), by.get("stateless"), by.get("compute-limit")
        for name, r in by.items():
            if not name.startswith("cogenesis"):
                continue
            out.append(
                {
                    "sessions": n,
                    "variant": name,
                    "vs_large_only": _r(ratio(r.decode_tokens_per_s, ref.decode_tokens_per_s if ref else None)),
                    "vs_shared_limit": _r(ratio(r.decode_tokens_per_s, limit.decode_tokens_per_s if limit else None)),
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
    step = f"{r.step_p50_ms:.1f}/{r.step_p99_ms:.1f} ms" if r.step_p50_ms is not None else "-"
    flag = " [truncated by a budget]" if r.truncated else ""
    fail = f" [red]{r.failed} failed[/]" if r.failed else ""
    return (
        f"  {r.variant:<28} N={r.sessions:<4} decode {dec:>7} tok/s  e2e {r.tokens_per_s:7.1f} tok/s  "
        f"step p50/p99 {step}  overhead p50/p99 {over}{flag}{fail}"
    )


def write_report(report: dict, json_path: Path) -> None:
    from cogenesis.apps.bench.report import markdown_table, plot

    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(markdown_table(report) + "\n")
    plot(report, json_path.with_suffix(".png"))
