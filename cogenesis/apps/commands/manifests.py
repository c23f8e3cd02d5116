"""``cogenesis manifests``: what a deployed cluster is made from, rendered from the project's own configs.

``k8s`` writes the KubeRay manifests (``configs/k8s/``), ``serve-config`` the Serve config a Ray cluster launcher
head deploys (configs/serve.yaml with its Redis URL), ``redis-acl`` the aclfile of the bus's Redis users for a
secrets directory. See ``cogenesis.apps.manifests`` for what each holds and why."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub) -> None:
    from cogenesis.apps import manifests as m

    p = sub.add_parser(
        "manifests",
        help="render the deployment files: KubeRay manifests, a launcher's Serve config, the Redis aclfile",
        description=(
            "Render what a deployed cluster is made from, from the project's own configs so they never drift: "
            "`k8s` the KubeRay RayService and the Redis Deployment/Service (configs/k8s/), `serve-config` "
            "configs/serve.yaml with another Redis URL (what a Ray cluster launcher's head deploys), `redis-acl` "
            "the aclfile of the Redis users of a secrets directory (hashed passwords only)."
        ),
    )
    msub = p.add_subparsers(dest="manifests_cmd", required=True, metavar="{k8s,serve-config,redis-acl}")
    k8s = msub.add_parser(
        "k8s",
        help="write the KubeRay manifests (rayservice.yaml, redis.yaml)",
        description=(
            "Write rayservice.yaml (a KubeRay RayService: configs/serve.yaml's apps with the in-cluster Redis URL, "
            "a head and a GPU worker group, Ray token auth, the cluster's secrets mounted read-only at "
            f"{m.SECRETS_MOUNT}) and redis.yaml (the bus, locked with the {m.REDIS_ACL_SECRET} Secret) into --out. "
            "With the defaults it rewrites the committed configs/k8s/ exactly."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    k8s.add_argument("--image", default=m.IMAGE, help="the project's image (head, Redis), as pushed: REGISTRY/NAME:TAG")
    k8s.add_argument(
        "--gpu-image", default=None, help=f"the GPU workers' image (default: --image + {m.GPU_SUFFIX!r} on its tag)"
    )
    k8s.add_argument("--out", default=str(m.K8S_DIR), help="directory to write the manifests into")
    k8s.add_argument("--serve-config", default=str(m.SERVE_CONFIG), help="the Serve config the RayService runs")
    serve = msub.add_parser(
        "serve-config",
        help="print (or write) configs/serve.yaml with another Redis URL, for `serve deploy`",
        description=(
            "configs/serve.yaml with every application's redis_url (and optionally secrets_dir, and any field with "
            "--set) replaced, checked as CloudConfigs: what `serve deploy` deploys on a Ray cluster once its Redis "
            "runs (a cluster launcher's head, or one you started with `ray start`)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--redis-url", required=True, help="the bus as every node reaches it: redis://HOST:PORT/0")
    serve.add_argument("--secrets-dir", default=m.SECRETS_MOUNT, help="where the secrets directory is on every node")
    serve.add_argument("--serve-config", default=str(m.SERVE_CONFIG), help="the Serve config to start from")
    serve.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a CloudConfig field in every application's args (repeatable; dotted for nested fields: "
        "--set num_replicas=2 --set autoscaling.max_replicas=4; the fields: `cogenesis config`)",
    )
    serve.add_argument("--out", default=None, help="write it to this file (default: stdout)")
    acl = msub.add_parser(
        "redis-acl",
        help="print (or write) the Redis aclfile of a secrets directory's users",
        description=(
            "The aclfile that locks the bus's Redis: one user per role (replica, gateway, edge, admin) with the "
            "SHA-256 of its password from --secrets-dir, and the `default` user off. For the "
            f"{m.REDIS_ACL_SECRET} Secret (key {m.REDIS_ACL_KEY}) or `redis-server --aclfile FILE`."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    acl.add_argument("--secrets-dir", required=True, help="the cluster's secrets directory (`cogenesis token secret`)")
    acl.add_argument(
        "--redis-major",
        type=int,
        choices=(6, 7),
        default=6,
        help="the server's major version: 6 (the image's bundled redis-server; 7 reads it too) or 7 (selectors)",
    )
    acl.add_argument("--out", default=None, help="write it to this file, mode 0600 (default: stdout)")
    k8s.set_defaults(handler=run_k8s)
    serve.set_defaults(handler=run_serve_config)
    acl.set_defaults(handler=run_redis_acl)


def run_k8s(args) -> int:
    from cogenesis.apps import manifests as m

    files = m.k8s_manifests(args.image, args.gpu_image, Path(args.serve_config))
    for path in m.write_files(Path(args.out), files):
        print(f"wrote {path}")
    print("next: create the Secrets from your secrets directory ($SECRETS), then `kubectl apply -f` the directory:")
    for line in m.kubectl_secret_commands():
        print(f"  {line}")
    return 0


def run_serve_config(args) -> int:
    import yaml

    from cogenesis.apps import manifests as m
    from cogenesis.core.errors import ConfigError

    if not args.redis_url.startswith(("redis://", "rediss://")):
        raise ConfigError(f"invalid --redis-url {args.redis_url!r}", hint="redis://HOST:PORT/0 (or rediss:// for TLS)")
    overrides = {**m.parse_sets(args.set), "redis_url": args.redis_url, "secrets_dir": args.secrets_dir}
    config = m.render_serve_config(overrides, args.serve_config)
    text = yaml.safe_dump(config, sort_keys=False, width=120)
    _emit(text, args.out, private=False)
    return 0


def run_redis_acl(args) -> int:
    from cogenesis.apps import manifests as m

    _emit(m.render_redis_acl(args.secrets_dir, args.redis_major), args.out, private=True)
    return 0


def _emit(text: str, out: str | None, private: bool) -> None:
    """``text`` on stdout, or into ``out`` (0600 when ``private``); a ConfigError when ``out`` cannot be written."""
    import os

    from cogenesis.core.errors import ConfigError

    if out is None:
        sys.stdout.write(text)
        return
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError as exc:
        raise ConfigError(
            f"cannot write --out {path}: {exc.strerror or exc}", hint="pass a file in a directory you can write"
        ) from None
    print(f"wrote {path}", file=sys.stderr)
