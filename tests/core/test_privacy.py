"""Unit tests for cogenesis.core.privacy's private spans: normalization, entities, ``find``, ``open_prefix``."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cogenesis.core.data import load_records, parse_context_aware, sample_data_path
from cogenesis.core.privacy import Match, PrivateSpans, normalize, private_ngrams

_REPO = Path(__file__).resolve().parents[2]
_CANDIDATES = [Path(p) for p in (os.environ.get("COGENESIS_DATA_DIR"),) if p] + [
    Path("/work/shared/data/cogenesis"),
    _REPO / "shared" / "data" / "cogenesis",
    _REPO.parent / "shared" / "data" / "cogenesis",
]
DATA_DIR = next((p for p in _CANDIDATES if (p / "context_aware_test.json").is_file()), None)
needs_data = pytest.mark.skipif(DATA_DIR is None, reason="CoGenesis data files (shared/data/cogenesis) not found")

PROFILE = (
    "Age: 57 years\nName: Martin Reynolds\nOccupation: Senior Real Estate Agent\nLocation: Charlotte, North Carolina\n"
    "Personal_traits: Detail-oriented; Personable; Strategic thinker; Avid golfer\n"
    "Privacy_info: Volunteers bi-monthly at the local 'Homes for Humanity' chapter"
)
FACTS = (
    "Write to me at martin.reynolds@queencity.com or call (704) 555-0187 before March 3, 2021. The closing is on "
    "2021-04-12, at 184 Maple Drive, Apt 2B. My grandson, who is 12 years old, lives with Dana Whitfield at "
    "https://www.example.org/dana and posts as @dana_w. We paid 1,250 dollars."
)
PROSE = (
    "The morning was quiet. I walked to the market and bought bread. After that, we talked about the weather and "
    "the garden. It was a good day! However, nothing special happened. Then the rain started; everyone went home. "
    "Honestly, I think the best days are the simple ones. Maybe tomorrow will be different. Yes, it will."
)
WRITING = "Every autumn I repaint the little blue shed behind the house and plant tulips along the fence"


def spans(*fields: str, public: str = "Write a short note", declared: bool = True, ngram: int = 5) -> PrivateSpans:
    return PrivateSpans.of(public, fields, declared_public=declared, ngram=ngram)


def texts(s: PrivateSpans, text: str, kind: str | None = None) -> set[str]:
    """What ``find`` reports, as substrings of the original text."""
    return {text[m.start : m.end] for m in s.find(text) if kind is None or m.kind == kind}


# ---- normalize ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Ｍａｒｔｉｎ", "martin"),  # full-width
        ("Mar\u200btin Rey\u00adnolds\ufeff", "martin reynolds"),  # zero-width space, soft hyphen, BOM
        ("Mаrtin Rеynоlds", "martin reynolds"),  # Cyrillic а, е, о
        ("ΜΑRΤΙΝ", "martin"),  # Greek capitals
        ("STRASSE Straße", "strasse strasse"),  # casefold
        ("a \t\n  b\u00a0\u2003c", "a b c"),  # whitespace runs, no-break and em spaces
        ("“it’s” – ok", '"it\'s" - ok'),  # typographic quotes and dashes
        ("cafe\u0301", "café"),  # composed
    ],
)
def test_normalize(text, expected):
    assert normalize(text)[0] == expected


def test_normalize_maps_every_character_to_its_original():
    text = "Hi  Ｍａr\u200btin,\n\nﬁne"
    norm, idx = normalize(text)
    assert norm == "hi martin, fine"
    assert len(idx) == len(norm)
    assert [text[i] for i in idx[3:9]] == ["Ｍ", "ａ", "r", "t", "i", "n"]  # the zero-width space is skipped
    assert text[idx[norm.index("fi")]] == "ﬁ" and idx[norm.index("fi") + 1] == idx[norm.index("fi")]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_normalize_is_idempotent_and_its_map_is_ordered(text):
    norm, idx = normalize(text)
    assert normalize(norm)[0] == norm
    assert len(idx) == len(norm)
    assert idx == sorted(idx) and all(0 <= i < len(text) for i in idx)


# ---- entities -------------------------------------------------------------------------------------


def test_names_places_and_age_from_a_profile():
    s = spans(PROFILE)
    assert texts(s, "Dear Martin Reynolds,", "name") >= {"Martin Reynolds", "Martin", "Reynolds"}
    assert texts(s, "he moved to Charlotte, North Carolina") == {"Charlotte", "North Carolina"}
    assert texts(s, "at 57 he retired") == {"57"}
    assert s.kinds()["age"] == 1
    assert not texts(s, "a detail-oriented, personable and strategic thinker")  # list items are not names


def test_facts_of_every_kind():
    s = spans(FACTS)
    assert s.kinds().keys() >= {"email", "phone", "date", "address", "age", "name", "url", "number"}
    found = texts(s, FACTS)
    assert {"martin.reynolds@queencity.com", "(704) 555-0187", "March 3, 2021", "2021-04-12"} <= found
    assert {"184 Maple Drive, Apt 2B", "12", "Dana Whitfield", "example.org/dana", "dana_w", "1,250"} <= found


@pytest.mark.parametrize(
    "written", ["(704) 555-0187", "704-555-0187", "704.555.0187", "+1 704 555 0187", "7045550187", "555-0187"]
)
def test_phone_numbers_in_any_format(written):
    s = spans("Call me at +1 (704) 555-0187 tonight.")
    found = texts(s, f"the number is {written}.", "phone")
    assert written in found and all(f in written for f in found)


@pytest.mark.parametrize("date", ["March 3, 2021", "3 March 2021", "3/4/2021", "2021-03-04", "May 2020", "Dec. 24th"])
def test_dates(date):
    s = spans(f"We met on {date} downtown.")
    assert s.kinds().get("date") == 1
    assert date in texts(s, f"since {date}")


def test_a_planted_canary_sentence():
    sentence = (
        "Contact Anna Brulorix (anna.brulorix42@zaku.com, +1 (555) 123-4567) with the code vorkelin-4471-quastrobe."
    )
    s = spans(f"I like tea. {sentence}")
    out = "Ask Anna Brulorix (anna.brulorix42@zaku.com, 555 123 4567), code vorkelin-4471-quastrobe"
    assert {"Anna Brulorix", "anna.brulorix42@zaku.com", "555 123 4567", "vorkelin-4471-quastrobe"} <= texts(s, out)


def test_ordinary_prose_yields_no_names():
    s = spans(PROSE, "Dear Readers, The End. Thanks for reading! Sincerely, [Your Name]")
    assert "name" not in s.kinds()
    assert not [m for m in s.find("I think the morning was quiet. The rain. Yes.") if m.kind != "ngram"]


def test_kinds_and_repr_carry_counts_only():
    s = spans(PROFILE, FACTS)
    assert all(isinstance(v, int) and v > 0 for v in s.kinds().values())
    shown = repr(s) + str(s.kinds())
    for secret in ("martin", "reynolds", "charlotte", "queencity", "0187", "maple"):
        assert secret not in shown.lower()
    with pytest.raises(ValueError) as err:
        PrivateSpans.of("x", [PROFILE], declared_public=True, ngram=-1)
    assert "Martin" not in str(err.value)


def test_empty():
    s = spans()
    assert not s and s.kinds() == {} and s.find("Martin Reynolds") == [] and s.open_prefix("Mar") is None
    assert spans("the", ngram=5).find("the") == []  # no n-gram from one word
    assert spans(WRITING, ngram=0).kinds().get("ngram") is None


# ---- declared public ------------------------------------------------------------------------------


def test_a_declared_public_instruction_exempts_what_it_shows():
    fields = ["Dana Whitfield lives at 42 Willow Lane", "Remind Dana Whitfield about the twelve red roses today"]
    public = "Write a note to Dana Whitfield about the twelve red roses"
    declared = spans(*fields, public=public, declared=True)
    assert texts(declared, public) == set()
    assert texts(declared, "Dana Whitfield lives at 42 Willow Lane") >= {"42 Willow Lane", "Willow Lane"}


def test_an_undeclared_instruction_exempts_nothing():
    fields = ["Dana Whitfield lives at 42 Willow Lane", "Remind Dana Whitfield about the twelve red roses today"]
    public = "Write a note to Dana Whitfield about the twelve red roses"
    undeclared = spans(*fields, public=public, declared=False)
    assert texts(undeclared, public) >= {"Dana Whitfield", "Dana Whitfield about the twelve"}


def test_ngrams_are_todays_private_ngrams_normalized():
    fields = [WRITING, PROSE]
    public = "Every autumn I repaint the little blue shed"
    s = spans(*fields, public=public)
    assert s.kinds()["ngram"] == len(private_ngrams(public, fields, 5))
    copied = "so I repaint the little blue ѕhed behind the house"  # Cyrillic ѕ
    assert texts(s, copied, "ngram") == {"the little blue ѕhed behind", "little blue ѕhed behind the",
                                          "blue ѕhed behind the house"}  # fmt: skip
    assert not texts(s, public, "ngram")  # public by declaration


# ---- find -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    ["Martin Reynolds", "MARTIN REYNOLDS", "martin\n  reynolds", "Ｍａｒｔｉｎ Reynolds", "Mar\u200btin Rey\u200dnolds",
     "Mаrtin Reynоlds", "Martin\u00a0Reynolds"],
)  # fmt: skip
def test_look_alikes_are_found_at_their_original_offsets(variant):
    s = spans(PROFILE)
    text = f"— Best, {variant}."
    hits = [m for m in s.find(text) if m.kind == "name" and m.end - m.start > 10]
    assert hits == [Match("name", text.index(variant), text.index(variant) + len(variant))]


def test_matches_stop_at_word_boundaries():
    s = spans("I owe 30 dollars to my friend Ann today.")
    assert not texts(s, "the Annual report, Anne, Joann")
    assert texts(s, "thanks, Ann!") == {"Ann"}
    assert texts(s, "the 30th time") == {"30"}  # an ordinal of a private number
    assert not texts(s, "301 or 130 or 3.0")


@settings(max_examples=200, deadline=None)
@given(
    before=st.text(max_size=40),
    after=st.text(max_size=40),
    entity=st.sampled_from(["Martin Reynolds", "martin.reynolds@queencity.com", "North Carolina", "184 Maple Drive"]),
)
def test_an_entity_is_found_whatever_surrounds_it(before, after, entity):
    s = spans(PROFILE, FACTS)
    text = f"{before} {entity} {after}"
    start = len(before) + 1
    assert any(m.start == start and m.end == start + len(entity) for m in s.find(text))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["upper", "fullwidth", "zerowidth", "cyrillic", "spaces"]), max_size=5), st.data())
def test_disguised_names_are_found(disguises, data):
    name = "Martin Reynolds"
    for d in disguises:
        if d == "upper":
            name = name.upper()
        elif d == "fullwidth":
            name = "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in name)
        elif d == "zerowidth":
            at = data.draw(st.integers(1, len(name) - 1))
            name = name[:at] + "\u200b" + name[at:]
        elif d == "cyrillic":
            name = name.replace("a", "а").replace("o", "о")
        else:
            name = name.replace(" ", "  \n ")
    text = f"Regards, {name}"
    assert any(m.start == len("Regards, ") and m.end == len(text) for m in spans(PROFILE).find(text))


# ---- open_prefix ----------------------------------------------------------------------------------


def test_open_prefix_holds_what_could_begin_an_entity():
    s = spans(PROFILE, FACTS)
    assert s.open_prefix("Kind regards, Mar") == len("Kind regards, ")
    assert s.open_prefix("Kind regards, Martin") == len("Kind regards, ")  # "Martin" may become "Martin Reynolds"
    assert s.open_prefix("Kind regards, Martin Rey") == len("Kind regards, ")
    assert s.open_prefix("Kind regards, Ｍａｒ") == len("Kind regards, ")
    assert s.open_prefix("write to martin.reyn") == len("write to ")
    assert s.open_prefix("call (704) 55") == len("call ")
    assert s.open_prefix("we had 18") == len("we had ")  # could be 184 Maple Drive


def test_open_prefix_releases_ordinary_text():
    s = spans(PROFILE, FACTS, WRITING)
    for text in [
        "",
        "\u200b\u00ad",
        "Kind regards, ",
        "The weather is nice",
        "Martinez wrote",
        "every autumn",
        "Every",
    ]:
        assert s.open_prefix(text) is None, text


def test_open_prefix_holds_the_last_word_of_an_ngram():
    s = spans(WRITING)
    assert s.open_prefix("so I repaint the little blu") == len("so I repaint the little ")
    assert s.open_prefix("so I repaint the little b") == len("so I repaint the little ")
    assert s.open_prefix("so I repaint the little red") is None
    assert s.open_prefix("I repaint the") is None  # the first words of an n-gram are not held


def test_open_prefix_offsets_are_in_the_original_text():
    s = spans(PROFILE)
    text = "x\u200b\u200b  Ｍａ"
    at = s.open_prefix(text)
    assert at is not None and text[at:] == "Ｍａ"
    long = "word " * 400 + "Mart"
    assert s.open_prefix(long) == len(long) - 4


# ---- real records ---------------------------------------------------------------------------------


def test_shipped_records():
    for record in load_records(sample_data_path()):
        s = PrivateSpans.of(record.public_instruction, record.private_fields(), declared_public=True)
        name = next(line for line in record.profile.splitlines() if line.startswith("Name:"))[6:]
        assert [m.kind for m in s.find(f"Yours, {name}.") if m.end - m.start == len(name)] == ["name"], record.tid
        assert 3 <= s.kinds()["name"] <= 80, record.tid


@needs_data
def test_real_records_are_sane_and_fast():
    assert DATA_DIR is not None
    raw = json.loads((DATA_DIR / "context_aware_test.json").read_text(encoding="utf-8"))[:12]
    for i, item in enumerate(raw):
        record = parse_context_aware(item, f"record {i}")
        s = PrivateSpans.of(record.public_instruction, record.private_fields(), declared_public=True)
        kinds = s.kinds()
        assert 2 <= kinds["name"] <= 100 and kinds["age"] == 1 and kinds["ngram"] > 100, (record.tid, kinds)
        assert s.find(record.public_instruction) == []  # declared public
        gold = record.gold or ""
        start = time.perf_counter()
        for end in range(0, min(len(gold), 2000), 8):  # the gate: every few characters of a growing text
            s.open_prefix(gold[:end])
        s.find(gold)
        assert time.perf_counter() - start < 2.0


def test_a_name_at_the_end_of_a_longer_capitalized_run_is_a_span_of_its_own():
    # found by `cogenesis audit-privacy`: mid-sentence, "Contact" joined the name's run, and the bare name passed
    spans = PrivateSpans.of(
        "Write a note", ["We host events Contact Irene Brioxbaszath for tickets"], declared_public=True
    )
    assert [m.kind for m in spans.find("please ask Irene Brioxbaszath today")] == ["name"]
    assert spans.open_prefix("please ask Irene Briox") is not None
