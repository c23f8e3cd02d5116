"""``cogenesis up`` / ``down`` / ``status``: a local cluster (Redis + Ray head + Serve app) in the background."""

from __future__ import annotations

import argparse

from cogenesis.apps.flags import UP


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
    UP.add_to(up)
    up.set_defaults(handler=run_up)
    down = sub.add_parser("down", help="stop the background cluster started by `cogenesis up`")
    down.add_argument("--timeout", type=float, default=60.0, help="seconds before its processes are killed")
    down.set_defaults(handler=run_down)
    st = sub.add_parser("status", help="show the background cluster: process, Redis, Serve health, replica stats")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    st.set_defaults(handler=run_status)
    for p in (up, down, st):
        p.add_argument("--state-dir", default=None, help="state directory (default: $COGENESIS_HOME/cluster)")


def run_up(args) -> int:
    from rich.console import Console

    from cogenesis.cluster import daemon
    from cogenesis.core.config import CloudConfig

    cloud = UP.config(args, CloudConfig, {"cloud.redis_url": args.redis_url} if args.redis_url else None)
    console = Console(stderr=True)
    with console.status("cogenesis up: starting") as st:
        state, started = daemon.up(cloud, args.state_dir, args.timeout, lambda m: st.update(f"cogenesis up: {m}"))
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


def run_down(args) -> int:
    from cogenesis.cluster import daemon

    state = daemon.down(args.state_dir, args.timeout)
    print("no cluster was running" if state is None else f"cluster stopped (pid {state.pid})")
    return 0


def run_status(args) -> int:
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
            f"  gateway {st.get('gateway_url') or '(none)'}\n"
            f"  secrets {st.get('secrets_dir') or f'{args.state_dir or daemon.default_state_dir()}/secrets'}\n"
            f"  ray    {st['ray_address']}"
        )
        stats = st.get("stats") or {}
        if stats:
            print(
                f"  replica {stats.get('replica')}: "
                + ", ".join(f"{k} {v}" for k, v in stats.items() if k != "replica")
            )
    return 0 if st["running"] and st.get("healthy") else 1
