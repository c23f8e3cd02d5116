"""``cogenesis token``: bearer tokens for devices, workers and operators, and the key that signs them."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from cogenesis.core.errors import ConfigError

TTL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

WHERE = (
    "The secrets directory is --secrets-dir, else the running `cogenesis up` cluster's ($COGENESIS_HOME/cluster/"
    "secrets, or --state-dir's), else $COGENESIS_SECRETS_DIR."
)


def register(sub) -> None:
    tok = sub.add_parser(
        "token",
        help="make bearer tokens (devices, workers, operators) and the cluster key that signs them",
        description=(
            "A token is `cgt1.<claims>.<signature>`: who (--device), as what (--role), until when (--ttl), signed "
            "with the cluster key (cluster.key in the cluster's secrets directory). Devices send it to the "
            "gateway as `Authorization: Bearer <token>`. " + WHERE
        ),
    )
    tsub = tok.add_subparsers(dest="token_cmd", required=True, metavar="ACTION")
    create = tsub.add_parser(
        "create",
        help="print a new token (only the token, on stdout)",
        description=(
            "Print a signed token on stdout (nothing else, so `TOKEN=$(cogenesis token create --device phone-1)` "
            "works). Roles: device (a user's device: its own sessions and outlines through the gateway, rate "
            "limited), worker (a trusted in-cluster edge worker: the cloud's own HTTP routes), admin (an operator: "
            "stats, health details, and what a worker may do). " + WHERE
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    create.add_argument("--device", required=True, help="the token's subject: a device or operator id")
    create.add_argument("--role", choices=("device", "worker", "admin"), default="device", help="what it may do")
    create.add_argument("--ttl", default="24h", help="lifetime: a number with a unit s, m, h or d (e.g. 90m, 7d)")
    secret = tsub.add_parser(
        "secret",
        help="create the secrets directory, or rotate the cluster key (--rotate)",
        description=(
            "Without --rotate: create the secrets directory (cluster key, Redis passwords, admin and worker "
            "tokens) where it is missing; existing secrets are kept. With --rotate: a new cluster key; every token "
            "signed with the old one stops working (the directory's admin and worker tokens are re-made), and the "
            "cluster's cloud replicas and gateway must be restarted to read it. " + WHERE + " If none of these "
            "exists, the secrets directory `cogenesis up` will use is created."
        ),
    )
    secret.add_argument("--rotate", action="store_true", help="replace the cluster key (invalidates every token)")
    for p in (create, secret):
        p.add_argument("--secrets-dir", default=None, help="the cluster's secrets directory")
        p.add_argument(
            "--state-dir", default=None, help="`cogenesis up` state directory (default: $COGENESIS_HOME/cluster)"
        )
    create.set_defaults(handler=run_create)
    secret.set_defaults(handler=run_secret)


def parse_ttl(text: str) -> float:
    """Seconds of a lifetime written as a number with a unit (s, m, h, d; none: seconds)."""
    match = TTL.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(f"invalid --ttl {text!r}", hint="a positive number with a unit s, m, h or d (e.g. 24h, 7d)")
    return float(match.group(1)) * UNITS[match.group(2)]


def _running_cluster_secrets(state_dir: str | None) -> Path | None:
    """The secrets directory of the `cogenesis up` cluster running from ``state_dir``, if one runs."""
    from cogenesis.cluster import daemon

    chosen = Path(state_dir) if state_dir else daemon.default_state_dir()
    state = daemon.running(chosen)
    if state is None:
        return None
    return Path(getattr(state, "secrets_dir", None) or chosen / "secrets")


def find_secrets_dir(explicit: str | None, state_dir: str | None) -> Path | None:
    """--secrets-dir, else the running cluster's, else $COGENESIS_SECRETS_DIR; None: none of them."""
    from cogenesis.core.secrets import secrets_dir

    if explicit:
        return Path(explicit).expanduser()
    running = _running_cluster_secrets(state_dir)
    if running is not None:
        return running
    found = secrets_dir()
    return found.path if found is not None else None


def run_create(args) -> int:
    from cogenesis.core.auth import mint
    from cogenesis.core.secrets import SecretsDir

    ttl_s = parse_ttl(args.ttl)
    path = find_secrets_dir(args.secrets_dir, args.state_dir)
    if path is None:
        raise ConfigError(
            "no secrets directory: no cluster runs (`cogenesis up`) and neither --secrets-dir nor "
            "$COGENESIS_SECRETS_DIR is given",
            hint="start a cluster (`cogenesis up`), pass --secrets-dir DIR, or make one with `cogenesis token secret "
            "--secrets-dir DIR`",
        )
    if not path.is_dir():
        raise ConfigError(f"the secrets directory {path} does not exist", hint="create it: `cogenesis token secret`")
    token = mint(SecretsDir(path).cluster_key(), args.device, args.role, ttl_s)
    print(f"token for {args.device} ({args.role}, {args.ttl}) signed with {path}/cluster.key", file=sys.stderr)
    print(token)
    return 0


def run_secret(args) -> int:
    from cogenesis.cluster import daemon
    from cogenesis.core.secrets import SecretsDir

    path = find_secrets_dir(args.secrets_dir, args.state_dir)
    if path is None:
        path = (Path(args.state_dir) if args.state_dir else daemon.default_state_dir()) / "secrets"
    existed = (path / "cluster.key").exists()
    if args.rotate and existed:
        SecretsDir(path).rotate_key()
        for role in ("admin", "worker"):
            (path / f"{role}.token").unlink(missing_ok=True)  # signed with the old key: re-made below
        SecretsDir.create(path)
        print(
            f"rotated the cluster key in {path}: every token signed with the old key is now invalid.\n"
            "  restart what checks tokens so it reads the new key: `cogenesis down && cogenesis up` (or the "
            "deployed gateway and cloud apps),\n"
            f"  then hand out new tokens (`cogenesis token create`); {path}/admin.token and worker.token are re-made"
        )
        return 0
    SecretsDir.create(path)
    if existed:
        print(f"{path} already holds the cluster's secrets (kept); `--rotate` replaces the key")
    else:
        print(
            f"created the cluster's secrets in {path} (mode 0700): cluster key, Redis passwords, admin and worker tokens"
        )
    return 0
