"""What one benchmark variant measured, from its session results (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


def pct(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation); None when there is nothing to measure."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


@dataclass(frozen=True)
class Run:
    """One session as the benchmark sees it: seconds are relative to the variant's start."""

    tokens: int
    first_token_s: float | None  # when its first token was chosen
    end_s: float  # when it finished (or was stopped)
    completed: bool  # wrote all it was asked to (False: failed or stopped by the time budget)
    failed: bool = False
    round_trips: int = 0
    rtt_us: tuple[int, ...] = ()
    overhead_us: tuple[int, ...] = ()
    step_s: tuple[float, ...] = ()  # its step latencies: gaps between its tokens (a batched decode: each step's time)


@dataclass(frozen=True)
class VariantResult:
    variant: str
    sessions: int
    completed: int
    failed: int
    truncated: bool  # the time budget stopped it before every session finished
    tokens: int
    wall_s: float
    tokens_per_s: float  # all tokens / wall (includes prefill: the edge's private context too)
    decode_tokens_per_s: float | None  # tokens written after the last session's first / (end - that instant)
    ttft_p50_s: float | None
    session_p50_s: float | None
    session_p99_s: float | None
    rtt_p50_ms: float | None
    rtt_p99_ms: float | None
    overhead_p50_ms: float | None  # bus + serialization per step (None: not traced)
    overhead_p99_ms: float | None
    step_p50_ms: float | None  # step latency: the gap between a session's consecutive tokens
    step_p99_ms: float | None
    round_trips: int
    tokens_per_round_trip: float | None
    extra: dict
    achieved_gflops: float | None = None  # decode tokens/s x model FLOPs per token (set by the benchmark)
    share_of_peak: float | None = None  # ... over the machine's measured matmul GFLOP/s at the threads it used

    def to_json(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def summarize(
    variant: str, runs: Sequence[Run], wall_s: float, truncated: bool = False, extra: dict | None = None
) -> VariantResult:
    ok = [r for r in runs if not r.failed]
    tokens = sum(r.tokens for r in ok)
    firsts = [r.first_token_s for r in ok if r.first_token_s is not None]
    decode_tps = None
    steps = [s * 1000 for r in ok for s in r.step_s]
    if firsts and len(firsts) == len(ok):
        start = max(firsts)  # the decode phase: from the instant every session has its first token
        span = max(r.end_s for r in ok) - start
        if all(r.step_s or r.tokens <= 1 for r in ok):  # token times known: count what was written in the phase
            after_first, steps = 0, []
            for r in ok:
                times = r.first_token_s + np.cumsum(r.step_s)
                after_first += int((times > start).sum())
                steps += [s * 1000 for s, t in zip(r.step_s, times) if t > start]
        else:  # one session, or no token times: every token after each session's first
            after_first = sum(max(0, r.tokens - 1) for r in ok)
        decode_tps = after_first / span if span > 0 and after_first else None
    lat = [r.end_s for r in ok if r.completed]
    rtt = [u / 1000 for r in ok for u in r.rtt_us]
    over = [u / 1000 for r in ok for u in r.overhead_us]
    trips = sum(r.round_trips for r in ok)
    return VariantResult(
        variant=variant,
        sessions=len(runs),
        completed=sum(r.completed for r in runs),
        failed=len(runs) - len(ok),
        truncated=truncated,
        tokens=tokens,
        wall_s=wall_s,
        tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        decode_tokens_per_s=decode_tps,
        ttft_p50_s=pct(firsts, 50),
        session_p50_s=pct(lat, 50),
        session_p99_s=pct(lat, 99),
        rtt_p50_ms=pct(rtt, 50),
        rtt_p99_ms=pct(rtt, 99),
        overhead_p50_ms=pct(over, 50),
        overhead_p99_ms=pct(over, 99),
        step_p50_ms=pct(steps, 50),
        step_p99_ms=pct(steps, 99),
        round_trips=trips,
        tokens_per_round_trip=tokens / trips if trips else None,
        extra=dict(extra or {}),
    )


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def shared_limit(large_tps: float | None, small_tps: float | None) -> float | None:
    """The decode tokens/s two models sharing the same cores can reach together: every fused token costs one
    token of each model's compute, so their times per token add (1 / (1/large + 1/small))."""
    return 1.0 / (1.0 / large_tps + 1.0 / small_tps) if large_tps and small_tps else None


def decode_flops_per_token(params: int, layers: int, hidden: int, mean_context: float) -> float:
    """A decoder's FLOPs for one decoded token: 2 per weight it multiplies (the transformer's parameters, the
    LM head included, embeddings looked up not multiplied), plus attention over its context (Q·K and the
    weighted sum of V: 2 x 2 x hidden per layer and context position)."""
    return 2.0 * params + 4.0 * layers * hidden * mean_context
