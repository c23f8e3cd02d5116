"""The one sketch path: gate-sealed outline requests to an outline source, the answer written on the device."""

import httpx
import msgspec
import pytest

from cogenesis.core.config import EdgeConfig
from cogenesis.core.errors import ClusterError, PrivacyViolation, SessionError
from cogenesis.core.models import load_causal_lm
from cogenesis.core.protocol import SketchReply, SketchRequest
from cogenesis.edge_sim.client import EdgeClient
from cogenesis.edge_sim.device import DeviceProfile, ProfileDevice, SharedDevice
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.sketch import HttpOutlines, Outline, write_sketch, write_sketches


class FakeOutlines:
    """Outlines written from the request alone; a client index in ``failing`` gets an error instead."""

    def __init__(self, failing: dict[int, Exception] | None = None) -> None:
        self.failing = failing or {}
        self.calls: list[list] = []

    def outlines(self, requests):
        self.calls.append(list(requests))
        return [self.failing.get(r.client) or Outline(f"1. {r.request.instruction}", 5, 0.25) for r in requests]


def cfg(**kw):
    return EdgeConfig(max_new_tokens=6, max_prompt_tokens=256, sampling={"temperature": 0.7, "seed": 3}, **kw)


@pytest.fixture(scope="module")
def engine(tiny_small):
    model, tok = load_causal_lm(str(tiny_small))
    return EdgeEngine(model, tok, 256)


def clients(engine, records, config):
    return [EdgeClient(i, r, engine, config) for i, r in enumerate(records)]


def test_a_group_sends_sealed_public_requests_and_writes_in_one_batched_generation(engine, sample_records):
    config = cfg()
    group = clients(engine, sample_records[:3], config)
    source = FakeOutlines()
    results = write_sketches(group, source, engine, config)

    (sent,) = source.calls  # one call for the whole group
    assert [r.client for r in sent] == [0, 1, 2]
    for r, c in zip(sent, group):
        assert msgspec.json.decode(r.sealed.payload, type=SketchRequest) == r.request  # exactly what was sealed
        assert r.request.instruction == c.record.public_instruction
        assert r.request.seed is None  # a greedy outline needs no seed; the device's own (c.seed) never leaves
        assert r.request.max_tokens == config.sketch_max_tokens and r.request.kind == c.record.kind
    outlines = [f"1. {c.record.public_instruction}" for c in group]
    ids = engine.generate(
        [engine.prompt_ids(c.record, sketch=o) for c, o in zip(group, outlines)],
        config.max_new_tokens,
        config.sampling.temperature,
        config.sampling.top_p,
        [c.seed for c in group],
    )
    assert [r.text for r in results] == [engine.tok.decode(i, skip_special_tokens=True).strip() for i in ids]
    assert [r.tokens for r in results] == [len(i) for i in ids]
    for r, c, o in zip(results, group, outlines):
        assert r.error is None and r.mode == "sketch" and r.client == c.index and r.tid == c.record.tid
        assert r.sketch == o and r.round_trips == 1 and r.sketch_seconds == 0.25 and r.edge_seconds is not None


def test_a_failed_outline_fails_only_its_own_session(engine, sample_records):
    config = cfg()
    group = clients(engine, sample_records[:3], config)
    results = write_sketches(group, FakeOutlines({1: SessionError("cloud answered 503: busy")}), engine, config)
    assert [r.client for r in results] == [0, 1, 2]
    assert results[1].error == "cloud answered 503: busy" and results[1].tokens == 0 and results[1].text == ""
    assert results[0].error is None and results[2].error is None and results[0].tokens > 0


def test_what_the_gate_refuses_never_reaches_the_source(engine, sample_records):
    config = cfg()
    group = clients(engine, sample_records[:2], config)

    def refuse(msg):
        raise PrivacyViolation("outbound message carries 1 private 5-word phrase(s); nothing was sent")

    group[0].gate.seal_json = refuse
    source = FakeOutlines()
    results = write_sketches(group, source, engine, config)
    assert [r.client for r in source.calls[0]] == [1]
    assert "private" in results[0].error and results[1].error is None


def test_one_session_on_a_shared_device_measures_its_tokens(engine, sample_records):
    config = cfg(ignore_eos=True)
    device = SharedDevice(engine.model, engine.pad_id)
    try:
        r = write_sketch(EdgeClient(0, sample_records[0], engine, config), FakeOutlines(), engine, device, config)
    finally:
        device.close()
    assert r.error is None and r.tokens == 6 and r.text and not r.simulated
    assert r.sketch == f"1. {sample_records[0].public_instruction}" and r.sketch_seconds == 0.25
    assert r.ttft_s is not None and 0 < r.ttft_s <= r.seconds and len(r.itl_s) == 5
    assert not device.caches  # the session released its cache


def test_a_profile_device_takes_its_time_and_writes_no_text(engine, sample_records):
    config = cfg()
    slept = []
    profile = DeviceProfile(name="test", decode_tokens_per_s=50, prefill_tokens_per_s=1000, rtt_ms=40)
    r = write_sketch(
        EdgeClient(0, sample_records[0], engine, config),
        FakeOutlines(),
        engine,
        ProfileDevice(profile, slept.append),
        config,
    )
    assert r.simulated and r.text == "" and r.tokens == 6
    assert slept[0] == 0.04 and slept[2:] == [0.02] * 5  # the round trip, the prompt, then one pass a token


def test_a_single_session_raises_what_its_outline_request_raised(engine, sample_records):
    config = cfg()
    device = ProfileDevice(DeviceProfile(name="t", decode_tokens_per_s=50, prefill_tokens_per_s=1000, rtt_ms=0))
    with pytest.raises(SessionError, match="busy"):
        write_sketch(
            EdgeClient(0, sample_records[0], engine, config),
            FakeOutlines({0: SessionError("busy")}),
            engine,
            device,
            config,
        )


def test_http_outlines_post_the_sealed_body_and_report_errors(engine, sample_records):
    config = cfg()
    group = clients(engine, sample_records[:3], config)
    bodies = []

    def cloud(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/sketch"
        req = msgspec.json.decode(request.content, type=SketchRequest)
        bodies.append(request.content)
        if req.instruction == group[1].record.public_instruction:
            return httpx.Response(503, json={"error": "replica busy", "hint": "add replicas"})
        if req.instruction == group[2].record.public_instruction:
            raise httpx.ConnectError("refused")
        reply = SketchReply(request_id=req.request_id, sketch="1. intro", tokens=4)
        return httpx.Response(200, content=msgspec.json.encode(reply))

    with httpx.Client(transport=httpx.MockTransport(cloud)) as http:
        results = write_sketches(group, HttpOutlines(http, "http://cloud", 5.0), engine, config)
    assert len(bodies) == 3
    assert results[0].error is None and results[0].sketch == "1. intro"
    assert results[1].error == "cloud answered 503: replica busy (add replicas)"
    assert results[2].error.startswith("cannot reach the cloud at http://cloud/v1/sketch")
    device = ProfileDevice(DeviceProfile(name="t", decode_tokens_per_s=50, prefill_tokens_per_s=1000, rtt_ms=0))
    with httpx.Client(transport=httpx.MockTransport(cloud)) as http, pytest.raises(ClusterError):
        write_sketch(group[2], HttpOutlines(http, "http://cloud", 5.0), engine, device, config)  # the caller reports it


def test_outline_requests_of_one_device_share_nothing_but_the_public_instruction(engine, sample_records):
    """Two sessions of one client (and one of another) as the cloud receives them: the device's own seed
    never leaves it; what one device's requests share, another's share too, but for the instruction."""
    from cogenesis.edge_sim.sketch import sketch_request

    sampled = cfg(sketch={"temperature": 0.7})
    first, again = (EdgeClient(0, sample_records[0], engine, sampled) for _ in range(2))  # one device, two sessions
    other = EdgeClient(1, sample_records[1], engine, sampled)
    a1, a2, b = (msgspec.to_builtins(sketch_request(c, sampled)) for c in (first, again, other))
    assert a1["seed"] != a2["seed"] and first.seed not in (a1["seed"], a2["seed"])
    common = {k for k in a1 if a1[k] == a2[k]}
    assert common - {k for k in a1 if a1[k] == b[k]} <= {"instruction", "kind"}  # the record's public task
    greedy = sketch_request(first, cfg())  # a greedy outline needs no seed: none is sent
    assert greedy.seed is None


def test_outlines_post_nothing_but_sealed_payloads():
    from cogenesis.edge_sim.sketch import post_sealed

    posted = []
    with httpx.Client(transport=httpx.MockTransport(lambda r: posted.append(r) or httpx.Response(200))) as http:
        for forged in (b'{"instruction": "x"}', SketchRequest(request_id="r", instruction="x")):
            with pytest.raises(TypeError, match="sealed by the outbound gate"):
                post_sealed(http, "http://cloud/v1/sketch", forged, 5.0)
    assert posted == []


# ---- budgets, busy refusals and streamed outlines ------------------------------------------------------------


def _one(engine, record, config):
    from cogenesis.edge_sim.sketch import OutlineRequest, sketch_request

    client = EdgeClient(0, record, engine, config)
    req = sketch_request(client, config)
    return OutlineRequest(0, req, client.gate.seal_json(req))


def _reply_json(request: httpx.Request, sketch="1. intro") -> bytes:
    req = msgspec.json.decode(request.content, type=SketchRequest)
    return msgspec.json.encode(SketchReply(request_id=req.request_id, sketch=sketch, tokens=4))


def test_an_outline_carries_a_budget_that_scales_with_its_tokens_and_the_wait_follows_it(engine, sample_records):
    config = cfg(step_timeout_s=10, sketch_max_tokens=40, sketch_token_s=0.25)
    timeouts = []

    def cloud(request):
        timeouts.append(request.extensions["timeout"]["read"])
        return httpx.Response(200, content=_reply_json(request))

    one = _one(engine, sample_records[0], config)
    assert one.request.budget_ms == (10 + 40 * 0.25) * 1000  # counted by the replica from the request's arrival
    with httpx.Client(transport=httpx.MockTransport(cloud)) as http:
        outline = HttpOutlines(http, "http://cloud", 5.0).outline(one)
    from cogenesis.edge_sim.sketch import HTTP_MARGIN_S

    assert outline.sketch == "1. intro" and timeouts == [20 + HTTP_MARGIN_S]


@pytest.mark.parametrize("status", [429, 503])
def test_a_busy_answer_is_retried_after_its_retry_after(engine, sample_records, status):
    from cogenesis.core import metrics

    config = cfg()
    bodies = []

    def cloud(request):
        bodies.append(request.content)
        if len(bodies) <= 2:
            return httpx.Response(status, headers={"Retry-After": "0.05"}, json={"error": "queue full"})
        return httpx.Response(200, content=_reply_json(request))

    before = metrics.busy_retries._value.get()
    one = _one(engine, sample_records[0], config)
    with httpx.Client(transport=httpx.MockTransport(cloud)) as http:
        outline = HttpOutlines(http, "http://cloud", 5.0, admission_timeout_s=30).outline(one)
    assert outline.sketch == "1. intro" and outline.busy_retries == 2
    assert metrics.busy_retries._value.get() - before == 2
    assert bodies == [one.sealed.payload] * 3  # the sealed bytes, exactly, each time


def test_busy_past_the_admission_timeout_fails_the_session_busy(engine, sample_records):
    config = cfg(admission_timeout_s=0.3)
    calls = []

    def cloud(request):
        calls.append(1)
        return httpx.Response(429, headers={"Retry-After": "0.05"}, json={"error": "queue full"})

    with httpx.Client(transport=httpx.MockTransport(cloud)) as http:
        group = clients(engine, sample_records[:1], config)
        (r,) = write_sketches(
            group, HttpOutlines(http, "http://cloud", 5.0, config.admission_timeout_s), engine, config
        )
    assert r.error_code == "busy" and "admission_timeout_s" in r.error and len(calls) >= 2


def _sse(*events: tuple[str | None, object]) -> bytes:
    out = [": keep-alive\n\n"]
    for name, data in events:
        payload = data if isinstance(data, str) else msgspec.json.encode(data).decode()
        out.append((f"event: {name}\n" if name else "") + f"data: {payload}\n\n")
    return "".join(out).encode()


def test_a_streamed_outline_reports_its_progress(engine, sample_records):
    from cogenesis.core.protocol import SketchProgress

    config = cfg()
    accepts, seen = [], []

    def cloud(request):
        accepts.append(request.headers["accept"])
        rid = msgspec.json.decode(request.content, type=SketchRequest).request_id
        body = _sse(
            ("progress", SketchProgress(request_id=rid, tokens=2, text="1. in")),
            (None, SketchProgress(request_id=rid, tokens=3, text="1. intro")),  # unnamed: read by its type tag
            ("done", SketchReply(request_id=rid, sketch="1. intro\n2. body", tokens=6)),
        )
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)

    one = _one(engine, sample_records[0], config)
    with httpx.Client(transport=httpx.MockTransport(cloud)) as http:
        outlines = HttpOutlines(
            http, "http://cloud", 5.0, on_progress=lambda req, p: seen.append((req.client, p.tokens))
        )
        outline = outlines.outline(one)
    assert outline.sketch == "1. intro\n2. body" and outline.tokens == 6
    assert seen == [(0, 2), (0, 3)] and "text/event-stream" in accepts[0]


@pytest.mark.parametrize(
    "events, error, code",
    [
        ([("error", {"code": "deadline", "error": "budget spent"})], "gave up on the outline", "timeout"),
        ([("error", {"code": "internal", "error": "boom"})], "internal: boom", "cloud_error"),
        ([("progress", {"request_id": "r", "tokens": 1, "text": "1."})], "ended without an outline", "bad_reply"),
        ([("done", "{not json")], "malformed SketchReply", "bad_reply"),
    ],
    ids=["deadline", "error", "cut-short", "garbled"],
)
def test_a_streamed_outline_that_fails_says_why(engine, sample_records, events, error, code):
    from cogenesis.core.protocol import error_code

    config = cfg()

    def cloud(request):
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=_sse(*events))

    one = _one(engine, sample_records[0], config)
    with httpx.Client(transport=httpx.MockTransport(cloud)) as http:
        (got,) = HttpOutlines(http, "http://cloud", 5.0).outlines([one])
    assert isinstance(got, Exception) and error in str(got) and error_code(got) == code


def test_a_busy_error_event_is_retried_and_json_is_read_when_not_streaming(engine, sample_records):
    config = cfg()
    calls = []

    def cloud(request):
        calls.append(request.headers["accept"])
        if len(calls) == 1:
            body = _sse(("error", {"code": "busy", "error": "outline queue full", "retry_after_ms": 20}))
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)
        return httpx.Response(200, headers={"content-type": "application/json"}, content=_reply_json(request))

    one = _one(engine, sample_records[0], config)
    with httpx.Client(transport=httpx.MockTransport(cloud)) as http:
        assert HttpOutlines(http, "http://cloud", 5.0).outline(one).busy_retries == 1
        assert HttpOutlines(http, "http://cloud", 5.0, stream=False).outline(one).sketch == "1. intro"
    assert calls[-1] == "application/json"


def test_server_sent_events_are_parsed_per_the_format():
    from cogenesis.edge_sim.sketch import sse_events

    lines = [": comment", "event: progress", "data: a", "data: b", "", "", "data:c", "id: 7", "", "event: done"]
    assert list(sse_events(lines)) == [("progress", "a\nb"), ("message", "c")]
