"""The variants ``cogenesis bench exchange`` can run, by name (no imports: the CLI's parser reads them)."""

from __future__ import annotations

VARIANTS = (
    "large-only",
    "compute-limit",
    "cogenesis-isolated",
    "cogenesis-isolated-lookahead",
    "cogenesis",
    "cogenesis-lookahead",
    "stateless",
    "cogenesis-gateway",
)
DEFAULT_VARIANTS = VARIANTS[:6]  # stateless and cogenesis-gateway: by --variants
