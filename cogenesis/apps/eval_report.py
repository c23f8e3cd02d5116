"""The evaluation report as a markdown table (like the paper's Table 1) and a PNG bar chart."""

from __future__ import annotations

from pathlib import Path

COLUMNS = [  # (header, key, format)
    ("setting", "setting", "{}"),
    ("cloud sees context", "cloud_sees_context", "{}"),
    ("NLL/token ↓", "nll_per_token", "{:.3f}"),
    ("PPL ↓", "perplexity", "{:.1f}"),
    ("ROUGE-L ↑", "rouge_l", "{:.4f}"),
    ("words", "words", "{:.0f}"),
    ("exposure ↓", "exposure", "{:.4f}"),
    ("gold in candidates", "coverage", "{:.3f}"),
    ("round trips/token", "round_trips_per_token", "{:.2f}"),
    ("failed", "failed", "{}"),
]
PRICE = [  # the price of privacy (eval --span-policies): per span policy, per record or session
    ("span policy", "span_policy", "{}"),
    ("private spans written", "private_spans_written", "{:.2f}"),
    ("private spans sent ↓", "private_spans_sent", "{:.2f}"),
    ("spans replaced", "spans_replaced", "{:.2f}"),
    ("held tokens", "held_tokens", "{:.1f}"),
    ("refused", "refused", "{}"),
]
JUDGE = [
    ("judge overall", "overall"),
    ("judge personalization", "personalization"),
    ("judge overall w/o profile", "overall_without_profile"),
]


def _cell(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def markdown_table(report: dict) -> str:
    rows = report["settings"]
    judged = any("judge" in r for r in rows)
    columns = COLUMNS + (PRICE if any("span_policy" in r for r in rows) else [])
    head = [h for h, _, _ in columns] + ([h for h, _ in JUDGE] if judged else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_cell(r.get(key), fmt) for _, key, fmt in columns]
        if judged:
            cells += [_cell(r.get("judge", {}).get(key), "{:.2f}") for _, key in JUDGE]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> Path:
    """Bar charts of NLL/token, ROUGE-L and exposure (and judge ratings when present) per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["settings"]
    names = [r["setting"] for r in rows]
    panels = [
        ("NLL/token of gold (lower is better)", "nll_per_token"),
        ("ROUGE-L F1 (higher is better)", "rouge_l"),
        ("privacy exposure (lower is better)", "exposure"),
    ]
    if any("span_policy" in r for r in rows):
        panels.append(("private spans sent per record (lower is better)", "private_spans_sent"))
    if any("judge" in r for r in rows):
        panels.append(("judge: overall (1-10)", "judge.overall"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 0.45 * len(rows) + 1.8), sharey=True)
    colors = [
        "#8c8c8c" if n == "large_with_context" else "#d62728" if n.startswith("logits_") else "#1f77b4" for n in names
    ]
    for ax, (title, key) in zip(axes, panels):
        values = [(r.get("judge", {}).get(key.split(".")[1]) if key.startswith("judge.") else r.get(key)) for r in rows]
        ax.barh(range(len(rows)), [v or 0 for v in values], color=colors)
        for y, v in enumerate(values):
            ax.text(v or 0, y, "–" if v is None else f" {v:.3g}", va="center", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    axes[0].set_yticks(range(len(rows)), names)
    fig.suptitle(
        f"cogenesis eval: {report['records']} records of {Path(report['options']['data']).name} "
        f"(grey: reference with context; red: logits fusion)",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
