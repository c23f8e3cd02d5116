"""The ``cogenesis`` command. Errors print what was wrong and what to do, never a traceback.

Each subcommand lives in ``cogenesis.apps.commands``: its parser (``register``) and its handler."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from cogenesis.apps.commands import (
    audit_privacy,
    bench,
    chaos,
    cluster,
    config,
    dashboard,
    demo,
    edge,
    evaluate,
    fuzz,
    loadtest,
    manifests,
    models,
    soak,
    token,
    top,
    train_fusion,
)
from cogenesis.core.errors import CoGenesisError

EPILOG = "Docs: README.md. Every command accepts -v for progress logs."
COMMANDS = (
    demo,
    models,
    bench,
    cluster,
    token,
    edge,
    loadtest,
    top,
    dashboard,
    train_fusion,
    evaluate,
    audit_privacy,
    config,
    manifests,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cogenesis",
        epilog=EPILOG,
        description=(
            "CoGenesis Serve: a cloud LLM (Ray Serve) and on-device small models write together over "
            "Redis; the user's private context never leaves the device."
        ),
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    chaos.register(sub)
    soak.register(sub)
    fuzz.register(sub)
    return parser


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` shuts down as cleanly as Ctrl-C
    try:
        return args.handler(args)
    except CoGenesisError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: everything started was shut down", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: say so plainly; the traceback only with -v
        if args.verbose:
            import traceback

            traceback.print_exc()
        print(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        print("  hint: rerun with -v for the traceback and report it", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
