"""``cogenesis top``: throughput and latency of a running cluster, live, from its metrics endpoints.

Every process announces its metrics address on the bus (``cogenesis.core.metrics``); ``top`` scrapes
them all, sums each series over processes, and turns two snapshots into rates and windowed
percentiles (the way Prometheus' ``rate`` and ``histogram_quantile`` would).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Snapshot:
    at: float
    values: dict[tuple[str, tuple], float] = field(default_factory=dict)  # (sample name, labels) -> summed value
    targets: int = 0
    errors: list[str] = field(default_factory=list)

    def get(self, name: str, **labels) -> float:
        key = tuple(sorted(labels.items()))
        return sum(v for (n, lbl), v in self.values.items() if n == name and all(x in lbl for x in key))

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """Cumulative (le, count) pairs of a histogram, summed over processes."""
        out: dict[float, float] = {}
        for (n, lbl), v in self.values.items():
            if n == f"{name}_bucket":
                le = float(dict(lbl)["le"])
                out[le] = out.get(le, 0.0) + v
        return sorted(out.items())


def scrape(addresses: list[str], timeout_s: float = 3.0) -> Snapshot:
    snap = Snapshot(time.monotonic(), targets=len(addresses))
    for addr in addresses:
        try:
            text = httpx.get(f"http://{addr}/metrics", timeout=timeout_s).text
        except httpx.HTTPError as exc:
            snap.errors.append(f"{addr}: {type(exc).__name__}")
            continue
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if not s.name.startswith("cogenesis_") or s.name.endswith("_created"):
                    continue
                key = (s.name, tuple(sorted(s.labels.items())))
                snap.values[key] = snap.values.get(key, 0.0) + s.value
    return snap


def quantile(q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float | None:
    """``histogram_quantile`` over the increase between two snapshots' buckets (None: no observations)."""
    prior = dict(before)
    inc = [(le, c - prior.get(le, 0.0)) for le, c in after]
    if not inc or inc[-1][1] <= 0:
        return None
    rank, lo_le, lo_c = q * inc[-1][1], 0.0, 0.0
    for le, c in inc:
        if c >= rank:
            if math.isinf(le):
                return lo_le  # beyond the last finite bucket: its bound is the best estimate
            return lo_le + (le - lo_le) * ((rank - lo_c) / (c - lo_c) if c > lo_c else 1.0)
        lo_le, lo_c = le, c
    return None


def figures(a: Snapshot, b: Snapshot) -> dict:
    """The dashboard's figures from two snapshots ``a`` (earlier) and ``b``."""
    dt = max(b.at - a.at, 1e-9)

    def rate(name, **labels):
        return max(0.0, (b.get(name, **labels) - a.get(name, **labels)) / dt)

    def mean(name):
        n = b.get(f"{name}_count") - a.get(f"{name}_count")
        return (b.get(f"{name}_sum") - a.get(f"{name}_sum")) / n if n > 0 else None

    rt_a, rt_b = a.buckets("cogenesis_step_roundtrip_seconds"), b.buckets("cogenesis_step_roundtrip_seconds")
    return {
        "window_s": round(dt, 2),
        "targets": b.targets,
        "errors": b.errors,
        "cloud_tokens_per_s": {m: round(rate("cogenesis_cloud_tokens_total", mode=m), 1) for m in ("logits", "sketch")},
        "edge_tokens_per_s": {m: round(rate("cogenesis_edge_tokens_total", mode=m), 1) for m in ("logits", "sketch")},
        "roundtrip_ms": {f"p{int(q * 100)}": _ms(quantile(q, rt_a, rt_b)) for q in (0.5, 0.99)},
        "cloud_pass_ms": {
            f"p{int(q * 100)}": _ms(
                quantile(q, a.buckets("cogenesis_cloud_step_seconds"), b.buckets("cogenesis_cloud_step_seconds"))
            )
            for q in (0.5, 0.99)
        },
        "mean_batch_size": _round(mean("cogenesis_cloud_step_batch_size")),
        "active_sessions": int(b.get("cogenesis_active_sessions")),
        "kv_cache_mib": round(b.get("cogenesis_kv_cache_bytes") / 2**20, 1),
        "bus_queue_depth": int(b.get("cogenesis_bus_queue_depth")),
        "lookahead_accepted_mean": _round(mean("cogenesis_lookahead_accepted_tokens")),
        "sketch_requests_per_s": round(rate("cogenesis_sketch_requests_total"), 2),
        "sessions": {o: int(b.get("cogenesis_sessions_total", outcome=o)) for o in ("ok", "failed", "cut")},
        "sessions_per_s": round(rate("cogenesis_sessions_total", outcome="ok"), 2),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def render(f: dict):
    from rich.table import Table

    t = Table(title=f"cogenesis top — {f['targets']} process(es), last {f['window_s']:g} s", title_justify="left")
    t.add_column("figure")
    t.add_column("value", justify="right")
    na = "—"

    def show(x, unit=""):
        return na if x is None else f"{x:g}{unit}"

    t.add_row(
        "cloud tokens/s (logits / sketch)",
        f"{f['cloud_tokens_per_s']['logits']:g} / {f['cloud_tokens_per_s']['sketch']:g}",
    )
    t.add_row(
        "edge tokens/s (logits / sketch)",
        f"{f['edge_tokens_per_s']['logits']:g} / {f['edge_tokens_per_s']['sketch']:g}",
    )
    t.add_row(
        "step round trip p50 / p99",
        f"{show(f['roundtrip_ms']['p50'], ' ms')} / {show(f['roundtrip_ms']['p99'], ' ms')}",
    )
    t.add_row(
        "cloud pass p50 / p99", f"{show(f['cloud_pass_ms']['p50'], ' ms')} / {show(f['cloud_pass_ms']['p99'], ' ms')}"
    )
    t.add_row("mean batch size", show(f["mean_batch_size"]))
    t.add_row("active sessions", str(f["active_sessions"]))
    t.add_row("KV cache", f"{f['kv_cache_mib']:g} MiB")
    t.add_row("bus queue depth", str(f["bus_queue_depth"]))
    t.add_row("lookahead accepted / reply", show(f["lookahead_accepted_mean"]))
    t.add_row("sketch requests/s", f"{f['sketch_requests_per_s']:g}")
    s = f["sessions"]
    t.add_row("sessions ok / failed / cut", f"{s['ok']} / {s['failed']} / {s['cut']} ({f['sessions_per_s']:g} ok/s)")
    for e in f["errors"]:
        t.add_row("[red]unreachable[/]", e)
    return t
