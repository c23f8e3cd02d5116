"""``cogenesis bench``: benchmarks measured side by side (JSON + markdown table + PNG plot)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cogenesis.apps.bench.variants import DEFAULT_VARIANTS, VARIANTS
from cogenesis.apps.flags import BENCH_EXCHANGE


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmarks measured side by side (JSON + markdown table + PNG plot)",
        description="Benchmarks. Each runs its variants side by side in one run on this machine.",
    )
    bsub = p.add_subparsers(dest="bench_cmd", required=True, metavar="{exchange}")
    e = bsub.add_parser(
        "exchange",
        help="logits-mode step exchange vs large-only decode, the shared compute limit and the stateless protocol",
        description=(
            "For each session count: the large model's own batched greedy decode at the replica's threads "
            "(large-only); both models' own batched decodes on every core (compute-limit: the shared limit of "
            "two models on these cores); CoGenesis logits mode over Ray Serve + Redis with instant devices "
            "(cogenesis-isolated: the cloud alone) and with real devices (cogenesis: the small model runs "
            "here), each with lookahead 0 and N; on request the official code's stateless protocol (whole "
            "sequence over HTTP per step, batch 1), the gateway's hop, and a vLLM server driven per step. "
            "Every session writes --max-new-tokens tokens (greedy, end-of-text ignored). Writes JSON, a "
            "markdown table (.md) and plots (.png, -scaling.png) beside --json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("--sessions", default="1,16,64,256,1024", help="comma-separated concurrent session counts")
    e.add_argument(
        "--prefill-budget",
        type=float,
        default=300.0,
        help="seconds per variant and N from the start until every session has its first token; a variant "
        "still without them then is cut and marked (large-only, compute-limit: their one prefill pass is never cut)",
    )
    e.add_argument(
        "--decode-budget",
        type=float,
        default=120.0,
        help="seconds per variant and N from the moment every session has its first token; a variant still "
        "decoding then is cut and marked",
    )
    e.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated variants, of: {', '.join(VARIANTS)}",
    )
    e.add_argument(
        "--real-max-sessions",
        type=int,
        default=64,
        help="session counts above this skip the real-device variants (cogenesis, cogenesis-lookahead, "
        "stateless, cogenesis-gateway, vllm), whose edge pool holds every session's small-model KV here "
        "(~16 MiB a session for 512-token prompts); the skip is recorded in the report",
    )
    e.add_argument("--with-vllm", action="store_true", help="add a vLLM OpenAI server driven per step")
    e.add_argument(
        "--vllm-python",
        default=None,
        help="python of the venv where vllm imports (default: $COGENESIS_VLLM_PYTHON, else this one)",
    )
    e.add_argument("--data", default=None, help="CoGenesis JSON file (None: the shipped sample, cycled)")
    e.add_argument(
        "--json",
        dest="json_path",
        default="out/bench-exchange.json",
        help="report path; the .md table and .png plot are written beside it",
    )
    BENCH_EXCHANGE.add_to(e)
    e.set_defaults(handler=run_exchange)


def run_exchange(args) -> int:
    from rich.console import Console

    from cogenesis.apps.bench.exchange import ExchangeBenchOptions, run_exchange_bench
    from cogenesis.apps.bench.report import markdown_table, scaling_path
    from cogenesis.core.config import CloudConfig, EdgeConfig

    edge = BENCH_EXCHANGE.config(args, EdgeConfig)
    cloud = BENCH_EXCHANGE.config(args, CloudConfig)
    opts = ExchangeBenchOptions(
        sessions=tuple(parse_ints(args.sessions, "--sessions")),
        max_new_tokens=edge.max_new_tokens,
        lookahead=edge.lookahead,
        top_k=edge.top_k,
        edge_prompt_tokens=edge.max_prompt_tokens,
        prefill_budget_s=args.prefill_budget,
        decode_budget_s=args.decode_budget,
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        real_max_sessions=args.real_max_sessions,
        with_vllm=args.with_vllm,
        vllm_python=args.vllm_python,
        data=args.data,
        large_model=cloud.large_model,
        small_model=edge.small_model,
        json_path=args.json_path,
        threads=edge.torch_threads,
    )
    console = Console()
    with console.status("cogenesis bench exchange") as status:
        report = run_exchange_bench(opts, console, lambda m: status.update(f"bench exchange: {m}"))
    print(markdown_table(report))
    png = Path(opts.json_path).with_suffix(".png")
    console.print(f"wrote {opts.json_path}, {png.with_suffix('.md')}, {png}, {scaling_path(png)}")
    return 1 if any(r["failed"] for r in report["results"]) else 0


def parse_ints(text: str, flag: str) -> list[int]:
    from cogenesis.core.errors import ConfigError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r} is not a comma-separated list of integers", hint=f"e.g. {flag} 1,16,64"
        ) from None
    if not values:
        raise ConfigError(f"{flag} is empty", hint=f"e.g. {flag} 1,16,64")
    return values
