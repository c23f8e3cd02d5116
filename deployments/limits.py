"""Limits of what a client may send to the cloud's HTTP routes (``CloudConfig.limits``), checked before anything
reaches the engine: light to import (the gateway uses them without loading a model)."""

from __future__ import annotations

from cogenesis.core.config import LimitsConfig
from cogenesis.core.errors import TooLarge
from cogenesis.core.protocol import SketchRequest


def check_outline(request: SketchRequest, limits: LimitsConfig) -> None:
    """``TooLarge`` for an outline request past the limits (its tokens, its instruction's characters, its budget)."""
    if request.max_tokens > limits.max_sketch_tokens:
        raise TooLarge(
            f"sketch {request.request_id}: max_tokens {request.max_tokens} is above the limit of "
            f"{limits.max_sketch_tokens}",
            hint="ask for fewer tokens (CloudConfig.limits.max_sketch_tokens)",
        )
    if len(request.instruction) > limits.max_instruction_chars:
        raise TooLarge(
            f"sketch {request.request_id}: the instruction has {len(request.instruction)} characters; at most "
            f"{limits.max_instruction_chars} are taken",
            hint="shorten the instruction (CloudConfig.limits.max_instruction_chars)",
        )
    if request.budget_ms is not None and request.budget_ms > limits.max_budget_ms:
        raise TooLarge(
            f"sketch {request.request_id}: budget_ms {request.budget_ms} is above the limit of {limits.max_budget_ms}",
            hint="ask for a shorter budget (CloudConfig.limits.max_budget_ms)",
        )


def check_stateless(length: int, limits: LimitsConfig) -> None:
    """``TooLarge`` for a stateless request whose whole sequence is past ``max_session_tokens``: it is refused
    before the engine (and its lock, which the step loop shares) sees it."""
    if length > limits.max_session_tokens:
        raise TooLarge(
            f"the sequence has {length} token ids; at most {limits.max_session_tokens} are taken",
            hint="send a shorter sequence (CloudConfig.limits.max_session_tokens)",
        )
