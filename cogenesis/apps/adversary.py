"""The adversarial device of the privacy audit (``cogenesis audit-privacy``): it tries to send private spans.

- Logits mode: ``CopyingDevice`` wraps a session's small model; at scripted positions its distribution
  puts all but a negligible mass on the next token of a canary of the session's own record, so the
  session writes the canary verbatim into its output, where the token stream would carry it to the cloud.
  Everything else (fusion, sampling, the outbound gate, the link) is the real edge.
- Sketch mode: ``crafted_client`` is a client whose instruction carries a canary after its public part,
  checked by the gate of the real record, as a device that tries to smuggle private text into its
  outline request would.

Each try is an ``Attempt``, counted whether or not anything left the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cogenesis.apps.canaries import Canary
from cogenesis.core.config import EdgeConfig
from cogenesis.core.data import Record
from cogenesis.edge_sim.client import EdgeClient
from cogenesis.edge_sim.device import Device
from cogenesis.edge_sim.engine import EdgeEngine

FORCED_FLOOR = -60.0  # log-prob of every token but the forced one: fused with any cloud top-k, the forced one wins
GAP = 3  # tokens the small model writes freely before each canary


@dataclass
class Attempt:
    """One canary a device tried to send; ``written``: how many of its tokens the session wrote (logits)."""

    canary: Canary
    ids: tuple[int, ...] = ()
    written: int = 0

    @property
    def started(self) -> bool:
        return self.written > 0


@dataclass
class Plan:
    """A logits session's script: which canary token to force at which position."""

    attempts: list[Attempt]
    at: dict[int, tuple[Attempt, int]]  # position -> (attempt, index of its token)
    length: int  # positions the script spans (free tokens after the last canary included)


def plan(canaries: Sequence[Canary], tokenizer: Any, gap: int = GAP) -> Plan:
    """Write each canary (a space before it) after ``gap`` free tokens, one after the other."""
    attempts: list[Attempt] = []
    at: dict[int, tuple[Attempt, int]] = {}
    pos = 0
    for c in canaries:
        ids = tuple(int(i) for i in tokenizer(" " + c.text, add_special_tokens=False).input_ids)
        attempt = Attempt(c, ids)
        attempts.append(attempt)
        pos += gap
        at.update((pos + j, (attempt, j)) for j in range(len(ids)))
        pos += len(ids)
    return Plan(attempts, at, pos + gap)


@dataclass
class _Session:
    plan: Plan
    pos: int = 0  # tokens written so far


@dataclass
class CopyingDevice:
    """A ``Device`` whose small model copies private spans: ``inner`` runs the passes; at a planned
    position the distribution is forced onto the canary's next token. Sessions take ``plans`` in the
    order they are prefilled (the order of the clients given to ``run_logits_sessions``)."""

    inner: Device
    plans: Sequence[Plan]
    simulated: bool = False
    _sessions: dict[int, _Session] = field(default_factory=dict)

    def prefill(self, keys: Sequence[object], prompts: Sequence[Sequence[int]]) -> list[torch.Tensor | None]:
        if len(keys) != len(self.plans) or self._sessions:
            raise ValueError(f"a copying device runs its {len(self.plans)} planned sessions at once, got {len(keys)}")
        self._sessions = {id(k): _Session(p) for k, p in zip(keys, self.plans)}
        return [self._force(self._sessions[id(k)], lp) for k, lp in zip(keys, self.inner.prefill(keys, prompts))]

    def step(self, keys: Sequence[object], tokens: Sequence[int]) -> list[torch.Tensor | None]:
        for k, token in zip(keys, tokens):
            self._wrote(self._sessions[id(k)], int(token))
        return [self._force(self._sessions[id(k)], lp) for k, lp in zip(keys, self.inner.step(keys, tokens))]

    def release(self, keys: Sequence[object]) -> None:
        self.inner.release(keys)

    @staticmethod
    def _wrote(s: _Session, token: int) -> None:
        planned = s.plan.at.get(s.pos)
        if planned is not None:
            attempt, j = planned
            if attempt.written == j and attempt.ids[j] == token:
                attempt.written += 1
        s.pos += 1

    @staticmethod
    def _force(s: _Session, lp: torch.Tensor | None) -> torch.Tensor | None:
        planned = s.plan.at.get(s.pos)
        if lp is None or planned is None:
            return lp
        attempt, j = planned
        forced = torch.full_like(lp, FORCED_FLOOR)
        forced[attempt.ids[j]] = 0.0
        return forced


def crafted_client(index: int, record: Record, canary: Canary, engine: EdgeEngine, cfg: EdgeConfig) -> EdgeClient:
    """A client of ``record`` (its gate knows the record as it is) whose instruction carries ``canary``."""
    client = EdgeClient(index, record, engine, cfg)
    client.record = dataclasses.replace(record, public_instruction=f"{record.public_instruction} {canary.text}")
    return client
