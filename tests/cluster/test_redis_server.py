"""The bundled Redis server starts, answers, and refuses a taken port with a clear error."""

import pytest
import redis

from cogenesis.cluster.redis_server import RedisServer
from cogenesis.core.errors import ClusterError


def test_start_version_stop():
    server = RedisServer().start()
    try:
        assert server.version().startswith(("6.", "7.", "8."))
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(server.url, socket_connect_timeout=0.5).ping()


def test_taken_port_is_a_clear_error(redis_server):
    with pytest.raises(ClusterError, match="exited at start|did not answer"):
        RedisServer(port=redis_server.port, start_timeout_s=3).start()


def test_restart_keeps_the_url_and_loses_the_data():
    server = RedisServer().start()
    try:
        url, pid = server.url, server.pid
        client = redis.Redis.from_url(url, socket_timeout=2)
        client.set("k", "v")
        assert server.restart(down_s=0.1) is server
        assert server.url == url and server.pid not in (None, pid)
        assert client.get("k") is None  # a new server, no persistence (the client reconnects on its own)
        client.close()
    finally:
        server.stop()
    assert server.pid is None


def test_locked_server_talks_to_itself_as_admin(tmp_path):
    """With a secrets directory its own clients (start's PING loop, version, restart) connect as admin, and a
    client without credentials is refused, before and after a restart."""
    from cogenesis.core.secrets import SecretsDir

    server = RedisServer(secrets=SecretsDir.create(tmp_path / "s")).start()
    try:
        assert server.version().startswith(("6.", "7.", "8."))
        for _ in range(2):
            with pytest.raises(redis.AuthenticationError):
                redis.Redis.from_url(server.url, socket_timeout=2).ping()
            assert server.client().ping()
            server.restart(down_s=0.1)
    finally:
        server.stop()


def test_tls_needs_a_secrets_directory():
    from cogenesis.core.errors import ConfigError

    with pytest.raises(ConfigError, match="needs a secrets directory"):
        RedisServer(tls=True)
