"""Unit tests for cogenesis.core.data: loading CoGenesis records and keeping private context apart."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from cogenesis.core.data import HISTORY_HEAD, TASK_HEAD, Record, load_records, sample_data_path
from cogenesis.core.errors import DataError
from cogenesis.core.prompts import OUTLINE_HINT, SYSTEM_WITH_CONTEXT

_REPO = Path(__file__).resolve().parents[2]
_CANDIDATES = [Path(p) for p in (os.environ.get("COGENESIS_DATA_DIR"),) if p] + [
    Path("/work/shared/data/cogenesis"),
    _REPO / "shared" / "data" / "cogenesis",
]
DATA_DIR = next((p for p in _CANDIDATES if (p / "context_aware_test.json").is_file()), None)
needs_data = pytest.mark.skipif(DATA_DIR is None, reason="CoGenesis data files (shared/data/cogenesis) not found")


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


LONG = 10  # a "long phrase": 10 consecutive words


# ---- real files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca_records():
    return load_records(DATA_DIR / "context_aware_test.json")


@pytest.fixture(scope="module")
def ca_raw():
    return json.loads((DATA_DIR / "context_aware_test.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def paper_records():
    return load_records(DATA_DIR / "paper_dev.json")


@needs_data
def test_context_aware_loads_every_record(ca_records, ca_raw):
    assert len(ca_records) == len(ca_raw) == 240
    assert all(r.kind == "context_aware" for r in ca_records)
    assert [r.tid for r in ca_records] == [str(x["tid"]) for x in ca_raw]


@needs_data
def test_context_aware_public_is_text_before_first_colon(ca_records, ca_raw):
    for rec, raw in zip(ca_records, ca_raw):
        instruction = raw["conversations"][0]["value"]
        assert rec.public_instruction == instruction.split(": ", 1)[0].strip()
        assert rec.task == instruction.strip()
        assert rec.gold == raw["conversations"][1]["value"]
        assert ": " not in rec.public_instruction


@needs_data
def test_context_aware_private_fields_hold_profile_history_and_details(ca_records, ca_raw):
    for rec, raw in zip(ca_records, ca_raw):
        private = rec.private_fields()
        details = raw["conversations"][0]["value"].split(": ", 1)[1].strip()
        assert details in private
        assert raw["additional_profile"] in private
        assert rec.profile == raw["additional_profile"]
        assert len(rec.history) == len(raw["profile"])
        for item in raw["profile"]:
            assert item["text"] in private
            assert item["title"] in private
            assert (item["title"], item["text"]) in rec.history


@needs_data
def test_context_aware_public_never_carries_private_phrases(ca_records):
    for rec in ca_records:
        details = rec.private_fields()[0]
        assert details not in rec.public_instruction
        name = re.search(r"Name: (.+)", rec.profile).group(1).strip()
        assert name not in rec.public_instruction
        public = _ngrams(rec.public_instruction, LONG)
        for field in rec.private_fields():
            assert not (_ngrams(field, LONG) & public), (rec.tid, field[:80])


@needs_data
def test_paper_records_pair_with_wo_file(paper_records):
    wo = json.loads((DATA_DIR / "paper_dev_wo.json").read_text(encoding="utf-8"))
    assert len(paper_records) == len(wo) == 161
    for rec, w in zip(paper_records, wo):
        assert rec.kind == "paper"
        assert rec.tid == str(w["tid"])
        assert rec.public_instruction == w["conversations"][0]["value"].strip()
        assert HISTORY_HEAD not in rec.public_instruction and TASK_HEAD not in rec.public_instruction


@needs_data
def test_paper_private_fields_are_history_and_stay_out_of_public(paper_records):
    raw = json.loads((DATA_DIR / "paper_dev.json").read_text(encoding="utf-8"))
    for rec, r in zip(paper_records, raw):
        assert len(rec.history) == 5
        private = rec.private_fields()
        assert len(private) == 10
        prompt = r["conversations"][0]["value"]
        for title, text in rec.history:
            assert title in private and text in private
            assert f"Title: {title}\n" in prompt and text in prompt  # content is whitespace-stripped
            assert text not in rec.public_instruction
        public = _ngrams(rec.public_instruction, LONG)
        for field in private:
            assert not (_ngrams(field, LONG) & public), (rec.tid, field[:80])
        assert rec.task == prompt.split(TASK_HEAD, 1)[1].strip()


@needs_data
def test_repr_hides_private_text(ca_records, paper_records):
    for rec in (*ca_records[:20], *paper_records[:20]):
        text = repr(rec)
        assert str(rec) == text
        assert rec.tid in text and rec.public_instruction in text
        for field in rec.private_fields():
            # a private string may share short words with the public instruction; a private string
            # long enough to identify must not appear
            if len(field) > 40:
                assert field not in text
                assert field[:40] not in text


@needs_data
def test_limit(ca_records):
    recs = load_records(DATA_DIR / "context_aware_test.json", limit=3)
    assert [r.tid for r in recs] == [r.tid for r in ca_records[:3]]


def test_sample_data_path_loads_eight_records():
    path = sample_data_path()
    assert path.is_file()
    recs = load_records(path)
    assert len(recs) == 8
    assert all(isinstance(r, Record) and r.kind == "context_aware" and r.public_instruction for r in recs)
    assert all(r.private_fields() for r in recs)


@needs_data
def test_sample_records_come_from_context_aware_test(ca_records):
    by_tid = {r.tid: r for r in ca_records}
    for rec in load_records(sample_data_path()):
        assert rec.tid in by_tid
        assert rec.public_instruction == by_tid[rec.tid].public_instruction


# ---- edge_prompt --------------------------------------------------------------------------------


def _ca_record() -> Record:
    return load_records(sample_data_path(), limit=1)[0]


def test_edge_prompt_context_aware_without_sketch():
    rec = _ca_record()
    system, user = rec.edge_prompt()
    assert system == {"role": "system", "content": SYSTEM_WITH_CONTEXT["context_aware"]}
    assert user["role"] == "user"
    body = user["content"]
    assert rec.profile in body and rec.task in body
    for title, text in rec.history:
        assert f"Task: {title}\nContent: {text}" in body
    assert OUTLINE_HINT not in body
    assert body.rstrip().endswith(rec.task)


def test_edge_prompt_includes_outline_hint_with_sketch():
    rec = _ca_record()
    sketch = "1. Greeting\n2. Event details\n3. RSVP"
    body = rec.edge_prompt(sketch=sketch)[1]["content"]
    assert rec.task + OUTLINE_HINT + sketch in body
    assert body.count(OUTLINE_HINT) == 1


def test_edge_prompt_max_history():
    rec = _ca_record()
    assert len(rec.history) >= 2
    body = rec.edge_prompt(max_history=1)[1]["content"]
    assert rec.history[0][1] in body
    assert all(text not in body for _, text in rec.history[1:])
    body0 = rec.edge_prompt(max_history=0)[1]["content"]
    assert all(text not in body0 for _, text in rec.history)


def test_edge_prompt_paper(tmp_path):
    path = _write(tmp_path, "paper_x.json", [_paper_raw("1")])
    rec = load_records(path)[0]
    system, user = rec.edge_prompt(sketch="1. Problem\n2. Method")
    assert system["content"] == SYSTEM_WITH_CONTEXT["paper"]
    body = user["content"]
    assert body.startswith(HISTORY_HEAD)
    assert "Title: Old paper one\nContent: We study graphs" in body
    assert f"{TASK_HEAD}\n{rec.task}{OUTLINE_HINT}1. Problem\n2. Method" in body


# ---- bad inputs -----------------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _ca_raw(tid="1", instruction="Write a toast: mention my brother Joe's new bakery on Pine Street"):
    return {
        "tid": tid,
        "conversations": [{"from": "user", "value": instruction}, {"from": "assistant", "value": "Cheers!"}],
        "profile": [{"title": "Old post: about bread", "text": "I bake sourdough every Sunday morning."}],
        "additional_profile": "Name: Ann Lee\nOccupation: Baker",
    }


def _paper_raw(tid="1", task="Compose an abstract for the title 'Fast Graphs'"):
    prompt = (
        SYSTEM_WITH_CONTEXT["paper"] + "\n\n" + HISTORY_HEAD + "\n"
        "Title: Old paper one\nContent: We study graphs.\n\n"
        "Title: Old paper two\nContent: We study trees.\n\n" + TASK_HEAD + "\n" + task
    )
    return {"tid": tid, "conversations": [{"from": "user", "value": prompt}, {"from": "assistant", "value": "gold"}]}


def test_synthetic_context_aware_record(tmp_path):
    rec = load_records(_write(tmp_path, "ca.json", [_ca_raw()]))[0]
    assert rec.public_instruction == "Write a toast"
    assert rec.private_fields() == (
        "mention my brother Joe's new bakery on Pine Street",
        "Name: Ann Lee\nOccupation: Baker",
        "Old post: about bread",
        "I bake sourdough every Sunday morning.",
    )
    assert "Joe" not in repr(rec) and "Ann Lee" not in repr(rec) and "sourdough" not in repr(rec)


def test_synthetic_paper_without_wo_uses_task(tmp_path):
    rec = load_records(_write(tmp_path, "paper_x.json", [_paper_raw()]))[0]
    assert rec.kind == "paper"
    assert rec.public_instruction == rec.task == "Compose an abstract for the title 'Fast Graphs'"
    assert rec.history == (("Old paper one", "We study graphs."), ("Old paper two", "We study trees."))


def test_synthetic_paper_pairs_wo_by_tid(tmp_path):
    path = _write(tmp_path, "paper_x.json", [_paper_raw("a"), _paper_raw("b")])
    wo = [
        {"tid": "a", "conversations": [{"from": "user", "value": "Public A"}]},
        {"tid": "zzz", "conversations": [{"from": "user", "value": "Public B"}]},
    ]  # tid mismatch
    _write(tmp_path, "paper_x_wo.json", wo)
    a, b = load_records(path)
    assert a.public_instruction == "Public A"
    assert b.public_instruction == b.task  # no pairing on mismatched tid


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.json")


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2", "\u00ff\u00fe garbage"])
def test_invalid_json(tmp_path, text):
    path = _write(tmp_path, "bad.json", text)
    with pytest.raises(DataError, match="not valid JSON") as info:
        load_records(path)
    assert "bad.json" in info.value.message


@pytest.mark.parametrize("data", [{"tid": "1"}, "a string", 42, [], None])
def test_not_a_non_empty_list(tmp_path, data):
    with pytest.raises(DataError, match="non-empty JSON list"):
        load_records(_write(tmp_path, "bad.json", json.dumps(data)))


def test_record_not_an_object(tmp_path):
    with pytest.raises(DataError, match=r"bad\.json record 1 is a list"):
        load_records(_write(tmp_path, "bad.json", [_ca_raw(), ["x"]]))


def test_context_aware_record_missing_conversations(tmp_path):
    raw = _ca_raw()
    del raw["conversations"]
    with pytest.raises(DataError, match=r"bad\.json record 1: missing field 'conversations'"):
        load_records(_write(tmp_path, "bad.json", [_ca_raw(), raw]))


def test_plain_record_missing_conversations(tmp_path):
    with pytest.raises(DataError, match=r"bad\.json record 0: missing field 'conversations'"):
        load_records(_write(tmp_path, "bad.json", [{"tid": "1"}]))


@pytest.mark.parametrize("conv", [[], [{"from": "user"}], [{"from": "user", "value": 3}], ["text"]])
def test_bad_conversations(tmp_path, conv):
    raw = _ca_raw()
    raw["conversations"] = conv
    with pytest.raises(DataError, match=r"record 0: conversations\[0\]\.value"):
        load_records(_write(tmp_path, "bad.json", [raw]))


def test_conversations_wrong_type(tmp_path):
    raw = _ca_raw()
    raw["conversations"] = "hello"
    with pytest.raises(DataError, match=r"record 0: field 'conversations' should be list"):
        load_records(_write(tmp_path, "bad.json", [raw]))


@pytest.mark.parametrize("instruction", ["", "   ", ": only private details here"])
def test_empty_instruction(tmp_path, instruction):
    with pytest.raises(DataError, match=r"bad\.json record 0: the instruction is empty"):
        load_records(_write(tmp_path, "bad.json", [_ca_raw(instruction=instruction)]))


def test_bad_profile_item(tmp_path):
    raw = _ca_raw()
    raw["profile"] = [{"title": "no text"}]
    with pytest.raises(DataError, match=r"record 0: profile\[0\]"):
        load_records(_write(tmp_path, "bad.json", [raw]))


def test_empty_paper_task(tmp_path):
    with pytest.raises(DataError, match=r"record 0: the '## Task' section is empty"):
        load_records(_write(tmp_path, "paper_x.json", [_paper_raw(task="   ")]))


def test_wo_only_paper_file_has_no_private_context(tmp_path):
    wo = [
        {
            "tid": "0",
            "conversations": [
                {"from": "user", "value": "Compose an abstract for 'X'"},
                {"from": "assistant", "value": "gold"},
            ],
        }
    ]
    path = _write(tmp_path, "paper_dev_wo.json", wo)
    with pytest.raises(DataError, match=r"paper_dev_wo\.json record 0 has no private context"):
        load_records(path)


@needs_data
def test_real_wo_file_is_refused():
    with pytest.raises(DataError, match=r"paper_dev_wo\.json record 0 has no private context"):
        load_records(DATA_DIR / "paper_dev_wo.json")


def test_data_error_has_hint(tmp_path):
    with pytest.raises(DataError) as info:
        load_records(_write(tmp_path, "bad.json", {"x": 1}))
    assert info.value.hint
