"""``cogenesis demo``: a whole CoGenesis deployment on this machine, both modes, real models.

Redis (bundled binary) + Ray + the Serve app (large model) + an edge pool of simulated clients,
each holding one record's private context. The clients are devices: each reaches the cloud through the
gateway (its WebSocket for logits steps, its ``/v1/sketch`` for outlines) with a device token of its own,
minted with the cluster's key. Everything stops on exit, Ctrl-C included.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from cogenesis.core.config import CloudConfig, EdgeConfig
from cogenesis.core.data import Record, load_records, sample_data_path
from cogenesis.core.errors import ConfigError
from cogenesis.core.models import check_same_tokenizer, load_causal_lm, read_derivation, resolve_model

DEMO_TOKEN_TTL_S = 3600.0  # a demo client's device token


@dataclass(frozen=True)
class DemoOptions:
    clients: int = 4
    modes: tuple[str, ...] = ("sketch", "logits")
    data: str | None = None
    redis_url: str | None = None
    json_path: str | None = None
    show_private: bool = False


def pick_records(path: str | None, n: int) -> list[Record]:
    records = load_records(path or sample_data_path())
    if n < 1:
        raise ConfigError(f"--clients must be at least 1, got {n}")
    return [records[i % len(records)] for i in range(n)]  # cycled when there are fewer records


def summarize(results, wall: dict[str, float]) -> dict:
    out = {}
    for mode, seconds in wall.items():
        rs = [r for r in results if r.mode == mode]
        ok = [r for r in rs if r.error is None]
        tokens = sum(r.tokens for r in ok)
        lat = [r.seconds for r in ok]
        out[mode] = {
            "sessions": len(rs),
            "failed": len(rs) - len(ok),
            "tokens": tokens,
            "wall_seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
            "session_latency_p50_s": round(statistics.median(lat), 3) if lat else None,
            "session_latency_max_s": round(max(lat), 3) if lat else None,
            "round_trips": sum(r.round_trips for r in ok),
        }
    return out


def run_demo(opts: DemoOptions, cloud: CloudConfig, edge: EdgeConfig, console: Console) -> dict:
    import torch

    from cogenesis.cluster.local import LocalCluster
    from cogenesis.edge_sim.engine import EdgeEngine
    from cogenesis.edge_sim.pool import EdgePool

    records = pick_records(opts.data, opts.clients)
    with console.status("preparing models (first run converts the embedded GGUF, ~30 s)") as status:
        large_path = resolve_model(cloud.large_model, lambda m: status.update(m))
        small_path = resolve_model(edge.small_model, lambda m: status.update(m))
        status.update("loading the small model")
        torch.set_num_threads(edge.torch_threads)
        small, tok = load_causal_lm(small_path)
        from transformers import AutoTokenizer

        check_same_tokenizer(AutoTokenizer.from_pretrained(large_path), tok)
    cloud = cloud.model_copy(update={"large_model": large_path})
    cluster = LocalCluster(cloud, redis_url=opts.redis_url)
    results, wall = [], {}
    try:
        with console.status("starting the cluster") as status:
            info = cluster.start(lambda m: status.update(m))
        transport = "ws" if info.gateway_url else "redis"
        console.print(
            f"[green]cluster up[/]: Redis {info.redis_version} at {info.redis_url}, "
            f"Ray {info.ray_version}, Serve at {info.http_url}"
            + (f", gateway at {info.gateway_url}" if info.gateway_url else " (no gateway: clients as trusted workers)")
        )
        pool = EdgePool(records, EdgeEngine(small, tok, edge.max_prompt_tokens), edge)
        tokens = device_tokens(info.secrets_dir) if info.gateway_url else None
        for mode in opts.modes:
            with console.status(f"{mode} mode: {len(records)} client(s)") as status:
                done = []

                def progress(r, mode=mode):
                    done.append(r)  # noqa: B023 (called only within this iteration)
                    status.update(f"{mode} mode: {len(done)}/{len(records)} sessions done")  # noqa: B023

                t0 = time.perf_counter()
                if info.gateway_url and tokens is not None:  # devices: through the gateway, a token each
                    runs = (
                        pool.run_sketch(info.gateway_url, progress, token=tokens)
                        if mode == "sketch"
                        else pool.run_logits_gateway(info.gateway_url, tokens, progress)
                    )
                else:  # a cluster without a gateway: the trusted path (the bus, the cloud's own route)
                    runs = (
                        pool.run_sketch(info.http_url, progress, token=worker_token(info.secrets_dir))
                        if mode == "sketch"
                        else pool.run_logits(info.redis_url, progress, secrets_dir=info.secrets_dir)
                    )
                wall[mode] = time.perf_counter() - t0
            results.extend(runs)
        _print_results(console, records, results, opts.show_private)
    finally:
        with console.status("shutting down (Serve, Ray, Redis)"):
            cluster.stop()
    summary = {
        "models": {"large": cloud.large_model, "small": small_path, "small_derivation": read_derivation(small_path)},
        "redis_version": info.redis_version,
        "ray_version": info.ray_version,
        "transport": transport,
        "clients": len(records),
        "max_new_tokens": edge.max_new_tokens,
        "top_k": edge.top_k,
        "fusion": edge.fusion.model_dump(),
        "sampling": edge.sampling.model_dump(),
        "modes": summarize(results, wall),
    }
    _print_summary(console, summary)
    report = {"sessions": [r.to_json() for r in results], "summary": summary}
    if opts.json_path:
        Path(opts.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json_path).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        console.print(f"wrote {opts.json_path}")
    return report


def device_tokens(secrets_dir: str | None):
    """Each demo client's device token (subject ``demo-{index}``), minted with the cluster's key."""
    from cogenesis.core.secrets import cluster_key
    from cogenesis.edge_sim.session import device_minter

    return device_minter(cluster_key(secrets_dir), "demo", DEMO_TOKEN_TTL_S)


def worker_token(secrets_dir: str | None) -> str | None:
    """The cluster's worker token (None: a cluster without secrets, whose routes are open)."""
    from cogenesis.core.secrets import stored_token

    return stored_token("worker", secrets_dir) if secrets_dir else None


def _print_results(console: Console, records: list[Record], results, show_private: bool) -> None:
    for i, rec in enumerate(records):
        private_chars = sum(map(len, rec.private_fields()))
        head = f"[bold]{escape(rec.public_instruction)}[/]"
        head += (
            f"\n[dim]{escape(rec.task)}[/]"
            if show_private
            else f"\n[dim](+ {private_chars} chars of private context, kept on this device)[/]"
        )
        body = [head]
        for r in (r for r in results if r.client == i):
            if r.sketch:
                body.append(f"[cyan]cloud sketch[/]\n{escape(r.sketch)}")
            body.append(
                f"[magenta]{r.mode}[/] ({r.tokens} tokens, {r.seconds:.1f} s)\n"
                + (f"[red]failed: {escape(r.error)}[/]" if r.error else escape(r.text))
            )
        console.print(Panel("\n\n".join(body), title=f"client {i} - record {rec.tid}", expand=False))


def _print_summary(console: Console, summary: dict) -> None:
    table = Table(title=f"CoGenesis demo (transport: {summary.get('transport', 'redis')})")
    for col in ("mode", "sessions", "failed", "tokens", "tokens/s", "session p50 s", "session max s", "round trips"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    for mode, m in summary["modes"].items():
        table.add_row(
            mode,
            str(m["sessions"]),
            str(m["failed"]),
            str(m["tokens"]),
            f"{m['tokens_per_s']:.1f}",
            f"{m['session_latency_p50_s'] or 0:.2f}",
            f"{m['session_latency_max_s'] or 0:.2f}",
            str(m["round_trips"]),
        )
    console.print(table)
