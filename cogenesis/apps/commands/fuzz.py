"""``cogenesis fuzz``: hostile traffic at the gateway, the HTTP routes and the bus while legitimate sessions run."""

from __future__ import annotations

import argparse
import textwrap
import time

DEFAULT_JSON = "docs/fuzz/fuzz.json"


def register(sub) -> None:
    from cogenesis.apps.fuzz import FuzzOptions
    from cogenesis.apps.fuzz_cases import SHARES, kinds

    d = FuzzOptions()
    intro = textwrap.fill(
        "Start a local cluster (Redis locked with its ACL users, Ray, Serve: the cloud app and the device gateway, "
        "embedded models), run the legitimate workload once undisturbed (greedy logits sessions through the "
        "gateway's WebSocket, greedy outlines through /v1/sketch and /v1/chat/completions: the reference), then "
        "run it again, round after round, while --count seeded fuzz cases go at three surfaces: malformed, "
        "oversized, replayed, cross-session and forged messages, with missing, expired, forged and wrong-role "
        "tokens. Every answer is classified: refused (4xx, an ErrorReply code, a close code, NOPERM/NOAUTH), "
        "accepted, sent (nothing owed), dropped, unsent (the HTTP client would not send it), and the findings: "
        "server_error (5xx; ErrorReply internal/unavailable/replica_lost; close 1011), hung (an owed answer never "
        "came), breach (served though it must be refused). Crashes (a Serve replica died or was replaced, a "
        "health check failed), stuck bus entries (pending or unread after --grace) and legitimate outputs that "
        "differ from the reference are findings too. Prints a table and every finding, writes --json; exits 0 "
        "only when there is no finding. A finding is reproduced from --seed and its case number.",
        width=100,
    )
    kind_lines = "\n".join(
        textwrap.fill(
            f"{surface} ({SHARES[surface]:.0%} of the cases): {', '.join(k for k, _, _ in table)}",
            width=100,
            initial_indent="  ",
            subsequent_indent="    ",
        )
        for surface, table in kinds().items()
    )
    p = sub.add_parser(
        "fuzz",
        help="fuzz the gateway, the HTTP routes and the bus while legitimate sessions run; check nothing breaks",
        description=f"{intro}\n\ncase kinds by surface:\n{kind_lines}",
        formatter_class=_Formatter,
    )
    p.add_argument("--count", type=int, default=d.count, help="fuzz cases, spread over the three surfaces")
    p.add_argument("--seed", type=int, default=d.seed, help="the generators' seed (a finding's seed + case number)")
    p.add_argument("--sessions", type=int, default=d.sessions, help="legitimate greedy logits sessions per round")
    p.add_argument(
        "--outlines", type=int, default=d.outlines, help="legitimate outlines per round (sketch + chat each)"
    )
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens every logits session writes")
    p.add_argument("--outline-tokens", type=int, default=d.outline_tokens, help="tokens of every legitimate outline")
    p.add_argument("--ws-workers", type=int, default=d.ws_workers, help="WebSocket fuzz threads (one victim each)")
    p.add_argument("--http-workers", type=int, default=d.http_workers, help="HTTP fuzz threads")
    p.add_argument("--bus-chunk", type=int, default=d.bus_chunk, help="bus cases sent together before their answers")
    p.add_argument(
        "--answer-timeout", type=float, default=d.answer_timeout_s, help="an owed answer later than this is hung (s)"
    )
    p.add_argument("--grace", type=float, default=d.grace_s, help="seconds the bus may take to be clean after the run")
    p.add_argument("--json", dest="json_path", default=DEFAULT_JSON, help="write the report here")
    p.add_argument("--data", default=None, help="CoGenesis JSON file (None: the shipped sample records, cycled)")
    p.add_argument("--large-model", default=d.large_model, help="the cloud's model")
    p.add_argument("--small-model", default=d.small_model, help="the device's model")
    p.add_argument("--edge-prompt-tokens", type=int, default=d.max_prompt_tokens, help="edge prompt budget")
    p.add_argument("--top-k", type=int, default=d.top_k, help="top-k the cloud returns per step")
    p.add_argument("--step-timeout", type=float, default=d.step_timeout_s, help="deadline for one cloud reply (s)")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds for the reference and for the fuzz")
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

    from cogenesis.apps.commands.common import progress_bar, write_json
    from cogenesis.apps.fuzz import FuzzOptions, run_fuzz
    from cogenesis.apps.fuzz_report import render_table, summary_lines

    opts = FuzzOptions(
        count=args.count,
        sessions=args.sessions,
        outlines=args.outlines,
        max_new_tokens=args.max_new_tokens,
        outline_tokens=args.outline_tokens,
        seed=args.seed,
        ws_workers=args.ws_workers,
        http_workers=args.http_workers,
        bus_chunk=args.bus_chunk,
        answer_timeout_s=args.answer_timeout,
        grace_s=args.grace,
        data=args.data,
        large_model=args.large_model,
        small_model=args.small_model,
        max_prompt_tokens=args.edge_prompt_tokens,
        top_k=args.top_k,
        step_timeout_s=args.step_timeout,
        timeout_s=args.timeout,
        threads=args.threads,
    )
    opts.validate()
    t0 = time.monotonic()
    bar, update = progress_bar()

    def say(msg: str) -> None:
        bar.console.print(f"[{time.monotonic() - t0:6.1f}s] {msg}", highlight=False, markup=False, soft_wrap=True)

    with bar:
        report = run_fuzz(opts, say, lambda done, total: update("fuzz cases", done, total))
    report["seconds"] = round(time.monotonic() - t0, 1)
    console = Console()
    if not console.is_terminal:  # a log or a pipe: room for every column
        console = Console(width=160)
    console.print(render_table(report))
    for line in summary_lines(report):
        finding = not line.startswith(("legitimate:", "fuzz:"))
        console.print(line, highlight=False, markup=False, style="red" if finding else None)
    if args.json_path:
        write_json(args.json_path, report)
        print(f"wrote {args.json_path}")
    return 0 if report["passed"] else 1
