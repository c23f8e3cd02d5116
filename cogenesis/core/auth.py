"""Bearer tokens and per-device rate limits: pure functions over a cluster secret and an injected clock.

A token is ``cgt1.<claims>.<signature>``: the claims are JSON (``sub`` the device or operator id, ``role``,
``iat`` and ``exp`` in unix seconds) in URL-safe base64, the signature an HMAC-SHA256 of ``cgt1.<claims>``
under the cluster secret (``cogenesis.core.secrets``). Anyone holding the secret can mint tokens
(``cogenesis token create``); rotating the secret invalidates every token at once. Tokens carry no
private data and are never logged: logs name a token by its subject only.

Roles:
- ``device``: a user's device. Opens, steps and closes its own sessions through the gateway, asks for
  outlines; rate limited per subject.
- ``worker``: a trusted in-cluster edge worker. The cloud's own HTTP routes (outlines, the stateless
  baseline) take it; its Redis user is ``edge`` (``cogenesis.cluster.acl``).
- ``admin``: an operator. Stats, health details, and everything a worker may do.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from cogenesis.core.errors import AuthError, ConfigError, Forbidden, RateLimited

Role = Literal["device", "worker", "admin"]
ROLES: tuple[Role, ...] = get_args(Role)
PREFIX = "cgt1"
MIN_SECRET_BYTES = 32
MAX_TOKEN_CHARS = 2048  # a longer Authorization header is refused before any decoding
SUBJECT = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")  # device and operator ids: no spaces, no separators of ours
MAX_TTL_S = 366 * 24 * 3600


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: bytes, signed: str) -> str:
    return _b64(hmac.new(secret, signed.encode(), hashlib.sha256).digest())


def check_secret(secret: bytes) -> bytes:
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"the cluster secret has {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed",
            hint="make one with `cogenesis token secret` (or let `cogenesis up` create it)",
        )
    return secret


@dataclass(frozen=True)
class Claims:
    """Who a verified token speaks for, as what, until when (unix seconds)."""

    sub: str
    role: Role
    iat: int
    exp: int

    def allows(self, *roles: Role) -> bool:
        """The token's role is one of ``roles``; an admin is allowed what a worker is."""
        return self.role in roles or (self.role == "admin" and "worker" in roles)

    def require(self, *roles: Role) -> Claims:
        if not self.allows(*roles):
            raise Forbidden(
                f"a {self.role} token may not do this (it needs a {' or '.join(roles)} token)",
                hint="ask the cluster's operator for a token of that role (`cogenesis token create --role ...`)",
            )
        return self


def mint(secret: bytes, subject: str, role: Role = "device", ttl_s: float = 24 * 3600, now: float | None = None) -> str:
    """A signed token for ``subject`` as ``role``, valid for ``ttl_s`` seconds from ``now``."""
    check_secret(secret)
    if not SUBJECT.match(subject):
        raise ConfigError(
            f"invalid token subject {subject!r}",
            hint="use 1-128 characters of letters, digits and . _ : @ -",
        )
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}", hint=f"use one of {', '.join(ROLES)}")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ConfigError(f"token lifetime {ttl_s:g} s is out of range", hint=f"use 1 s to {MAX_TTL_S // 86400} days")
    issued = int(time.time() if now is None else now)
    claims = {"sub": subject, "role": role, "iat": issued, "exp": issued + math.ceil(ttl_s)}
    body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signed = f"{PREFIX}.{body}"
    return f"{signed}.{_signature(secret, signed)}"


def verify(secret: bytes, token: str | None, now: float | None = None) -> Claims:
    """The claims of a genuine, unexpired token; AuthError (401) for anything else, saying which."""
    if not token:
        raise AuthError("no credential: this route needs a bearer token", hint="send 'Authorization: Bearer <token>'")
    if len(token) > MAX_TOKEN_CHARS or token.count(".") != 2 or not token.startswith(PREFIX + "."):
        raise AuthError("malformed token", hint="tokens come from `cogenesis token create` (cgt1.<claims>.<sig>)")
    signed, _, signature = token.rpartition(".")
    if not hmac.compare_digest(signature, _signature(secret, signed)):
        raise AuthError("token signature is invalid (forged, or signed with another cluster's secret)")
    try:
        raw = json.loads(_unb64(signed.split(".", 1)[1]))
        claims = Claims(sub=str(raw["sub"]), role=raw["role"], iat=int(raw["iat"]), exp=int(raw["exp"]))
    except (ValueError, KeyError, TypeError):
        raise AuthError("malformed token claims") from None
    if claims.role not in ROLES:
        raise AuthError(f"token role {claims.role!r} is unknown")
    t = time.time() if now is None else now
    if t >= claims.exp:
        raise AuthError(
            f"token of {claims.sub} expired {int(t - claims.exp)} s ago",
            hint="get a fresh one (`cogenesis token create`)",
        )
    return claims


def bearer_header(token: str | None) -> dict[str, str]:
    """The ``Authorization`` header that carries ``token`` (none without a token: a cluster whose routes are open)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (None: absent or another scheme)."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


class RateLimiter:
    """Token buckets per subject: ``rate_per_s`` requests a second on average, bursts of ``burst``.

    ``take(subject)`` spends one request or raises ``RateLimited`` with the wait until the next one. The
    clock is injected (``time.monotonic`` by default); at most ``max_subjects`` buckets are kept (the least
    recently used go first, which only forgives their debt)."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
        max_subjects: int = 100_000,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ConfigError(f"rate limit {rate_per_s}/s with burst {burst} is invalid", hint="rate > 0, burst >= 1")
        self.rate, self.burst, self.clock, self.max_subjects = rate_per_s, burst, clock, max_subjects
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # subject -> (tokens, at)

    def take(self, subject: str, cost: float = 1.0) -> None:
        now = self.clock()
        tokens, at = self._buckets.pop(subject, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if tokens < cost:
            self._buckets[subject] = (tokens, now)
            wait = (cost - tokens) / self.rate
            raise RateLimited(f"{subject} is over its rate of {self.rate:g} requests/s", retry_after_s=wait)
        self._buckets[subject] = (tokens - cost, now)
        while len(self._buckets) > self.max_subjects:
            self._buckets.popitem(last=False)
