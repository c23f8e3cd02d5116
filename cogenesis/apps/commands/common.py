"""What several commands share: flags (the gold-token budget; which cluster), JSON reports and a progress bar."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def add_gold_tokens_flag(p) -> None:
    """The flag of the commands that teacher-force gold answers through both models (train-fusion, eval)."""
    p.add_argument("--max-gold-tokens", type=int, default=384, help="gold tokens used per record")


def write_json(path: str, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1))


def progress_bar() -> tuple[Any, Callable[[str, int, int], None]]:
    """A rich progress bar as a (stage, done, total) callback, and the bar to stop."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("starting", total=None)

    def update(stage: str, done: int, total: int) -> None:
        bar.update(task, description=stage, completed=done, total=total)

    return bar, update


# ---- which cluster a command works against --------------------------------------------------------------


def add_cluster_flags(p, token: bool = False) -> None:
    """The flags that name the cluster a command works against: the running `cogenesis up` cluster by default
    (``--state-dir``), or any deployed one through its URLs and secrets directory (``cluster_of``)."""
    p.add_argument("--redis-url", default=None, help="the cluster's bus (default: the running `cogenesis up` one's)")
    p.add_argument("--http-url", default=None, help="the cloud app's URL, e.g. http://HOST:8000/cloud")
    p.add_argument("--gateway-url", default=None, help="the device gateway's URL (default: the cluster's)")
    p.add_argument(
        "--secrets-dir",
        default=None,
        help="the cluster's secrets directory (Redis passwords, tokens; default: the running cluster's, else "
        "$COGENESIS_SECRETS_DIR)",
    )
    if token:
        p.add_argument(
            "--token",
            default=None,
            help="one device token for every device (default: $COGENESIS_TOKEN, else one minted per device with the "
            "cluster's key); prefer the environment variable, which stays off the process list",
        )
    p.add_argument("--state-dir", default=None, help="cluster state directory (default: $COGENESIS_HOME/cluster)")


@dataclass(frozen=True)
class Where:
    """The cluster a command works against: the running one's (``cogenesis up``) unless flags say otherwise."""

    redis_url: str
    http_url: str
    gateway_url: str
    ray_address: str | None
    secrets_dir: str | None
    started_here: bool = False  # ``cogenesis up``'s cluster (not one named by URL)
    ray_env: dict[str, str] | None = None  # what a Ray driver needs (a multi-node cluster's token auth)


def cluster_of(args) -> Where:
    """Where the cluster answers, from the flags (``add_cluster_flags``) and the running cluster's state. With a
    ``--transport`` (edge, loadtest): ``ws`` needs a gateway URL and a way to every device's token (``--token``/
    ``$COGENESIS_TOKEN``, or the secrets to mint them), ``redis`` the cloud app's URL: a clear error before anything
    starts."""
    from cogenesis.cluster import daemon
    from cogenesis.core.errors import ClusterError
    from cogenesis.core.secrets import ENV_DIR, ENV_TOKEN
    from cogenesis.edge_sim.session import gateway_of, token_source

    named = bool(args.redis_url or args.http_url)
    state = None if named else daemon.running(args.state_dir)
    redis_url = args.redis_url or (state.redis_url if state is not None else None)
    http_url = args.http_url or (state.http_url if state is not None else "")
    if not redis_url:
        raise ClusterError(
            "no cluster is running and no --redis-url given" if not named else "--http-url needs --redis-url",
            hint="start one with `cogenesis up` (stop it with `cogenesis down`), or name a deployed cluster with "
            "--redis-url, --http-url and --secrets-dir",
        )
    gateway_url = args.gateway_url or getattr(state, "gateway_url", None) or gateway_of(http_url)
    transport = getattr(args, "transport", None)
    if transport == "ws" and not gateway_url:
        raise ClusterError("no gateway URL", hint="pass --gateway-url (`cogenesis status` shows the cluster's)")
    if transport == "redis" and not http_url:
        raise ClusterError("no cloud URL for --transport redis", hint="pass --http-url")
    secrets_dir = args.secrets_dir or getattr(state, "secrets_dir", None) or os.environ.get(ENV_DIR)
    if getattr(args, "token", None):
        os.environ[ENV_TOKEN] = args.token  # the pools inherit it: never on their command lines
    if transport is not None:
        token_source(transport, secrets_dir)  # no way to a token: a clear error before any pool starts
    ray_address = state.ray_address if state is not None else None
    ray_env = None
    if state is not None and state.nodes > 1 and secrets_dir:
        from cogenesis.cluster.nodes import node_env
        from cogenesis.core.secrets import SecretsDir

        ray_env = node_env(SecretsDir(secrets_dir).ray_auth_env())
    return Where(
        redis_url,
        http_url,
        gateway_url or "",
        ray_address,
        secrets_dir,
        started_here=state is not None,
        ray_env=ray_env,
    )
