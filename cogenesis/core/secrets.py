"""A cluster's secrets: where they live, how they are made, how a process finds them.

A secrets directory (mode 0700, every file 0600)::

    cluster.key              the token-signing secret (64 hex chars; ``cogenesis.core.auth``)
    redis/<role>.password    the password of each Redis ACL user (``cogenesis.cluster.acl``)
    admin.token              an operator token (``cogenesis status``, ``top`` and the tests use it)
    worker.token             a trusted edge worker's token (the cloud's own HTTP routes)
    ray.token                Ray's own cluster token (token authentication, Ray >= 2.52): every ``ray start``,
                             driver and ``serve`` CLI call of the cluster runs with ``RAY_AUTH_MODE=token`` and
                             ``RAY_AUTH_TOKEN_PATH`` naming this file (``ray_auth_env``)

``cogenesis up`` (and every command that starts its own cluster) creates one; a deployed cluster mounts
one (a Kubernetes Secret). A process finds it through ``CloudConfig.secrets_dir``, a ``--secrets-dir``
flag or ``COGENESIS_SECRETS_DIR``; single values can come from the environment instead
(``COGENESIS_CLUSTER_KEY``, ``COGENESIS_REDIS_PASSWORD`` with ``COGENESIS_REDIS_USER``, ``COGENESIS_TOKEN``).
Secrets never travel on a command line or in a URL, and are never logged. Rotation: write a new file (or
``cogenesis token secret --rotate``) and restart what reads it; tokens signed with the old key stop working.
"""

from __future__ import annotations

import os
import secrets as _random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from cogenesis.core.errors import ConfigError

RedisRole = Literal["replica", "gateway", "edge", "admin"]
REDIS_ROLES: tuple[RedisRole, ...] = get_args(RedisRole)
ENV_DIR = "COGENESIS_SECRETS_DIR"
ENV_CLUSTER_KEY = "COGENESIS_CLUSTER_KEY"
ENV_REDIS_USER = "COGENESIS_REDIS_USER"
ENV_REDIS_PASSWORD = "COGENESIS_REDIS_PASSWORD"
ENV_TOKEN = "COGENESIS_TOKEN"


@dataclass(frozen=True)
class RedisCredentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never shows the password
        return f"RedisCredentials({self.username}, ***)"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _read_private(path: Path, what: str) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found at {path}", hint="is this the cluster's secrets directory?") from None
    except PermissionError:
        raise ConfigError(f"{what} at {path} is not readable by this user") from None


class SecretsDir:
    """One cluster's secrets directory (see the module doc)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    @classmethod
    def create(cls, path: str | Path, admin_ttl_s: float = 30 * 24 * 3600) -> SecretsDir:
        """Make every secret that is missing (existing ones are kept: restarting a cluster keeps its tokens)."""
        from cogenesis.core.auth import mint

        out = cls(path)
        out.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(out.path, 0o700)
        if not out.key_file.exists():
            _write_private(out.key_file, _random.token_hex(32) + "\n")
        for role in REDIS_ROLES:
            if not out.password_file(role).exists():
                _write_private(out.password_file(role), _random.token_urlsafe(32) + "\n")
        if not out.ray_token_file.exists():
            _write_private(out.ray_token_file, _random.token_hex(32) + "\n")
        for token_role in ("admin", "worker"):
            file = out.path / f"{token_role}.token"
            if not file.exists():
                _write_private(file, mint(out.cluster_key(), f"{token_role}@local", token_role, admin_ttl_s) + "\n")
        return out

    @property
    def key_file(self) -> Path:
        return self.path / "cluster.key"

    @property
    def ray_token_file(self) -> Path:
        return self.path / "ray.token"

    def ray_auth_env(self) -> dict[str, str]:
        """The environment every Ray process of the cluster needs (nodes, drivers, the ``serve`` CLI): token
        authentication with this directory's token. A path, not the token, so it may be logged."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.ray_token_file)}

    def password_file(self, role: RedisRole) -> Path:
        return self.path / "redis" / f"{role}.password"

    def cluster_key(self) -> bytes:
        text = _read_private(self.key_file, "the cluster key")
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise ConfigError(
                f"{self.key_file} does not hold a hex key", hint="recreate it: `cogenesis token secret`"
            ) from None

    def rotate_key(self) -> None:
        """A new signing key: every token signed with the old one stops working."""
        _write_private(self.key_file, _random.token_hex(32) + "\n")

    def redis(self, role: RedisRole) -> RedisCredentials:
        return RedisCredentials(role, _read_private(self.password_file(role), f"the Redis password of {role}"))

    def token(self, role: Literal["admin", "worker"]) -> str:
        return _read_private(self.path / f"{role}.token", f"the {role} token")


def secrets_dir(explicit: str | Path | None = None) -> SecretsDir | None:
    """The secrets directory to use: ``explicit``, else ``$COGENESIS_SECRETS_DIR``, else None (no secrets:
    an unlocked Redis and open routes, which only a test's own cluster should run)."""
    chosen = explicit or os.environ.get(ENV_DIR)
    return SecretsDir(chosen) if chosen else None


def stored_token(role: Literal["admin", "worker"], explicit: str | Path | None = None) -> str | None:
    """The secrets directory's ``role`` token (``explicit``, else ``$COGENESIS_SECRETS_DIR``); None where there is no
    directory or it holds no such token (a cluster without secrets, whose routes are open)."""
    found = secrets_dir(explicit)
    if found is None or not (found.path / f"{role}.token").is_file():
        return None
    return found.token(role)


def cluster_key(explicit: str | Path | None = None) -> bytes:
    """The token-signing key: ``$COGENESIS_CLUSTER_KEY`` (hex), else the secrets directory's."""
    env = os.environ.get(ENV_CLUSTER_KEY)
    if env:
        try:
            return bytes.fromhex(env.strip())
        except ValueError:
            raise ConfigError(f"{ENV_CLUSTER_KEY} is not hex", hint="it holds the key as 64 hex characters") from None
    found = secrets_dir(explicit)
    if found is None:
        raise ConfigError(
            "no cluster key: tokens cannot be made or checked",
            hint=f"pass --secrets-dir, set {ENV_DIR}, or set {ENV_CLUSTER_KEY}",
        )
    return found.cluster_key()


def redis_credentials(role: RedisRole, explicit: str | Path | None = None) -> RedisCredentials | None:
    """The Redis user ``role`` connects as: ``$COGENESIS_REDIS_USER``/``$COGENESIS_REDIS_PASSWORD`` when set,
    else the secrets directory's password of ``role``; None when there are no secrets (an unlocked Redis)."""
    password = os.environ.get(ENV_REDIS_PASSWORD)
    if password:
        return RedisCredentials(os.environ.get(ENV_REDIS_USER, role), password)
    found = secrets_dir(explicit)
    return found.redis(role) if found is not None else None
