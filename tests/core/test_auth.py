"""Bearer tokens and per-device rate limits (cogenesis.core.auth)."""

from __future__ import annotations

import pytest

from cogenesis.core import auth
from cogenesis.core.errors import AuthError, ConfigError, Forbidden, RateLimited

SECRET = bytes(range(32))
NOW = 1_800_000_000.0


def test_a_token_round_trips_its_claims():
    token = auth.mint(SECRET, "phone-7", "device", ttl_s=60, now=NOW)
    claims = auth.verify(SECRET, token, now=NOW + 59)
    assert (claims.sub, claims.role, claims.iat, claims.exp) == ("phone-7", "device", int(NOW), int(NOW) + 60)


def test_an_expired_token_is_refused_with_its_age():
    token = auth.mint(SECRET, "phone-7", ttl_s=60, now=NOW)
    with pytest.raises(AuthError, match="expired 10 s ago"):
        auth.verify(SECRET, token, now=NOW + 70)


def test_another_clusters_token_is_refused():
    token = auth.mint(bytes(32), "phone-7", now=NOW)
    with pytest.raises(AuthError, match="signature is invalid"):
        auth.verify(SECRET, token, now=NOW)


@pytest.mark.parametrize(
    "token",
    [None, "", "Bearer x", "cgt1.a", "cgt2.a.b", "cgt1." + "a" * 3000 + ".b", "cgt1.!!!.sig"],
)
def test_missing_or_malformed_tokens_are_refused(token):
    with pytest.raises(AuthError):
        auth.verify(SECRET, token, now=NOW)


def test_edited_claims_break_the_signature():
    """Raising one's own role: the claims are signed, so the edit is caught."""
    import base64
    import json

    token = auth.mint(SECRET, "phone-7", "device", now=NOW)
    prefix, body, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["role"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(AuthError, match="signature"):
        auth.verify(SECRET, f"{prefix}.{forged}.{sig}", now=NOW)


def test_roles_allow_what_they_should():
    device = auth.Claims("d", "device", 0, 1)
    admin = auth.Claims("a", "admin", 0, 1)
    assert device.allows("device") and not device.allows("worker", "admin")
    assert admin.allows("worker") and admin.allows("admin")
    with pytest.raises(Forbidden, match="needs a admin token"):
        device.require("admin")


@pytest.mark.parametrize(
    ("secret", "subject", "role", "ttl"),
    [
        (b"short", "d", "device", 60),
        (SECRET, "has space", "device", 60),
        (SECRET, "d", "root", 60),
        (SECRET, "d", "device", 0),
    ],
)
def test_minting_refuses_bad_input(secret, subject, role, ttl):
    with pytest.raises(ConfigError):
        auth.mint(secret, subject, role, ttl)


@pytest.mark.parametrize(
    ("header", "token"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer", None), (None, None)],
)
def test_bearer_reads_the_authorization_header(header, token):
    assert auth.bearer(header) == token


def test_the_rate_limiter_allows_a_burst_then_the_rate():
    t = [0.0]
    limiter = auth.RateLimiter(rate_per_s=2.0, burst=3, clock=lambda: t[0])
    for _ in range(3):
        limiter.take("d")
    with pytest.raises(RateLimited) as refused:
        limiter.take("d")
    assert refused.value.retry_after_s == pytest.approx(0.5)
    limiter.take("other")  # buckets are per subject
    t[0] = 0.5
    limiter.take("d")
    with pytest.raises(RateLimited):
        limiter.take("d")


def test_the_rate_limiter_keeps_a_bounded_number_of_buckets():
    limiter = auth.RateLimiter(rate_per_s=1.0, burst=1, clock=lambda: 0.0, max_subjects=10)
    for i in range(100):
        limiter.take(f"d{i}")
    assert len(limiter._buckets) == 10


def test_a_bearer_header_carries_the_token_and_none_without_one():
    assert auth.bearer_header("cgt1.a.b") == {"Authorization": "Bearer cgt1.a.b"}
    assert auth.bearer(auth.bearer_header("cgt1.a.b")["Authorization"]) == "cgt1.a.b"
    assert auth.bearer_header(None) == {} and auth.bearer_header("") == {}
