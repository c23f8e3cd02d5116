"""The stream gate (edge_sim.gate.TokenStream) on the real SmolLM2 tokenizer: what a session's tokens
release to the cloud, token by token, as the small model writes private spans or public text."""

from __future__ import annotations

import pytest

from cogenesis.core.config import PrivacyConfig
from cogenesis.core.data import parse_context_aware
from cogenesis.core.errors import PrivacyViolation
from cogenesis.edge_sim.gate import OutboundGate

RECORD = parse_context_aware(
    {
        "tid": "t1",
        "conversations": [{"value": "Write a note to a new neighbour: mention my golf club"}],
        "additional_profile": "Name: Martin Reynolds\nEmail: martin.reynolds@example.com\nPhone: (503) 555-0134",
        "profile": [
            {"title": "A letter", "text": "Every Sunday morning I walk along the river with my old dog and think."}
        ],
    },
    "test record",
)
PASSAGE = "I walk along the river with my old dog and think"  # 11 words of the past writing


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def write(tok, text: str, **privacy):
    """Push ``text``'s tokens through a new stream; returns (the stream, what each push released)."""
    stream = OutboundGate.of_record(RECORD, PrivacyConfig(**privacy)).stream(tok)
    return stream, [stream.push(t) for t in tok.encode(text, add_special_tokens=False)]


def sent(tok, pushes) -> str:
    return tok.decode([t for ids in pushes for t in ids])


def test_public_text_leaves_token_by_token_unchanged(tok):
    text = "The weather was lovely, so we went for a long walk by the sea."
    stream, pushes = write(tok, text)
    assert pushes == [[t] for t in tok.encode(text, add_special_tokens=False)]
    assert (stream.stats.held, stream.stats.replaced, stream.stats.policy) == (0, 0, None) and not stream.holding


@pytest.mark.parametrize(
    ("text", "first", "leaked"),
    [
        ("Say hello to Martin Reynolds, please.", " Martin", ("Martin", "Reynolds")),  # a 2-word name
        ("Say hello to Reynolds, please.", " Reynolds", ("Reynolds",)),  # a last name alone
        ("Write to martin.reynolds@example.com today.", " mart", ("mart", "reynolds", "example")),
        ("Call 503-555-0134 today.", "5", ("503", "555", "0134")),
        ("Call (503) 555-0134 today.", "5", ("503", "555", "0134")),
    ],
    ids=["name", "last-name", "email", "phone", "phone-parens"],
)
def test_a_short_entity_never_leaves_not_even_its_first_token(tok, text, first, leaked):
    stream, pushes = write(tok, text)
    ids = tok.encode(text, add_special_tokens=False)
    at = next(i for i, t in enumerate(ids) if tok.decode([t]) == first)
    assert ids[at] not in pushes[at]  # the entity's first token is held back (or replaced at once)
    out = sent(tok, pushes)
    assert not any(piece in out for piece in leaked) and "[private]" in out
    assert out.endswith(" today.") or out.endswith(", please.")  # the text after it leaves
    assert stream.stats.replaced == 1 and stream.stats.policy == "placeholder" and stream.stats.held >= 1
    assert not stream.holding


def test_a_name_is_replaced_once_with_its_spacing(tok):
    _, pushes = write(tok, "Say hello to Martin Reynolds, please.")
    assert sent(tok, pushes) == "Say hello to [private], please."
    assert pushes[3:5] == [[], tok.encode(" [private]", add_special_tokens=False)]  # " Martin", " Reynolds"


def test_a_held_token_that_turns_out_public_leaves_with_the_next(tok):
    stream, pushes = write(tok, "Say hello to Martina, please.")
    assert sent(tok, pushes) == "Say hello to Martina, please."
    assert [len(p) for p in pushes] == [1, 1, 1, 0, 2, 1, 1, 1]  # " Mart" waits for "ina", then both go
    assert (stream.stats.held, stream.stats.replaced, stream.stats.policy) == (1, 0, None)


def test_a_copied_passage_placeholder_replaces_every_private_word(tok):
    stream, pushes = write(tok, f"Then {PASSAGE}. And more.")
    out = sent(tok, pushes)
    spans = OutboundGate.of_record(RECORD).spans
    assert spans.find(out) == [] and spans.find(f"Then {PASSAGE}.")  # the device's text held some
    assert out.startswith("Then I walk along the [private]") and out.endswith(". And more.")
    assert stream.stats.replaced == len(PASSAGE.split()) - 4 and stream.stats.policy == "placeholder"


def test_local_pauses_for_the_whole_span_and_sends_one_placeholder(tok):
    text = f"Then {PASSAGE}. And more."
    stream, pushes = write(tok, text, span_policy="local")
    assert sent(tok, pushes) == "Then I walk along the [private]. And more."
    words = [tok.decode([t]) for t in tok.encode(text, add_special_tokens=False)]
    span = words.index(" river"), words.index(".")
    assert all(p == [] for p in pushes[span[0] : span[1]])  # nothing left while the span was written
    assert stream.stats.replaced == 1 and stream.stats.policy == "local"


@pytest.mark.parametrize(
    "text",
    ["Say hello to Martin Reynolds, please.", "Write to martin.reynolds@example.com", f"Then {PASSAGE}."],
    ids=["name", "email", "passage"],
)
def test_refuse_ends_the_session_with_counts_and_kinds(tok, text):
    stream = OutboundGate.of_record(RECORD, PrivacyConfig(span_policy="refuse")).stream(tok)
    out: list[int] = []
    with pytest.raises(PrivacyViolation, match=r"span policy 'refuse'") as info:
        for t in tok.encode(text, add_special_tokens=False):
            out += stream.push(t)
    message = str(info.value)
    assert "private span" in message and not any(w in message.lower() for w in ("martin", "reynolds", "river"))
    assert "[private]" not in tok.decode(out) and not OutboundGate.of_record(RECORD).spans.find(tok.decode(out))
    assert stream.stats.policy == "refuse"


def test_a_long_undecided_hold_is_decided_private(tok):
    """More than max_hold_tokens that could still begin a private span: replaced, never released."""
    stream, pushes = write(tok, "Write to martin.reynolds@example.com today.", max_hold_tokens=2)
    out = sent(tok, pushes)
    assert not any(piece in out for piece in ("mart", "reyn", "example")) and out.endswith(" today.")
    assert stream.stats.replaced >= 2  # the address was cut into several held runs
    with pytest.raises(PrivacyViolation, match="3 tokens that could begin a private span"):
        write(tok, "Call 503-555-0134 today.", max_hold_tokens=2, span_policy="refuse")


def test_the_placeholder_is_configurable_and_public(tok):
    _, pushes = write(tok, "Say hello to Martin Reynolds, please.", placeholder="(someone)")
    assert sent(tok, pushes) == "Say hello to (someone), please."
