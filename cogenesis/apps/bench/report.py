"""A benchmark report as a markdown table and PNG plots (pure functions of the JSON report)."""

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
    ("step p50 ms", "step_p50_ms", "{:.1f}"),
    ("step p99 ms", "step_p99_ms", "{:.1f}"),
    ("overhead p50 ms", "overhead_p50_ms", "{:.2f}"),
    ("overhead p99 ms", "overhead_p99_ms", "{:.2f}"),
    ("RTT p50 ms", "rtt_p50_ms", "{:.1f}"),
    ("tokens/RT", "tokens_per_round_trip", "{:.2f}"),
    ("share of peak", "share_of_peak", "{:.1%}"),
]
RATIOS = [  # (header, key in the report's ratios, format)
    ("× large-only", "vs_large_only", "{:.2f}"),
    ("× shared limit", "vs_shared_limit", "{:.2f}"),
    ("× stateless", "vs_stateless", "{:.1f}"),
]
# The scaling figure: how each of these grows with the sessions (label, line style), when the report has it.
SCALING = {
    "large-only": ("large-only (same threads)", "-"),
    "cogenesis-isolated": ("cogenesis-isolated", "-"),
    "cogenesis": ("cogenesis (real devices)", "-"),
    "cogenesis-lookahead": ("cogenesis-lookahead", "--"),
    "cogenesis-isolated-lookahead": ("cogenesis-isolated-lookahead", "--"),
}


def _cell(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def markdown_table(report: dict) -> str:
    ratios = {(r["sessions"], r["variant"]): r for r in report.get("ratios", [])}
    head = [h for h, _, _ in COLUMNS] + [h for h, _, _ in RATIOS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        cells = [_cell(r.get(key), fmt) for _, key, fmt in COLUMNS]
        if r.get("truncated"):
            cells[1] += " (cut at budget)"
        if r.get("failed"):
            cells[1] += f" ({r['failed']} failed)"
        q = ratios.get((r["sessions"], r["variant"]), {})
        cells += [_cell(q.get(key), fmt) for _, key, fmt in RATIOS]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = report.get("skipped") or []
    if skipped:
        lines += ["", "Skipped:"] + [f"- {s['variant']} with {s['sessions']} sessions: {s['reason']}" for s in skipped]
    return "\n".join(lines)


def scaling_path(path: Path) -> Path:
    """Where ``plot`` writes the scaling figure, beside the main plot."""
    return path.with_name(f"{path.stem}-scaling{path.suffix}")


def plot(report: dict, path: Path) -> None:
    """The main plot at ``path`` (throughput and exchange overhead of every variant) and the scaling figure at
    ``scaling_path(path)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    variants = list(dict.fromkeys(r["variant"] for r in results))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, v in enumerate(variants):
        color = f"C{i}"  # one color per variant in both panels
        rows = _rows(results, v)
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
    _sessions_axes(ax1, ax2)
    ax1.set_ylabel("decode tokens/s (all sessions)")
    ax1.set_title("throughput")
    ax2.set_ylabel("ms per step")
    if ax2.lines:
        ax2.set_yscale("log")
    ax2.set_title("exchange overhead (bus + serialization)")
    fig.suptitle(_title(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    plot_scaling(report, scaling_path(path))


def plot_scaling(report: dict, path: Path) -> None:
    """Tokens/s and step latency p50/p99 against the sessions (log x) of large-only, the cogenesis variants with
    instant and with real devices, and the shared limit (compute-limit), those the report has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (v, (label, style)) in enumerate(SCALING.items()):
        color = f"C{i}"
        rows = _rows(results, v)
        measured = [r for r in rows if r.get("decode_tokens_per_s") is not None]
        if measured:
            ax1.plot(
                [r["sessions"] for r in measured],
                [r["decode_tokens_per_s"] for r in measured],
                marker="o",
                linestyle=style,
                color=color,
                label=label,
            )
        stepped = [r for r in rows if r.get("step_p50_ms") is not None]
        if stepped:
            xs = [r["sessions"] for r in stepped]
            ax2.plot(xs, [r["step_p50_ms"] for r in stepped], marker="o", linestyle=style, color=color, label=label)
            ax2.plot(xs, [r["step_p99_ms"] for r in stepped], marker="x", linestyle=":", color=color)
    limit = [r for r in _rows(results, "compute-limit") if r.get("decode_tokens_per_s") is not None]
    if limit:
        ax1.plot(
            [r["sessions"] for r in limit],
            [r["decode_tokens_per_s"] for r in limit],
            linestyle=":",
            color="grey",
            label="shared limit (compute-limit)",
        )
    _sessions_axes(ax1, ax2)
    ax1.set_ylabel("decode tokens/s (all sessions)")
    ax1.set_title("throughput")
    ax2.set_ylabel("ms between a session's tokens")
    if ax2.lines:
        ax2.set_yscale("log")
    ax2.set_title("step latency (o p50, x p99)")
    fig.suptitle(_title(report) + ": scaling", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rows(results: list[dict], variant: str) -> list[dict]:
    return sorted((r for r in results if r["variant"] == variant and r["tokens"]), key=lambda r: r["sessions"])


def _sessions_axes(*axes) -> None:
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sessions")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)


def _title(report: dict) -> str:
    opts = report.get("options", {})
    return (
        f"cogenesis bench exchange: {opts.get('max_new_tokens')} tokens/session, "
        f"top-k {opts.get('top_k')}, {report.get('machine', {}).get('cpus')} CPUs"
    )
