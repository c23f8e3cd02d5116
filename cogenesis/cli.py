"""The ``cogenesis`` command. Errors print what was wrong and what to do, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from cogenesis.errors import CoGenesisError

EPILOG = "Docs: README.md. Every command accepts -v for progress logs."


def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="run both CoGenesis modes end to end on this machine",
        description=("Start Redis, a local Ray instance and a Ray Serve app hosting the large model, then run "
                     "simulated edge clients (each with one record's private context) in sketch and logits mode. "
                     "Prints each client's output and a summary; everything is shut down on exit or Ctrl-C."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clients", type=int, default=4, help="simulated edge clients (records are cycled)")
    p.add_argument("--mode", choices=["sketch", "logits", "both"], default="both", help="which mode(s) to run")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens each client writes per session")
    p.add_argument("--data", default=None, help="CoGenesis JSON file (None: the 8 records shipped with the package)")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of starting the bundled one")
    p.add_argument("--json", dest="json_path", default=None, help="write sessions and summary to this JSON file")
    p.add_argument("--audit-log", default=None, help="cloud appends one JSON line per model request (its input text)")
    p.add_argument("--large-model", default="embedded:large", help="cloud model: embedded:large, HF dir or hub id")
    p.add_argument("--small-model", default="embedded:small", help="device model: embedded:small, HF dir or hub id")
    p.add_argument("--replicas", type=int, default=1, help="Serve replicas of the large model")
    p.add_argument("--top-k", type=int, default=10, help="top-k the cloud returns per logits step (<= 50)")
    p.add_argument("--lookahead", type=int, default=0, help="draft tokens the cloud proposes per reply (0-16)")
    p.add_argument("--schedule", choices=["every", "pkt", "uncertainty"], default="every",
                   help="when to ask the cloud: every step, the paper's (P,K,T) schedule, or when the small model is unsure")
    p.add_argument("--pkt", default="5,10,3", help="P,K,T of the pkt schedule")
    p.add_argument("--tau", type=float, default=2.0, help="entropy threshold (nats) of the uncertainty schedule")
    p.add_argument("--fusion-weight", type=float, default=0.5, help="constant fusion weight of the small model")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (client i uses seed + i)")
    p.add_argument("--sketch-style", choices=["zero-shot", "paper"], default="zero-shot",
                   help="sketch prompt: paper instructions alone, or with the paper's few-shot examples")
    p.add_argument("--sketch-temperature", type=float, default=0.0,
                   help="outline temperature (the paper: 0.7; greedy writes better outlines with 135M models)")
    p.add_argument("--sketch-top-p", type=float, default=1.0, help="outline nucleus mass (the paper: 0.9)")
    p.add_argument("--sketch-repetition-penalty", type=float, default=1.3, help="outline repetition penalty")
    p.add_argument("--sketch-max-tokens", type=int, default=160, help="tokens the cloud may spend on an outline")
    p.add_argument("--step-timeout", type=float, default=30.0, help="seconds to wait for one cloud reply")
    p.add_argument("--show-private", action="store_true", help="also print each client's private instruction text")


def _models_parser(sub) -> None:
    p = sub.add_parser("models", help="prepare, derive and inspect the embedded models",
                       description="Manage the embedded models (cached under $COGENESIS_HOME, default ~/.cache/cogenesis).")
    msub = p.add_subparsers(dest="models_cmd", required=True, metavar="{prepare,derive-small,info}")
    msub.add_parser("prepare", help="convert the embedded GGUF and derive the small model (idempotent)")
    d = msub.add_parser(
        "derive-small", help="derive the small model from the large one by layer pruning",
        description=("Remove decoder layers from the large model. --search recorded drops the recorded layers "
                     "(14-18 and 26; fast, identical everywhere); --search greedy removes one layer at a time, "
                     "each time the one that hurts perplexity on --data's gold answers least (slow: minutes per "
                     "layer on 2 cores)."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--search", choices=["recorded", "greedy"], default="recorded", help="how layers are chosen")
    d.add_argument("--keep", type=int, default=24, help="layers to keep (greedy search)")
    d.add_argument("--data", default=None, help="CoGenesis JSON whose gold answers calibrate/measure (None: the shipped sample)")
    d.add_argument("--records", type=int, default=8, help="records used for calibration and measurement")
    d.add_argument("--out", default=None, help="output directory (default: the cache's small-model directory)")
    msub.add_parser("info", help="show model paths, derivations and measured quality")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks measured side by side (JSON + markdown table + PNG plot)",
                       description="Benchmarks. Each runs its variants side by side in one run on this machine.")
    bsub = p.add_subparsers(dest="bench_cmd", required=True, metavar="{exchange}")
    e = bsub.add_parser(
        "exchange", help="logits-mode step exchange vs large-only decode and the stateless protocol",
        description=("For each session count: the large model's own batched greedy decode (large-only, the "
                     "compute reference); the official code's stateless protocol (whole sequence over HTTP per "
                     "step, batch 1); CoGenesis logits mode over Ray Serve + Redis with lookahead 0 and N; "
                     "optionally a vLLM server driven per step. Every session writes --max-new-tokens tokens "
                     "(greedy, end-of-text ignored). Writes JSON, a markdown table (.md) and a plot (.png) "
                     "beside --json."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--sessions", default="1,16,64,256", help="comma-separated concurrent session counts")
    e.add_argument("--max-new-tokens", type=int, default=64, help="tokens every session writes")
    e.add_argument("--lookahead", type=int, default=4, help="draft tokens of the cogenesis-lookahead variant")
    e.add_argument("--top-k", type=int, default=10, help="cloud top-k per step")
    e.add_argument("--edge-prompt-tokens", type=int, default=512,
                   help="small-model prompt budget (private context trimmed to fit; bounds edge memory at large N)")
    e.add_argument("--budget", type=float, default=300.0,
                   help="seconds per variant and N; a variant still running then is cut and marked")
    e.add_argument("--variants", default=",".join(("large-only", "stateless", "cogenesis", "cogenesis-lookahead")),
                   help="comma-separated subset of the variants")
    e.add_argument("--with-vllm", action="store_true", help="add a vLLM OpenAI server driven per step")
    e.add_argument("--vllm-python", default=None,
                   help="python of the venv where vllm imports (default: $COGENESIS_VLLM_PYTHON, else this one)")
    e.add_argument("--data", default=None, help="CoGenesis JSON file (None: the shipped sample, cycled)")
    e.add_argument("--large-model", default="embedded:large", help="cloud model spec")
    e.add_argument("--small-model", default="embedded:small", help="device model spec")
    e.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="torch threads of the edge and of the replica each (they share this machine's cores)")
    e.add_argument("--json", dest="json_path", default="out/bench-exchange.json",
                   help="report path; the .md table and .png plot are written beside it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cogenesis", epilog=EPILOG,
        description=("CoGenesis Serve: a cloud LLM (Ray Serve) and on-device small models write together over "
                     "Redis; the user's private context never leaves the device."))
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _demo_parser(sub)
    _models_parser(sub)
    _bench_parser(sub)
    c = sub.add_parser("config", help="print every configuration field with its default and meaning")
    c.add_argument("--show", action="store_true", help="(default) print the configuration reference")
    return parser


def cmd_demo(args) -> int:
    from rich.console import Console

    from cogenesis.config import CloudConfig, EdgeConfig, validate
    from cogenesis.demo import DemoOptions, run_demo

    cpus = os.cpu_count() or 2
    half = max(1, cpus // 2)  # edge and cloud share this machine: split its cores (oversubscribed, both slow ~5x)
    cloud = validate(CloudConfig, {"large_model": args.large_model, "num_replicas": args.replicas,
                                   "audit_log": args.audit_log, "sketch_style": args.sketch_style,
                                   "torch_threads": max(1, half // max(1, args.replicas))},
                     "flags")
    edge = validate(EdgeConfig, {
        "small_model": args.small_model, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens,
        "step_timeout_s": args.step_timeout, "sketch_max_tokens": args.sketch_max_tokens,
        "sketch": {"temperature": args.sketch_temperature, "top_p": args.sketch_top_p,
                   "repetition_penalty": args.sketch_repetition_penalty},
        "sampling": {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed},
        "fusion": {"weight": args.fusion_weight}, "lookahead": args.lookahead,
        "torch_threads": half, "prefill_threads": cpus,
        "schedule": {"kind": args.schedule, **_pkt(args.pkt), "tau": args.tau}}, "flags")
    modes = ("sketch", "logits") if args.mode == "both" else (args.mode,)
    opts = DemoOptions(clients=args.clients, modes=modes, data=args.data, redis_url=args.redis_url,
                       json_path=args.json_path, show_private=args.show_private)
    report = run_demo(opts, cloud, edge, Console())
    failed = sum(m["failed"] for m in report["summary"]["modes"].values())
    return 1 if failed else 0


def _pkt(text: str) -> dict:
    from cogenesis.errors import ConfigError

    try:
        p, k, t = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--pkt {text!r} is not three integers P,K,T", hint="e.g. --pkt 5,10,3") from None
    return {"p": p, "k": k, "t": t}


def cmd_bench(args) -> int:
    from rich.console import Console

    from cogenesis.bench.exchange import ExchangeBenchOptions, run_exchange_bench
    from cogenesis.bench.report import markdown_table

    opts = ExchangeBenchOptions(
        sessions=tuple(_ints(args.sessions, "--sessions")), max_new_tokens=args.max_new_tokens,
        lookahead=args.lookahead, top_k=args.top_k, edge_prompt_tokens=args.edge_prompt_tokens,
        budget_s=args.budget, variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        with_vllm=args.with_vllm, vllm_python=args.vllm_python, data=args.data, large_model=args.large_model,
        small_model=args.small_model, json_path=args.json_path, threads=args.threads)
    console = Console()
    with console.status("cogenesis bench exchange") as status:
        report = run_exchange_bench(opts, console, lambda m: status.update(f"bench exchange: {m}"))
    print(markdown_table(report))
    stem = opts.json_path.rsplit(".", 1)[0]
    console.print(f"wrote {opts.json_path}, {stem}.md, {stem}.png")
    return 1 if any(r["failed"] for r in report["results"]) else 0


def _ints(text: str, flag: str) -> list[int]:
    from cogenesis.errors import ConfigError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a comma-separated list of integers", hint=f"e.g. {flag} 1,16,64") from None
    if not values:
        raise ConfigError(f"{flag} is empty", hint=f"e.g. {flag} 1,16,64")
    return values


def cmd_models(args) -> int:
    from cogenesis import model_tools

    return model_tools.run(args)


def cmd_config(args) -> int:
    from cogenesis.config import CloudConfig, EdgeConfig

    for model in (CloudConfig, EdgeConfig):
        print(f"{model.__name__}: {(model.__doc__ or '').strip()}")
        _print_fields(model, "  ")
    return 0


def _print_fields(model, indent: str) -> None:
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            print(f"{indent}{name}:")
            _print_fields(ann, indent + "  ")
        else:
            print(f"{indent}{name} = {field.default!r}  # {field.description}")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` shuts down as cleanly as Ctrl-C
    handlers = {"demo": cmd_demo, "models": cmd_models, "bench": cmd_bench, "config": cmd_config}
    try:
        return handlers[args.cmd](args)
    except CoGenesisError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: everything started was shut down", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so plainly; the traceback only with -v
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
        print("  hint: rerun with -v for the traceback and report it", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
