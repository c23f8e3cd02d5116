"""``cogenesis top``: live throughput and latency of the running cluster (from its metrics endpoints)."""

from __future__ import annotations

import argparse
import os

from cogenesis.apps.commands.common import add_cluster_flags


def register(sub) -> None:
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
    add_cluster_flags(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    import json
    import time

    from rich.console import Console
    from rich.live import Live

    from cogenesis.apps.commands.common import cluster_of
    from cogenesis.apps.top import figures, render, scrape
    from cogenesis.cluster.bus import connect
    from cogenesis.core import metrics
    from cogenesis.core.errors import ClusterError, ConfigError

    if args.interval <= 0:
        raise ConfigError(f"--interval must be > 0, got {args.interval}")
    where = cluster_of(args)
    bus = connect(where.redis_url, role="admin", secrets=where.secrets_dir)  # an operator's tool

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
