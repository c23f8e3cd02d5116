"""A benchmark report as a markdown table and a PNG plot (pure functions of the JSON report)."""

from __future__ import annotations

from pathlib import Path

COLUMNS = [  # (header, key, format)
    ("N", "sessions", "{}"),
    ("variant", "variant", "{}"),
    ("decode tok/s", "decode_tokens_per_s", "{:.1f}"),
    ("e2e tok/s", "tokens_per_s", "{:.1f}"),
    ("TTFT p50 s", "ttft_p50_s", "{:.2f}"),
    ("session p50 s", "session_p50_s", "{:.2f}"),
    ("session p99 s", "session_p99_s", "{:.2f}"),
    ("overhead p50 ms", "overhead_p50_ms", "{:.2f}"),
    ("overhead p99 ms", "overhead_p99_ms", "{:.2f}"),
    ("RTT p50 ms", "rtt_p50_ms", "{:.1f}"),
    ("tokens/RT", "tokens_per_round_trip", "{:.2f}"),
]


def _cell(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def markdown_table(report: dict) -> str:
    ratios = {(r["sessions"], r["variant"]): r for r in report.get("ratios", [])}
    head = [h for h, _, _ in COLUMNS] + ["× large-only", "× stateless"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        cells = [_cell(r.get(key), fmt) for _, key, fmt in COLUMNS]
        if r.get("truncated"):
            cells[1] += " (cut at budget)"
        if r.get("failed"):
            cells[1] += f" ({r['failed']} failed)"
        q = ratios.get((r["sessions"], r["variant"]), {})
        cells += [_cell(q.get("vs_large_only"), "{:.2f}"), _cell(q.get("vs_stateless"), "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    variants = list(dict.fromkeys(r["variant"] for r in results))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, v in enumerate(variants):
        color = f"C{i}"  # one color per variant in both panels
        rows = sorted((r for r in results if r["variant"] == v and r["tokens"]), key=lambda r: r["sessions"])
        measured = [r for r in rows if r.get("decode_tokens_per_s") is not None]  # runs cut before decoding: no point
        ax1.plot(
            [r["sessions"] for r in measured],
            [r["decode_tokens_per_s"] for r in measured],
            marker="o",
            label=v,
            color=color,
        )
        traced = [r for r in rows if r.get("overhead_p50_ms") is not None]
        if traced:
            ax2.plot(
                [r["sessions"] for r in traced],
                [r["overhead_p50_ms"] for r in traced],
                marker="o",
                color=color,
                label=f"{v} p50",
            )
            ax2.plot(
                [r["sessions"] for r in traced],
                [r["overhead_p99_ms"] for r in traced],
                marker="x",
                linestyle="--",
                color=color,
                label=f"{v} p99",
            )
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sessions")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax1.set_ylabel("decode tokens/s (all sessions)")
    ax1.set_title("throughput")
    ax2.set_ylabel("ms per step")
    if ax2.lines:
        ax2.set_yscale("log")
    ax2.set_title("exchange overhead (bus + serialization)")
    opts = report.get("options", {})
    fig.suptitle(
        f"cogenesis bench exchange: {opts.get('max_new_tokens')} tokens/session, "
        f"top-k {opts.get('top_k')}, {report.get('machine', {}).get('cpus')} CPUs",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
