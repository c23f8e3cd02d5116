"""Unit tests for cogenesis.core.protocol: binary (msgpack) and JSON messages between edge and cloud."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from cogenesis.core.errors import CoGenesisError, ProtocolError
from cogenesis.core.protocol import (
    PROTOCOL_VERSION,
    CloseSession,
    ErrorReply,
    OpenSession,
    SketchReply,
    SketchRequest,
    StepReply,
    StepRequest,
    budget_of,
    deadline_in,
    decode_json,
    decode_reply,
    decode_request,
    encode,
    error_code,
    now_ms,
    pack_ids,
    pack_logprobs,
    unpack_ids,
    unpack_logprobs,
)

OPEN = OpenSession(session_id="s-1", instruction="Write a poem about autumn", top_k=10, budget_ms=60_000)
STEP = StepRequest(session_id="s-1", step=3, tokens=pack_ids([17, 4, 99_999]), budget_ms=30_000)
CLOSE = CloseSession(session_id="s-1")
REPLY = StepReply(
    session_id="s-1",
    step=3,
    replica="replica-a",
    ids=pack_ids([5, 9, 2]),
    logprobs=pack_logprobs([-0.25, -1.5, -3.0]),
    prompt_tokens=42,
    compute_ms=1.25,
)
ERROR = ErrorReply(session_id="s-1", step=4, code="unknown_session", message="no such session")
SKETCH = SketchRequest(
    request_id="r-7", instruction="Outline an essay", kind="paper", max_tokens=64, temperature=0.3, top_p=0.8, seed=11
)
SKETCH_REPLY = SketchReply(request_id="r-7", sketch="1. Intro\n2. Body", tokens=9, compute_ms=3.5)


def _raw(msg) -> dict:
    return msgspec.msgpack.decode(encode(msg))


def _with(msg, **changes) -> bytes:
    raw = _raw(msg)
    raw.update(changes)
    return msgspec.msgpack.encode(raw)


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("msg", [OPEN, STEP, CLOSE], ids=["open", "step", "close"])
def test_edge_to_cloud_round_trip(msg):
    out = decode_request(encode(msg))
    assert type(out) is type(msg)
    assert out == msg
    assert out.v == PROTOCOL_VERSION


@pytest.mark.parametrize("msg", [REPLY, ERROR], ids=["reply", "error"])
def test_cloud_to_edge_round_trip(msg):
    out = decode_reply(encode(msg))
    assert type(out) is type(msg)
    assert out == msg


@pytest.mark.parametrize("msg", [SKETCH, SKETCH_REPLY], ids=["sketch", "sketch_reply"])
def test_sketch_messages_round_trip_json(msg):
    out = decode_json(msgspec.json.encode(msg), type(msg))
    assert type(out) is type(msg)
    assert out == msg


@pytest.mark.parametrize("msg", [SKETCH, SKETCH_REPLY], ids=["sketch", "sketch_reply"])
def test_sketch_messages_round_trip_msgpack(msg):
    assert msgspec.msgpack.decode(encode(msg), type=type(msg)) == msg


@pytest.mark.parametrize(
    "msg,tag",
    [
        (OPEN, "open"),
        (STEP, "step"),
        (CLOSE, "close"),
        (REPLY, "reply"),
        (ERROR, "error"),
        (SKETCH, "sketch"),
        (SKETCH_REPLY, "sketch_reply"),
    ],
)
def test_encoded_messages_carry_type_tag_and_version(msg, tag):
    raw = _raw(msg)
    assert raw["type"] == tag
    assert raw["v"] == PROTOCOL_VERSION


def test_step_reply_top_k_round_trips_arrays():
    ids, lps = decode_reply(encode(REPLY)).top_k()
    assert ids.dtype == np.int32
    assert lps.dtype == np.float32
    np.testing.assert_array_equal(ids, [[5, 9, 2]])  # [positions, k]: one position without a draft
    np.testing.assert_allclose(lps, [[-0.25, -1.5, -3.0]])


def test_step_reply_with_draft_has_one_top_k_row_per_position():
    reply = StepReply(
        session_id="s",
        step=3,
        replica="r",
        ids=pack_ids([1, 2, 3, 4, 5, 6]),
        logprobs=pack_logprobs([-0.1, -1.0, -0.2, -2.0, -0.3, -3.0]),
        draft=pack_ids([1, 3]),
    )
    ids, lps = decode_reply(encode(reply)).top_k()
    np.testing.assert_array_equal(ids, [[1, 2], [3, 4], [5, 6]])
    assert lps.shape == (3, 2)
    np.testing.assert_array_equal(decode_reply(encode(reply)).drafts(), [1, 3])
    uneven = StepReply(
        session_id="s",
        step=3,
        replica="r",
        ids=pack_ids([1, 2, 3]),
        logprobs=pack_logprobs([-1, -2, -3]),
        draft=pack_ids([1]),
    )
    with pytest.raises(ProtocolError, match="for 2 position"):
        uneven.top_k()


def test_step_request_tokens_survive_round_trip():
    out = decode_request(encode(STEP))
    np.testing.assert_array_equal(unpack_ids(out.tokens), [17, 4, 99_999])


def test_messages_are_frozen():
    with pytest.raises(AttributeError):
        OPEN.instruction = "changed"  # type: ignore[misc]


# ---- int32 / float16 packing ----------------------------------------------------------------


def test_pack_ids_is_little_endian_int32():
    assert pack_ids([1]) == b"\x01\x00\x00\x00"
    assert pack_ids([256, -1]) == b"\x00\x01\x00\x00" + b"\xff\xff\xff\xff"
    assert len(pack_ids(range(10))) == 40


def test_ids_round_trip_including_extremes():
    ids = [0, 1, -1, 151_935, 2**31 - 1, -(2**31)]
    out = unpack_ids(pack_ids(ids))
    assert out.dtype == np.dtype("<i4")
    np.testing.assert_array_equal(out, ids)


def test_pack_ids_accepts_numpy_and_empty():
    np.testing.assert_array_equal(unpack_ids(pack_ids(np.array([3, 4], dtype=np.int64))), [3, 4])
    assert pack_ids([]) == b""
    assert unpack_ids(b"").size == 0


def test_pack_logprobs_is_little_endian_float16():
    assert pack_logprobs([-0.5]) == b"\x00\xb8"  # float16 -0.5 = 0xB800
    assert pack_logprobs([0.0, 1.0]) == b"\x00\x00\x00\x3c"
    assert len(pack_logprobs([-1.0] * 7)) == 14


def test_logprobs_round_trip_within_float16_precision():
    values = np.array([0.0, -0.01, -0.6931, -2.5, -13.37, -60.0], dtype=np.float32)
    out = unpack_logprobs(pack_logprobs(values))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, values, rtol=1e-3, atol=1e-3)
    # order is preserved exactly (no reordering by the packing)
    assert list(np.argsort(-out)) == list(np.argsort(-values))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_odd_length_id_payload_raises(n):
    with pytest.raises(ProtocolError, match="multiple of 4"):
        unpack_ids(b"\x00" * n)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_odd_length_logprob_payload_raises(n):
    with pytest.raises(ProtocolError, match="multiple of 2"):
        unpack_logprobs(b"\x00" * n)


def test_step_reply_with_truncated_ids_raises():
    bad = StepReply(session_id="s", step=0, replica="r", ids=pack_ids([1, 2])[:-1], logprobs=pack_logprobs([-1, -2]))
    with pytest.raises(ProtocolError):
        decode_reply(encode(bad)).top_k()


def test_step_reply_with_mismatched_lengths_raises():
    bad = StepReply(session_id="s", step=0, replica="r", ids=pack_ids([1, 2, 3]), logprobs=pack_logprobs([-1, -2]))
    decoded = decode_reply(encode(bad))  # the envelope is fine ...
    with pytest.raises(ProtocolError, match="3 ids and 2 logprobs"):
        decoded.top_k()  # ... the payload is not


# ---- malformed input ----------------------------------------------------------------------------


MALFORMED = [
    b"",
    b"\xc1",  # never-used msgpack opcode
    b"\x01",  # msgpack int, not a map
    b"\x93\x01\x02\x03",  # msgpack array
    encode(OPEN)[:-3],  # truncated
    b"not msgpack at all \xff\xfe",
    msgspec.msgpack.encode({"type": "open"}),  # missing fields
    msgspec.msgpack.encode({"session_id": "s"}),  # missing tag
    msgspec.msgpack.encode({"type": "nope", "session_id": "s"}),  # unknown tag
]


@pytest.mark.parametrize("buf", MALFORMED)
def test_decode_request_malformed_raises_protocol_error(buf):
    with pytest.raises(ProtocolError):
        decode_request(buf)


@pytest.mark.parametrize("buf", MALFORMED)
def test_decode_reply_malformed_raises_protocol_error(buf):
    with pytest.raises(ProtocolError):
        decode_reply(buf)


@pytest.mark.parametrize(
    "changes",
    [
        {"top_k": "ten"},
        {"top_k": True},
        {"session_id": 5},
        {"budget_ms": 1.5},
        {"budget_ms": -1},  # a budget is a duration
        {"instruction": None},
    ],
)
def test_wrong_field_types_raise_protocol_error(changes):
    with pytest.raises(ProtocolError):
        decode_request(_with(OPEN, **changes))


def test_wrong_field_type_in_reply_raises():
    with pytest.raises(ProtocolError):
        decode_reply(_with(REPLY, ids="not bytes"))


def test_protocol_error_is_a_cogenesis_error():
    with pytest.raises(CoGenesisError):
        decode_request(b"\xc1")


# ---- version ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 99])
def test_wrong_version_request_raises(version):
    with pytest.raises(ProtocolError, match="version"):
        decode_request(_with(OPEN, v=version))


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1])
def test_wrong_version_reply_raises(version):
    with pytest.raises(ProtocolError, match="version"):
        decode_reply(_with(ERROR, v=version))


def test_wrong_version_json_raises():
    body = msgspec.json.encode({**msgspec.to_builtins(SKETCH), "v": PROTOCOL_VERSION + 1})
    with pytest.raises(ProtocolError, match="version"):
        decode_json(body, SketchRequest)


def test_missing_version_defaults_to_current():
    raw = _raw(CLOSE)
    del raw["v"]
    assert decode_request(msgspec.msgpack.encode(raw)) == CLOSE


def test_wrong_version_error_has_hint():
    with pytest.raises(ProtocolError) as info:
        decode_request(_with(OPEN, v=PROTOCOL_VERSION + 1))
    assert info.value.hint


# ---- wrong direction ----------------------------------------------------------------------------


@pytest.mark.parametrize("msg", [REPLY, ERROR, SKETCH, SKETCH_REPLY], ids=["reply", "error", "sketch", "sketch_reply"])
def test_cloud_side_messages_are_not_requests(msg):
    with pytest.raises(ProtocolError):
        decode_request(encode(msg))


@pytest.mark.parametrize("msg", [OPEN, STEP, CLOSE, SKETCH], ids=["open", "step", "close", "sketch"])
def test_edge_side_messages_are_not_replies(msg):
    with pytest.raises(ProtocolError):
        decode_reply(encode(msg))


# ---- decode_json (sketch mode) ------------------------------------------------------------------


def test_decode_json_fills_defaults():
    msg = decode_json(b'{"request_id": "r", "instruction": "Outline X"}', SketchRequest)
    assert isinstance(msg, SketchRequest)
    assert (msg.request_id, msg.instruction) == ("r", "Outline X")
    # every omitted field takes the struct's declared default
    assert msg == SketchRequest(request_id="r", instruction="Outline X")
    assert msg.kind == "context_aware" and msg.seed is None
    assert msg.v == PROTOCOL_VERSION


def test_decode_json_keeps_explicit_sampling_fields():
    body = msgspec.json.encode(
        {
            "request_id": "r",
            "instruction": "i",
            "kind": "paper",
            "max_tokens": 32,
            "temperature": 0.25,
            "top_p": 0.5,
            "seed": 9,
        }
    )
    msg = decode_json(body, SketchRequest)
    assert (msg.kind, msg.max_tokens, msg.temperature, msg.top_p, msg.seed) == ("paper", 32, 0.25, 0.5, 9)


def test_decode_json_accepts_explicit_tag():
    msg = decode_json(b'{"type": "sketch", "request_id": "r", "instruction": "i", "seed": 3}', SketchRequest)
    assert msg.seed == 3


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"request_id": "r", "instruction": "i"',  # truncated
        b"[]",
        b'"a string"',
        b"null",
        b'{"request_id": "r"}',  # missing instruction
        b'{"request_id": 1, "instruction": "i"}',  # wrong type
        b'{"request_id": "r", "instruction": "i", "max_tokens": "many"}',
        b'{"type": "open", "request_id": "r", "instruction": "i"}',  # wrong tag
        b'{"request_id": "r", "instruction": "i", "kind": "poetry"}',  # unknown task family
        b"\xff\xfe\x00",  # not UTF-8 JSON
    ],
)
def test_decode_json_malformed_raises_protocol_error(body):
    with pytest.raises(ProtocolError, match="SketchRequest|version"):
        decode_json(body, SketchRequest)


# ---- deadlines and budgets -------------------------------------------------------------------------


def test_deadline_in_is_absolute_ms_in_the_future():
    before = now_ms()
    deadline = deadline_in(2.5)
    after = now_ms()
    assert before + 2500 <= deadline <= after + 2500
    assert abs(now_ms() - __import__("time").time() * 1000) < 1000


def test_budgets_are_relative_whole_milliseconds():
    assert budget_of(2.5) == 2500 and budget_of(0.0004) == 0 and budget_of(-1) == 0


# ---- no linkable metadata --------------------------------------------------------------------------


EDGE_MESSAGES = {  # every edge -> cloud message type, and the fields it may carry
    OpenSession: {
        "type",
        "v",
        "session_id",
        "instruction",
        "top_k",
        "budget_ms",
        "lookahead",
        "reply_to",
        "resume",  # ids the session already released (they passed the gate), when it resumes elsewhere
        "resume_step",
    },
    StepRequest: {"type", "v", "session_id", "step", "tokens", "budget_ms", "reply_to"},
    CloseSession: {"type", "v", "session_id", "reply_to"},
    SketchRequest: {
        "type",
        "v",
        "request_id",
        "instruction",
        "kind",
        "max_tokens",
        "temperature",
        "top_p",
        "repetition_penalty",
        "seed",
        "budget_ms",
    },
}


@pytest.mark.parametrize("typ", list(EDGE_MESSAGES), ids=lambda t: t.__name__)
def test_edge_messages_carry_no_clock_and_no_client(typ):
    """What an edge sends names no device (no client index, pool or user id) and reads no clock of it
    (no send time, no absolute deadline): a budget is relative, ids are random per session."""
    assert set(typ.__struct_fields__) | {"type"} == EDGE_MESSAGES[typ]
    fields = " ".join(typ.__struct_fields__)
    for banned in ("sent", "deadline", "_us", "client", "user", "device", "pool", "time"):
        assert banned not in fields, (typ.__name__, banned)


def test_stateless_and_completions_requests_carry_no_clock_and_no_client():
    from cogenesis.core.protocol import CompletionsRequest, StatelessRequest

    assert set(StatelessRequest.__struct_fields__) == {"v", "session_id", "tokens", "top_k", "budget_ms"}
    assert set(CompletionsRequest.__struct_fields__) == {
        "model",
        "prompt",
        "logprobs",
        "max_tokens",
        "temperature",
        "return_tokens_as_token_ids",
    }
    body = msgspec.json.decode(msgspec.json.encode(CompletionsRequest(model="m", prompt=[1, 2], logprobs=5)))
    assert body == {  # the completions API's own JSON: no tag, no version, no session
        "model": "m",
        "prompt": [1, 2],
        "logprobs": 5,
        "max_tokens": 1,
        "temperature": 0.0,
        "return_tokens_as_token_ids": True,
    }


def test_replies_carry_only_durations_of_the_replica():
    traced = {"server_us", "model_us", "queue_us"}
    assert traced <= set(StepReply.__struct_fields__)
    assert not {"bus_in_us", "posted_us", "sent_us"} & set(StepReply.__struct_fields__)


# ---- error codes ---------------------------------------------------------------------------------------


def test_errors_leave_the_device_as_codes_from_a_fixed_set():
    from typing import get_args

    from cogenesis.core.errors import (
        AuthError,
        BusTimeout,
        ClusterError,
        ConfigError,
        Forbidden,
        ModelError,
        PrivacyViolation,
        RateLimited,
        SessionError,
        TooLarge,
        UnknownSession,
    )
    from cogenesis.core.protocol import ErrorCode

    cases = {
        BusTimeout("no reply for step 3"): "timeout",
        PrivacyViolation("carries 1 private span"): "privacy",
        ProtocolError("malformed"): "bad_reply",
        SessionError("cloud refused"): "cloud_error",
        UnknownSession("gone"): "cloud_error",
        ClusterError("cannot reach Redis"): "unreachable",
        ConfigError("bad flag"): "setup",
        ModelError("no model"): "setup",
        AuthError("no credential"): "unauthorized",
        Forbidden("another device's session"): "forbidden",
        RateLimited("over its rate"): "rate_limited",
        TooLarge("instruction of 20000 chars"): "cloud_error",
        ValueError("Martin Reynolds"): "internal",
    }
    assert {error_code(exc) for exc in cases} <= set(get_args(ErrorCode))
    for exc, code in cases.items():
        assert error_code(exc) == code


# ---- batching and tracing ------------------------------------------------------------------


def test_step_batch_carries_sealed_messages_verbatim():
    from cogenesis.core.protocol import StepBatch

    items = [
        encode(StepRequest(session_id=f"s{i}", step=2, tokens=pack_ids([i]), budget_ms=1, reply_to="pool"))
        for i in range(3)
    ]
    batch = decode_request(encode(StepBatch(items=items)))
    assert isinstance(batch, StepBatch) and batch.items == items
    assert [decode_request(b).session_id for b in batch.items] == ["s0", "s1", "s2"]
    assert decode_request(batch.items[0]).reply_to == "pool"


def test_reply_batch_decodes_to_its_replies():
    from cogenesis.core.protocol import ReplyBatch, decode_replies

    ok = StepReply(session_id="a", step=1, replica="r", ids=pack_ids([1]), logprobs=pack_logprobs([-0.5]))
    err = ErrorReply(session_id="b", step=3, code="deadline", message="late")
    assert decode_replies(encode(ReplyBatch(items=[ok, err]))) == [ok, err]
    assert decode_replies(encode(ok)) == [ok]


def test_stateless_request_round_trips_msgpack():
    from cogenesis.core.protocol import StatelessRequest, decode_msgpack

    msg = StatelessRequest(session_id="s", tokens=pack_ids([1, 2, 3]), top_k=5, budget_ms=9)
    assert decode_msgpack(encode(msg), StatelessRequest) == msg
    with pytest.raises(ProtocolError, match="malformed StatelessRequest"):
        decode_msgpack(b"\x00junk", StatelessRequest)


def test_exchange_overhead_excludes_model_queue_and_busy_time():
    reply = StepReply(
        session_id="s", step=1, replica="r", ids=b"", logprobs=b"", server_us=5_000, model_us=4_800, queue_us=1_000
    )
    assert reply.traced
    # the edge waited for it: a round trip of 6_900 = 1_000 queued + 4_800 in the model + 1_100 on the bus
    # and in serialization (the replica's 200 outside the model among them)
    assert reply.exchange_overhead_us(6_900) == 1_100
    # it was already waiting when the edge, busy until then, looked: fetching it took 250, all it cost
    assert reply.exchange_overhead_us(60_000, fetch_us=250) == 250
    # ... but no more than the round trip less model and queue
    assert reply.exchange_overhead_us(6_000, fetch_us=900) == 200
    assert reply.exchange_overhead_us(5_000) == 0  # never negative
    untraced = StepReply(session_id="s", step=1, replica="r", ids=b"", logprobs=b"")
    assert not untraced.traced and untraced.exchange_overhead_us(123) == 0
