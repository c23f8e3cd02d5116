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
