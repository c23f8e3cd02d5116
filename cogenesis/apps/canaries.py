"""Canaries for the privacy audit (``cogenesis audit-privacy``): unique private strings planted in every
private field of real records, so that any of them found where the cloud can look is a proven leak.

Kinds (``KINDS``):
- ``string``: a random unique token string (``vorkelin-4471-quastrobe``);
- ``name``: a person's name (a common first name, an invented surname);
- ``email``: an email address built on that name;
- ``phone``: a phone number;
- ``writing``: a real 12-word span of one of the record's past writings (nothing planted: the writing's own words).

Planting happens on the raw JSON (every non-empty private field gets one sentence holding a fresh
canary of each planted kind); the planted file is loaded with the ordinary loader, so the records
are real records, otherwise unchanged. A canary's text never appears in a report: reports name its
kind, its record's ``tid`` and the field it was planted in.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cogenesis.core.data import HISTORY_HEAD, TASK_HEAD, Record, load_records, sample_data_path
from cogenesis.core.errors import DataError
from cogenesis.core.privacy import normalize as _normalize
from cogenesis.core.prompts import split_instruction

PLANTED_KINDS = ("string", "name", "email", "phone")
KINDS = (*PLANTED_KINDS, "writing")
WRITING_WORDS = 12  # words of a past writing that make one ``writing`` canary

_FIRST_NAMES = (
    "Anna", "Bruno", "Clara", "Daniel", "Elena", "Felix", "Grace", "Hugo", "Irene", "Jonas", "Karin", "Leo",
    "Maya", "Nadia", "Oscar", "Paula", "Quentin", "Rosa", "Simon", "Tara", "Ulrich", "Vera", "Walter", "Yara",
)  # fmt: skip
_ONSETS = (
    "b",
    "br",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "k",
    "kl",
    "l",
    "m",
    "n",
    "p",
    "qu",
    "r",
    "s",
    "st",
    "t",
    "tr",
    "v",
    "z",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io")
_CODAS = ("", "", "k", "l", "n", "r", "s", "th", "x")
_DOMAINS = ("com", "net", "org", "io")


def normalize(text: str) -> str:
    """Text as the audit compares it: as the gate's matches see it (``cogenesis.core.privacy.normalize``:
    NFKC, look-alikes mapped, casefolded, invisible characters removed, whitespace collapsed)."""
    return _normalize(text)[0]


@dataclass(frozen=True)
class Canary:
    """One canary: its kind, its text (never reported), the record and private field that hold it."""

    kind: str
    text: str
    tid: str
    field: str  # "instruction", "profile", "history[2].title", "history[2].text"

    def __repr__(self) -> str:  # never print the text by accident
        return f"Canary(kind={self.kind!r}, tid={self.tid!r}, field={self.field!r})"


class _Maker:
    """Fresh canaries of the planted kinds, unique in one audit (seeded: the same data and seed plant the same)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.used: set[str] = set()

    def _unique(self, make: Callable[[], str]) -> str:
        while True:
            text = make()
            if normalize(text) not in self.used:
                self.used.add(normalize(text))
                return text

    def _word(self, syllables: int) -> str:
        r = self.rng
        return "".join(r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS) for _ in range(syllables))

    def _digits(self, n: int) -> str:
        return str(self.rng.randint(10 ** (n - 1), 10**n - 1))

    def planted(self) -> dict[str, str]:
        """One canary of each planted kind (the email is built on the name, as real ones are)."""
        first = self.rng.choice(_FIRST_NAMES)
        surname = self._unique(lambda: self._word(3).capitalize())
        return {
            "string": self._unique(lambda: f"{self._word(3)}-{self._digits(4)}-{self._word(3)}"),
            "name": f"{first} {surname}",
            "email": self._unique(
                lambda: (
                    f"{first.lower()}.{surname.lower()}{self._digits(2)}@{self._word(2)}.{self.rng.choice(_DOMAINS)}"
                )
            ),
            "phone": self._unique(lambda: f"+1 ({self._digits(3)}) {self._digits(3)}-{self._digits(4)}"),
        }


def _sentence(found: dict[str, str]) -> str:
    return f"Contact {found['name']} ({found['email']}, {found['phone']}) with the code {found['string']}."


def _plant_in(maker: _Maker, tid: str, field: str, text: str, canaries: list[Canary]) -> str:
    """``text`` with one sentence of fresh canaries appended (empty fields are not private: left as they are)."""
    if not text.strip():
        return text
    found = maker.planted()
    canaries.extend(Canary(kind, found[kind], tid, field) for kind in PLANTED_KINDS)
    text = text.rstrip()
    return f"{text}{'' if text.endswith(('.', '!', '?')) else '.'} {_sentence(found)}"


def _plant_context_aware(raw: dict, maker: _Maker, tid: str, canaries: list[Canary]) -> None:
    turn = raw["conversations"][0]
    public, private = split_instruction(turn["value"])
    if private:  # an instruction without ": " holds nothing private to plant in
        turn["value"] = f"{public}: {_plant_in(maker, tid, 'instruction', private, canaries)}"
    if isinstance(raw.get("additional_profile"), str):
        raw["additional_profile"] = _plant_in(maker, tid, "profile", raw["additional_profile"], canaries)
    for j, item in enumerate(raw["profile"]):
        if isinstance(item.get("title"), str):
            item["title"] = _plant_in(maker, tid, f"history[{j}].title", item["title"], canaries)
        item["text"] = _plant_in(maker, tid, f"history[{j}].text", str(item["text"]), canaries)


def _plant_paper(raw: dict, maker: _Maker, tid: str, canaries: list[Canary]) -> None:
    turn = raw["conversations"][0]
    head, _, rest = turn["value"].partition(HISTORY_HEAD)
    history, _, task = rest.partition(TASK_HEAD)
    blocks = []
    for j, block in enumerate(history.strip().split("\n\nTitle: ")):
        title, sep, content = block.removeprefix("Title: ").partition("\nContent: ")
        title = _plant_in(maker, tid, f"history[{j}].title", title.strip(), canaries)
        if sep:
            content = _plant_in(maker, tid, f"history[{j}].text", content.strip(), canaries)
        blocks.append(f"Title: {title}{sep}{content}")
    turn["value"] = f"{head}{HISTORY_HEAD}\n" + "\n\n".join(blocks) + f"\n\n{TASK_HEAD}{task}"


def writing_canaries(record: Record, words: int = WRITING_WORDS) -> list[Canary]:
    """The first ``words``-word span of each past writing (as written; none from a shorter writing), unless
    the public instruction holds it."""
    public = normalize(record.public_instruction)
    out = []
    for j, (_, text) in enumerate(record.history):
        split = text.split()
        span = " ".join(split[:words])
        if len(split) >= words and normalize(span) not in public:
            out.append(Canary("writing", span, record.tid, f"history[{j}].text"))
    return out


def plant(
    data: str | Path | None, limit: int | None, workdir: Path, seed: int = 0
) -> tuple[list[Record], list[Canary]]:
    """Load ``data`` (None: the records shipped with the package), plant canaries in every private field,
    and return the planted records with every canary (planted kinds and ``writing`` spans).

    The planted file (and a paper file's ``_wo`` companion) is written in ``workdir``."""
    path = Path(data) if data is not None else sample_data_path()
    original = load_records(path, limit)  # the loader's own checks and errors first
    raw = [dict(r, tid=rec.tid) for r, rec in zip(json.loads(path.read_text(encoding="utf-8")), original)]
    maker = _Maker(seed)
    planted: list[Canary] = []
    for rec in raw:
        plant_in = _plant_context_aware if "additional_profile" in rec or "profile" in rec else _plant_paper
        plant_in(rec, maker, rec["tid"], planted)
    out = workdir / "planted.json"
    out.write_text(json.dumps(raw, ensure_ascii=False), encoding="utf-8")
    companion = path.with_name(path.stem + "_wo" + path.suffix)
    if companion.is_file() and not path.stem.endswith("_wo"):
        shutil.copyfile(companion, workdir / "planted_wo.json")
    records = load_records(out)
    canaries = planted + [c for r in original for c in writing_canaries(r)]
    _check_planted(records, canaries)
    return records, canaries


def _check_planted(records: list[Record], canaries: list[Canary]) -> None:
    """Every canary is private: in a private field of its record, not in its public instruction."""
    by_tid = {r.tid: r for r in records}
    for c in canaries:
        rec = by_tid[c.tid]
        text = normalize(c.text)
        if text in normalize(rec.public_instruction) or not any(text in normalize(f) for f in rec.private_fields()):
            raise DataError(
                f"record {c.tid}: a {c.kind} canary planted in {c.field} is not private after loading",
                hint="records must keep their private context in the fields CoGenesis reads (see README)",
            )


def by_kind(canaries: list[Canary]) -> dict[str, int]:
    """How many canaries of each kind (every kind listed)."""
    return {k: sum(c.kind == k for c in canaries) for k in KINDS}


def per_record(canaries: list[Canary], kind: str) -> Iterator[tuple[str, list[Canary]]]:
    """``(tid, its canaries of kind)`` for every record that has one, in planting order."""
    seen: dict[str, list[Canary]] = {}
    for c in canaries:
        if c.kind == kind:
            seen.setdefault(c.tid, []).append(c)
    yield from seen.items()
