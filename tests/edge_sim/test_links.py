"""The links' typed seam (items in, arrivals out) and the HTTP links on a stand-in transport.

The real servers are exercised by tests/cluster/test_local.py (stateless) and `cogenesis bench exchange
--with-vllm` (README: Benchmarks)."""

import json
import time
import uuid

import httpx
import msgspec
import numpy as np
import pytest
import redis
from transformers import AutoTokenizer

from cogenesis.cluster.bus import Sealed
from cogenesis.core import prompts
from cogenesis.core.config import EdgeConfig
from cogenesis.core.errors import BusTimeout, PrivacyViolation, ProtocolError, SessionError
from cogenesis.core.protocol import (
    CompletionsRequest,
    ErrorReply,
    StatelessRequest,
    StepReply,
    encode,
    pack_ids,
    pack_logprobs,
    unpack_ids,
)
from cogenesis.edge_sim.gate import OutboundGate
from cogenesis.edge_sim.links import Arrival, Failure, OpenAILink, Opening, StatelessLink, Step

PUBLIC = "Write a birthday message for my colleague"


class _Tok:
    def decode(self, ids):
        return " ".join(map(str, ids))


class _SpyGate(OutboundGate):
    """The real gate, remembering every payload it sealed."""

    def __init__(self, public: str = PUBLIC, private=()) -> None:
        super().__init__(public, list(private))
        self.made: list[Sealed] = []

    def seal(self, msg, prompt_text=None):
        self.made.append(super().seal(msg, prompt_text))
        return self.made[-1]

    def seal_json(self, msg, prompt_text=None):
        self.made.append(super().seal_json(msg, prompt_text))
        return self.made[-1]


def _openai(handler):
    link = OpenAILink("http://vllm.invalid", "m", _Tok(), max_concurrency=2)
    link.http = httpx.Client(transport=httpx.MockTransport(handler))
    return link


def test_completions_post_the_sealed_body_and_top_logprobs_become_a_step_reply():
    bodies: list[bytes] = []

    def handler(request):
        bodies.append(request.content)
        assert request.headers["content-type"] == "application/json"
        return httpx.Response(
            200,
            json={
                "choices": [
                    {"logprobs": {"top_logprobs": [{"token_id:7": -2.0, "token_id:3": -0.5, "token_id:11": -1.0}]}}
                ]
            },
        )

    link, gate = _openai(handler), _SpyGate()
    link._prompt["s"] = ([1, 2, 3], "1 2 3")  # the session's cloud prompt (ids, text)
    try:
        link.request([Step("s", 1, (4,), (4,), "", gate)], EdgeConfig(top_k=3))
        (arrival,) = link.collect(["s"], EdgeConfig(top_k=3))
    finally:
        link.shutdown()
    assert bodies == [gate.made[0].payload]  # exactly the bytes the gate sealed
    assert json.loads(bodies[0]) == {
        "model": "m",
        "prompt": [1, 2, 3, 4],
        "logprobs": 3,
        "max_tokens": 1,
        "temperature": 0.0,
        "return_tokens_as_token_ids": True,
    }  # the completions API's JSON: no session id, no clock
    reply = arrival.reply
    assert isinstance(reply, StepReply) and reply.step == 4
    ids, lps = reply.top_k()
    assert ids.tolist() == [[3, 11, 7]] and np.allclose(lps, [[-0.5, -1.0, -2.0]])
    assert not reply.traced and arrival.received_us is not None  # untraced: round trips only
    assert arrival.exchange_overhead_us() is None


def test_the_completions_prompt_is_checked_by_the_gate():
    link, gate = (
        _openai(lambda request: httpx.Response(500)),
        _SpyGate(PUBLIC, ["she lives at 42 Willow Lane, Portland"]),
    )
    link._prompt["s"] = ([1, 2], "she lives at 42 Willow Lane")
    try:
        with pytest.raises(PrivacyViolation):
            link.request([Step("s", 1, (4,), (4,), "", gate)], EdgeConfig(top_k=3))
    finally:
        link.shutdown()
    assert gate.made == []
    with pytest.raises(TypeError, match="decoded text"):
        gate.seal_json(CompletionsRequest(model="m", prompt=[1], logprobs=1))


@pytest.mark.parametrize(
    "status, body, error", [(500, {"error": "boom"}, SessionError), (200, {"choices": []}, ProtocolError)]
)
def test_bad_replies_are_clear_errors(status, body, error):
    link = _openai(lambda request: httpx.Response(status, json=body))
    try:
        with pytest.raises(error):
            link._reply(httpx.Response(status, json=body), "s", 1)
    finally:
        link.shutdown()


@pytest.mark.parametrize("link_type", [StatelessLink, OpenAILink])
@pytest.mark.parametrize("forged", [b"raw bytes", "text", None], ids=["bytes", "str", "none"])
def test_http_links_post_nothing_but_sealed_payloads(link_type, forged):
    posted = []
    link = link_type("http://cloud.invalid", *(["m"] if link_type is OpenAILink else []), _Tok())
    link.http = httpx.Client(
        transport=httpx.MockTransport(lambda request: posted.append(request) or httpx.Response(500))
    )
    try:
        with pytest.raises(TypeError, match="sealed by the outbound gate"):
            link._post(forged, "s", 1, 5.0)
    finally:
        link.shutdown()
    assert posted == []


def test_failures_say_what_went_wrong_and_leave_as_codes():
    timeout = Failure.of(BusTimeout("no reply for step 3", hint="is the cloud up?"))
    assert timeout == Failure("no reply for step 3", "timeout")
    assert Failure.of(ValueError("bad")) == Failure("ValueError: bad", "internal")
    assert Failure.of(SessionError("cloud refused")).code == "cloud_error"


def test_arrivals_trace_the_overhead_on_the_edges_clock():
    reply = StepReply(
        session_id="s", step=1, replica="r", ids=b"", logprobs=b"", server_us=900, model_us=800, queue_us=100
    )
    waited = Arrival("s", reply, sent_us=1_000, received_us=3_000)  # arrived while the edge waited
    assert waited.exchange_overhead_us() == 2_000 - 800 - 100
    found = Arrival("s", reply, sent_us=1_000, received_us=9_300, waited_from_us=9_000)  # was already there
    assert found.exchange_overhead_us() == 300
    assert Arrival("s", reply, sent_us=1_000).exchange_overhead_us() is None  # untimed (in-process)
    assert Arrival("s", Failure("x", "timeout"), 1, 2).exchange_overhead_us() is None


def test_stateless_link_takes_items_and_returns_timed_arrivals(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    posted: list[list[int]] = []
    bodies: list[bytes] = []

    def handler(request):
        bodies.append(request.content)
        req = msgspec.msgpack.decode(request.content, type=StatelessRequest)
        posted.append(unpack_ids(req.tokens).tolist())
        if req.session_id == "bad":
            return httpx.Response(200, content=encode(ErrorReply(session_id="bad", step=0, code="busy", message="x")))
        top = StepReply(
            session_id=req.session_id, step=0, replica="r1", ids=pack_ids([4, 5]), logprobs=pack_logprobs([-0.1, -1])
        )
        return httpx.Response(200, content=encode(top))

    link = StatelessLink("http://cloud.invalid", tok, max_concurrency=2)
    link.http = httpx.Client(transport=httpx.MockTransport(handler))
    gate, cfg = _SpyGate(), EdgeConfig(top_k=2)
    try:
        link.open([Opening("s", 0, PUBLIC, gate), Opening("bad", 1, PUBLIC, gate)], cfg)
        opened = {a.session_id: a for a in link.collect(["s", "bad"], cfg)}
        link.request([Step("s", 1, (4,), (4,), "r1", gate)], cfg)
        (stepped,) = link.collect(["s"], cfg)
    finally:
        link.shutdown()
    prompt = prompts.cloud_prompt_ids(tok, PUBLIC)
    assert posted[0] == prompt and posted[-1] == prompt + [4]  # the whole public sequence, every step
    assert opened["bad"].reply == Failure("cloud refused session bad: busy: x", "cloud_error")
    for a in (opened["s"], stepped):
        assert isinstance(a.reply, StepReply) and a.reply.top_k()[0].tolist() == [[4, 5]]
        assert a.received_us is not None and 0 < a.sent_us <= a.received_us  # timed: the loop traces it
        assert a.waited_from_us == 0  # timed by the thread that received it: exact
    assert gate.sealed == 3  # every request was sealed, each with the prompt text it carries
    assert sorted(bodies) == sorted(m.payload for m in gate.made)  # and went out exactly as sealed
    sent = [msgspec.msgpack.decode(b, type=StatelessRequest) for b in bodies]
    assert {r.budget_ms for r in sent} == {int(cfg.step_timeout_s * 1000)}  # a budget, not the edge's clock


# ---- what the cloud sees of a device over the bus ----------------------------------------------------------


def _looks_like_a_clock(value: object) -> bool:
    """An integer within a day of now, in seconds, milliseconds, microseconds or nanoseconds."""
    if not isinstance(value, int) or isinstance(value, bool):
        return False
    now = time.time()
    return any(abs(value - now * scale) < 86_400 * scale for scale in (1, 1e3, 1e6, 1e9))


def _fields(payload: bytes) -> dict:
    return msgspec.msgpack.decode(payload)


def test_bus_sessions_of_one_device_share_nothing_but_the_public_instruction(redis_url):
    """What the cloud reads of two sessions of one client (each on a link of its own, as a fleet client
    or a Locust user runs them) has nothing in common that a session of another client lacks, except the
    public instruction; and no field reads the device's clock."""
    from cogenesis.cluster.bus import OPEN_STREAM, EdgeBus, in_stream
    from cogenesis.edge_sim.links import BusLink

    cfg = EdgeConfig(top_k=4, step_timeout_s=30)
    other = "Write a poem about the sea"
    bus = EdgeBus(redis_url)
    try:
        for client, instruction in ((7, PUBLIC), (7, PUBLIC), (8, other)):
            link, session_id = BusLink(bus), uuid.uuid4().hex  # the session loop's ids
            gate = OutboundGate(instruction, ["Dana Whitfield, 42 Willow Lane"])
            link.open([Opening(session_id, client, instruction, gate)], cfg)
            link.request([Step(session_id, 1, (5, 6), (5, 6), "r1", gate)], cfg)
    finally:
        bus.close()
    r = redis.Redis.from_url(redis_url)
    opens = [_fields(f[b"m"]) for _, f in r.xrange(OPEN_STREAM)]
    steps = [_fields(f[b"m"]) for _, f in r.xrange(in_stream("r1"))]
    assert len(opens) == len(steps) == 3
    for msg in opens + steps:
        assert not any(_looks_like_a_clock(v) for v in msg.values()), msg
        assert not {"sent_us", "deadline_ms", "client", "seed"} & set(msg), msg
        assert msg["budget_ms"] == 30_000
    for same, apart in ((opens[0], opens[1]), (steps[0], steps[1])):
        common = {k for k in same if same[k] == apart.get(k)}  # what one device's two sessions share ...
        b = opens[2] if "instruction" in same else steps[2]
        shared_by_all = {k for k in same if same[k] == b.get(k)}  # ... beyond the run's settings
        assert common - shared_by_all <= {"instruction"}, common - shared_by_all
    assert opens[0]["reply_to"] != opens[1]["reply_to"] and opens[0]["session_id"] != opens[1]["session_id"]
