"""How many replicas the load asks for: Serve's custom autoscaling policy for the cloud's replicas.

Serve's default policy counts HTTP requests in flight, which says nothing here: a logits session lives on the
bus, not in an HTTP request. So every replica reports what actually loads it (``CloudServer.
record_autoscaling_stats``, from ``StepLoop.load``): the sessions it holds, the outlines it holds and queues,
and the longest an open waited on the bus before a replica took it. Serve averages each report over
``look_back_period_s`` and calls ``SessionPolicy`` with them; the policy asks for enough replicas to hold every
session at ``target_sessions`` each, and for one more than now while opens wait longer than ``max_open_wait_s``
(the replicas are behind, whatever they hold). Serve then applies the bounds and the up/down delays.

This module is pickled by value into Serve's controller (``AutoscalingPolicy``): it imports nothing of the
project at module level, so the controller needs nothing more than Ray.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

POLICY_PATH = "cogenesis.deployments.autoscale:SessionPolicy"
# the replicas' report (``StepLoop.load``): Serve's custom metrics, by name
SESSIONS, OUTLINES, OPEN_WAIT = "sessions", "outlines", "open_wait_s"


def desired_replicas(
    load: Mapping[str, Mapping[Any, float]],
    current: int,
    target_sessions: float,
    max_open_wait_s: float,
) -> int:
    """The replicas ``load`` asks for (before Serve's bounds and delays).

    ``load``: each metric by replica (Serve's ``aggregated_metrics``); a replica that has not reported yet counts
    nothing. Enough replicas to hold every session and outline at ``target_sessions`` each (at least one); one
    more than ``current`` when an open waited longer than ``max_open_wait_s``."""
    held = sum(load.get(SESSIONS, {}).values()) + sum(load.get(OUTLINES, {}).values())
    want = max(1, math.ceil(held / target_sessions - 1e-9))
    waited = max(load.get(OPEN_WAIT, {}).values(), default=0.0)
    if waited > max_open_wait_s:
        want = max(want, current + 1)
    return want


class SessionPolicy:
    """Serve's policy object (``policy_function`` names this class; ``policy_kwargs`` are its arguments)."""

    def __init__(self, target_sessions: float = 32.0, max_open_wait_s: float = 2.0) -> None:
        if target_sessions <= 0 or max_open_wait_s <= 0:
            raise ValueError(f"target_sessions ({target_sessions}) and max_open_wait_s ({max_open_wait_s}) must be > 0")
        self.target_sessions = target_sessions
        self.max_open_wait_s = max_open_wait_s

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        """``ctx``: Serve's ``AutoscalingContext``. Returns (replicas, the policy's state, which it keeps none of)."""
        want = desired_replicas(
            ctx.aggregated_metrics or {}, ctx.current_num_replicas, self.target_sessions, self.max_open_wait_s
        )
        return want, {}
