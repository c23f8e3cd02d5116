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


@pytest.mark.parametrize("mode", ["logits", "sketch"])
def test_a_simulated_devices_session_is_the_sdks(monkeypatch, mode):
    """`cogenesis edge` and Locust run each device's session through the edge SDK (``Client.session``), with the
    device's own token, the process's engine, shared device and HTTP client; the client is closed afterwards
    but the shared HTTP client is not its to close."""
    from types import SimpleNamespace

    from cogenesis.core.config import EdgeConfig
    from cogenesis.edge_sim import sdk
    from cogenesis.edge_sim.session import Cloud, run_session

    seen: dict = {}

    class Recording(sdk.Client):
        def session(self, client, mode, cfg=None, on_token=None, stop_at=None):
            seen.update(url=self.url, token=self._token, engine=self.engine, device=self._device, http=self._http)
            seen.update(client=client, mode=mode, stop_at=stop_at)
            return "result"

        def close(self):
            seen["closed"] = not self._own_http
            super().close()

    monkeypatch.setattr(sdk, "Client", Recording)
    http, engine, device, client = object(), object(), object(), SimpleNamespace(index=3)
    cloud = Cloud("redis://x", "http://h/cloud", http, "ws", "http://h", token=lambda i: f"token-{i}")
    assert run_session(client, mode, engine, device, cloud, EdgeConfig(), stop_at=9.0) == "result"
    assert seen == {
        "url": "http://h",
        "token": "token-3",
        "engine": engine,
        "device": device,
        "http": http,
        "client": client,
        "mode": mode,
        "stop_at": 9.0,
        "closed": True,
    }
