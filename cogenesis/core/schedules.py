"""When the device asks the cloud: collaboration schedules. Pure functions of the step and the
small model's own distribution; a step that is not fused needs no round trip.

- ``every``: fuse every step (the paper's default).
- ``pkt``: the paper's (P, K, T) schedule (its released code's FusionStrategy): fuse the first P
  steps, then in cycles of K + T steps fuse T of them.
- ``uncertainty``: fuse only when the small model's entropy (nats) is above ``tau``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of [B, V] log-probabilities -> [B]."""
    p = logprobs.float().exp()
    return -(p * torch.where(p > 0, logprobs.float(), torch.zeros_like(p))).sum(dim=-1)


def pkt_fuses(step: int, p: int, k: int, t: int) -> bool:
    """The paper's schedule: steps 0..P-1 fuse; afterwards phase = (step - K - 1) mod (K + T) < T."""
    if step < p:
        return True
    return (step - k - 1) % (k + t) < t


@dataclass(frozen=True)
class Schedule:
    kind: str = "every"  # every | pkt | uncertainty
    p: int = 5
    k: int = 10
    t: int = 3
    tau: float = 2.0

    def __post_init__(self) -> None:
        if self.kind not in ("every", "pkt", "uncertainty"):
            raise ValueError(f"unknown schedule {self.kind!r}: use every, pkt or uncertainty")
        if min(self.p, self.k, self.t) < 0 or self.k + self.t == 0:
            raise ValueError(f"pkt schedule needs P, K, T >= 0 and K + T > 0, got {self.p}, {self.k}, {self.t}")
        if self.tau < 0:
            raise ValueError(f"uncertainty threshold tau must be >= 0, got {self.tau}")

    @property
    def known_in_advance(self) -> bool:
        """Whether the decision needs only the step number (so a request can be sent early)."""
        return self.kind != "uncertainty"

    def fuses(self, step: int, small_lp: torch.Tensor | None = None) -> bool:
        """Should generation step ``step`` (0-based) use the cloud's distribution?"""
        if self.kind == "every":
            return True
        if self.kind == "pkt":
            return pkt_fuses(step, self.p, self.k, self.t)
        if small_lp is None:
            raise ValueError("the uncertainty schedule needs the small model's log-probabilities")
        return bool(entropy(small_lp[None] if small_lp.dim() == 1 else small_lp)[0] > self.tau)
