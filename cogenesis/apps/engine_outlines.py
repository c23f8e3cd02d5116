"""Outlines from the cloud engine called in-process (``cogenesis eval``): an ``OutlineSource`` without Serve.

The edge's sketch path (``cogenesis.edge_sim.sketch``) seals each client's request with its gate, as it
would before leaving the device, and hands the requests here; the engine (``cogenesis.deployments.engine``)
outlines them in one batch. This lives with the applications because it joins the two roles, the edge and
the cloud, in one process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from cogenesis.deployments.engine import CloudEngine
from cogenesis.edge_sim.sketch import Outline, OutlineRequest


class EngineOutlines:
    """Outlines written by a ``CloudEngine`` in this process. An engine error fails the whole batch."""

    def __init__(self, engine: CloudEngine) -> None:
        self.engine = engine
        self.asked: dict[str, int] = {}  # request id -> client index (to attribute the engine's audit log)

    def outlines(self, requests: Sequence[OutlineRequest]) -> list[Outline | Exception]:
        self.asked.update((r.request.request_id, r.client) for r in requests)
        t0 = time.perf_counter()
        replies = self.engine.sketch([r.request for r in requests])
        seconds = time.perf_counter() - t0
        return [Outline(reply.sketch, reply.tokens, seconds) for reply in replies]
