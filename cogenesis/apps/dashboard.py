"""Render the Grafana dashboard's panels to one PNG from a Prometheus server (no Grafana needed).

Every panel of ``configs/grafana/cogenesis.json`` is drawn from its own queries over
``/api/v1/query_range``, so the picture shows exactly what the dashboard would.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import httpx

from cogenesis.core.errors import ClusterError

DASHBOARD = Path(__file__).resolve().parents[2] / "configs" / "grafana" / "cogenesis.json"


def panels(path: str | Path = DASHBOARD) -> list[dict]:
    return sorted(json.loads(Path(path).read_text())["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))


def query_range(base: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    try:
        r = httpx.get(
            f"{base}/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step}, timeout=30
        ).json()
    except (httpx.HTTPError, ValueError) as exc:
        raise ClusterError(
            f"cannot query Prometheus at {base}: {exc}", hint="is it running? (--prometheus URL)"
        ) from None
    if r.get("status") != "success":
        raise ClusterError(f"Prometheus refused {expr!r}: {r.get('error')}")
    return r["data"]["result"]


def _legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or "value"


def render(base: str, out: str | Path, minutes: float = 10.0, step: float = 5.0, end: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = end or time.time()
    start = end - minutes * 60
    ps = panels()
    cols = 2
    rows = math.ceil(len(ps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 2.8 * rows), squeeze=False)
    for ax, p in zip(axes.flat, ps):
        for t in p["targets"]:
            for series in query_range(base, t["expr"], start, end, step):
                xs = [float(v[0]) - start for v in series["values"]]
                ys = [float(v[1]) if v[1] not in ("NaN", "+Inf", "-Inf") else float("nan") for v in series["values"]]
                ax.plot(xs, ys, label=_legend(t.get("legendFormat", ""), series["metric"]))
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        ax.set_title(p["title"] + (f" ({unit})" if unit not in ("", "short") else ""), fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=8)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(ps) :]:
        ax.axis("off")
    fig.suptitle(f"CoGenesis Serve dashboard (configs/grafana/cogenesis.json), last {minutes:g} min", fontsize=12)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def text_to_png(text: str, out: str | Path, title: str = "") -> Path:
    """A terminal capture (e.g. ``cogenesis top --once``) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = text.rstrip("\n").splitlines()
    width = max(map(len, lines), default=1)
    fig = plt.figure(figsize=(0.085 * width + 0.4, 0.155 * (len(lines) + 1) + 0.3))
    fig.patch.set_facecolor("#1e1e1e")
    fig.text(0.02, 0.98, "\n".join(lines), family="DejaVu Sans Mono", fontsize=9, color="#e0e0e0", va="top")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, facecolor=fig.get_facecolor())
    plt.close(fig)
    return out
