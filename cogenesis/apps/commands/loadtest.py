"""``cogenesis loadtest``: a headless Locust run against the local cluster, with a summary."""

from __future__ import annotations

import argparse

from cogenesis.apps.commands.common import add_cluster_flags
from cogenesis.apps.flags import LOADTEST


def register(sub) -> None:
    p = sub.add_parser(
        "loadtest",
        help="headless Locust load test against the local cluster, with a summary",
        description=(
            "Run loadtest/locustfile.py headless against the cluster of `cogenesis up` (started first if "
            "none runs, and stopped after unless --keep-cluster), or against any deployed cluster named by "
            "--redis-url/--http-url/--gateway-url/--secrets-dir. Every Locust user is an edge device "
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
    p.add_argument(
        "--transport",
        choices=["ws", "redis"],
        default="ws",
        help="ws: every user is a device on the gateway, a token each; redis: trusted workers on the bus",
    )
    add_cluster_flags(p, token=True)
    LOADTEST.add_to(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from rich.console import Console

    from cogenesis.apps.commands.common import cluster_of
    from cogenesis.cluster import daemon
    from cogenesis.core.config import CloudConfig, EdgeConfig, command_config
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
        max_new_tokens=LOADTEST.config(args, EdgeConfig).max_new_tokens,
        max_active=args.max_active,
        stop_timeout_s=args.stop_timeout,
        out_dir=args.out,
        json_path=args.json_path,
        transport=args.transport,
        gateway_url=args.gateway_url or "",
    )
    opts.validate()  # before starting anything
    console = Console(stderr=True)
    started = False
    try:
        if not (args.redis_url or args.http_url) and daemon.running(args.state_dir) is None:
            with console.status("cogenesis loadtest: starting the cluster") as st:
                _, started = daemon.up(
                    command_config(CloudConfig, "up"),
                    args.state_dir,
                    progress=lambda m: st.update(f"cogenesis loadtest: {m}"),
                )
        where = cluster_of(args)
        opts.gateway_url = where.gateway_url
        with console.status("cogenesis loadtest: starting Locust") as st:
            summary = run_loadtest(
                opts,
                where.redis_url,
                where.http_url,
                lambda p: st.update(
                    f"loadtest {p['elapsed_s']:.0f}s | {p['users']} users | {p['requests']} requests | "
                    f"{p['failures']} failures"
                ),
                secrets_dir=where.secrets_dir,
                token=args.token,
            )
    finally:
        if started and not args.keep_cluster:
            daemon.down(args.state_dir)
    print_summary(summary)
    bad = summary["sessions"]["failed"] or summary["exceptions"] or summary["locust_exit_code"] not in (0, None)
    if summary.get("locust_ended") == "killed":  # its run was fine, but its process would not exit
        print(
            f"Locust finished its run but its process did not exit within {opts.exit_grace_s:g} s: killed it "
            f"(exit code {summary['locust_exit_code']}); see {summary['reports']['log']}"
        )
        bad = True
    return 1 if bad else 0


def print_summary(s: dict) -> None:
    print(f"device: {s['device']}")
    target = (
        f"{s['users']} users at {s['spawn_rate']:g}/s for {s['run_time_s']:g} s"
        if s["users"]
        else f"shape {s['shape']}"
    )
    print(
        f"{target}, mode {s['mode']}, transport {s.get('transport', 'redis')}, think {s['think_time_s']} s: reached {s['users_reached']} users"
    )
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
