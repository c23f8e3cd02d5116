"""The device gateway over real sockets: uvicorn serving ``gateway_api`` on a free port, devices speaking the
msgpack protocol with websocket-client, a real Redis, and fake replicas (the real step loop and ``CloudBus``
over a deterministic ``FakeEngine``) answering the bus. The Serve deployment itself (slow) at the end."""

import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import redis
import uvicorn
import websocket
from cloud_fakes import FakeEngine

from cogenesis.cluster.bus import CloudBus, alive_key, reply_key
from cogenesis.cluster.redis_server import free_port
from cogenesis.core.auth import mint
from cogenesis.core.config import CloudConfig
from cogenesis.core.errors import ConfigError
from cogenesis.core.protocol import (
    CloseSession,
    ErrorReply,
    OpenSession,
    StepBatch,
    StepReply,
    StepRequest,
    decode_replies,
    encode,
    pack_ids,
)
from cogenesis.core.secrets import ENV_CLUSTER_KEY, ENV_DIR, SecretsDir
from cogenesis.deployments.gateway import GatewayServer, build_gateway_app, gateway_api
from cogenesis.deployments.relay import GatewayRelay, connect_async, owner_key
from cogenesis.deployments.step_loop import StepLoop

TIMEOUT_S = 20.0


class Device:
    """A device's WebSocket to the gateway (websocket-client, every wait bounded)."""

    def __init__(self, url: str, token: str | None) -> None:
        header = [f"Authorization: Bearer {token}"] if token else []
        self.ws = websocket.create_connection(url, header=header, timeout=TIMEOUT_S)

    def send(self, *msgs) -> None:
        """One frame: the message, or a StepBatch of several (raw bytes go as they are)."""
        raw = [m if isinstance(m, bytes) else encode(m) for m in msgs]
        self.ws.send_binary(raw[0] if len(raw) == 1 else encode(StepBatch(items=raw)))

    def replies(self, n: int = 1) -> list[StepReply | ErrorReply]:
        out: list[StepReply | ErrorReply] = []
        while len(out) < n:
            opcode, data = self.ws.recv_data()
            assert opcode == websocket.ABNF.OPCODE_BINARY, (opcode, data)
            out.extend(decode_replies(data))
        return out

    def reply(self) -> StepReply | ErrorReply:
        (only,) = self.replies(1)
        return only

    def closed_with(self) -> tuple[int, str]:
        """The close code and reason the gateway closed with."""
        while True:
            opcode, data = self.ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return int.from_bytes(data[:2], "big"), data[2:].decode()

    def close(self) -> None:
        self.ws.close()


def open_msg(sid: str, instruction: str = "write a poem", **kw) -> OpenSession:
    return OpenSession(session_id=sid, instruction=instruction, top_k=3, budget_ms=60_000, **kw)


def step_msg(sid: str, step: int, ids=(5,), **kw) -> StepRequest:
    return StepRequest(session_id=sid, step=step, tokens=pack_ids(list(ids)), budget_ms=60_000, **kw)


def eventually(check, what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s} s"
        time.sleep(0.02)


@pytest.fixture
def secrets_dir(tmp_path, monkeypatch):
    for name in (ENV_DIR, ENV_CLUSTER_KEY):
        monkeypatch.delenv(name, raising=False)
    return SecretsDir.create(tmp_path / "secrets")


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def replicas(redis_url):
    """Start fake replicas: ``replicas("r1")`` -> (engine, loop); stopped at the end."""
    started = []

    def start(name: str = "r1"):
        engine = FakeEngine()
        loop = StepLoop(engine, CloudBus(redis_url, name), threading.Lock(), config=CloudConfig()).start()
        started.append(loop)
        return engine, loop

    yield start
    for loop in started:
        loop.stop(timeout_s=10)


@pytest.fixture
def gateway(redis_url, secrets_dir):
    """Start gateways on free ports: ``gateway(**CloudConfig fields)`` -> namespace(url, ws_url, token(sub, role),
    server); stopped at the end."""
    running = []

    def start(**fields):
        cfg = CloudConfig(redis_url=redis_url, secrets_dir=str(secrets_dir.path), **fields)
        relay = GatewayRelay(connect_async(redis_url), cfg.limits, cfg.gateway, gateway_id="g1")
        server = GatewayServer(cfg.model_dump(), relay=relay, cloud_handle=SimpleNamespace())  # never reached
        port = free_port()
        config = uvicorn.Config(gateway_api(server), host="127.0.0.1", port=port, log_level="warning")
        web = uvicorn.Server(config)
        thread = threading.Thread(target=web.run, daemon=True)
        thread.start()
        running.append((web, thread))
        eventually(lambda: web.started, "the gateway's start")
        key = secrets_dir.cluster_key()
        return SimpleNamespace(
            url=f"http://127.0.0.1:{port}",
            ws_url=f"ws://127.0.0.1:{port}/v1/ws",
            server=server,
            relay=relay,
            token=lambda sub="phone-1", role="device", **kw: mint(key, sub, role, **kw),
            device=lambda sub="phone-1", role="device": Device(f"ws://127.0.0.1:{port}/v1/ws", mint(key, sub, role)),
        )

    yield start
    for web, thread in running:
        web.should_exit = True
        thread.join(TIMEOUT_S)


# ---- authentication -----------------------------------------------------------------------------------


def test_a_missing_bad_or_expired_token_is_refused_before_the_socket_opens(gateway):
    gw = gateway()
    refusals = {
        "missing": None,
        "malformed": "not-a-token",
        "forged": mint(b"x" * 32, "phone-1"),
        "expired": gw.token(ttl_s=10, now=time.time() - 60),
    }
    for what, token in refusals.items():
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            Device(gw.ws_url, token)
        assert refused.value.status_code == 401, what
        assert b'"error"' in refused.value.resp_body, what
    assert b"expired" in refused.value.resp_body
    for role in ("device", "worker", "admin"):  # every role may connect
        gw.device(role=role).close()


def test_the_gateway_refuses_to_start_without_secrets(redis_url, monkeypatch):
    for name in (ENV_DIR, ENV_CLUSTER_KEY):
        monkeypatch.delenv(name, raising=False)
    cfg = CloudConfig(redis_url=redis_url)
    with pytest.raises(ConfigError, match="gateway cannot start"):
        GatewayServer(cfg.model_dump())
    with pytest.raises(ConfigError, match="gateway cannot start"):
        build_gateway_app(cfg)


def test_a_replica_full_of_connections_closes_new_ones_with_1013(gateway):
    gw = gateway(gateway={"max_connections": 1})
    first = gw.device()
    second = gw.device(sub="phone-2")
    code, reason = second.closed_with()
    assert code == 1013 and "maximum" in reason
    first.close()
    eventually(lambda: not gw.relay.connections, "the first connection's end")
    gw.device(sub="phone-2").close()  # room again


# ---- sessions end to end ------------------------------------------------------------------------------


def test_a_session_opens_steps_and_closes_through_the_gateway(gateway, replicas, r):
    engine, _ = replicas("r1")
    gw = gateway()
    phone = gw.device()
    phone.send(open_msg("s1", reply_to="someone-elses-list"))  # the gateway chooses where replies go
    first = phone.reply()
    assert isinstance(first, StepReply) and (first.session_id, first.step, first.replica) == ("s1", 0, "r1")
    ids, _ = first.top_k()
    assert ids[0].tolist() == [3, 4, 5]  # FakeEngine: three instruction words
    phone.send(step_msg("s1", 1, ids=(7, 8)))
    second = phone.reply()
    assert isinstance(second, StepReply) and second.step == 1 and second.top_k()[0][0].tolist() == [5, 6, 7]
    assert not r.exists(reply_key("someone-elses-list"))
    # the session is bound to the device by hashes only
    assert r.get(owner_key("s1")) is not None
    assert not [k for k in r.scan_iter(match="cg:*") if b"s1" in k or b"phone-1" in k]
    phone.send(CloseSession(session_id="s1"))
    eventually(lambda: "s1" not in engine.sessions, "the session's close on the replica")
    eventually(lambda: not r.exists(owner_key("s1")), "the owner key's delete")
    phone.close()


def test_a_batch_of_items_is_answered_item_by_item(gateway, replicas):
    replicas("r1")
    gw = gateway()
    phone = gw.device()
    phone.send(open_msg("a"), open_msg("b"), step_msg("a", 1))  # a step before its open's reply
    got = {(x.session_id, type(x).__name__): x for x in phone.replies(3)}
    assert (
        got[("a", "ErrorReply")].code == "bad_request" and "before the open's reply" in got[("a", "ErrorReply")].message
    )
    assert got[("a", "StepReply")].step == 0 and got[("b", "StepReply")].step == 0
    phone.send(step_msg("a", 1), step_msg("b", 1))
    steps = {x.session_id: x for x in phone.replies(2)}
    assert all(isinstance(x, StepReply) and x.step == 1 for x in steps.values())


def test_another_devices_session_is_forbidden(gateway, replicas):
    replicas("r1")
    gw = gateway()
    owner, thief = gw.device(sub="phone-1"), gw.device(sub="phone-2")
    owner.send(open_msg("mine"))
    assert isinstance(owner.reply(), StepReply)
    for msg in (
        step_msg("mine", 1),
        open_msg("mine"),
        open_msg("mine", resume=pack_ids([3, 4]), resume_step=1),
    ):
        thief.send(msg)
        answer = thief.reply()
        assert isinstance(answer, ErrorReply) and (answer.session_id, answer.code) == ("mine", "forbidden")
    thief.send(CloseSession(session_id="mine"), step_msg("mine", 1))
    answers = thief.replies(2)
    assert [a.code for a in answers if isinstance(a, ErrorReply)] == ["forbidden", "forbidden"]
    owner.send(step_msg("mine", 1))  # untouched
    assert isinstance(owner.reply(), StepReply)


def test_the_same_device_may_resume_its_session_on_a_new_connection(gateway, replicas):
    engine, _ = replicas("r1")
    gw = gateway()
    first = gw.device()
    first.send(open_msg("s"))
    assert isinstance(first.reply(), StepReply)
    first.close()
    eventually(lambda: "s" not in engine.sessions, "the close of a disconnected device's session")
    again = gw.device()
    again.send(open_msg("s", resume=pack_ids([3, 4, 5]), resume_step=2))
    resumed = again.reply()
    assert isinstance(resumed, StepReply) and resumed.step == 2


# ---- refusals -------------------------------------------------------------------------------------------


def test_a_device_over_its_rate_is_refused_rate_limited(gateway, replicas):
    replicas("r1")
    gw = gateway(gateway={"rate_per_s": 0.01, "burst": 2})
    phone = gw.device()
    phone.send(open_msg("a"), open_msg("b"), open_msg("c"))
    got = {x.session_id: x for x in phone.replies(3)}
    assert isinstance(got["a"], StepReply) and isinstance(got["b"], StepReply)
    assert isinstance(got["c"], ErrorReply) and got["c"].code == "rate_limited" and got["c"].retry_after_ms > 1000
    other = gw.device(sub="phone-2")  # the limit is per device
    other.send(open_msg("d"))
    assert isinstance(other.reply(), StepReply)


def test_oversized_and_garbage_frames_are_refused_and_the_connection_goes_on(gateway, replicas):
    replicas("r1")
    gw = gateway(limits={"max_message_bytes": 1024, "max_step_tokens": 4, "max_sessions_per_device": 2})
    phone = gw.device()
    phone.send(b"\x00garbage")
    assert phone.reply().code == "bad_request"
    phone.ws.send("text")
    assert phone.reply().code == "bad_request"  # a text frame
    phone.send(open_msg("big", instruction="x" * 2000))
    too_big = phone.reply()
    assert (too_big.session_id, too_big.code) == ("", "too_large")
    phone.send(open_msg("a"))
    assert isinstance(phone.reply(), StepReply)
    phone.send(step_msg("a", 1, ids=range(5)))
    assert phone.reply().code == "too_large"
    phone.send(open_msg("b"), open_msg("c"))  # two sessions per device at most
    got = {x.session_id: x for x in phone.replies(2)}
    assert isinstance(got["b"], StepReply) and got["c"].code == "busy" and got["c"].retry_after_ms > 0
    phone.send(step_msg("a", 1))
    assert isinstance(phone.reply(), StepReply)  # still usable
    phone.send(b"\x00" * 5000)  # far over the limit: answered, then the socket closes
    assert phone.reply().code == "too_large"
    assert phone.closed_with()[0] == 1009


# ---- faults -----------------------------------------------------------------------------------------------


def test_a_disconnect_closes_the_devices_sessions_on_their_replica(gateway, replicas, r):
    engine, _ = replicas("r1")
    gw = gateway()
    phone = gw.device()
    phone.send(open_msg("a"), open_msg("b"))
    phone.replies(2)
    assert set(engine.sessions) == {"a", "b"}
    conn = next(iter(gw.relay.connections.values()))
    phone.close()
    eventually(lambda: not engine.sessions, "the sessions' close on the replica")
    eventually(lambda: not gw.relay.connections, "the connection's end")
    assert not r.exists(owner_key("a"), owner_key("b"), reply_key(conn.reply_to))
    assert gw.relay.sessions_of == {}


def test_a_dead_replica_is_answered_replica_lost_and_the_session_resumes_elsewhere(gateway, replicas, r):
    _, loop = replicas("r1")
    gw = gateway()
    phone = gw.device()
    phone.send(open_msg("s"))
    assert phone.reply().replica == "r1"
    loop.stop(timeout_s=10)  # r1 stops reading; its heartbeat is gone
    r.delete(alive_key("r1"))
    phone.send(step_msg("s", 1))
    lost = phone.reply()
    assert isinstance(lost, ErrorReply) and (lost.session_id, lost.step, lost.code) == ("s", 1, "replica_lost")
    replicas("r2")
    phone.send(open_msg("s", resume=pack_ids([5]), resume_step=1))
    resumed = phone.reply()
    assert isinstance(resumed, StepReply) and (resumed.step, resumed.replica) == (1, "r2")
    phone.send(step_msg("s", 2))
    assert phone.reply().replica == "r2"


# ---- health, stats, outlines ------------------------------------------------------------------------------


def test_health_and_stats_show_details_to_admins_only(gateway):
    gw = gateway()
    phone = gw.device()
    admin = {"Authorization": f"Bearer {gw.token('ops', 'admin')}"}
    device = {"Authorization": f"Bearer {gw.token()}"}
    with httpx.Client(base_url=gw.url, timeout=TIMEOUT_S) as http:
        assert http.get("/healthz").json() == {"ok": True}
        assert http.get("/healthz", headers=device).json() == {"ok": True}
        details = http.get("/healthz", headers=admin).json()
        assert details["ok"] and details["redis"] and details["gateway"] == "g1" and details["connections"] == 1
        assert http.get("/v1/stats").status_code == 401
        assert http.get("/v1/stats", headers=device).status_code == 403
        stats = http.get("/v1/stats", headers=admin).json()
        assert stats["connections"] == 1 and stats["refused"] == {}
    phone.close()


def test_outline_routes_need_a_token_and_spend_the_rate(gateway):
    gw = gateway(gateway={"rate_per_s": 0.01, "burst": 1}, limits={"max_body_bytes": 1024})
    device = {"Authorization": f"Bearer {gw.token()}"}
    with httpx.Client(base_url=gw.url, timeout=TIMEOUT_S) as http:
        assert http.post("/v1/sketch", json={}).status_code == 401
        chat = http.post("/v1/chat/completions", json={})
        assert chat.status_code == 401 and chat.json()["error"]["code"] == "unauthorized"
        first = http.post("/v1/sketch", content=b"x" * 2000, headers=device)
        assert first.status_code == 413  # handed on to the outline route, which checks the body's size
        limited = http.post("/v1/chat/completions", json={}, headers=device)
        assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
        assert limited.json()["error"]["code"] == "rate_limited"
