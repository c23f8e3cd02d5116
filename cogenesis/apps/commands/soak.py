"""``cogenesis soak``: the edge fleet at a steady load for a long time, with every process's memory sampled."""

from __future__ import annotations

import argparse

from cogenesis.apps.flags import EDGE


def register(sub) -> None:
    p = sub.add_parser(
        "soak",
        help="run the fleet at a steady load for a long time, sampling every process's memory",
        description=(
            "Start a background cluster (Redis + Ray + Serve, as `cogenesis up`; one already running in "
            "--state-dir is used and left running), run `cogenesis edge`'s fleet against it for --minutes, "
            "and sample the RSS of every process (Redis, Ray's GCS, raylet and agents, the Serve controller, "
            "proxy and each replica, the edge pools, this driver) every --interval seconds. Writes soak.json "
            "(samples, per process and role: start/end/peak RSS and the growth in MiB/hour fitted over the "
            "second half, sessions over time), soak.md (the table) and soak.png to --out. Exit code 1 if any "
            "session failed."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--minutes", type=float, default=30.0, help="how long the load runs")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between memory samples")
    p.add_argument("--clients", type=int, default=4, help="simulated devices (a steady load for a 2-core machine)")
    p.add_argument("--mode", choices=["sketch", "logits", "mixed"], default="mixed", help="session mode")
    p.add_argument("--think-time", default="2..8", help="A..B: seconds a client waits between sessions")
    p.add_argument("--pools", type=int, default=1, help="edge pool processes")
    p.add_argument("--device", default="real", help="real, or a device profile name (configs/devices.yaml)")
    p.add_argument("--max-active", type=int, default=None, help="sessions at once per pool (default: the fleet's)")
    p.add_argument("--data", default=None, help="CoGenesis JSON file (None: the shipped sample, cycled)")
    p.add_argument("--large-model", default=None, help="the cluster's large model (default: `cogenesis up`'s)")
    p.add_argument("--replicas", type=int, default=None, help="Serve replicas (default: `cogenesis up`'s)")
    p.add_argument("--out", default="docs/soak", help="directory for soak.json, soak.md and soak.png")
    p.add_argument(
        "--state-dir",
        default=None,
        help="cluster state directory (default: $COGENESIS_HOME/soak/cluster, a cluster of the soak's own)",
    )
    EDGE.add_to(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    from rich.console import Console

    from cogenesis.apps.soak import SoakOptions, run_soak
    from cogenesis.core.config import CloudConfig, EdgeConfig, command_config
    from cogenesis.core.models import cogenesis_home
    from cogenesis.edge_sim.fleet import FleetOptions, parse_think

    opts = SoakOptions(
        minutes=args.minutes,
        interval_s=args.interval,
        clients=args.clients,
        mode=args.mode,
        think=args.think_time,
        pools=args.pools,
        device=args.device,
        max_active=args.max_active,
        data=args.data,
        out_dir=args.out,
    )
    opts.validate()
    cloud_values = {}
    if args.large_model:
        cloud_values["cloud.large_model"] = args.large_model
    if args.replicas:
        cloud_values["cloud.num_replicas"] = args.replicas
    cloud = command_config(CloudConfig, "up", cloud_values)
    fleet = FleetOptions(
        clients=args.clients,
        mode=args.mode,
        duration_s=args.minutes * 60,
        think_s=parse_think(args.think_time),
        pools=args.pools,
        device=args.device,
        max_active=args.max_active,
        data=args.data,
        edge=EDGE.config(args, EdgeConfig).model_dump(),
    )
    fleet.validate()  # before anything starts
    state_dir = Path(args.state_dir) if args.state_dir else cogenesis_home() / "soak" / "cluster"
    console = Console(stderr=True)
    with console.status("cogenesis soak: starting") as st:
        report = run_soak(opts, fleet, cloud, state_dir, lambda line: st.update(f"cogenesis soak: {line}"))
    print_report(report)
    failed = report["sessions"]["failed"] or (report["fleet"] or {}).get("errors")
    return 1 if failed else 0


def print_report(r: dict) -> None:
    from cogenesis.apps.soak import markdown_table

    o, s = r["options"], r["sessions"]
    print(
        f"RSS over {r['load_end_s'] / 60:.1f} min of steady load (of {r['seconds'] / 60:.1f} min sampled), every "
        f"{o['interval_s']:g} s; growth: least squares over the second half"
    )
    print(markdown_table(r))
    print(
        f"{o['clients']} clients ({o['mode']}, think {o['think']} s, device {o['device']}) on "
        f"{r['cluster']['large_model']} x{r['cluster']['replicas']}: sessions {s['ok']} ok, {s['failed']} failed"
    )
    for err, n in ((r["fleet"] or {}).get("errors") or {}).items():
        print(f"  {n} x {err}")
    print(f"wrote {r['json']}, {r['markdown']}, {r['png']}")
