"""``cogenesis bench``: benchmarks measured side by side (JSON + markdown table + PNG plot)."""

from __future__ import annotations

import argparse

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
        help="logits-mode step exchange vs large-only decode and the stateless protocol",
        description=(
            "For each session count: the large model's own batched greedy decode (large-only, the "
            "compute reference); the official code's stateless protocol (whole sequence over HTTP per "
            "step, batch 1); CoGenesis logits mode over Ray Serve + Redis with lookahead 0 and N; "
            "optionally a vLLM server driven per step. Every session writes --max-new-tokens tokens "
            "(greedy, end-of-text ignored). Writes JSON, a markdown table (.md) and a plot (.png) "
            "beside --json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    e.add_argument("--sessions", default="1,16,64,256", help="comma-separated concurrent session counts")
    e.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="seconds per variant and N; a variant still running then is cut and marked",
    )
    e.add_argument(
        "--variants",
        default=",".join(("large-only", "stateless", "cogenesis", "cogenesis-lookahead", "cogenesis-gateway")),
        help="comma-separated subset of the variants",
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
    from cogenesis.apps.bench.report import markdown_table
    from cogenesis.core.config import CloudConfig, EdgeConfig

    edge = BENCH_EXCHANGE.config(args, EdgeConfig)
    cloud = BENCH_EXCHANGE.config(args, CloudConfig)
    opts = ExchangeBenchOptions(
        sessions=tuple(parse_ints(args.sessions, "--sessions")),
        max_new_tokens=edge.max_new_tokens,
        lookahead=edge.lookahead,
        top_k=edge.top_k,
        edge_prompt_tokens=edge.max_prompt_tokens,
        budget_s=args.budget,
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
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
    stem = opts.json_path.rsplit(".", 1)[0]
    console.print(f"wrote {opts.json_path}, {stem}.md, {stem}.png")
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
