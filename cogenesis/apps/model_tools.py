"""``cogenesis models ...``: prepare the embedded models, derive the small one, report quality."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from cogenesis.core import models as m
from cogenesis.core.data import load_records, sample_data_path


def _texts(data: str | None, n: int) -> list[str]:
    return [r.gold for r in load_records(data or sample_data_path())[:n] if r.gold]


def measure_and_record(small_dir: Path, large_dir: Path, data: str | None, n: int, console: Console) -> dict:
    """Measure ppl / top-1 agreement against the large model and store them in the derivation record."""
    import torch

    torch.set_num_threads(2)
    small, tok = m.load_causal_lm(str(small_dir))
    large, _ = m.load_causal_lm(str(large_dir))
    texts = _texts(data, n)
    with console.status(f"measuring quality on {len(texts)} gold answers"):
        q = m.measure_quality(small, large, tok, texts)
    quality = {
        "ppl": round(q.ppl, 2),
        "large_ppl": round(q.reference_ppl, 2),
        "top1_agreement_with_large": round(q.top1_agreement, 4),
        "tokens": q.tokens,
        "eval_data": str(data or sample_data_path().name),
        "eval_records": n,
        "params": sum(p.numel() for p in small.parameters()),
        "large_params": sum(p.numel() for p in large.parameters()),
    }
    record = m.read_derivation(small_dir) or {}
    record["quality"] = quality
    (small_dir / m.DERIVATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return quality


def run(args) -> int:
    console = Console()
    if args.models_cmd == "prepare":
        with console.status("preparing the embedded models") as status:
            large = m.ensure_embedded_large(lambda s: status.update(s))
            small = m.ensure_embedded_small(lambda s: status.update(s))
        if "quality" not in (m.read_derivation(small) or {}):
            measure_and_record(small, large, None, 8, console)
        return _info(console)
    if args.models_cmd == "derive-small":
        large = m.ensure_embedded_large(console.print)
        out = Path(args.out) if args.out else m.cogenesis_home() / "models" / m.SMALL_DIRNAME
        if out.exists():
            raise m.ModelError(f"{out} already exists", hint="remove it first, or pass --out NEW_DIR")
        if args.search == "greedy":
            import torch

            torch.set_num_threads(2)
            model, tok = m.load_causal_lm(str(large))
            keep = m.greedy_layer_search(model, tok, _texts(args.data, args.records), args.keep, console.print)
            extra: dict[str, object] = {"search": f"greedy (keep {args.keep}, {args.records} records)"}
        else:
            keep, extra = list(m.RECORDED_LAYERS), {"search": "recorded", "dropped_layers": list(m.DROPPED_LAYERS)}
        m.prune_layers(large, out, keep, extra)
        quality = measure_and_record(out, large, args.data, args.records, console)
        console.print(f"small model at {out}: kept layers {keep}")
        console.print(json.dumps(quality, indent=2))
        return 0
    return _info(console)


def _info(console: Console) -> int:
    for name, dirname in (("large", m.LARGE_DIRNAME), ("small", m.SMALL_DIRNAME)):
        path = m.cogenesis_home() / "models" / dirname
        status = "ready" if (path / "config.json").is_file() else "not prepared (run `cogenesis models prepare`)"
        console.print(f"[bold]embedded:{name}[/] -> {path} ({status})")
        if derivation := m.read_derivation(path):
            console.print(json.dumps(derivation, indent=2))
    return 0
