"""``cogenesis up`` / ``down`` / ``status``: a local cluster (Redis + Ray head + Serve app) in the background."""

from __future__ import annotations

import argparse

from cogenesis.apps.commands.common import add_cluster_flags
from cogenesis.apps.flags import UP
from cogenesis.core.errors import ConfigError


def register(sub) -> None:
    up = sub.add_parser(
        "up",
        help="start a local cluster in the background (Redis + Ray head + Serve app)",
        description=(
            "Start Redis, a Ray head and the Serve apps (the large model at /cloud for trusted workers, the device "
            "gateway at /) as a background process; returns once both answer /healthz. State, log and secrets: "
            "$COGENESIS_HOME/cluster/ (state.json, cluster.log, secrets/: the cluster key, Redis passwords, "
            "admin.token, worker.token; kept across restarts). Make device tokens with `cogenesis token create`. "
            "Stop it with `cogenesis down`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    up.add_argument("--redis-url", default=None, help="use this Redis instead of starting the bundled one")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the app to be healthy")
    up.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="Ray nodes on this machine: 1 runs Ray in the cluster's process; N > 1 runs the multi-node sequence "
        "(`ray start --head`, then N-1 `ray start --address`), and the replicas spread over the nodes",
    )
    up.add_argument(
        "--autoscale",
        default=None,
        metavar="MIN,MAX",
        help="scale the large model's replicas between MIN and MAX on their sessions and queue (default: --replicas, "
        "fixed); more knobs: the config's cloud.autoscaling",
    )
    up.add_argument(
        "--target-sessions",
        type=float,
        default=None,
        help="with --autoscale: sessions one replica should hold (the config's default otherwise)",
    )
    up.add_argument(
        "--max-replicas-per-node", type=int, default=None, help="replicas one Ray node may host (1: one per node)"
    )
    UP.add_to(up)
    up.set_defaults(handler=run_up)
    down = sub.add_parser("down", help="stop the background cluster started by `cogenesis up`")
    down.add_argument("--timeout", type=float, default=60.0, help="seconds before its processes are killed")
    down.set_defaults(handler=run_down)
    st = sub.add_parser("status", help="show the background cluster: process, Redis, Serve health, replica stats")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    add_cluster_flags(st)
    st.set_defaults(handler=run_status)
    for p in (up, down):
        p.add_argument("--state-dir", default=None, help="state directory (default: $COGENESIS_HOME/cluster)")


def run_up(args) -> int:
    from rich.console import Console

    from cogenesis.cluster import daemon
    from cogenesis.cluster.nodes import MAX_NODES
    from cogenesis.core.config import CloudConfig

    if not 1 <= args.nodes <= MAX_NODES:
        raise ConfigError(f"--nodes must be 1..{MAX_NODES}, got {args.nodes}", hint="e.g. --nodes 3")
    extra: dict = {"cloud.redis_url": args.redis_url} if args.redis_url else {}
    extra.update(_autoscale(args))
    if args.max_replicas_per_node is not None:
        extra["cloud.max_replicas_per_node"] = args.max_replicas_per_node
    cloud = UP.config(args, CloudConfig, extra)
    console = Console(stderr=True)
    with console.status("cogenesis up: starting") as st:
        state, started = daemon.up(
            cloud, args.state_dir, args.timeout, lambda m: st.update(f"cogenesis up: {m}"), nodes=args.nodes
        )
    state_dir = args.state_dir or daemon.default_state_dir()
    print(
        f"cluster {'up' if started else 'already running'} (pid {state.pid})\n  redis  {state.redis_url}\n"
        f"  http   {state.http_url} (trusted workers: a worker token)\n"
        f"  gateway {getattr(state, 'gateway_url', None) or '(none)'} (devices: `cogenesis token create --device ID`)\n"
        f"  secrets {getattr(state, 'secrets_dir', None) or f'{state_dir}/secrets'}\n  ray    {state.ray_address}"
    )
    replica_metrics = (daemon.status(args.state_dir).get("stats") or {}).get("metrics")
    print(
        f"  metrics {'http://' + replica_metrics + '/metrics' if replica_metrics else '(replica starting)'} "
        f"(every process announces its own; `cogenesis top` shows them all)\n"
        f"  prometheus --config.file {state_dir}/prometheus.yml\nstop it with `cogenesis down`"
    )
    return 0


def _autoscale(args) -> dict:
    """The config paths ``--autoscale MIN,MAX`` and ``--target-sessions`` set."""
    if args.autoscale is None:
        if args.target_sessions is not None:
            raise ConfigError("--target-sessions needs --autoscale MIN,MAX", hint="e.g. --autoscale 1,3")
        return {}
    parts = args.autoscale.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"--autoscale {args.autoscale!r} is not MIN,MAX (two whole numbers)", hint="e.g. 1,3")
    out = {"cloud.autoscaling.min_replicas": int(parts[0]), "cloud.autoscaling.max_replicas": int(parts[1])}
    if args.target_sessions is not None:
        out["cloud.autoscaling.target_sessions"] = args.target_sessions
    return out


def run_down(args) -> int:
    from cogenesis.cluster import daemon

    state = daemon.down(args.state_dir, args.timeout)
    print("no cluster was running" if state is None else f"cluster stopped (pid {state.pid})")
    return 0


def run_status(args) -> int:
    import json

    from cogenesis.apps.commands.common import cluster_of
    from cogenesis.cluster import daemon

    if args.redis_url or args.http_url:  # any deployed cluster, through its URLs
        where = cluster_of(args)
        st = daemon.cluster_status(where.redis_url, where.http_url, where.secrets_dir, where.gateway_url or None)
        st["running"] = bool(st.get("healthy")) or "redis_keys" in st
    else:
        st = daemon.status(args.state_dir)
    if args.json:
        print(json.dumps(st, indent=1))
    elif not st["running"] and (args.redis_url or args.http_url):
        why = st.get("redis_error") or st.get("error") or "no answer"
        print(f"the cluster at {args.redis_url or args.http_url} does not answer: {why}")
    elif not st["running"]:
        print("no cluster running (start one with `cogenesis up`, or name a deployed one with --redis-url/--http-url)")
    else:
        print_status(st, args.state_dir)
    return 0 if st["running"] and st.get("healthy") else 1


def print_status(st: dict, state_dir: str | None) -> None:
    from cogenesis.cluster import daemon

    if "pid" in st:
        scale = st.get("autoscaling")
        replicas = (
            f"{scale['min_replicas']}..{scale['max_replicas']} replicas (autoscaling)"
            if scale
            else f"{st['replicas']} replica(s)"
        )
        print(f"cluster running (pid {st['pid']}, up {st['uptime_s']:.0f} s): {replicas} of {st['large_model']}")
    else:
        print("deployed cluster")
    health = "healthy" if st.get("healthy") else "NOT healthy: " + st.get("error", "no HTTP URL")
    print(
        f"  redis  {st['redis_url']} ({st.get('redis_keys', '?')} keys{'; ' + st['redis_error'] if 'redis_error' in st else ''})\n"
        f"  http   {st.get('http_url') or '(none)'} ({health})\n"
        f"  gateway {st.get('gateway_url') or '(none)'}\n"
        f"  secrets {st.get('secrets_dir') or f'{state_dir or daemon.default_state_dir()}/secrets'}"
    )
    if st.get("ray_address"):
        print(f"  ray    {st['ray_address']}")
    nodes = st.get("nodes") or []
    if nodes:
        hosting = sum(1 for n in nodes if n["replicas"])
        print(f"  nodes  {len(nodes)} ({hosting} with replicas)")
        for n in nodes:
            held = ", ".join(
                f"{r['replica']} ({r['sessions'] if r['sessions'] is not None else '?'} sessions)"
                for r in n["replicas"]
            )
            print(f"    {n['node'][:12]} {n.get('address') or ''}: {held or 'no replica'}")
    stats = st.get("stats") or {}
    if stats:
        print(f"  replica {stats.get('replica')}: " + ", ".join(f"{k} {v}" for k, v in stats.items() if k != "replica"))
