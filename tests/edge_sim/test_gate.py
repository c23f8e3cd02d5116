"""Unit tests for edge_sim.gate: the outbound gate every edge message must pass."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from cogenesis.cluster.bus import Sealed
from cogenesis.core.config import PrivacyConfig
from cogenesis.core.data import load_records, parse_context_aware, sample_data_path
from cogenesis.core.errors import PrivacyViolation
from cogenesis.core.privacy import words
from cogenesis.core.protocol import (
    CloseSession,
    ErrorReply,
    OpenSession,
    SketchReply,
    SketchRequest,
    StatelessRequest,
    StepReply,
    StepRequest,
    decode_json,
    decode_request,
    pack_ids,
    unpack_ids,
)
from cogenesis.edge_sim.gate import OutboundGate

PUBLIC = "Write a birthday message for my colleague"
PRIVATE = [
    "mention that she just moved to 42 Willow Lane in Portland last spring",
    "Name: Dana Whitfield\nOccupation: nurse at St. Mary hospital",
    "Write a birthday message for my colleague who loves jazz",  # shares 5-grams with PUBLIC
]


def _open(instruction: str) -> OpenSession:
    return OpenSession(session_id="s1", instruction=instruction, top_k=10, budget_ms=123)


def _sketch(instruction: str) -> SketchRequest:
    return SketchRequest(request_id="r1", instruction=instruction, seed=3)


@pytest.fixture
def gate() -> OutboundGate:
    return OutboundGate(PUBLIC, PRIVATE, declared_public=True)  # PUBLIC: the part before the user's ": "


# ---- OpenSession --------------------------------------------------------------------------------


def test_seals_open_session_with_public_instruction(gate):
    msg = _open(PUBLIC)
    sealed = gate.seal(msg)
    assert isinstance(sealed, Sealed)
    assert sealed.kind == "OpenSession"
    assert decode_request(sealed.payload) == msg
    assert gate.sealed == 1


@pytest.mark.parametrize(
    "instruction",
    [
        PUBLIC + ": mention that she just moved to 42 Willow Lane",
        "she just moved to 42 Willow",  # exactly one private 5-gram
        "Write something. MOVED TO 42, willow lane!",  # case and punctuation do not hide it
        "dana whitfield occupation nurse at",  # crosses the newline inside a private field
    ],
)
def test_refuses_open_session_with_private_phrase(gate, instruction):
    with pytest.raises(PrivacyViolation, match="5-word phrase"):
        gate.seal(_open(instruction))
    assert gate.sealed == 0  # nothing was sealed


@pytest.mark.parametrize(
    "instruction",
    [
        "she just moved to",  # only 4 consecutive private words, none of them a private fact
        "she just moved to a new town last spring",  # private words, but not 5 consecutive in the field
        "Write a poem about jazz music",
    ],
)
def test_allows_short_or_non_consecutive_overlap(gate, instruction):
    gate.seal(_open(instruction))
    assert gate.sealed == 1


@pytest.mark.parametrize(
    ("instruction", "kind"),
    [
        ("near 42 Willow Lane", "address"),  # 4 words, but a private address
        ("she works at St. Mary now", "name"),  # a capitalized name in a private field
        ("Say hi to Dana", "name"),  # a first name from a profile's "Name:" line
        ("Write to Whitfield", "name"),
    ],
)
def test_refuses_short_private_facts(gate, instruction, kind):
    with pytest.raises(PrivacyViolation, match=rf"carries \d private spans? \({kind}: \d\)") as info:
        gate.seal(_open(instruction))
    for word in ("Mary", "Dana", "Whitfield", "42"):
        assert word not in str(info.value)  # counts and kinds, never the text
    assert gate.sealed == 0


def test_ngrams_shared_with_public_instruction_are_allowed(gate):
    # "write a birthday message for" is in a private field too, but the user chose to send it
    gate.seal(_open("Write a birthday message for my colleague"))
    gate.seal_json(_sketch("please write a birthday message for my colleague today"))
    assert gate.sealed == 2


def test_private_ngram_next_to_shared_one_is_refused(gate):
    # "message for my colleague who" is private (not in the public instruction)
    with pytest.raises(PrivacyViolation):
        gate.seal(_open("Write a birthday message for my colleague who"))


def test_custom_ngram_size():
    gate3 = OutboundGate(PUBLIC, PRIVATE, declared_public=True, privacy=PrivacyConfig(ngram=3))
    with pytest.raises(PrivacyViolation, match="3-word phrase"):
        gate3.seal(_open("then she just moved away"))
    OutboundGate(PUBLIC, PRIVATE, declared_public=True, privacy=PrivacyConfig(ngram=5)).seal(
        _open("then she just moved away")
    )


def test_no_private_fields_allows_anything():
    gate = OutboundGate(PUBLIC, [], declared_public=True)
    gate.seal(_open("she just moved to 42 Willow Lane in Portland"))
    assert gate.sealed == 1


def test_violation_has_hint_and_does_not_echo_private_text(gate):
    with pytest.raises(PrivacyViolation) as info:
        gate.seal(_open("she just moved to 42 Willow Lane"))
    assert info.value.hint
    assert "Willow" not in str(info.value)


# ---- SketchRequest (HTTP) ------------------------------------------------------------------------


def test_seal_json_sketch_request_round_trips(gate):
    msg = _sketch(PUBLIC)
    sealed = gate.seal_json(msg)
    assert sealed.kind == "SketchRequest"
    assert decode_json(sealed.payload, SketchRequest) == msg
    assert gate.sealed == 1


def test_refuses_sketch_request_with_private_phrase(gate):
    with pytest.raises(PrivacyViolation):
        gate.seal_json(_sketch("Outline: Dana Whitfield Occupation nurse at St Mary"))
    assert gate.sealed == 0


# ---- other messages ------------------------------------------------------------------------------


def test_step_request_and_close_pass(gate):
    step = StepRequest(session_id="s1", step=1, tokens=pack_ids([5, 6, 7]), budget_ms=9)
    close = CloseSession(session_id="s1")
    s1, s2 = gate.seal(step), gate.seal(close)
    assert (s1.kind, s2.kind) == ("StepRequest", "CloseSession")
    assert decode_request(s1.payload) == step
    np.testing.assert_array_equal(unpack_ids(decode_request(s1.payload).tokens), [5, 6, 7])
    assert decode_request(s2.payload) == close
    assert gate.sealed == 2


@pytest.mark.parametrize(
    "msg",
    [
        _sketch(PUBLIC),  # belongs on HTTP, not on the bus
        StepReply(session_id="s", step=0, replica="r", ids=b"", logprobs=b""),
        ErrorReply(session_id="s", step=0, code="internal", message="x"),
        SketchReply(request_id="r", sketch="1. a", tokens=1),
        "a plain string",
        b"raw bytes",
        {"type": "open"},
        None,
    ],
    ids=["sketch", "step_reply", "error_reply", "sketch_reply", "str", "bytes", "dict", "none"],
)
def test_seal_rejects_non_bus_messages(gate, msg):
    with pytest.raises(TypeError):
        gate.seal(msg)
    assert gate.sealed == 0


@pytest.mark.parametrize(
    "msg",
    [_open(PUBLIC), CloseSession(session_id="s"), "text", b"bytes", {"instruction": PUBLIC}],
    ids=["open", "close", "str", "bytes", "dict"],
)
def test_seal_json_rejects_non_sketch(gate, msg):
    with pytest.raises(TypeError):
        gate.seal_json(msg)
    assert gate.sealed == 0


def test_sealed_is_immutable(gate):
    sealed = gate.seal(_open(PUBLIC))
    with pytest.raises(AttributeError):
        sealed.payload = b"tampered"  # type: ignore[misc]


def test_sealed_payload_is_compact_msgpack_not_json(gate):
    sealed = gate.seal(_open(PUBLIC))
    assert msgspec.msgpack.decode(sealed.payload)["type"] == "open"
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(sealed.payload)


# ---- real records --------------------------------------------------------------------------------


def test_real_records_public_passes_and_full_task_is_refused():
    refused = 0
    for rec in load_records(sample_data_path()):
        gate = OutboundGate.of_record(rec)
        assert decode_request(gate.seal(_open(rec.public_instruction)).payload).instruction == rec.public_instruction
        details = rec.task[len(rec.public_instruction) :]
        if len(words(details)) >= 5:
            with pytest.raises(PrivacyViolation):
                gate.seal(_open(rec.task))
            with pytest.raises(PrivacyViolation):
                gate.seal_json(_sketch(rec.task))
            refused += 1
        # a long piece of a past writing is refused too
        history_text = rec.history[0][1]
        with pytest.raises(PrivacyViolation):
            gate.seal(_open("Please use this: " + " ".join(history_text.split()[:12])))
    assert refused >= 4


# ---- look-alikes, and instructions the user did not split -----------------------------------------

NEIGHBOUR = {
    "tid": "t1",
    "additional_profile": "Name: Martin Reynolds\nEmail: martin.reynolds@example.com\nPhone: (503) 555-0134",
    "profile": [{"title": "A letter", "text": "Every Sunday morning I walk along the river with my old dog."}],
}


def _record(instruction: str):
    return parse_context_aware({**NEIGHBOUR, "conversations": [{"value": instruction}]}, "test record")


@pytest.mark.parametrize(
    "instruction",
    [
        "Write a note to \uff2d\uff41\uff52\uff54\uff49\uff4e \uff32\uff45\uff59\uff4e\uff4f\uff4c\uff44\uff53",  # full-width
        "Write a note to Mar\u200btin Rey\u200dnolds",  # zero-width space and joiner inside the words
        "Write a note to M\u0430rtin R\u0435ynolds",  # Cyrillic a and e
        "Write a note to MARTIN REYNOLDS",  # case
        "Mail m\u0430rtin.reynolds\uff20example.com",  # Cyrillic a, full-width @
        "Call (503) 555\u20110134",  # a non-breaking hyphen
        "Then I w\u0430lk \u0430long the river with my old dog",  # a private 5-gram with Cyrillic a's
        "I walk along the\u00a0river",  # a no-break space
    ],
    ids=["fullwidth", "zero-width", "homoglyph", "case", "email", "phone", "ngram", "nbsp"],
)
def test_look_alikes_of_private_spans_are_refused(instruction):
    gate = OutboundGate.of_record(_record("Write a note to a new neighbour: mention my golf club"))
    with pytest.raises(PrivacyViolation) as info:
        gate.seal(_open(instruction))
    with pytest.raises(PrivacyViolation):
        gate.seal_json(_sketch(instruction))
    assert "artin" not in str(info.value) and "555" not in str(info.value)
    assert gate.sealed == 0


def test_an_instruction_without_a_split_is_checked_like_any_text():
    """No ": " in the instruction: nothing in it is public by declaration, so a private name it holds is refused;
    split, the general task is the user's choice to send (the name in it is public) and the details stay."""
    whole = _record("Write a note to Martin Reynolds about the golf club")
    assert whole.public_instruction == whole.task
    with pytest.raises(PrivacyViolation, match="name"):
        OutboundGate.of_record(whole).seal(_open(whole.public_instruction))
    split = _record("Write a note to Martin Reynolds: about the golf club")
    assert split.public_instruction == "Write a note to Martin Reynolds"
    gate = OutboundGate.of_record(split)
    gate.seal(_open(split.public_instruction))
    with pytest.raises(PrivacyViolation, match="email"):
        gate.seal(_open("Write a note to martin.reynolds@example.com"))
    assert gate.sealed == 1


def test_a_stateless_prompt_is_checked_with_the_text_it_carries():
    gate = OutboundGate.of_record(_record("Write a note to a new neighbour: mention my golf club"))
    step = StatelessRequest(session_id="s", tokens=pack_ids([1, 2]), top_k=2, budget_ms=9)
    gate.seal(step, prompt_text="<|im_start|>user\nWrite a note to a new neighbour<|im_end|>")
    with pytest.raises(PrivacyViolation, match="phone"):
        gate.seal(step, prompt_text="<|im_start|>user\nCall 503-555-0134<|im_end|>")
    with pytest.raises(TypeError):
        gate.seal(step)
    assert gate.sealed == 1


# ---- resume opens: only what the session's stream released ------------------------------------------------


class _Tok:
    """Ids decode to themselves as words: nothing in them is private."""

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)

    def encode(self, text, add_special_tokens=False):
        return [len(text)]


def _resume(session_id: str, ids, step: int) -> OpenSession:
    return OpenSession(
        session_id=session_id, instruction=PUBLIC, top_k=10, budget_ms=123, resume=pack_ids(ids), resume_step=step
    )


def test_a_resume_carries_only_a_prefix_of_what_its_stream_released():
    gate = OutboundGate(PUBLIC, PRIVATE, declared_public=True)
    stream = gate.stream(_Tok(), "s1")
    for token in (5, 6, 7):
        assert stream.push(token) == [token]
    assert stream.released == [5, 6, 7]
    for ids in ([], [5], [5, 6, 7]):  # what the stream released, through any in-flight step
        sealed = gate.seal(_resume("s1", ids, 3))
        assert decode_request(sealed.payload).resume == pack_ids(ids)
    for ids in ([5, 6, 7, 8], [6, 7], [5, 9]):  # more, other or reordered ids: refused, nothing sealed
        with pytest.raises(PrivacyViolation, match="not what its stream released"):
            gate.seal(_resume("s1", ids, 3))
    with pytest.raises(PrivacyViolation):
        gate.seal(_resume("other-session", [5], 1))  # another session's stream released nothing
    assert gate.seal(_resume("other-session", [], 1))  # an empty resume carries nothing: only the instruction
    with pytest.raises(PrivacyViolation):  # the instruction is checked as in any open
        gate.seal(OpenSession(session_id="s1", instruction=PRIVATE[1], top_k=1, budget_ms=1, resume_step=2))


def test_a_simulated_devices_stream_releases_every_token_and_may_be_resumed():
    gate = OutboundGate(PUBLIC, PRIVATE, declared_public=True)
    stream = gate.public_stream("sim")
    assert [stream.push(t) for t in (1, 2)] == [[1], [2]] and not stream.holding and stream.stats.held == 0
    assert gate.seal(_resume("sim", [1, 2], 2))
    with pytest.raises(PrivacyViolation):
        gate.seal(_resume("sim", [1, 2, 3], 3))
