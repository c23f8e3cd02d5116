"""``cogenesis demo``: both CoGenesis modes end to end on this machine."""

from __future__ import annotations

import argparse
import os

from cogenesis.apps.flags import DEMO


def register(sub) -> None:
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
    p.add_argument("--data", default=None, help="CoGenesis JSON file (None: the 8 records shipped with the package)")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of starting the bundled one")
    p.add_argument("--json", dest="json_path", default=None, help="write sessions and summary to this JSON file")
    p.add_argument("--show-private", action="store_true", help="also print each client's private instruction text")
    DEMO.add_to(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from rich.console import Console

    from cogenesis.apps.demo import DemoOptions, run_demo
    from cogenesis.core.config import CloudConfig, EdgeConfig

    cpus = os.cpu_count() or 2
    half = max(1, cpus // 2)  # edge and cloud share this machine: split its cores (oversubscribed, both slow ~5x)
    cloud = DEMO.config(args, CloudConfig, {"cloud.torch_threads": max(1, half // max(1, args.replicas))})
    edge = DEMO.config(args, EdgeConfig, {"edge.torch_threads": half, "edge.prefill_threads": cpus})
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
