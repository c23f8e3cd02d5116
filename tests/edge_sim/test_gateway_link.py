"""GatewayLink's own behaviour against a stand-in gateway: a real WebSocket server (``websockets``) in this process
that speaks the device protocol (binary msgpack frames, a bearer token at the upgrade) and answers from a script.

The real gateway (deployments/gateway.py) and its relay are tested with a real Redis and replicas in
tests/deployments; the SDK through them in tests/edge_sim/test_sdk.py."""

from __future__ import annotations

import threading
import time
from http import HTTPStatus

import pytest
from websockets.sync.server import serve

from cogenesis.core.config import EdgeConfig, LimitsConfig
from cogenesis.core.errors import AuthError, ClusterError, Forbidden
from cogenesis.core.protocol import (
    CloseSession,
    ErrorReply,
    OpenSession,
    ReplyBatch,
    StepBatch,
    StepReply,
    StepRequest,
    decode_request,
    encode,
    pack_ids,
    pack_logprobs,
)
from cogenesis.edge_sim.gate import OutboundGate
from cogenesis.edge_sim.gateway_link import DeviceLinks, GatewayLink, failure_of, frames, ws_url
from cogenesis.edge_sim.links import Closing, Failure, Opening, Step

PUBLIC = "Write a birthday message for my colleague"
TOKEN = "cgt1.good.token"
CFG = EdgeConfig(top_k=2, step_timeout_s=5.0)


class _SpyGate(OutboundGate):
    """The real gate, remembering every payload it sealed."""

    def __init__(self) -> None:
        super().__init__(PUBLIC, [])
        self.made: list[bytes] = []

    def seal(self, msg, prompt_text=None):
        sealed = super().seal(msg, prompt_text)
        self.made.append(sealed.payload)
        return sealed


def _top(sid: str, step: int) -> StepReply:
    return StepReply(
        session_id=sid,
        step=step,
        replica="r1",
        ids=pack_ids([7, 8]),
        logprobs=pack_logprobs([-0.1, -2.0]),
        server_us=50,
        model_us=20,
    )


class FakeGateway:
    """Answers every open and step with a top-k (one ReplyBatch per frame), unless ``script`` says otherwise:
    ``script[(kind, step)]`` is an ErrorReply code to answer instead, or "drop" (close the connection), or "mute"
    (no answer). Records every frame and the Authorization header of every upgrade."""

    def __init__(self, auth_status: HTTPStatus | None = None, close_code: int | None = None) -> None:
        self.frames: list[bytes] = []
        self.auth: list[str | None] = []
        self.script: dict[tuple[str, int], str] = {}
        self.auth_status, self.close_code = auth_status, close_code
        self.connections = 0
        self.server = serve(self._handle, "127.0.0.1", 0, process_request=self._upgrade)
        self.url = f"http://127.0.0.1:{self.server.socket.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _upgrade(self, connection, request):
        self.auth.append(request.headers.get("Authorization"))
        if request.path != "/v1/ws":
            return connection.respond(HTTPStatus.NOT_FOUND, "no such route\n")
        if self.auth_status is not None:
            return connection.respond(self.auth_status, "token refused\n")
        return None

    def _handle(self, connection) -> None:
        self.connections += 1
        if self.close_code is not None:
            connection.close(self.close_code, "token expired")
            return
        for frame in connection:
            assert isinstance(frame, bytes), "device frames are binary"
            self.frames.append(frame)
            msg = decode_request(frame)
            items = [decode_request(i) for i in msg.items] if isinstance(msg, StepBatch) else [msg]
            replies: list[StepReply | ErrorReply] = []
            for item in items:
                if isinstance(item, CloseSession):
                    continue
                kind, step = ("open", item.resume_step) if isinstance(item, OpenSession) else ("step", item.step)
                assert item.reply_to == "", "a device never names a reply list"
                action = self.script.pop((kind, step), None)
                if action == "drop":
                    connection.close()
                    return
                if action == "mute":
                    continue
                if action is not None:
                    replies.append(
                        ErrorReply(session_id=item.session_id, step=step, code=action, message="x", retry_after_ms=250)
                    )
                else:
                    replies.append(_top(item.session_id, step))
            if replies:
                connection.send(encode(ReplyBatch(items=replies)))

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


@pytest.fixture
def gateway():
    gw = FakeGateway()
    yield gw
    gw.stop()


def _wait_for(done, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        time.sleep(0.01)


def _open(link: GatewayLink, sids, gate, resume_step=0):
    link.open([Opening(sid, 0, PUBLIC, gate, resume_step=resume_step) for sid in sids], CFG)


def test_urls_become_the_gateways_websocket_endpoint():
    assert ws_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/v1/ws"
    assert ws_url("https://gw.example/devices/") == "wss://gw.example/devices/v1/ws"
    assert ws_url("ws://h:1/v1/ws") == "ws://h:1/v1/ws"
    with pytest.raises(ClusterError):
        ws_url("redis://127.0.0.1:6379")


def test_a_round_goes_as_one_frame_of_sealed_bytes_and_replies_are_filed_per_session(gateway):
    gate = _SpyGate()
    with GatewayLink(gateway.url, TOKEN) as link:
        _open(link, ["a", "b"], gate)
        arrivals = {a.session_id: a for a in link.collect(["a", "b"], CFG)}
        link.request([Step("a", 1, (5,), (5,), "r1", gate), Step("b", 1, (6,), (6,), "ignored-replica", gate)], CFG)
        steps = {a.session_id: a for a in link.collect(["b", "a"], CFG)}
        link.close([Closing("a", "r1", gate), Closing("b", "r1", gate)])
        _wait_for(lambda: len(gateway.frames) == 3)
    assert gateway.auth[0] == f"Bearer {TOKEN}"
    assert len(gateway.frames) == 3  # opens, steps, closes: one frame each round
    batch = decode_request(gateway.frames[1])
    assert isinstance(batch, StepBatch)
    assert batch.items == gate.made[2:4]  # exactly the bytes the gate sealed
    for item in map(decode_request, batch.items):
        assert isinstance(item, StepRequest) and item.reply_to == ""  # no reply list, no replica named
    assert {sid: a.reply.step for sid, a in arrivals.items()} == {"a": 0, "b": 0}
    assert {sid: a.reply.step for sid, a in steps.items()} == {"a": 1, "b": 1}
    for a in steps.values():
        assert isinstance(a.reply, StepReply)
        assert a.received_us is not None and a.received_us >= a.sent_us  # timed by the reader on the edge's clock
        assert a.exchange_overhead_us() is not None
    assert isinstance(decode_request(gateway.frames[2]), StepBatch)  # the closes


@pytest.mark.parametrize(
    "code, expect",
    [
        ("replica_lost", ("replica_lost", "replica_lost", None)),
        ("unknown_session", ("cloud_error", "unknown_session", None)),
        ("busy", ("busy", None, 0.25)),
        ("rate_limited", ("rate_limited", None, 0.25)),
        ("unavailable", ("unreachable", None, 0.25)),
        ("forbidden", ("forbidden", None, None)),
        ("too_large", ("cloud_error", None, None)),
        ("bad_request", ("cloud_error", None, None)),
        ("deadline", ("cloud_error", None, None)),
    ],
)
def test_error_replies_become_the_failures_the_session_loop_acts_on(gateway, code, expect):
    gate = _SpyGate()
    gateway.script[("step", 1)] = code
    with GatewayLink(gateway.url, TOKEN) as link:
        _open(link, ["s"], gate)
        link.collect(["s"], CFG)
        link.request([Step("s", 1, (5,), (5,), "r1", gate)], CFG)
        (arrival,) = link.collect(["s"], CFG)
    failure = arrival.reply
    assert isinstance(failure, Failure)
    assert (failure.code, failure.resume, failure.retry_after_s) == expect
    assert failure_of(ErrorReply(session_id="s", step=1, code=code, message="x", retry_after_ms=250)) == failure


@pytest.mark.parametrize("status, error", [(HTTPStatus.UNAUTHORIZED, AuthError), (HTTPStatus.FORBIDDEN, Forbidden)])
def test_a_refused_token_is_a_clear_error_at_connect(status, error):
    gw = FakeGateway(auth_status=status)
    try:
        with pytest.raises(error) as info:
            GatewayLink(gw.url, "cgt1.bad.token")
    finally:
        gw.stop()
    assert "token" in (info.value.hint or "")
    assert "cgt1.bad.token" not in str(info.value)  # the token is never in a message


def test_a_close_for_a_refused_token_fails_sessions_without_retry():
    gw = FakeGateway(close_code=4401)
    try:
        link = GatewayLink(gw.url, TOKEN)
        _open(link, ["s"], _SpyGate())
        (arrival,) = link.collect(["s"], CFG)
        _open(link, ["t"], _SpyGate())  # no reconnect with a refused token
        (again,) = link.collect(["t"], CFG)
        link.shutdown()
    finally:
        gw.stop()
    assert isinstance(arrival.reply, Failure) and arrival.reply.code == "unauthorized" and arrival.reply.resume is None
    assert isinstance(again.reply, Failure) and again.reply.code == "unauthorized"
    assert gw.connections == 1


def test_a_dropped_connection_fails_sessions_resumable_and_the_next_send_reconnects(gateway):
    gate = _SpyGate()
    gateway.script[("step", 1)] = "drop"
    with GatewayLink(gateway.url, TOKEN, reconnect_s=5) as link:
        _open(link, ["s"], gate)
        link.collect(["s"], CFG)
        link.request([Step("s", 1, (5,), (5,), "r1", gate)], CFG)
        (lost,) = link.collect(["s"], CFG)
        _open(link, ["s"], gate, resume_step=1)  # what the session loop does with it: a resume, on a new connection
        (resumed,) = link.collect(["s"], CFG)
    assert isinstance(lost.reply, Failure) and lost.reply.resume is not None
    assert isinstance(resumed.reply, StepReply) and resumed.reply.step == 1
    assert gateway.connections == 2


def test_a_stale_unknown_session_does_not_answer_the_resume_that_replaced_it(gateway):
    gate = _SpyGate()
    with GatewayLink(gateway.url, TOKEN) as link:
        _open(link, ["s"], gate)
        link.collect(["s"], CFG)
        link._file([ErrorReply(session_id="s", step=1, code="unknown_session", message="late")], 1)
        gateway.script[("open", 1)] = "mute"  # the resume's answer comes later, by hand
        _open(link, ["s"], gate, resume_step=1)
        link._file([ErrorReply(session_id="s", step=1, code="unknown_session", message="late")], 2)
        link._file([_top("s", 1)], 3)
        (arrival,) = link.collect(["s"], CFG)
    assert isinstance(arrival.reply, StepReply) and arrival.received_us == 3


def test_no_answer_in_time_is_a_timeout(gateway):
    gateway.script[("open", 0)] = "mute"
    with GatewayLink(gateway.url, TOKEN) as link:
        _open(link, ["s"], _SpyGate())
        (arrival,) = link.collect(["s"], EdgeConfig(step_timeout_s=0.3))
    assert isinstance(arrival.reply, Failure) and arrival.reply.code == "timeout"


def test_an_unreachable_gateway_is_a_cluster_error():
    with pytest.raises(ClusterError, match="cannot reach the gateway"):
        GatewayLink("http://127.0.0.1:9", TOKEN, connect_timeout_s=2)


def test_frames_split_at_the_limits():
    limits = LimitsConfig(max_batch_items=2, max_message_bytes=1024)
    payloads = [bytes([i]) * 400 for i in range(7)]
    out = frames(payloads, limits)
    groups = [decode_request(f).items for f in out[:-1]] + [[out[-1]]]  # the last payload goes alone, unwrapped
    assert [len(g) for g in groups] == [2, 2, 2, 1]
    assert [p for g in groups for p in g] == payloads
    assert all(len(f) <= 1024 for f in out)
    bigger = frames(payloads, LimitsConfig(max_message_bytes=1024))
    assert all(len(f) <= 1024 for f in bigger) and len(bigger) == 4  # bytes bound it too
    assert frames([b"x"], limits) == [b"x"]  # one message alone: its sealed bytes, no envelope


def test_device_links_give_each_device_its_own_connection_and_token(gateway):
    gate = _SpyGate()
    links = DeviceLinks(gateway.url, lambda client: f"cgt1.device-{client}.sig")
    try:
        links.open([Opening("a", 0, PUBLIC, gate), Opening("b", 1, PUBLIC, gate)], CFG)
        got = links.collect(["a", "b"], CFG)
        links.request([Step("a", 1, (5,), (5,), "r1", gate), Step("b", 1, (6,), (6,), "r1", gate)], CFG)
        got += links.collect(["a", "b"], CFG)
        links.close([Closing("a", "r1", gate), Closing("b", "r1", gate)])
    finally:
        links.shutdown()
    assert sorted(gateway.auth) == ["Bearer cgt1.device-0.sig", "Bearer cgt1.device-1.sig"]
    assert all(isinstance(a.reply, StepReply) for a in got) and len(got) == 4
