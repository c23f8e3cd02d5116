"""The ``cogenesis`` command. Errors print what was wrong and what to do, never a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from cogenesis.core.errors import CoGenesisError, ConfigError

EPILOG = "Docs: README.md. Every command accepts -v for progress logs."


def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run both CoGenesis modes end to end on this machine",
        description=(
            "Start Redis, a local Ray instance and a Ray Serve app hosting the large model, then run "
            "simulated edge clients (each with one record's private context) in sketch and logits mode. "
            "Prints each client's output and a summary; everything is shut down on exit or Ctrl-C."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    _schedule_flags(p)
    _fusion_flags(p)
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (client i uses seed + i)")
    p.add_argument(
        "--sketch-style",
        choices=["zero-shot", "paper"],
        default="zero-shot",
        help="sketch prompt: paper instructions alone, or with the paper's few-shot examples",
    )
    p.add_argument(
        "--sketch-temperature",
        type=float,
        default=0.0,
        help="outline temperature (the paper: 0.7; greedy writes better outlines with 135M models)",
    )
    p.add_argument("--sketch-top-p", type=float, default=1.0, help="outline nucleus mass (the paper: 0.9)")
    p.add_argument("--sketch-repetition-penalty", type=float, default=1.3, help="outline repetition penalty")
    p.add_argument("--sketch-max-tokens", type=int, default=160, help="tokens the cloud may spend on an outline")
    p.add_argument("--step-timeout", type=float, default=30.0, help="seconds to wait for one cloud reply")
    p.add_argument("--show-private", action="store_true", help="also print each client's private instruction text")


def _schedule_flags(p) -> None:
    p.add_argument(
        "--schedule",
        choices=["every", "pkt", "uncertainty"],
        default="every",
        help="when to ask the cloud: every step, the paper's (P,K,T) schedule, or when the small model is unsure",
    )
    p.add_argument("--pkt", default="5,10,3", help="P,K,T of the pkt schedule")
    p.add_argument("--tau", type=float, default=2.0, help="entropy threshold (nats) of the uncertainty schedule")


def _schedule_cfg(args) -> dict:
    return {"kind": args.schedule, **_pkt(args.pkt), "tau": args.tau}


def _scoring_flags(p) -> None:
    """Flags of the commands that teacher-force gold answers through both models (train-fusion, eval)."""
    p.add_argument("--max-gold-tokens", type=int, default=384, help="gold tokens used per record")
    p.add_argument("--edge-prompt-tokens", type=int, default=1536, help="with-context prompt budget (history trimmed)")
    p.add_argument("--large-model", default="embedded:large", help="cloud model spec")
    p.add_argument("--small-model", default="embedded:small", help="device model spec")


def _fusion_flags(p) -> None:
    p.add_argument(
        "--fusion",
        choices=["constant", "entropy", "contrast", "learned"],
        default="constant",
        help="logits fusion: fixed weight, entropy-weighted, contrast (proxy-tuning; a 2nd small-model "
        "pass without the context), or a trained network (--fusion-checkpoint)",
    )
    p.add_argument("--fusion-weight", type=float, default=0.5, help="constant fusion weight of the small model")
    p.add_argument("--contrast-alpha", type=float, default=1.0, help="contrast fusion: strength of the context's edit")
    p.add_argument("--fusion-checkpoint", default=None, help="learned fusion: checkpoint from `cogenesis train-fusion`")


def _fusion_cfg(args) -> dict:
    return {
        "method": args.fusion,
        "weight": args.fusion_weight,
        "alpha": args.contrast_alpha,
        "checkpoint": args.fusion_checkpoint,
    }


def _models_parser(sub) -> None:
    p = sub.add_parser(
        "models",
        help="prepare, derive and inspect the embedded models",
        description="Manage the embedded models (cached under $COGENESIS_HOME, default ~/.cache/cogenesis).",
    )
    msub = p.add_subparsers(dest="models_cmd", required=True, metavar="{prepare,derive-small,info}")
    msub.add_parser("prepare", help="convert the embedded GGUF and derive the small model (idempotent)")
    d = msub.add_parser(
        "derive-small",
        help="derive the small model from the large one by layer pruning",
        description=(
            "Remove decoder layers from the large model. --search recorded drops the recorded layers "
            "(14-18 and 26; fast, identical everywhere); --search greedy removes one layer at a time, "
            "each time the one that hurts perplexity on --data's gold answers least (slow: minutes per "
            "layer on 2 cores)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument("--search", choices=["recorded", "greedy"], default="recorded", help="how layers are chosen")
    d.add_argument("--keep", type=int, default=24, help="layers to keep (greedy search)")
    d.add_argument(
        "--data", default=None, help="CoGenesis JSON whose gold answers calibrate/measure (None: the shipped sample)"
    )
    d.add_argument("--records", type=int, default=8, help="records used for calibration and measurement")
    d.add_argument("--out", default=None, help="output directory (default: the cache's small-model directory)")
    msub.add_parser("info", help="show model paths, derivations and measured quality")


def _bench_parser(sub) -> None:
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
    e.add_argument("--max-new-tokens", type=int, default=64, help="tokens every session writes")
    e.add_argument("--lookahead", type=int, default=4, help="draft tokens of the cogenesis-lookahead variant")
    e.add_argument("--top-k", type=int, default=10, help="cloud top-k per step")
    e.add_argument(
        "--edge-prompt-tokens",
        type=int,
        default=512,
        help="small-model prompt budget (private context trimmed to fit; bounds edge memory at large N)",
    )
    e.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="seconds per variant and N; a variant still running then is cut and marked",
    )
    e.add_argument(
        "--variants",
        default=",".join(("large-only", "stateless", "cogenesis", "cogenesis-lookahead")),
        help="comma-separated subset of the variants",
    )
    e.add_argument("--with-vllm", action="store_true", help="add a vLLM OpenAI server driven per step")
    e.add_argument(
        "--vllm-python",
        default=None,
        help="python of the venv where vllm imports (default: $COGENESIS_VLLM_PYTHON, else this one)",
    )
    e.add_argument("--data", default=None, help="CoGenesis JSON file (None: the shipped sample, cycled)")
    e.add_argument("--large-model", default="embedded:large", help="cloud model spec")
    e.add_argument("--small-model", default="embedded:small", help="device model spec")
    e.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="torch threads of the edge and of the replica each (they share this machine's cores)",
    )
    e.add_argument(
        "--json",
        dest="json_path",
        default="out/bench-exchange.json",
        help="report path; the .md table and .png plot are written beside it",
    )


def _cluster_parsers(sub) -> None:
    up = sub.add_parser(
        "up",
        help="start a local cluster in the background (Redis + Ray head + Serve app)",
        description=(
            "Start Redis, a Ray head and the Serve app hosting the large model as a background process; "
            "returns once the app answers /healthz. State and log: $COGENESIS_HOME/cluster/ "
            "(state.json, cluster.log). Stop it with `cogenesis down`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    up.add_argument("--large-model", default="embedded:large", help="cloud model: embedded:large, HF dir or hub id")
    up.add_argument("--replicas", type=int, default=1, help="Serve replicas of the large model")
    up.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="torch threads per replica (edge pools on this machine use the other cores)",
    )
    up.add_argument("--kv-budget-mb", type=float, default=4096, help="KV-cache budget per replica (MiB)")
    up.add_argument("--max-sessions", type=int, default=4096, help="open logits sessions a replica keeps")
    up.add_argument("--max-ongoing-requests", type=int, default=1024, help="HTTP requests a replica takes at once")
    up.add_argument("--http-port", type=int, default=8000, help="Serve HTTP port (a free one if taken)")
    up.add_argument("--redis-url", default=None, help="use this Redis instead of starting the bundled one")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the app to be healthy")
    down = sub.add_parser("down", help="stop the background cluster started by `cogenesis up`")
    down.add_argument("--timeout", type=float, default=60.0, help="seconds before its processes are killed")
    st = sub.add_parser("status", help="show the background cluster: process, Redis, Serve health, replica stats")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    for p in (up, down, st):
        p.add_argument("--state-dir", default=None, help="state directory (default: $COGENESIS_HOME/cluster)")


def _edge_parser(sub) -> None:
    p = sub.add_parser(
        "edge",
        help="simulate many edge clients against the running cluster",
        description=(
            "Run --clients simulated devices against the cluster of `cogenesis up`, in --pools pool "
            "processes. Each client holds one record's private context (cycled from --data), thinks "
            "for --think-time seconds, runs a session, and again. A pool batches its clients' "
            "small-model passes. --device real runs the small model; a profile from "
            "configs/devices.yaml (phone, laptop, iot) simulates the device's speed and network instead "
            "and is printed in the report. Shows a progress line; writes a JSON report with --json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=100, help="simulated devices")
    p.add_argument("--mode", choices=["sketch", "logits", "mixed"], default="logits", help="session mode")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--duration", type=float, default=None, help="seconds to run (default 60 unless --sessions-per-client)"
    )
    g.add_argument("--sessions-per-client", type=int, default=None, help="sessions each client runs, then stops")
    p.add_argument(
        "--think-time",
        default="5..15",
        help="A..B: seconds a client waits between sessions (uniform); "
        "clients also start at a random point of the first B seconds",
    )
    p.add_argument("--pools", type=int, default=1, help="edge pool processes (clients are spread over them)")
    p.add_argument("--device", default="real", help="real, or a device profile name (configs/devices.yaml)")
    p.add_argument(
        "--max-active",
        type=int,
        default=None,
        help="sessions running at once per pool (default: 8 on the real device, no cap for a profile)",
    )
    p.add_argument(
        "--launcher",
        choices=["local", "ray"],
        default="local",
        help="run pools as local processes, or as Ray tasks spread over the cluster's nodes",
    )
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per session")
    p.add_argument("--sketch-max-tokens", type=int, default=64, help="tokens the cloud may spend on an outline")
    p.add_argument("--top-k", type=int, default=10, help="cloud top-k per logits step")
    p.add_argument("--lookahead", type=int, default=0, help="draft tokens the cloud proposes per reply")
    _fusion_flags(p)
    p.add_argument("--edge-prompt-tokens", type=int, default=512, help="small-model prompt budget per client")
    p.add_argument("--small-model", default="embedded:small", help="device model: embedded:small, HF dir or hub id")
    p.add_argument("--threads", type=int, default=1, help="torch threads per pool (real device)")
    p.add_argument("--step-timeout", type=float, default=60.0, help="seconds to wait for one cloud reply")
    p.add_argument("--data", default=None, help="CoGenesis JSON file (None: the shipped sample, cycled)")
    p.add_argument("--json", dest="json_path", default=None, help="write the report to this JSON file")
    p.add_argument("--state-dir", default=None, help="cluster state directory (default: $COGENESIS_HOME/cluster)")


def _loadtest_parser(sub) -> None:
    p = sub.add_parser(
        "loadtest",
        help="headless Locust load test against the local cluster, with a summary",
        description=(
            "Run loadtest/locustfile.py headless against the cluster of `cogenesis up` (started first if "
            "none runs, and stopped after unless --keep-cluster). Every Locust user is an edge device "
            "running whole sessions. Writes Locust's CSV and HTML reports and its log to --out, and a "
            "summary JSON (users reached, sessions ok/failed, tokens/s, TTFT/ITL p50/p99, the device). "
            "For a bigger, distributed test run Locust itself: see the README."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--users", type=int, default=100, help="peak concurrent users (devices)")
    p.add_argument("--spawn-rate", type=float, default=10.0, help="users started per second")
    p.add_argument("--run-time", default="60s", help="test length (60s, 2m, 1h30m)")
    p.add_argument("--mode", choices=["logits", "sketch", "mixed"], default="logits", help="user classes to run")
    p.add_argument("--device", default="real", help="real, or a device profile name (configs/devices.yaml)")
    p.add_argument("--processes", type=int, default=1, help="Locust worker processes on this machine")
    p.add_argument(
        "--shape",
        default=None,
        help="a load profile (configs/loadtest/ramp|step|spike.yaml); replaces --users/--spawn-rate/--run-time",
    )
    p.add_argument("--think-time", default="5..15", help="A..B seconds between a user's sessions")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per session")
    p.add_argument(
        "--max-active",
        type=int,
        default=0,
        help="sessions at once per Locust process (0: 8 on the real device, no cap for a profile)",
    )
    p.add_argument("--stop-timeout", type=float, default=30.0, help="seconds running sessions get to finish at the end")
    p.add_argument("--out", default="out/loadtest", help="directory for Locust's CSV/HTML reports, log and summary")
    p.add_argument("--json", dest="json_path", default=None, help="summary JSON path (default: OUT/summary.json)")
    p.add_argument("--keep-cluster", action="store_true", help="leave a cluster this command started running")
    p.add_argument("--state-dir", default=None, help="cluster state directory (default: $COGENESIS_HOME/cluster)")


def _top_parser(sub) -> None:
    p = sub.add_parser(
        "top",
        help="live throughput and latency of the running cluster (from its metrics endpoints)",
        description=(
            "Scrape every metrics endpoint announced on the bus (replicas, edge pools, Locust processes) "
            "and show tokens/s by mode, step round trip p50/p99, batch size, active sessions, KV cache, "
            "queue depth, lookahead acceptance and sessions, refreshed every --interval seconds. "
            "Ctrl-C quits."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (the rate window)")
    p.add_argument("--once", action="store_true", help="print one snapshot (over one interval) and exit")
    p.add_argument("--json", action="store_true", help="with --once: print the figures as JSON")
    p.add_argument("--png", default=None, help="with --once: also save the table as a PNG (a terminal capture)")
    p.add_argument("--redis-url", default=None, help="the bus (default: the `cogenesis up` cluster's)")
    p.add_argument("--state-dir", default=None, help="cluster state directory (default: $COGENESIS_HOME/cluster)")


def _dashboard_parser(sub) -> None:
    p = sub.add_parser(
        "dashboard",
        help="render the Grafana dashboard's panels to a PNG from a Prometheus server",
        description=(
            "Run every panel query of configs/grafana/cogenesis.json against Prometheus (/api/v1/query_range) "
            "and draw the panels into one PNG: the dashboard without Grafana."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL")
    p.add_argument("--minutes", type=float, default=10.0, help="time range to draw (ending now)")
    p.add_argument("--out", default="out/dashboard.png", help="PNG path")


def _train_fusion_parser(sub) -> None:
    p = sub.add_parser(
        "train-fusion",
        help="train the learned logits fusion on gold answers (checkpoint for --fusion learned)",
        description=(
            "Teacher-force every record's gold answer through the small model WITH the private context and "
            "the large model WITHOUT it, keep both top-k per position, and train the fusion weight "
            "w = sigmoid(MLP(...)) to maximise the gold token's probability under w*z_small + (1-w)*z_large "
            "(gold token kept in the candidate set). Records are split into train/dev; the best dev epoch "
            "is saved, with its config and training history, to --out. Use it with "
            "`--fusion learned --fusion-checkpoint OUT`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="CoGenesis JSON with gold answers (e.g. context_aware_dev.json)")
    p.add_argument("--limit", type=int, default=None, help="use the first N records (default: all)")
    p.add_argument(
        "--variant",
        choices=["compact", "paper"],
        default="compact",
        help="compact: sorted top-k logprobs + entropies (~2.5k parameters); paper: the paper's network "
        "over both vocabulary-sized top-k vectors",
    )
    p.add_argument("--top-k", type=int, default=10, help="top-k per side (must match the cloud's --top-k at use)")
    p.add_argument("--hidden", type=int, default=64, help="first hidden layer width (the paper: 512)")
    p.add_argument("--epochs", type=int, default=100, help="at most this many epochs")
    p.add_argument("--patience", type=int, default=5, help="stop after this many epochs without a better dev NLL")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--batch-size", type=int, default=256, help="positions per optimiser step")
    p.add_argument("--dev-fraction", type=float, default=0.2, help="share of records held out for early stopping")
    p.add_argument("--seed", type=int, default=0, help="split and initialisation seed")
    _scoring_flags(p)
    p.add_argument("--out", default="out/fusion.pt", help="checkpoint path (a .json summary is written beside it)")


def _eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="the paper's Table 1 on any model pair: NLL, ROUGE-L and privacy exposure per setting",
        description=(
            "Run large_with_context (reference; the context is not private there), large_without_context, "
            "small_with_context, sketch and logits (one per --fusions method) on CoGenesis records, with the "
            "real cloud engine in-process. Per setting: teacher-forced NLL/token of the gold answer under the "
            "setting's own distribution, ROUGE-L of the generated answer, its length, and exposure (share of "
            "the record's private 4-grams in what the cloud model received). Writes --json, a markdown table "
            "(.md) and a bar chart (.png) beside it. With --judge-url, also the paper's three GPT-4-judge "
            "ratings from any OpenAI-compatible endpoint (the judge sees the profile and history, as in the "
            "paper: use an endpoint you trust with them)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="CoGenesis JSON (context_aware_*.json or paper_*.json)")
    p.add_argument("--limit", type=int, default=20, help="records to evaluate (the first N with a gold answer)")
    p.add_argument(
        "--settings",
        default="large_with_context,large_without_context,small_with_context,sketch",
        help="comma-separated non-logits settings to run ('none': only the --fusions settings)",
    )
    p.add_argument(
        "--fusions",
        default="constant,entropy,contrast",
        help="comma-separated logits fusion methods (add 'learned' with --fusion-checkpoint)",
    )
    p.add_argument("--fusion-checkpoint", default=None, help="learned fusion checkpoint (`cogenesis train-fusion`)")
    p.add_argument("--fusion-weight", type=float, default=0.5, help="constant fusion weight of the small model")
    p.add_argument("--contrast-alpha", type=float, default=1.0, help="contrast fusion strength")
    _schedule_flags(p)
    p.add_argument("--top-k", type=int, default=10, help="cloud top-k per logits step")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens each setting writes per record")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature of every setting (0 = greedy)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus mass")
    p.add_argument("--seed", type=int, default=0, help="record i samples with seed + i in every setting")
    p.add_argument("--batch", type=int, default=8, help="records generated together")
    _scoring_flags(p)
    p.add_argument("--json", dest="json_path", default="out/eval.json", help="report path (.md and .png beside it)")
    p.add_argument(
        "--outputs",
        default=None,
        help="also write every generated answer here (JSONL; device-side output: may repeat private details)",
    )
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL (…/v1) of a judge model")
    p.add_argument("--judge-model", default="gpt-4-1106-preview", help="judge model name (the paper's)")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's API key")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cogenesis",
        epilog=EPILOG,
        description=(
            "CoGenesis Serve: a cloud LLM (Ray Serve) and on-device small models write together over "
            "Redis; the user's private context never leaves the device."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    _demo_parser(sub)
    _models_parser(sub)
    _bench_parser(sub)
    _cluster_parsers(sub)
    _edge_parser(sub)
    _loadtest_parser(sub)
    _top_parser(sub)
    _dashboard_parser(sub)
    _train_fusion_parser(sub)
    _eval_parser(sub)
    c = sub.add_parser("config", help="print every configuration field with its default and meaning")
    c.add_argument("--show", action="store_true", help="(default) print the configuration reference")
    return parser


def cmd_demo(args) -> int:
    from rich.console import Console

    from cogenesis.apps.demo import DemoOptions, run_demo
    from cogenesis.core.config import CloudConfig, EdgeConfig, validate

    cpus = os.cpu_count() or 2
    half = max(1, cpus // 2)  # edge and cloud share this machine: split its cores (oversubscribed, both slow ~5x)
    cloud = validate(
        CloudConfig,
        {
            "large_model": args.large_model,
            "num_replicas": args.replicas,
            "audit_log": args.audit_log,
            "sketch_style": args.sketch_style,
            "torch_threads": max(1, half // max(1, args.replicas)),
        },
        "flags",
    )
    edge = validate(
        EdgeConfig,
        {
            "small_model": args.small_model,
            "top_k": args.top_k,
            "max_new_tokens": args.max_new_tokens,
            "step_timeout_s": args.step_timeout,
            "sketch_max_tokens": args.sketch_max_tokens,
            "sketch": {
                "temperature": args.sketch_temperature,
                "top_p": args.sketch_top_p,
                "repetition_penalty": args.sketch_repetition_penalty,
            },
            "sampling": {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed},
            "fusion": _fusion_cfg(args),
            "lookahead": args.lookahead,
            "torch_threads": half,
            "prefill_threads": cpus,
            "schedule": _schedule_cfg(args),
        },
        "flags",
    )
    modes = ("sketch", "logits") if args.mode == "both" else (args.mode,)
    opts = DemoOptions(
        clients=args.clients,
        modes=modes,
        data=args.data,
        redis_url=args.redis_url,
        json_path=args.json_path,
        show_private=args.show_private,
    )
    report = run_demo(opts, cloud, edge, Console())
    failed = sum(m["failed"] for m in report["summary"]["modes"].values())
    return 1 if failed else 0


def _pkt(text: str) -> dict:
    from cogenesis.core.errors import ConfigError

    try:
        p, k, t = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--pkt {text!r} is not three integers P,K,T", hint="e.g. --pkt 5,10,3") from None
    return {"p": p, "k": k, "t": t}


def cmd_bench(args) -> int:
    from rich.console import Console

    from cogenesis.apps.bench.exchange import ExchangeBenchOptions, run_exchange_bench
    from cogenesis.apps.bench.report import markdown_table

    opts = ExchangeBenchOptions(
        sessions=tuple(_ints(args.sessions, "--sessions")),
        max_new_tokens=args.max_new_tokens,
        lookahead=args.lookahead,
        top_k=args.top_k,
        edge_prompt_tokens=args.edge_prompt_tokens,
        budget_s=args.budget,
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        with_vllm=args.with_vllm,
        vllm_python=args.vllm_python,
        data=args.data,
        large_model=args.large_model,
        small_model=args.small_model,
        json_path=args.json_path,
        threads=args.threads,
    )
    console = Console()
    with console.status("cogenesis bench exchange") as status:
        report = run_exchange_bench(opts, console, lambda m: status.update(f"bench exchange: {m}"))
    print(markdown_table(report))
    stem = opts.json_path.rsplit(".", 1)[0]
    console.print(f"wrote {opts.json_path}, {stem}.md, {stem}.png")
    return 1 if any(r["failed"] for r in report["results"]) else 0


def _ints(text: str, flag: str) -> list[int]:
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


def _up_config(args=None):
    """The cloud of `cogenesis up`: its flags, or (for `cogenesis loadtest`) their defaults."""
    from cogenesis.core.config import CloudConfig, validate

    args = args or build_parser().parse_args(["up"])
    cloud = validate(
        CloudConfig,
        {
            "large_model": args.large_model,
            "num_replicas": args.replicas,
            "torch_threads": args.threads,
            "kv_budget_mb": args.kv_budget_mb,
            "max_sessions": args.max_sessions,
            "http_port": args.http_port,
            "max_ongoing_requests": args.max_ongoing_requests,
        },
        "flags",
    )
    return cloud.model_copy(update={"redis_url": args.redis_url}) if args.redis_url else cloud


def cmd_up(args) -> int:
    from rich.console import Console

    from cogenesis.cluster import daemon

    cloud = _up_config(args)
    console = Console(stderr=True)
    with console.status("cogenesis up: starting") as st:
        state, started = daemon.up(cloud, args.state_dir, args.timeout, lambda m: st.update(f"cogenesis up: {m}"))
    print(
        f"cluster {'up' if started else 'already running'} (pid {state.pid})\n  redis  {state.redis_url}\n"
        f"  http   {state.http_url}\n  ray    {state.ray_address}"
    )
    replica_metrics = (daemon.status(args.state_dir).get("stats") or {}).get("metrics")
    state_dir = args.state_dir or daemon.default_state_dir()
    print(
        f"  metrics {'http://' + replica_metrics + '/metrics' if replica_metrics else '(replica starting)'} "
        f"(every process announces its own; `cogenesis top` shows them all)\n"
        f"  prometheus --config.file {state_dir}/prometheus.yml\nstop it with `cogenesis down`"
    )
    return 0


def cmd_down(args) -> int:
    from cogenesis.cluster import daemon

    state = daemon.down(args.state_dir, args.timeout)
    print("no cluster was running" if state is None else f"cluster stopped (pid {state.pid})")
    return 0


def cmd_status(args) -> int:
    import json

    from cogenesis.cluster import daemon

    st = daemon.status(args.state_dir)
    if args.json:
        print(json.dumps(st, indent=1))
    elif not st["running"]:
        print("no cluster running (start one with `cogenesis up`)")
    else:
        print(
            f"cluster running (pid {st['pid']}, up {st['uptime_s']:.0f} s): {st['replicas']} replica(s) of "
            f"{st['large_model']}\n  redis  {st['redis_url']} ({st.get('redis_keys', '?')} keys)\n"
            f"  http   {st['http_url']} ({'healthy' if st.get('healthy') else 'NOT healthy: ' + st.get('error', '')})\n"
            f"  ray    {st['ray_address']}"
        )
        stats = st.get("stats") or {}
        if stats:
            print(
                f"  replica {stats.get('replica')}: "
                + ", ".join(f"{k} {v}" for k, v in stats.items() if k != "replica")
            )
    return 0 if st["running"] and st.get("healthy") else 1


def cmd_edge(args) -> int:
    from rich.console import Console

    from cogenesis.cluster import daemon
    from cogenesis.core.config import EdgeConfig, validate
    from cogenesis.core.errors import ClusterError
    from cogenesis.edge_sim.fleet import FleetOptions, parse_think, run_fleet

    state = daemon.running(args.state_dir)
    if state is None:
        raise ClusterError(
            "no cluster is running", hint="start one with `cogenesis up` (stop it with `cogenesis down`)"
        )
    edge = validate(
        EdgeConfig,
        {
            "max_new_tokens": args.max_new_tokens,
            "top_k": args.top_k,
            "small_model": args.small_model,
            "sketch_max_tokens": args.sketch_max_tokens,
            "lookahead": args.lookahead,
            "max_prompt_tokens": args.edge_prompt_tokens,
            "torch_threads": args.threads,
            "step_timeout_s": args.step_timeout,
            "fusion": _fusion_cfg(args),
        },
        "flags",
    )
    duration = args.duration if args.duration is not None or args.sessions_per_client else 60.0
    opts = FleetOptions(
        clients=args.clients,
        mode=args.mode,
        duration_s=duration,
        sessions_per_client=args.sessions_per_client,
        think_s=parse_think(args.think_time),
        pools=args.pools,
        device=args.device,
        max_active=args.max_active,
        data=args.data,
        launcher=args.launcher,
        edge=edge.model_dump(),
    )
    console = Console(stderr=True)
    with console.status("cogenesis edge: starting pools") as st:
        report = run_fleet(
            opts, state.redis_url, state.http_url, state.ray_address, lambda c: st.update(_fleet_line(c))
        )
    _print_fleet(report)
    if args.json_path:
        _write_json(args.json_path, report)
        print(f"wrote {args.json_path}")
    return 1 if report["sessions"]["failed"] else 0


def cmd_loadtest(args) -> int:
    from rich.console import Console

    from cogenesis.cluster import daemon
    from cogenesis.loadtest.run import LoadtestOptions, run_loadtest

    opts = LoadtestOptions(
        users=args.users,
        spawn_rate=args.spawn_rate,
        run_time=args.run_time,
        mode=args.mode,
        device=args.device,
        processes=args.processes,
        shape=args.shape,
        think_time=args.think_time,
        max_new_tokens=args.max_new_tokens,
        max_active=args.max_active,
        stop_timeout_s=args.stop_timeout,
        out_dir=args.out,
        json_path=args.json_path,
    )
    opts.validate()  # before starting anything
    console = Console(stderr=True)
    state, started = daemon.running(args.state_dir), False
    try:
        if state is None:
            with console.status("cogenesis loadtest: starting the cluster") as st:
                state, started = daemon.up(
                    _up_config(), args.state_dir, progress=lambda m: st.update(f"cogenesis loadtest: {m}")
                )
        with console.status("cogenesis loadtest: starting Locust") as st:
            summary = run_loadtest(
                opts,
                state.redis_url,
                state.http_url,
                lambda p: st.update(
                    f"loadtest {p['elapsed_s']:.0f}s | {p['users']} users | {p['requests']} requests | "
                    f"{p['failures']} failures"
                ),
            )
    finally:
        if started and not args.keep_cluster:
            daemon.down(args.state_dir)
    _print_loadtest(summary)
    bad = summary["sessions"]["failed"] or summary["exceptions"] or summary["locust_exit_code"] not in (0, None)
    return 1 if bad else 0


def _print_loadtest(s: dict) -> None:
    print(f"device: {s['device']}")
    target = (
        f"{s['users']} users at {s['spawn_rate']:g}/s for {s['run_time_s']:g} s"
        if s["users"]
        else f"shape {s['shape']}"
    )
    print(f"{target}, mode {s['mode']}, think {s['think_time_s']} s: reached {s['users_reached']} users")
    verdict = (
        "zero failures" if not s["sessions"]["failed"] and not s["failures"] else f"{s['sessions']['failed']} FAILED"
    )
    print(
        f"sessions: {s['sessions']['ok']} ok, {s['sessions']['failed']} failed ({verdict}) | {s['tokens']} tokens, "
        f"{s['tokens_per_s']} tok/s"
    )
    for mode, m in s["modes"].items():
        parts = [f"{k[:-3].upper()} p50/p99 {v['p50']:g}/{v['p99']:g} ms" for k, v in m.items() if k.endswith("_ms")]
        print(f"  {mode}: " + " | ".join(parts))
    for f in s["failures"]:
        print(f"  {f['count']} x {f['type']} {f['name']}: {f['error']}")
    for e in s["exceptions"]:
        print(f"  {e['count']} x error in a Locust user: {e['message']}")
    print(f"reports: {s['reports']['html']}, {s['reports']['csv']}, {s['reports'].get('png')}; summary: {s['json']}")


def cmd_top(args) -> int:
    import json
    import time

    from rich.console import Console
    from rich.live import Live

    from cogenesis.apps.top import figures, render, scrape
    from cogenesis.cluster import daemon
    from cogenesis.cluster.bus import connect
    from cogenesis.core import metrics
    from cogenesis.core.errors import ClusterError, ConfigError

    if args.interval <= 0:
        raise ConfigError(f"--interval must be > 0, got {args.interval}")
    url = args.redis_url
    if not url:
        state = daemon.running(args.state_dir)
        if state is None:
            raise ClusterError("no cluster is running", hint="start one with `cogenesis up`, or pass --redis-url")
        url = state.redis_url
    bus = connect(url)

    def addresses() -> list[str]:
        found = [a for addrs in metrics.targets(bus).values() for a in addrs]
        if not found:
            raise ClusterError(
                "no metrics endpoint is announced on the bus",
                hint="replicas announce theirs within a few seconds of starting; is the cluster up?",
            )
        return found

    try:
        prev = scrape(addresses())
        if args.once:
            time.sleep(args.interval)
            f = figures(prev, scrape(addresses()))
            print(json.dumps(f, indent=1)) if args.json else Console().print(render(f))
            if args.png:
                from cogenesis.apps.dashboard import text_to_png

                capture = Console(record=True, width=100, file=open(os.devnull, "w"))
                capture.print(render(f))
                print(f"wrote {text_to_png(capture.export_text(), args.png)}")
            return 0
        with Live(render(figures(prev, prev)), refresh_per_second=4) as live:
            while True:
                time.sleep(args.interval)
                cur = scrape(addresses())
                live.update(render(figures(prev, cur)))
                prev = cur
    except KeyboardInterrupt:
        return 0
    finally:
        bus.close()


def cmd_dashboard(args) -> int:
    from cogenesis.apps.dashboard import render
    from cogenesis.core.errors import ConfigError

    if args.minutes <= 0:
        raise ConfigError(f"--minutes must be > 0, got {args.minutes}")
    print(f"wrote {render(args.prometheus.rstrip('/'), args.out, args.minutes)}")
    return 0


def _fleet_line(c: dict) -> str:
    return (
        f"edge {c['elapsed_s']:.0f}s | clients {c.get('connected', 0)} connected, {c.get('active', 0)} in a "
        f"session | sessions ok {c.get('ok', 0)} failed {c.get('failed', 0)} | {c.get('tokens', 0)} tokens "
        f"({c.get('tokens', 0) / max(c['elapsed_s'], 1e-9):.1f}/s) | pools' RSS {c.get('rss_mb', 0):.0f} MiB"
    )


def _print_fleet(r: dict) -> None:
    s = r["sessions"]
    print(
        f"device: {r['device']}\nclients {r['clients']} in {r['pools']} pool(s), mode {r['mode']}, think "
        f"{r['think_s'][0]:g}..{r['think_s'][1]:g} s, {r['seconds']:.0f} s\n"
        f"sessions: {s['ok']} ok, {s['failed']} failed, {s['cut']} cut at the end | peak {r['peak_connected']} "
        f"connected, {r['peak_active']} in a session at once\n"
        f"tokens: {r['tokens']} ({r['tokens_per_s']} tok/s) | TTFT p50/p99 {r['ttft_ms']['p50']}/"
        f"{r['ttft_ms']['p99']} ms | ITL p50/p99 {r['itl_ms']['p50']}/{r['itl_ms']['p99']} ms"
    )
    for rss in r["pool_rss_mb"]:
        print(f"pool RSS MiB: start {rss['start']}, peak {rss['peak']}, end {rss['end']}")
    for err, n in r["errors"].items():
        print(f"  {n} x {err}")


def _write_json(path: str, obj) -> None:
    import json
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1))


def cmd_models(args) -> int:
    from cogenesis.apps import model_tools

    return model_tools.run(args)


def _progress_bar():
    """A rich progress bar as a (stage, done, total) callback, and the bar to stop."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("starting", total=None)

    def update(stage: str, done: int, total: int) -> None:
        bar.update(task, description=stage, completed=done, total=total)

    return bar, update


def cmd_train_fusion(args) -> int:
    from dataclasses import asdict

    from cogenesis.apps import fusion_train as ft
    from cogenesis.core.data import load_records
    from cogenesis.core.models import check_same_tokenizer, load_causal_lm, resolve_model
    from cogenesis.edge_sim.engine import EdgeEngine

    opts = ft.TrainOptions(
        variant=args.variant,
        hidden=args.hidden,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        dev_fraction=args.dev_fraction,
        seed=args.seed,
    )
    opts.validate()
    if not 1 <= args.top_k <= 50:
        raise ConfigError(f"--top-k must be in 1..50, got {args.top_k}")
    records = load_records(args.data, args.limit)
    bar, update = _progress_bar()
    with bar:
        update("loading models", 0, 1)
        large, ltok = load_causal_lm(resolve_model(args.large_model))
        small, stok = load_causal_lm(resolve_model(args.small_model))
        check_same_tokenizer(ltok, stok)
        positions = ft.extract(
            small,
            large,
            stok,
            ltok,
            EdgeEngine(small, stok, args.edge_prompt_tokens),
            records,
            args.top_k,
            args.max_gold_tokens,
            lambda s, d, n: update(f"extracting top-{args.top_k}", d, n),
        )
        result = ft.train(
            positions, small.config.vocab_size, args.top_k, opts, lambda s, d, n: update("training", d, n)
        )
    meta = {
        "data": args.data,
        "records": len(set(positions.record.tolist())),
        "small_model": args.small_model,
        "large_model": args.large_model,
        "max_gold_tokens": args.max_gold_tokens,
        "edge_prompt_tokens": args.edge_prompt_tokens,
        "options": asdict(opts),
    }
    path, json_path = ft.save_result(result, args.out, meta)
    best = result.history[result.best_epoch]["dev_nll"]
    print(
        f"{opts.variant} fusion network ({result.net.n_parameters():,} parameters), {result.train_positions} train / "
        f"{result.dev_positions} dev positions from {meta['records']} records"
    )
    print(
        f"dev NLL/token over candidates: learned {best:.4f} (epoch {result.best_epoch}); fixed w: "
        + ", ".join(f"{k.removeprefix('constant_')} {v:.4f}" for k, v in result.baselines.items())
    )
    print(f"wrote {path} and {json_path}")
    print(f"use it: --fusion learned --fusion-checkpoint {path}")
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from cogenesis.apps.eval_report import markdown_table, plot
    from cogenesis.apps.evaluate import EvalOptions, run_eval

    fusions = tuple(m.strip() for m in args.fusions.split(",") if m.strip())
    base = () if args.settings.strip() == "none" else tuple(x.strip() for x in args.settings.split(",") if x.strip())
    opts = EvalOptions(
        data=args.data,
        limit=args.limit,
        base=base,
        fusions=fusions,
        fusion_checkpoint=args.fusion_checkpoint,
        fusion_weight=args.fusion_weight,
        contrast_alpha=args.contrast_alpha,
        schedule=_schedule_cfg(args),
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
        max_gold_tokens=args.max_gold_tokens,
        edge_prompt_tokens=args.edge_prompt_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch=args.batch,
        large_model=args.large_model,
        small_model=args.small_model,
        json_path=args.json_path,
        outputs_path=args.outputs,
        judge_url=args.judge_url,
        judge_model=args.judge_model,
        judge_api_key=os.environ.get(args.judge_key_env) if args.judge_url else None,
    )
    opts.validate()  # before loading anything
    bar, update = _progress_bar()
    with bar:
        report = run_eval(opts, update)
    json_path = Path(args.json_path)
    _write_json(str(json_path), report)
    json_path.with_suffix(".md").write_text(markdown_table(report) + "\n", encoding="utf-8")
    plot(report, json_path.with_suffix(".png"))
    print(f"cogenesis eval: {report['records']} records of {args.data}, {report['seconds']:.0f} s")
    print(markdown_table(report))
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}, {json_path.with_suffix('.png')}")
    return 1 if any(r["failed"] for r in report["settings"]) else 0


def cmd_config(args) -> int:
    from cogenesis.core.config import CloudConfig, EdgeConfig

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
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` shuts down as cleanly as Ctrl-C
    handlers = {
        "demo": cmd_demo,
        "models": cmd_models,
        "bench": cmd_bench,
        "config": cmd_config,
        "up": cmd_up,
        "down": cmd_down,
        "status": cmd_status,
        "edge": cmd_edge,
        "loadtest": cmd_loadtest,
        "top": cmd_top,
        "dashboard": cmd_dashboard,
        "train-fusion": cmd_train_fusion,
        "eval": cmd_eval,
    }
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
        print(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        print("  hint: rerun with -v for the traceback and report it", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
