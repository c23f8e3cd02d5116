"""A cluster's secrets directory (cogenesis.core.secrets)."""

from __future__ import annotations

import stat

import pytest

from cogenesis.core import auth, secrets
from cogenesis.core.errors import ConfigError


def test_create_makes_private_files_and_keeps_them(tmp_path):
    d = secrets.SecretsDir.create(tmp_path / "s")
    assert stat.S_IMODE((tmp_path / "s").stat().st_mode) == 0o700
    files = [p for p in (tmp_path / "s").rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"cluster.key", "admin.token", "worker.token", "ray.token"} | {
        f"{r}.password" for r in secrets.REDIS_ROLES
    }
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    key, admin, ray_token = d.cluster_key(), d.token("admin"), d.ray_token_file.read_text()
    again = secrets.SecretsDir.create(tmp_path / "s")  # a restarted cluster keeps its tokens
    assert again.cluster_key() == key and again.token("admin") == admin
    assert again.ray_token_file.read_text() == ray_token and len(ray_token.strip()) == 64
    assert d.ray_auth_env() == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(d.ray_token_file)}
    assert auth.verify(key, admin).role == "admin" and auth.verify(key, d.token("worker")).role == "worker"


def test_rotating_the_key_invalidates_tokens(tmp_path):
    d = secrets.SecretsDir.create(tmp_path)
    token = d.token("admin")
    d.rotate_key()
    with pytest.raises(Exception, match="signature"):
        auth.verify(d.cluster_key(), token)


def test_credentials_never_show_the_password(tmp_path):
    creds = secrets.SecretsDir.create(tmp_path).redis("edge")
    assert creds.username == "edge" and creds.password not in repr(creds)


def test_the_environment_overrides_the_directory(tmp_path, monkeypatch):
    d = secrets.SecretsDir.create(tmp_path)
    monkeypatch.delenv(secrets.ENV_DIR, raising=False)
    assert secrets.redis_credentials("edge") is None  # no secrets anywhere: an unlocked Redis
    monkeypatch.setenv(secrets.ENV_DIR, str(tmp_path))
    assert secrets.redis_credentials("replica") == d.redis("replica")
    assert secrets.cluster_key() == d.cluster_key()
    monkeypatch.setenv(secrets.ENV_REDIS_PASSWORD, "pw")
    monkeypatch.setenv(secrets.ENV_REDIS_USER, "someone")
    assert secrets.redis_credentials("edge") == secrets.RedisCredentials("someone", "pw")
    monkeypatch.setenv(secrets.ENV_CLUSTER_KEY, "ab" * 32)
    assert secrets.cluster_key() == bytes.fromhex("ab" * 32)


def test_missing_secrets_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(secrets.ENV_DIR, raising=False)
    monkeypatch.delenv(secrets.ENV_CLUSTER_KEY, raising=False)
    with pytest.raises(ConfigError, match="no cluster key"):
        secrets.cluster_key()
    with pytest.raises(ConfigError, match="not found"):
        secrets.SecretsDir(tmp_path / "nowhere").cluster_key()
    monkeypatch.setenv(secrets.ENV_CLUSTER_KEY, "zz")
    with pytest.raises(ConfigError, match="not hex"):
        secrets.cluster_key()
