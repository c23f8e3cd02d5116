"""``cogenesis config``: every configuration field with its type, default, flag, per-command defaults
and meaning; ``--markdown`` renders the same as the table in README.md."""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from cogenesis.apps.flags import COMMANDS, scalar_type
from cogenesis.core.config import COMMAND_DEFAULTS, SECTIONS, MachineDefault, field_info, field_paths

PER_COMMAND = "command: the default `cogenesis COMMAND` starts from instead (loadtest: also Locust's --cg-* options)"


def register(sub) -> None:
    c = sub.add_parser("config", help="print every configuration field with its default and meaning")
    c.add_argument("--show", action="store_true", help="(default) print the configuration reference")
    c.add_argument("--markdown", action="store_true", help="print it as a markdown table (as in README.md)")
    c.set_defaults(handler=run)


def run(args) -> int:
    print(markdown() if args.markdown else text())
    return 0


def text() -> str:
    lines = []
    for section, model in SECTIONS.items():
        lines.append(f"{model.__name__} ({section}.*): {(model.__doc__ or '').strip()}")
        for path, info in documented_fields(section):
            notes = "; ".join(n for n in (type_text(info), flag_of(path), overrides_of(path, _text_value)) if n)
            lines.append(f"  {path.split('.', 1)[1]} = {info.default!r}  # {info.description}  [{notes}]")
    lines.append(f"[type; flag; {PER_COMMAND}]")
    return "\n".join(lines)


def optional_model(info: FieldInfo) -> type[BaseModel] | None:
    """The config model of a field that holds one or None (``CloudConfig.autoscaling``)."""
    kinds = [a for a in get_args(info.annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return kinds[0] if kinds and type(None) in get_args(info.annotation) else None


def documented_fields(section: str) -> list[tuple[str, FieldInfo]]:
    """Every field of a section with its path; an optional model's own fields follow it (``cloud.autoscaling.*``:
    the values it takes when it is set)."""
    out: list[tuple[str, FieldInfo]] = []
    for path in field_paths(section):
        info = field_info(path)
        out.append((path, info))
        model = optional_model(info)
        if model is not None:
            out += [(f"{path}.{name}", sub) for name, sub in model.model_fields.items()]
    return out


def markdown() -> str:
    rows = ["| setting | type | default | per command | flag | meaning |", "|---|---|---|---|---|---|"]
    for section in SECTIONS:
        for path, info in documented_fields(section):
            flag = flag_of(path)
            cells = (
                f"`{path}`",
                type_text(info),
                _md_value(info.default),
                overrides_of(path, _md_value),
                f"`{flag}`" if flag else "",
                info.description or "",
            )
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def type_text(info: FieldInfo) -> str:
    """``int in [1, 50]``, ``float > 0``, ``every / pkt / uncertainty``, ``str or None``."""
    kind = scalar_type(info.annotation)
    name = " / ".join(map(str, get_args(kind))) if get_origin(kind) is Literal else kind.__name__
    if kind is not info.annotation and get_origin(kind) is not Literal:
        name += " or None"
    bounds = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        return f"{name} in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"{name} {'>=' if low[0] == '[' else '>'} {low[1]:g}"
    if high:
        return f"{name} {'<=' if high[0] == ']' else '<'} {high[1]:g}"
    return name


def flag_of(path: str) -> str:
    """The flag commands set ``path`` with (empty: none does)."""
    return next((f.name for cf in COMMANDS for f in cf.flags if path in f.paths), "")


def overrides_of(path: str, show) -> str:
    """``edge: 32, eval: 128``: the commands that start ``path`` from another default."""
    return ", ".join(f"{cmd}: {show(d[path])}" for cmd, d in COMMAND_DEFAULTS.items() if path in d)


def _text_value(value: Any) -> str:
    return str(value) if isinstance(value, MachineDefault) else repr(value)


def _md_value(value: Any) -> str:
    return str(value) if isinstance(value, MachineDefault) else f"`{value}`"
