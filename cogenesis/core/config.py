"""Configuration as validated models. Every field documents itself; bad values name themselves."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cogenesis.core.errors import ConfigError
from cogenesis.core.models import EMBEDDED_LARGE, EMBEDDED_SMALL
from cogenesis.core.protocol import MAX_TOP_K


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SamplingConfig(_Cfg):
    temperature: float = Field(0.7, ge=0.0, le=5.0, description="Softmax temperature; 0 = greedy decoding.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(0, description="Seed per session (offset by client index); None = random.")


class SketchDecodingConfig(_Cfg):
    """How the cloud decodes outlines. The paper samples (0.7 / 0.9); 135M-class models write far
    better outlines greedily with a repetition penalty, so that is the default."""

    temperature: float = Field(0.0, ge=0.0, le=5.0, description="Outline temperature; 0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Outline nucleus mass.")
    repetition_penalty: float = Field(1.3, gt=0.0, le=10.0, description="Outline repetition penalty (1 = none).")


class ScheduleConfig(_Cfg):
    """When the device asks the cloud (steps not fused need no round trip)."""

    kind: Literal["every", "pkt", "uncertainty"] = Field(
        "every", description="every step, the paper's (P,K,T), or when unsure."
    )
    p: int = Field(5, ge=0, description="pkt: fuse the first P steps.")
    k: int = Field(10, ge=0, description="pkt: then in cycles of K + T steps ...")
    t: int = Field(3, ge=0, description="pkt: ... fuse T of them.")
    tau: float = Field(2.0, ge=0, description="uncertainty: fuse when the small model's entropy (nats) exceeds tau.")


class FusionConfig(_Cfg):
    """How the device fuses its distribution with the cloud's top-k (``cogenesis.core.fusion``)."""

    method: Literal["constant", "entropy", "contrast", "learned"] = Field(
        "constant", description="constant w; entropy-weighted; contrast (proxy-tuning, 2nd small pass); learned net."
    )
    weight: float = Field(0.5, ge=0.0, le=1.0, description="constant: w, weight of the small model (1 = small only).")
    floor: float = Field(-20.0, lt=0.0, description="Log-prob given to tokens missing from the cloud's top-k.")
    alpha: float = Field(
        1.0, ge=0.0, le=10.0, description="contrast: strength of the context's edit of the cloud's view."
    )
    checkpoint: str | None = Field(None, description="learned: fusion network from `cogenesis train-fusion`.")

    @model_validator(mode="after")
    def _learned_needs_checkpoint(self):
        if self.method == "learned" and not self.checkpoint:
            raise ValueError("method 'learned' needs a checkpoint (train one with `cogenesis train-fusion`)")
        return self


class CloudConfig(_Cfg):
    """The large-model side: one Ray Serve application."""

    large_model: str = Field(EMBEDDED_LARGE, description="Large model: embedded:large, an HF directory or hub id.")
    redis_url: str = Field("redis://127.0.0.1:6380/0", description="Redis bus the replicas consume from.")
    num_replicas: int = Field(1, ge=1, le=64, description="Serve replicas of the large model.")
    replica_cpus: float = Field(0.5, gt=0, le=64, description="CPUs Ray reserves per replica.")
    torch_threads: int = Field(2, ge=1, le=256, description="torch intra-op threads per replica.")
    kv_budget_mb: float = Field(
        2048, gt=0, description="KV-cache budget per replica (MiB); LRU sessions beyond it are evicted and recomputed."
    )
    max_sessions: int = Field(
        1024, ge=1, description="Open logits sessions a replica keeps; beyond it, oldest idle closes."
    )
    session_idle_s: float = Field(300.0, gt=0, description="A session idle this long is closed and its KV cache freed.")
    sketch_style: Literal["zero-shot", "paper"] = Field(
        "zero-shot", description="Sketch prompt: the paper's instructions alone, or with its two few-shot examples."
    )
    sketch_max_batch: int = Field(16, ge=1, le=256, description="Sketch requests batched into one generate call.")
    sketch_batch_wait_s: float = Field(0.05, ge=0, le=5, description="How long a sketch batch waits to fill.")
    audit_log: str | None = Field(
        None, description="Append one JSON line per model request (the text it conditions on)."
    )
    max_ongoing_requests: int = Field(
        256,
        ge=1,
        le=100_000,
        description="HTTP requests a replica takes at once (Serve queues the rest); >= sketch_max_batch.",
    )
    http_port: int = Field(8000, ge=1, le=65535, description="Serve HTTP ingress port.")
    route_prefix: str = Field("/", description="Serve route prefix of the app.")


class EdgeConfig(_Cfg):
    """The device side: small model, fusion and sampling, per simulated client."""

    small_model: str = Field(EMBEDDED_SMALL, description="Small model: embedded:small, an HF directory or hub id.")
    top_k: int = Field(10, ge=1, le=MAX_TOP_K, description="Top-k the cloud returns per logits step.")
    lookahead: int = Field(0, ge=0, le=16, description="Draft tokens the cloud proposes per reply (0 = none).")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Tokens each client generates per session.")
    ignore_eos: bool = Field(
        False, description="Keep writing past end-of-text (benchmarks: every session writes max_new_tokens)."
    )
    sketch_max_tokens: int = Field(160, ge=8, le=2048, description="Tokens the cloud may spend on a sketch.")
    max_prompt_tokens: int = Field(1536, ge=64, description="Edge prompt budget; older history is dropped to fit.")
    torch_threads: int = Field(2, ge=1, le=256, description="torch intra-op threads on the edge.")
    prefill_threads: int | None = Field(
        None,
        ge=1,
        le=256,
        description="torch threads for the pool's prefill of its clients' contexts (None: torch_threads); "
        "where edge and cloud share a machine, the cloud is idle while the edge prefills.",
    )
    step_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Deadline for one cloud reply (logits step or sketch)."
    )
    sampling: SamplingConfig = SamplingConfig()
    sketch: SketchDecodingConfig = SketchDecodingConfig()
    fusion: FusionConfig = FusionConfig()
    schedule: ScheduleConfig = ScheduleConfig()


def load_yaml(path: str | Path, model: type[_Cfg]):
    """Load a YAML file into ``model``; every problem becomes one ConfigError naming the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return validate(model, raw, str(path))


def validate(model: type[_Cfg], raw: dict, where: str = "config"):
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(
            f"invalid {model.__name__} in {where}: {problems}",
            hint=f"see `cogenesis config --show` for every field of {model.__name__}",
        ) from None
