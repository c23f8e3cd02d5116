"""``cogenesis dashboard``: the Grafana dashboard's panels, drawn from Prometheus into a PNG."""

from __future__ import annotations

import argparse


def register(sub) -> None:
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
    p.set_defaults(handler=run)


def run(args) -> int:
    from cogenesis.apps.dashboard import render
    from cogenesis.core.errors import ConfigError

    if args.minutes <= 0:
        raise ConfigError(f"--minutes must be > 0, got {args.minutes}")
    print(f"wrote {render(args.prometheus.rstrip('/'), args.out, args.minutes)}")
    return 0
