"""The Serve shim over a fake engine: a real Ray Serve app (``build_app`` through ``LocalCluster``) and a real
Redis, with a deterministic engine in place of the model, so every reply can be checked exactly."""

import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import msgspec
import numpy as np
import pytest
import ray.cloudpickle

from cogenesis.cluster.bus import EdgeBus
from cogenesis.cluster.local import LocalCluster
from cogenesis.core.config import CloudConfig
from cogenesis.core.errors import SessionError, UnknownSession
from cogenesis.core.protocol import (
    CloseSession,
    ErrorReply,
    OpenSession,
    SketchReply,
    StatelessRequest,
    StepReply,
    StepRequest,
    deadline_in,
    encode,
    pack_ids,
)
from cogenesis.deployments.engine import TopK
from cogenesis.edge_sim.gate import OutboundGate

pytestmark = pytest.mark.slow


class FakeEngine:
    """A deterministic CloudEngine: after n context tokens the top-k are the ids n, n+1, ... with
    log-probabilities 0, -1, ...; an open's context is its instruction's word count."""

    def __init__(self) -> None:
        self.sessions: dict[str, tuple[int, int]] = {}  # session -> (context length, top_k)
        self.yield_point = None
        self.sketch_calls = 0

    @staticmethod
    def top(context_len: int, top_k: int) -> TopK:
        ids = np.arange(context_len, context_len + top_k, dtype=np.int32)[None]
        logprobs = -np.arange(top_k, dtype=np.float32)[None]
        return TopK(ids, logprobs, np.zeros(0, np.int32), context_len, 1.5)

    def open_many(self, requests):
        out = []
        for r in requests:
            if not r.instruction.strip():
                out.append(SessionError("empty instruction"))
                continue
            self.sessions[r.session_id] = (len(r.instruction.split()), r.top_k)
            out.append(self.top(*self.sessions[r.session_id]))
        return out

    def step_many(self, requests):
        out = []
        for r in requests:
            if r.session_id not in self.sessions:
                out.append(UnknownSession(f"unknown session {r.session_id}"))
                continue
            context, top_k = self.sessions[r.session_id]
            self.sessions[r.session_id] = (context + len(r.tokens), top_k)
            out.append(self.top(*self.sessions[r.session_id]))
        return out

    def close(self, session_id):
        return self.sessions.pop(session_id, None) is not None

    def sketch(self, requests):
        self.sketch_calls += 1
        if any(not r.instruction.strip() for r in requests):
            raise SessionError("empty instruction", hint="send the general instruction to outline")
        return [
            SketchReply(request_id=r.request_id, sketch=f"outline of {r.instruction}", tokens=len(r.instruction))
            for r in requests
        ]

    def stateless_top_k(self, token_ids, top_k):
        if not token_ids:
            raise SessionError("stateless request carries invalid token ids")
        return self.top(len(token_ids), top_k)

    def stats(self):
        return {
            "active_sessions": len(self.sessions),
            "sketch_calls": self.sketch_calls,
            "yield_point": callable(self.yield_point),
        }

    def set_yield_point(self, yield_point):
        self.yield_point = yield_point

    def shutdown(self):
        self.sessions.clear()


def fake_engine(cfg: CloudConfig) -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def cloud(redis_server):
    """One Ray + Serve for the module: the shim over ``fake_engine`` (pickled by value: this test module is
    not importable in a replica)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = CloudConfig(replica_cpus=0.25, sketch_batch_wait_s=0.2)
    local = LocalCluster(cfg, redis_url=redis_server.url, start_timeout_s=240, engine_factory=fake_engine)
    info = local.start()
    replica = httpx.get(f"{info.http_url}/healthz", timeout=30).json()["replica"]
    yield info, replica
    local.stop()
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _send(bus, replica, msg):
    bus.send_many([(replica, msg.session_id, OutboundGate(" ", []).seal(msg))])


def _reply(bus, session_id, step):
    return bus.wait_many({session_id: step}, deadline_in(30))[session_id]


def test_healthz_names_the_replica(cloud):
    info, replica = cloud
    assert httpx.get(f"{info.http_url}/healthz", timeout=30).json() == {"ok": True, "replica": replica}


def test_sketch_serves_a_batch_and_refuses_only_its_bad_request(cloud):
    info, _ = cloud
    bodies = [{"type": "sketch", "request_id": str(i), "instruction": f"write note {i}"} for i in range(3)]
    bodies.append({"type": "sketch", "request_id": "bad", "instruction": "  "})
    with ThreadPoolExecutor(len(bodies)) as pool:  # concurrent: Serve batches them (sketch_batch_wait_s)
        answers = list(pool.map(lambda b: httpx.post(f"{info.http_url}/v1/sketch", json=b, timeout=30), bodies))
    assert [a.status_code for a in answers] == [200, 200, 200, 422]
    for i, a in enumerate(answers[:3]):
        reply = msgspec.json.decode(a.content, type=SketchReply)
        assert reply.request_id == str(i) and reply.sketch == f"outline of write note {i}" and reply.tokens == 12
    assert answers[3].json() == {"error": "empty instruction", "hint": "send the general instruction to outline"}
    malformed = httpx.post(f"{info.http_url}/v1/sketch", content=b"{not json", timeout=30)
    assert malformed.status_code == 400 and "malformed SketchRequest" in malformed.json()["error"]


def test_stateless_returns_the_engines_top_k_traced(cloud):
    info, replica = cloud
    req = StatelessRequest(session_id="x", tokens=pack_ids([5, 6, 7]), top_k=3, budget_ms=30_000)
    answer = httpx.post(f"{info.http_url}/v1/stateless", content=encode(req), timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/msgpack"
    reply = msgspec.msgpack.decode(answer.content, type=StepReply)
    ids, logprobs = reply.top_k()
    assert (reply.session_id, reply.step, reply.replica, reply.prompt_tokens) == ("x", 3, replica, 3)
    assert ids.tolist() == [[3, 4, 5]] and logprobs.tolist() == [[0.0, -1.0, -2.0]] and reply.drafts().size == 0
    assert reply.compute_ms == 1.5
    assert reply.traced and 0 <= reply.model_us <= reply.server_us and reply.queue_us == 0  # served on arrival


def test_stateless_bad_requests_get_typed_errors(cloud):
    info, _ = cloud
    url = f"{info.http_url}/v1/stateless"

    def post(body: bytes) -> tuple[int, ErrorReply]:
        answer = httpx.post(url, content=body, timeout=30)
        return answer.status_code, msgspec.msgpack.decode(answer.content, type=ErrorReply)

    status, junk = post(b"junk")
    assert status == 400 and junk.code == "bad_request"
    status, empty = post(encode(StatelessRequest(session_id="e", tokens=b"", top_k=3, budget_ms=30_000)))
    assert status == 422 and (empty.session_id, empty.code) == ("e", "bad_request")
    assert "invalid token ids" in empty.message
    late = StatelessRequest(session_id="l", tokens=pack_ids([1, 2]), top_k=3, budget_ms=0)  # spent on arrival
    status, refused = post(encode(late))
    assert status == 422 and (refused.session_id, refused.step, refused.code) == ("l", 2, "deadline")


def test_logits_session_over_the_bus(cloud):
    info, replica = cloud
    bus = EdgeBus(info.redis_url)
    try:
        _send(bus, None, OpenSession(session_id="s", instruction="write a haiku", top_k=4, budget_ms=30_000))
        first = _reply(bus, "s", 0)
        assert isinstance(first, StepReply) and (first.replica, first.prompt_tokens) == (replica, 3)
        assert first.top_k()[0].tolist() == [[3, 4, 5, 6]]
        step = StepRequest(session_id="s", step=1, tokens=pack_ids([9, 9]), budget_ms=30_000)
        _send(bus, replica, step)
        second = _reply(bus, "s", 1)
        assert (
            isinstance(second, StepReply) and second.prompt_tokens == 5 and second.top_k()[0].tolist() == [[5, 6, 7, 8]]
        )
        _send(bus, replica, CloseSession(session_id="s"))
        _send(bus, replica, StepRequest(session_id="s", step=2, tokens=pack_ids([1]), budget_ms=30_000))
        gone = _reply(bus, "s", 2)
        assert isinstance(gone, SessionError) and "unknown_session: unknown session s" in str(gone)
        _send(bus, None, OpenSession(session_id="e", instruction=" ", top_k=4, budget_ms=30_000))
        refused = _reply(bus, "e", 0)
        assert isinstance(refused, SessionError) and "bad_request: empty instruction" in str(refused)
    finally:
        bus.close()


def test_stats_merge_the_engine_and_the_step_loop(cloud):
    info, replica = cloud

    def stats() -> dict:
        return httpx.get(f"{info.http_url}/v1/stats", timeout=30).json()

    before = stats()
    assert before["replica"] == replica and before["metrics"].startswith("127.0.0.1:")
    assert before["yield_point"] is True  # the shim installed its lock's yield point through the protocol
    bus = EdgeBus(info.redis_url)
    try:
        _send(bus, None, OpenSession(session_id="t", instruction="count me", top_k=2, budget_ms=30_000))
        assert isinstance(_reply(bus, "t", 0), StepReply)
    finally:
        bus.close()
    after = stats()
    assert after["active_sessions"] == before["active_sessions"] + 1
    assert (after["bus_requests"], after["bus_errors"]) == (before["bus_requests"] + 1, before["bus_errors"])
