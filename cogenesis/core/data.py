"""Records in the CoGenesis personalized-writing format (context-aware and paper-abstract files).

A :class:`Record` separates what the cloud may see (``public_instruction``) from what stays on
the device (everything in ``private_fields()``). The loader accepts:
- context-aware records: ``conversations``, ``profile``, ``additional_profile``;
- with-context paper files (user turn = system line + "## History Paper Abstracts" + "## Task"),
  optionally paired with their ``_wo`` file (found automatically beside it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cogenesis.core.errors import DataError
from cogenesis.core.prompts import OUTLINE_HINT, SYSTEM_WITH_CONTEXT, split_instruction

HISTORY_HEAD = "## History Paper Abstracts"
TASK_HEAD = "## Task"
FORMAT_HINT = (
    "expected a JSON list of CoGenesis records (context_aware_*.json or paper_*.json, "
    "see shared/data/cogenesis/README.md)"
)


@dataclass(frozen=True, repr=False)
class Record:
    tid: str
    kind: Literal["context_aware", "paper"]
    public_instruction: str  # the only text the cloud may see
    task: str  # the user's whole instruction (may include private details)
    profile: str = ""  # additional_profile (private)
    history: tuple[tuple[str, str], ...] = ()  # (title, text) past writings (private)
    gold: str | None = None
    declared_public: bool = False  # the user split the public instruction off the task (see OutboundGate)
    _private: tuple[str, ...] = field(default=(), compare=False)

    def __repr__(self) -> str:  # never print private context by accident
        return f"Record(tid={self.tid!r}, kind={self.kind!r}, public_instruction={self.public_instruction!r})"

    def private_fields(self) -> tuple[str, ...]:
        """Every private string of this record (instruction details, profile, history)."""
        return self._private

    def edge_prompt(self, sketch: str | None = None, max_history: int | None = None) -> list[dict]:
        """The with-context conversation the device's small model sees (paper's code, verbatim)."""
        history = self.history if max_history is None else self.history[:max_history]
        task = self.task + (OUTLINE_HINT + sketch if sketch else "")
        if self.kind == "paper":
            examples = "\n\n".join(f"Title: {t}\nContent: {x}" for t, x in history)
            body = f"{HISTORY_HEAD}\n{examples}\n\n{TASK_HEAD}\n{task}\n"
        else:
            hist = "\n\n".join(f"Task: {t}\nContent: {x}" for t, x in history)
            body = f"## User Profile\n{self.profile}\n\n## User Writing History\n{hist}\n\n{TASK_HEAD}\n{task}\n"
        return [{"role": "system", "content": SYSTEM_WITH_CONTEXT[self.kind]}, {"role": "user", "content": body}]


def _need(obj: dict, key: str, typ: type, where: str):
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}", hint=FORMAT_HINT)
    if not isinstance(obj[key], typ):
        raise DataError(
            f"{where}: field {key!r} should be {typ.__name__}, got {type(obj[key]).__name__}", hint=FORMAT_HINT
        )
    return obj[key]


def _turns(raw: dict, where: str) -> tuple[str, str | None]:
    conv = _need(raw, "conversations", list, where)
    if not conv or not isinstance(conv[0], dict) or not isinstance(conv[0].get("value"), str):
        raise DataError(f"{where}: conversations[0].value (the user's instruction) is missing", hint=FORMAT_HINT)
    gold = conv[1].get("value") if len(conv) > 1 and isinstance(conv[1], dict) else None
    return conv[0]["value"], gold


def parse_context_aware(raw: dict, where: str) -> Record:
    instruction, gold = _turns(raw, where)
    public, private_part = split_instruction(instruction)
    if not public:
        raise DataError(f"{where}: the instruction is empty", hint="each record needs a non-empty user instruction")
    profile = raw.get("additional_profile") or ""
    history = []
    for j, item in enumerate(_need(raw, "profile", list, where)):
        if not isinstance(item, dict) or "text" not in item:
            raise DataError(f"{where}: profile[{j}] should be an object with 'title' and 'text'", hint=FORMAT_HINT)
        history.append((str(item.get("title", "")), str(item["text"])))
    private = tuple(s for s in (private_part, profile, *(t for pair in history for t in pair)) if s.strip())
    return Record(
        tid=str(raw.get("tid", where)),
        kind="context_aware",
        public_instruction=public,
        task=instruction.strip(),
        profile=profile,
        history=tuple(history),
        gold=gold,
        declared_public=": " in instruction,  # "<general task>: <personal details>": the user split it
        _private=private,
    )


def parse_paper(raw: dict, where: str, public_override: str | None = None) -> Record:
    prompt, gold = _turns(raw, where)
    if HISTORY_HEAD not in prompt or TASK_HEAD not in prompt:
        raise DataError(
            f"{where}: a paper record needs '{HISTORY_HEAD}' and '{TASK_HEAD}' sections",
            hint="pass the with-context paper file (paper_dev.json), not the _wo file",
        )
    hist_text, _, task = prompt.split(HISTORY_HEAD, 1)[1].partition(TASK_HEAD)
    task = task.strip()
    if not task:
        raise DataError(f"{where}: the '{TASK_HEAD}' section is empty", hint="each record needs an instruction")
    history = []
    for block in hist_text.strip().split("\n\nTitle: "):
        title, _, content = block.removeprefix("Title: ").partition("\nContent: ")
        if content.strip():
            history.append((title.strip(), content.strip()))
    private = tuple(s for pair in history for s in pair if s.strip())
    return Record(
        tid=str(raw.get("tid", where)),
        kind="paper",
        public_instruction=(public_override or task).strip(),
        task=task,
        history=tuple(history),
        gold=gold,
        declared_public=True,  # the paper's task names a public title; the author's past papers are the private part
        _private=private,
    )


def _read_json_list(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist", hint="pass --data with a CoGenesis JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc})", hint=FORMAT_HINT) from None
    if not isinstance(data, list) or not data:
        raise DataError(f"{path} should hold a non-empty JSON list of records", hint=FORMAT_HINT)
    return data


def load_records(path: str | Path, limit: int | None = None) -> list[Record]:
    """Load and validate records; errors name the file, the record and the field."""
    path = Path(path)
    data = _read_json_list(path)[:limit]
    wo_path = path.with_name(path.stem + "_wo" + path.suffix)
    wo = _read_json_list(wo_path) if wo_path.is_file() and not path.stem.endswith("_wo") else None
    records = []
    for i, raw in enumerate(data):
        where = f"{path.name} record {i}"
        if not isinstance(raw, dict):
            raise DataError(f"{where} is a {type(raw).__name__}, not an object", hint=FORMAT_HINT)
        if "additional_profile" in raw or "profile" in raw:
            records.append(parse_context_aware(raw, where))
            continue
        first, _ = _turns(raw, where)
        if HISTORY_HEAD in first:
            public = None
            if wo is not None and i < len(wo) and isinstance(wo[i], dict) and wo[i].get("tid") == raw.get("tid"):
                public = _turns(wo[i], f"{wo_path.name} record {i}")[0]
            records.append(parse_paper(raw, where, public))
            continue
        raise DataError(f"{where} has no private context (no profile, no '{HISTORY_HEAD}')", hint=FORMAT_HINT)
    return records


def sample_data_path() -> Path:
    """The records shipped with the package (8 from context_aware_test.json) for the demo."""
    return Path(__file__).parent / "assets" / "sample_records.json"
