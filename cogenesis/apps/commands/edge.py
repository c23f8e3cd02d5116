"""``cogenesis edge``: many simulated edge clients against the running cluster."""

from __future__ import annotations

import argparse

from cogenesis.apps.commands.common import add_cluster_flags, cluster_of
from cogenesis.apps.flags import EDGE


def register(sub) -> None:
    p = sub.add_parser(
        "edge",
        help="simulate many edge clients against the running cluster",
        description=(
            "Run --clients simulated devices against the cluster of `cogenesis up`, in --pools pool "
            "processes. Each client holds one record's private context (cycled from --data), thinks "
            "for --think-time seconds, runs a session, and again. A pool batches its clients' "
            "small-model passes. --device real runs the small model; a profile from "
            "configs/devices.yaml (phone, laptop, iot) simulates the device's speed and network instead "
            "and is printed in the report. Shows a progress line; writes a JSON report with --json. "
            "--transport ws (the default) connects every simulated device to the gateway with a device token of "
            "its own (minted with the cluster's secrets, or --token / $COGENESIS_TOKEN for all); --transport redis "
            "runs them as trusted in-cluster workers on the Redis bus (the `edge` Redis user)."
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
    p.add_argument("--data", default=None, help="CoGenesis JSON file (None: the shipped sample, cycled)")
    p.add_argument("--json", dest="json_path", default=None, help="write the report to this JSON file")
    p.add_argument(
        "--transport",
        choices=["ws", "redis"],
        default="ws",
        help="ws: devices through the gateway's WebSocket, a token each; redis: trusted workers on the bus",
    )
    add_cluster_flags(p, token=True)
    EDGE.add_to(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from rich.console import Console

    from cogenesis.apps.commands.common import write_json
    from cogenesis.apps.fleet import run_fleet
    from cogenesis.core.config import EdgeConfig
    from cogenesis.edge_sim.fleet import FleetOptions, parse_think

    where = cluster_of(args)
    edge = EDGE.config(args, EdgeConfig)
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
        transport=args.transport,
        gateway_url=where.gateway_url if args.transport == "ws" else "",
    )
    console = Console(stderr=True)
    with console.status("cogenesis edge: starting pools") as st:
        report = run_fleet(
            opts,
            where.redis_url,
            where.http_url,
            where.ray_address,
            lambda c: st.update(fleet_line(c)),
            secrets_dir=where.secrets_dir,
            ray_env=where.ray_env,
        )
    print_fleet(report)
    if args.json_path:
        write_json(args.json_path, report)
        print(f"wrote {args.json_path}")
    return 1 if report["sessions"]["failed"] else 0


def fleet_line(c: dict) -> str:
    return (
        f"edge {c['elapsed_s']:.0f}s | clients {c.get('connected', 0)} connected, {c.get('active', 0)} in a "
        f"session | sessions ok {c.get('ok', 0)} failed {c.get('failed', 0)} | {c.get('tokens', 0)} tokens "
        f"({c.get('tokens', 0) / max(c['elapsed_s'], 1e-9):.1f}/s) | pools' RSS {c.get('rss_mb', 0):.0f} MiB"
    )


def print_fleet(r: dict) -> None:
    s = r["sessions"]
    print(
        f"device: {r['device']}\nclients {r['clients']} in {r['pools']} pool(s), mode {r['mode']}, transport {r.get('transport', 'redis')}, think "
        f"{r['think_s'][0]:g}..{r['think_s'][1]:g} s, {r['seconds']:.0f} s\n"
        f"sessions: {s['ok']} ok, {s['failed']} failed, {s['cut']} cut at the end, {r.get('resumes', 0)} resumed on "
        f"another replica | peak {r['peak_connected']} "
        f"connected, {r['peak_active']} in a session at once\n"
        f"tokens: {r['tokens']} ({r['tokens_per_s']} tok/s) | TTFT p50/p99 {r['ttft_ms']['p50']}/"
        f"{r['ttft_ms']['p99']} ms | ITL p50/p99 {r['itl_ms']['p50']}/{r['itl_ms']['p99']} ms"
    )
    for rss in r["pool_rss_mb"]:
        print(f"pool RSS MiB: start {rss['start']}, peak {rss['peak']}, end {rss['end']}")
    for err, n in r["errors"].items():
        print(f"  {n} x {err}")
