"""``cogenesis audit-privacy``: an adversarial device against every channel the cloud side can see."""

from __future__ import annotations

import argparse

from cogenesis.apps.flags import AUDIT_PRIVACY


def register(sub) -> None:
    p = sub.add_parser(
        "audit-privacy",
        help="prove nothing private leaves the device: canaries, an adversarial device, every cloud channel",
        description=(
            "Plant canaries (random strings, person names, emails, phone numbers) in every private field of "
            "the records, and take 12-word spans of their past writings as canaries too. Start a local cluster "
            "(Redis, Ray Serve, the large model) and run an adversarial device in both modes: sketch requests "
            "whose instruction carries a canary, and logits sessions whose small model copies canaries "
            "verbatim into its output. Capture every channel the cloud side can see (the model's audit log, "
            "every Redis command with token ids decoded, HTTP request bodies, Ray/Serve and cluster logs, "
            "metrics) and search each for every canary and, in what devices sent, for the sender's private "
            "spans. Reports attempts and leaks per channel and canary kind (counts, kinds, channels, record "
            "ids: never private text). Exits 1 on any leak, and when a channel captured nothing or sessions failed "
            "(the audit is then incomplete), 0 otherwise."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=None, help="CoGenesis JSON file (None: the 8 records shipped with the package)")
    p.add_argument("--limit", type=int, default=None, help="audit the first N records (None: all)")
    p.add_argument("--mode", choices=["sketch", "logits", "both"], default="both", help="which mode(s) to attack")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report to this JSON file")
    p.add_argument("--batch", type=int, default=8, help="sessions (and outline requests) sent together")
    p.add_argument("--canary-seed", type=int, default=0, help="seed of the planted canaries")
    AUDIT_PRIVACY.add_to(p)
    p.set_defaults(handler=run)


def run(args) -> int:
    from rich.console import Console

    from cogenesis.apps.audit_privacy import MODES, AuditOptions, run_audit, tables
    from cogenesis.apps.commands.common import progress_bar, write_json
    from cogenesis.core.config import CloudConfig, EdgeConfig

    edge, cloud = AUDIT_PRIVACY.config(args, EdgeConfig), AUDIT_PRIVACY.config(args, CloudConfig)
    opts = AuditOptions(
        data=args.data,
        limit=args.limit,
        modes=MODES if args.mode == "both" else (args.mode,),
        batch=args.batch,
        seed=args.canary_seed,
    )
    opts.validate()  # before loading anything
    bar, update = progress_bar()
    with bar:
        report = run_audit(opts, cloud, edge, update)
    if args.json_path:
        write_json(args.json_path, report)
    console = Console()
    console.print(
        f"cogenesis audit-privacy: {report['records']} records of {report['data']}, modes {', '.join(report['modes'])}, "
        f"span policy {report['span_policy']}, {sum(report['canaries'].values())} canaries, {report['seconds']:.0f} s"
    )
    for table in tables(report):
        console.print(table)
    for problem in report["capture_errors"]:
        console.print(f"[yellow]capture: {problem}[/]")
    for problem in report["run_errors"]:
        console.print(f"[yellow]run: {problem}[/]")
    if report["leaked"]:
        verdict = f"[red]{report['leaked']} leak(s)[/] in {len(report['channels'])} channels"
    elif report["ok"]:
        verdict = f"[green]no leaks[/] in {len(report['channels'])} channels"
    else:
        verdict = "[yellow]no leaks found, but the audit is incomplete[/] (see above)"
    console.print(verdict + (f"; wrote {args.json_path}" if args.json_path else ""))
    return 0 if report["ok"] else 1
