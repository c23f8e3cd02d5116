"""``cogenesis chaos``: fault scenarios against a local cluster, every session's output checked exactly."""

from __future__ import annotations

import argparse
import sys
import textwrap
import time

DEFAULT_JSON = "docs/chaos/chaos.json"


def register(sub) -> None:
    from cogenesis.apps.chaos import ALL, SCENARIOS, ChaosOptions

    d = ChaosOptions()
    scenarios = "\n".join(
        textwrap.fill(f"{name}: {text}", width=100, initial_indent="  ", subsequent_indent="    ")
        for name, text in SCENARIOS.items()
    )
    intro = textwrap.fill(
        "Start a local cluster (Redis, Ray, Serve, embedded models), run --sessions concurrent greedy logits "
        "sessions once undisturbed (the reference), then again under each --scenario, and compare every "
        "session's token ids with the reference: sessions ok/failed, identical, tokens lost/duplicated/changed "
        "(an alignment of the ids), the fault's time and the longest stall after it (time to recover), resumes "
        "and busy retries. Prints a table, writes --json; exits 1 if any session failed or differed or a "
        "scenario's own check failed. Everything started is stopped on exit or Ctrl-C.",
        width=100,
    )
    p = sub.add_parser(
        "chaos",
        help="run fault scenarios against a local cluster and check every output against an undisturbed run",
        description=f"{intro}\n\nscenarios, in the order they run ('{ALL}' runs every one):\n{scenarios}",
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--scenario",
        action="append",
        dest="scenarios",
        choices=[*SCENARIOS, ALL],
        metavar="NAME",
        help=f"scenario to run (repeatable): {', '.join(SCENARIOS)} or {ALL}; none given: {ALL}",
    )
    p.add_argument("--sessions", type=int, default=d.sessions, help="concurrent greedy logits sessions")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens every session writes")
    p.add_argument("--json", dest="json_path", default=DEFAULT_JSON, help="write the report here")
    p.add_argument("--data", default=None, help="CoGenesis JSON file (None: the shipped sample records, cycled)")
    p.add_argument("--large-model", default=d.large_model, help="the cloud's model")
    p.add_argument("--small-model", default=d.small_model, help="the device's model")
    p.add_argument("--edge-prompt-tokens", type=int, default=d.max_prompt_tokens, help="edge prompt budget")
    p.add_argument("--top-k", type=int, default=d.top_k, help="top-k the cloud returns per step")
    p.add_argument("--step-timeout", type=float, default=d.step_timeout_s, help="deadline for one cloud reply (s)")
    p.add_argument("--pools", type=int, default=d.pools, help="kill-edge-pool: edge pool subprocesses (>= 2)")
    p.add_argument(
        "--session-idle",
        type=float,
        default=d.session_idle_s,
        help="the main cluster's session_idle_s: its sweeper frees a killed pool's sessions after this",
    )
    p.add_argument("--sweep-interval", type=float, default=d.sweep_interval_s, help="the sweeper's timer (s)")
    p.add_argument("--redis-down", type=float, default=d.redis_down_s, help="restart-redis: seconds Redis stays down")
    p.add_argument(
        "--fault-after", type=float, default=d.fault_after, help="the fault comes once this share of tokens is written"
    )
    p.add_argument(
        "--timeout", type=float, default=d.timeout_s, help="seconds per scenario; sessions still running are cut"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the edge and of each replica (None: split the cores)",
    )
    p.set_defaults(handler=run)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def run(args) -> int:
    from rich.console import Console

    from cogenesis.apps.chaos import ChaosOptions, failure_lines, notes, parse_scenarios, render_table, run_chaos
    from cogenesis.apps.commands.common import write_json

    opts = ChaosOptions(
        sessions=args.sessions,
        max_new_tokens=args.max_new_tokens,
        scenarios=tuple(parse_scenarios(args.scenarios)),
        data=args.data,
        large_model=args.large_model,
        small_model=args.small_model,
        max_prompt_tokens=args.edge_prompt_tokens,
        top_k=args.top_k,
        step_timeout_s=args.step_timeout,
        pools=args.pools,
        session_idle_s=args.session_idle,
        sweep_interval_s=args.sweep_interval,
        redis_down_s=args.redis_down,
        fault_after=args.fault_after,
        timeout_s=args.timeout,
        threads=args.threads,
    )
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    report = run_chaos(opts, say)
    console = Console()
    if not console.is_terminal:  # a log or a pipe: room for every column
        console = Console(width=160)
    console.print(render_table(report))
    for s in report["scenarios"]:
        if notes(s):
            console.print(f"{s['scenario']}: {notes(s)}", highlight=False)
    for line in failure_lines(report):
        console.print(f"[red]{line}[/]", highlight=False)
    if args.json_path:
        write_json(args.json_path, report)
        print(f"wrote {args.json_path}")
    return 0 if report["passed"] else 1
