"""What several commands share: a flag, JSON reports and a progress bar."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_gold_tokens_flag(p) -> None:
    """The flag of the commands that teacher-force gold answers through both models (train-fusion, eval)."""
    p.add_argument("--max-gold-tokens", type=int, default=384, help="gold tokens used per record")


def write_json(path: str, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1))


def progress_bar() -> tuple[Any, Callable[[str, int, int], None]]:
    """A rich progress bar as a (stage, done, total) callback, and the bar to stop."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = bar.add_task("starting", total=None)

    def update(stage: str, done: int, total: int) -> None:
        bar.update(task, description=stage, completed=done, total=total)

    return bar, update
