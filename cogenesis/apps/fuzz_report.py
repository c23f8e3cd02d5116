"""The report of ``cogenesis fuzz`` (``cogenesis.apps.fuzz``): the counts of every verdict by surface and kind, the
legitimate outputs against the reference, the totals that decide the exit code, the table and the finding lines."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from cogenesis.apps.chaos import check_sessions
from cogenesis.apps.chaos_pool import Outcome
from cogenesis.apps.fuzz_cases import SURFACES
from cogenesis.apps.fuzz_send import FINDINGS, VERDICTS, Result

MAX_FINDINGS = 200  # findings listed in the report (all are counted)
NOTABLE = ("dropped", "unsent")  # not findings, but listed too (the first MAX_NOTABLE): what ended a connection
MAX_NOTABLE = 50


@dataclass
class LegitRun:
    """One run of the legitimate workload: the logits sessions' outcomes, the outlines' texts (None: failed, with
    the error in ``outline_errors``)."""

    outcomes: list[Outcome] = field(default_factory=list)
    outlines: list[str | None] = field(default_factory=list)
    outline_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0


def compare_outlines(reference: Sequence[str | None], got: Sequence[str | None]) -> list[dict]:
    """One entry per outline: identical to the reference or not (texts are public instructions' outlines; only
    their lengths are reported)."""
    out = []
    for i, (ref, text) in enumerate(zip(reference, got)):
        same = ref is not None and text == ref
        out.append(
            {"index": i, "identical": same, "chars": None if text is None else len(text), "failed": text is None}
        )
    return out


class Tally:
    """Every result, counted by surface and kind; the findings kept (the first ``MAX_FINDINGS``) for the report."""

    def __init__(self, progress: Callable[[int], None] = lambda n: None) -> None:
        self.by_surface: dict[str, Counter[str]] = defaultdict(Counter)
        self.by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        self.findings: list[Result] = []
        self.notable: list[Result] = []
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.done = 0
        self.progress = progress
        self._lock = threading.Lock()

    def add(self, results: Sequence[Result]) -> None:
        with self._lock:
            for r in results:
                self.by_surface[r.surface][r.verdict] += 1
                self.by_kind[r.kind][r.verdict] += 1
                self.seconds[r.kind].append(r.seconds)
                if r.verdict in FINDINGS and len(self.findings) < MAX_FINDINGS:
                    self.findings.append(r)
                elif r.verdict in NOTABLE and len(self.notable) < MAX_NOTABLE:
                    self.notable.append(r)
            self.done += len(results)
            done = self.done
        self.progress(done)

    def count(self, verdict: str) -> int:
        return sum(c[verdict] for c in self.by_surface.values())

    def to_json(self) -> dict:
        return {
            "by_surface": {s: dict(self.by_surface[s]) for s in SURFACES if s in self.by_surface},
            "by_kind": {k: dict(v) for k, v in sorted(self.by_kind.items())},
            "seconds_by_kind": {
                k: {"mean": round(sum(v) / len(v), 3), "max": round(max(v), 3)}
                for k, v in sorted(self.seconds.items())
                if v
            },
            "notable": [asdict(r) for r in self.notable],
        }


# ---- the report ---------------------------------------------------------------------------------------------


def legit_report(reference: LegitRun, rounds: Sequence[LegitRun]) -> dict:
    """Every fuzzed round's outputs against the reference: sessions and outlines identical, failed, how."""
    ref = {o.client: o for o in reference.outcomes}
    sessions = identical = failed = 0
    differing: list[dict] = []
    outlines = outlines_same = 0
    outline_diffs: list[dict] = []
    errors: Counter[str] = Counter()
    for i, run in enumerate(rounds, 1):
        for check in check_sessions(ref, run.outcomes):
            sessions += 1
            identical += check.identical
            failed += not check.ok
            if not check.identical:
                differing.append({"round": i, **asdict(check)})
            if check.error:
                errors[check.error[:120]] += 1
        for c in compare_outlines(reference.outlines, run.outlines):
            outlines += 1
            outlines_same += c["identical"]
            if not c["identical"]:
                outline_diffs.append({"round": i, **c})
        errors.update(e[:120] for e in run.outline_errors)
    return {
        "rounds": len(rounds),
        "sessions": sessions,
        "identical": identical,
        "failed": failed,
        "outlines": outlines,
        "outlines_identical": outlines_same,
        "differing_sessions": differing[:50],
        "differing_outlines": outline_diffs[:50],
        "errors": dict(errors),
        "seconds": [round(r.seconds, 1) for r in rounds],
    }


def totals(report: dict) -> dict[str, int]:
    fz = report.get("fuzz", {})
    by_surface = fz.get("by_surface", {})
    count = lambda v: sum(c.get(v, 0) for c in by_surface.values())  # noqa: E731
    legit = report.get("legit", {})
    changed = (legit.get("sessions", 0) - legit.get("identical", 0)) + (
        legit.get("outlines", 0) - legit.get("outlines_identical", 0)
    )
    return {
        "crashes": len(report.get("crashes", [])),
        "5xx": count("server_error"),
        "stuck": int(report.get("stuck", {}).get("entries", 0)),
        "hung": count("hung"),
        "breaches": count("breach"),
        "changed_outputs": changed,
        "harness_errors": len(fz.get("worker_errors", [])) + (1 if fz.get("error") else 0),
    }


def passed(report: dict) -> bool:
    t = report["totals"]
    legit = report.get("legit", {})
    return bool(legit.get("sessions")) and not any(t.values())


# ---- the table ------------------------------------------------------------------------------------------------

TABLE_COLUMNS = ("surface", "cases", *VERDICTS)


def table_rows(report: dict) -> list[list[str]]:
    """One row per surface and a total, with the count of each verdict."""
    by_surface = report.get("fuzz", {}).get("by_surface", {})
    rows = []
    total: Counter[str] = Counter()
    for s in SURFACES:
        c = Counter(by_surface.get(s, {}))
        total.update(c)
        rows.append([s, str(sum(c.values())), *(str(c.get(v, 0)) for v in VERDICTS)])
    rows.append(["all", str(sum(total.values())), *(str(total.get(v, 0)) for v in VERDICTS)])
    return rows


def render_table(report: dict):
    from rich.table import Table

    t = report["totals"]
    title = (
        f"cogenesis fuzz: {report['settings']['count']} cases - crashes {t['crashes']}, 5xx {t['5xx']}, "
        f"stuck {t['stuck']}, hung {t['hung']}, breaches {t['breaches']}, changed outputs {t['changed_outputs']}: "
        f"{'PASS' if report['passed'] else 'FAIL'}"
    )
    table = Table(title=title)
    for col in TABLE_COLUMNS:
        table.add_column(col, justify="left" if col == "surface" else "right")
    for row in table_rows(report):
        bad = any(row[2 + VERDICTS.index(v)] != "0" for v in FINDINGS)
        table.add_row(*row, style="red" if bad else None)
    return table


def summary_lines(report: dict) -> list[str]:
    """The legitimate outputs and the run in a few lines, then every finding (capped) one per line."""
    lines = []
    legit = report.get("legit", {})
    if legit:
        lines.append(
            f"legitimate: {legit['identical']}/{legit['sessions']} sessions and {legit['outlines_identical']}/"
            f"{legit['outlines']} outlines identical to the reference over {legit['rounds']} round(s); "
            f"{legit['failed']} failed"
        )
    fz = report.get("fuzz", {})
    if fz.get("seconds") is not None:
        lines.append(f"fuzz: {fz.get('sent')} cases in {fz['seconds']} s ({fz.get('rate_per_s')}/s)")
    for e in [*fz.get("worker_errors", []), *([fz["error"]] if fz.get("error") else [])]:
        lines.append(f"harness error: {e}")
    for c in report.get("crashes", []):
        lines.append(f"crash: {c}")
    if report.get("stuck", {}).get("entries"):
        lines.append(f"stuck: {report['stuck']['streams']}")
    for f in report.get("findings", []):
        lines.append(f"{f['verdict']}: {f['surface']} case {f['n']} {f['kind']} ({f['note']}): {f['detail']}")
    for d in legit.get("differing_sessions", []):
        lines.append(
            f"changed: round {d['round']} session {d['client']}: first diff {d['first_diff']}, error {d['error']}"
        )
    for d in legit.get("differing_outlines", []):
        lines.append(f"changed: round {d['round']} outline {d['index']} ({'failed' if d['failed'] else 'differs'})")
    return lines
