"""Command-line flags generated from the config fields (``cogenesis.core.config``).

A flag takes its type, default and help from its field, and the default a command gives it from
``COMMAND_DEFAULTS``: a setting is declared once, in the config. Below: the established flag name
of each field, and the fields each command (and Locust, as ``--cg-*``) takes as flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from types import NoneType
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel

from cogenesis.core.config import SECTIONS, command_config, command_default, field_info
from cogenesis.core.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Flag:
    """A flag and the field(s) it sets; several fields take one comma-separated value each (``--pkt P,K,T``)."""

    name: str
    paths: tuple[str, ...]
    help: str | None = None  # None: the field's description
    metavar: str | None = None


# Flags whose established name is not `--` and the field's path below its section, dashed
# (``edge.fusion.weight`` -> ``--fusion-weight``).
NAMES = {
    "cloud.num_replicas": "--replicas",
    "cloud.torch_threads": "--threads",
    "edge.max_prompt_tokens": "--edge-prompt-tokens",
    "edge.torch_threads": "--threads",
    "edge.step_timeout_s": "--step-timeout",
    "edge.sampling.temperature": "--temperature",
    "edge.sampling.top_p": "--top-p",
    "edge.sampling.seed": "--seed",
    "edge.fusion.method": "--fusion",
    "edge.fusion.alpha": "--contrast-alpha",
    "edge.schedule.kind": "--schedule",
    "edge.schedule.tau": "--tau",
    "edge.privacy.span_policy": "--span-policy",
}


def flag(path: str) -> Flag:
    """The flag of the field at ``path``."""
    name = NAMES.get(path) or "--" + path.split(".", 1)[1].replace(".", "-").replace("_", "-")
    return Flag(name, (path,))


PKT = Flag(
    "--pkt", ("edge.schedule.p", "edge.schedule.k", "edge.schedule.t"), "P,K,T of the pkt schedule", metavar="P,K,T"
)
SAMPLING = ("edge.sampling.temperature", "edge.sampling.top_p", "edge.sampling.seed")
SKETCH = ("edge.sketch.temperature", "edge.sketch.top_p", "edge.sketch.repetition_penalty")
FUSION = ("edge.fusion.method", "edge.fusion.weight", "edge.fusion.alpha", "edge.fusion.checkpoint")
SCHEDULE = ("edge.schedule.kind", PKT, "edge.schedule.tau")
PRIVACY = (
    "edge.privacy.span_policy",
    "edge.privacy.placeholder",
    "edge.privacy.ngram",
    "edge.privacy.max_hold_tokens",
)
GROUP = ("configuration", "config fields (all of them: `cogenesis config`) with this command's defaults")


@dataclass(frozen=True)
class ConfigFlags:
    """The config fields one command takes as flags, with that command's defaults."""

    command: str  # as in COMMAND_DEFAULTS: "edge", "bench exchange", ...
    fields: tuple[str | Flag, ...]  # dotted paths (their established flag), or flags of their own
    prefix: str = "--"  # Locust's options: "--cg-"

    @property
    def flags(self) -> tuple[Flag, ...]:
        return tuple(f if isinstance(f, Flag) else flag(f) for f in self.fields)

    def option(self, f: Flag) -> str:
        return self.prefix + f.name.removeprefix("--")

    def add_to(self, parser: Any, grouped: bool = True) -> None:
        """Add the flags to ``parser`` (an argparse parser or group); ``grouped``: in a group of their own."""
        target = parser.add_argument_group(*GROUP) if grouped else parser
        for f in self.flags:
            target.add_argument(self.option(f), **argument(f, self.command))

    def config(self, args: Any, model: type[M], extra: Mapping[str, Any] | None = None) -> M:
        """The ``model`` these parsed flags (and ``extra``: dotted paths) describe, validated."""
        values: dict[str, Any] = {}
        for f in self.flags:
            values.update(zip(f.paths, self._values(f, getattr(args, _dest(self.option(f))))))
        section = next(name for name, m in SECTIONS.items() if m is model)
        labels = {
            p.split(".", 1)[1]: self.option(f) for f in self.flags for p in f.paths if p.startswith(section + ".")
        }
        return command_config(model, self.command, {**values, **(extra or {})}, labels=labels)

    def _values(self, f: Flag, given: Any) -> list[Any]:
        if len(f.paths) == 1:
            return [given]
        parts = str(given).split(",")
        if len(parts) != len(f.paths):
            raise ConfigError(
                f"{self.option(f)} {given!r} is not {len(f.paths)} comma-separated values {f.metavar}",
                hint=f"e.g. {self.option(f)} {argument(f, self.command)['default']}",
            )
        return parts


def argument(f: Flag, command: str) -> dict[str, Any]:
    """``add_argument`` keywords of ``f`` in ``command``: type, choices, the command's default, help."""
    if len(f.paths) > 1:
        default = ",".join(str(command_default(command, p)) for p in f.paths)
        return {"default": default, "metavar": f.metavar, "help": f.help}
    info = field_info(f.paths[0])
    kwargs: dict[str, Any] = {
        "default": command_default(command, f.paths[0]),
        "help": (f.help or info.description or "").replace("%", "%%"),
    }
    kind = scalar_type(info.annotation)
    if get_origin(kind) is Literal:
        kwargs["choices"] = list(get_args(kind))
    elif kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = kind
    return kwargs


def scalar_type(annotation: Any) -> Any:
    """A field's type without ``| None``: ``int | None`` -> ``int``; a Literal stays whole."""
    if get_origin(annotation) is Literal:
        return annotation
    kinds = [a for a in get_args(annotation) if a is not NoneType]
    return kinds[0] if kinds else annotation


def _dest(option: str) -> str:
    return option.removeprefix("--").replace("-", "_")


# ---- the config fields each command takes as flags ----------------------------------------------

DEMO = ConfigFlags(
    "demo",
    (
        "edge.max_new_tokens",
        "cloud.audit_log",
        "cloud.large_model",
        "edge.small_model",
        "cloud.num_replicas",
        "edge.top_k",
        "edge.lookahead",
        *SCHEDULE,
        *FUSION,
        *SAMPLING,
        "cloud.sketch_style",
        *SKETCH,
        "edge.sketch_max_tokens",
        "edge.step_timeout_s",
        *PRIVACY,
    ),
)
BENCH_EXCHANGE = ConfigFlags(
    "bench exchange",
    (
        "edge.max_new_tokens",
        "edge.lookahead",
        "edge.top_k",
        "edge.max_prompt_tokens",
        "cloud.large_model",
        "edge.small_model",
        Flag(
            "--threads",
            ("edge.torch_threads",),
            "torch threads of the edge and of the replica each (they share this machine's cores)",
        ),
    ),
)
UP = ConfigFlags(
    "up",
    (
        "cloud.large_model",
        "cloud.num_replicas",
        "cloud.torch_threads",
        "cloud.kv_budget_mb",
        "cloud.max_sessions",
        "cloud.max_ongoing_requests",
        "cloud.http_port",
        "cloud.secrets_dir",
        "cloud.redis_tls",
    ),
)
EDGE = ConfigFlags(
    "edge",
    (
        "edge.max_new_tokens",
        "edge.sketch_max_tokens",
        "edge.top_k",
        "edge.lookahead",
        *FUSION,
        "edge.max_prompt_tokens",
        "edge.small_model",
        "edge.torch_threads",
        "edge.step_timeout_s",
        *PRIVACY,
    ),
)
LOADTEST = ConfigFlags("loadtest", ("edge.max_new_tokens",))
LOCUST = ConfigFlags(
    "loadtest",
    (
        "edge.max_new_tokens",
        "edge.sketch_max_tokens",
        "edge.top_k",
        "edge.max_prompt_tokens",
        "edge.step_timeout_s",
        "edge.torch_threads",
        "edge.small_model",
        *PRIVACY,
    ),
    prefix="--cg-",
)
TRAIN_FUSION = ConfigFlags(
    "train-fusion",
    (
        Flag("--top-k", ("edge.top_k",), "top-k per side (must match the cloud's --top-k at use)"),
        "edge.max_prompt_tokens",
        "cloud.large_model",
        "edge.small_model",
    ),
)
EVAL = ConfigFlags(
    "eval",
    (
        "edge.fusion.checkpoint",
        "edge.fusion.weight",
        "edge.fusion.alpha",
        *SCHEDULE,
        "edge.top_k",
        "edge.max_new_tokens",
        *SAMPLING,
        "edge.max_prompt_tokens",
        "cloud.large_model",
        "edge.small_model",
        *PRIVACY,
    ),
)
AUDIT_PRIVACY = ConfigFlags(
    "audit-privacy",
    (
        "cloud.large_model",
        "edge.small_model",
        "edge.max_prompt_tokens",
        "edge.top_k",
        "edge.sampling.seed",
        *PRIVACY,
    ),
)
COMMANDS = (DEMO, BENCH_EXCHANGE, UP, EDGE, LOADTEST, TRAIN_FUSION, EVAL, AUDIT_PRIVACY)
