"""How a session reaches the cloud: the transport's tokens and URLs (the sessions themselves: test_sdk, test_logits)."""

import pytest

from cogenesis.core.auth import verify
from cogenesis.core.errors import ConfigError
from cogenesis.core.secrets import ENV_CLUSTER_KEY, ENV_DIR, ENV_TOKEN, SecretsDir
from cogenesis.edge_sim.session import gateway_of, token_source


@pytest.fixture
def no_env(monkeypatch):
    for name in (ENV_DIR, ENV_CLUSTER_KEY, ENV_TOKEN):
        monkeypatch.delenv(name, raising=False)


def test_every_simulated_device_gets_a_device_token_of_its_own(no_env, tmp_path):
    secrets = SecretsDir.create(tmp_path / "s")
    tokens = token_source("ws", str(secrets.path), subject="edge-run1")
    a, b = verify(secrets.cluster_key(), tokens(0)), verify(secrets.cluster_key(), tokens(1))
    assert (a.sub, a.role, b.sub) == ("edge-run1-0", "device", "edge-run1-1")
    assert tokens(0) == tokens(0)  # minted once per device


def test_an_explicit_token_serves_every_device(no_env, monkeypatch):
    assert token_source("ws", token="cgt1.a.b")(7) == "cgt1.a.b"
    monkeypatch.setenv(ENV_TOKEN, "cgt1.env.sig")
    assert token_source("ws")(3) == "cgt1.env.sig"


def test_trusted_workers_use_the_worker_token_or_none(no_env, tmp_path):
    secrets = SecretsDir.create(tmp_path / "s")
    assert verify(secrets.cluster_key(), token_source("redis", str(secrets.path))(0)).role == "worker"
    assert token_source("redis")(0) is None  # an unlocked cluster


def test_devices_without_a_token_or_secrets_are_a_clear_error(no_env):
    with pytest.raises(ConfigError, match="no device token") as info:
        token_source("ws")
    assert "--token" in (info.value.hint or "")
    with pytest.raises(ConfigError, match="transport"):
        token_source("pigeon", token=None)


def test_the_gateway_sits_beside_the_cloud_app():
    assert gateway_of("http://127.0.0.1:8000/cloud") == "http://127.0.0.1:8000"
    assert gateway_of("http://127.0.0.1:8000/cloud/") == "http://127.0.0.1:8000"
    assert gateway_of("http://gw:9") == "http://gw:9"
