"""The sessions of ``cogenesis chaos``: greedy logits sessions whose every token id is kept.

A chaos run compares each session's output, token id by token id, with an undisturbed reference run,
so it needs the ids the device wrote, not only their text (decoding and re-encoding is not exact): each
``SessionResult`` carries them (``ids``). ``CountingDevice`` wraps the pool's packed small model and counts
the tokens the sessions write as they come (the fault injector's clock).

The sessions run in the harness's process (``run_sessions``) or, for ``kill-edge-pool``, in edge pool
subprocesses (``python -m cogenesis.apps.chaos_pool``): each writes how many tokens it has written to a
progress file while it runs and its outcomes as JSON at the end, so the harness can SIGKILL one mid-run
and start it again. The outcomes (token ids of the sample records' sessions) stay in the harness's
temporary directory on this machine, as the demo's output does.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from cogenesis.core.config import EdgeConfig
    from cogenesis.edge_sim.client import EdgeClient, SessionResult
    from cogenesis.edge_sim.engine import EdgeEngine

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
RESULT_FILE = "outcomes.json"


class Outcome(msgspec.Struct, kw_only=True):
    """One session as a chaos run sees it: what it wrote (token ids), whether it failed, and when."""

    client: int
    tid: str
    ids: list[int] = []
    error: str | None = None
    error_code: str | None = None
    started_at: float = 0.0  # unix seconds: when the run began (all of its sessions start then)
    ttft_s: float | None = None
    itl_s: list[float] = []  # gaps between consecutive tokens
    seconds: float = 0.0
    resumes: int | None = None  # re-opened elsewhere (None: this edge does not count them)
    busy_retries: int | None = None  # opens retried after a busy refusal (None: not counted)

    @property
    def ok(self) -> bool:
        return self.error is None

    def token_times(self) -> list[float]:
        """Unix time of each token: the first one ``ttft_s`` after the start, then the gaps."""
        if self.ttft_s is None or not self.ids:
            return []
        t = self.started_at + self.ttft_s
        out = [t]
        for gap in self.itl_s:
            t += gap
            out.append(t)
        return out


def _count(value: object) -> int | None:
    """A SessionResult counter that may be a number, a per-cause mapping, or absent."""
    if value is None:
        return None
    if isinstance(value, dict):
        return int(sum(value.values()))
    return int(value)  # type: ignore[call-overload]


def outcome_of(result: SessionResult, started_at: float) -> Outcome:
    return Outcome(
        client=result.client,
        tid=result.tid,
        ids=list(result.ids),
        error=result.error,
        error_code=result.error_code,
        started_at=started_at,
        ttft_s=result.ttft_s,
        itl_s=list(result.itl_s),
        seconds=result.seconds,
        resumes=_count(getattr(result, "resumes", None)),
        busy_retries=_count(getattr(result, "busy_retries", None)),
    )


def failed_outcomes(clients: Sequence[EdgeClient], message: str, code: str, started_at: float) -> list[Outcome]:
    return [
        Outcome(client=c.index, tid=c.record.tid, error=message, error_code=code, started_at=started_at)
        for c in clients
    ]


class CountingDevice:
    """A ``Device`` that passes everything to ``inner`` and counts the tokens the sessions write (``on_tokens``
    gets the running total at each pass, before it runs)."""

    simulated = False

    def __init__(self, inner, on_tokens: Callable[[int], None] = lambda n: None) -> None:
        self.inner = inner
        self.on_tokens = on_tokens
        self.tokens = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str):  # what else the loop asks of a device (``network``, ...)
        return getattr(self.inner, name)

    def prefill(self, keys, prompts):
        return self.inner.prefill(keys, prompts)

    def step(self, keys, tokens):
        with self._lock:
            self.tokens += len(tokens)
            n = self.tokens
        self.on_tokens(n)
        return self.inner.step(keys, tokens)

    def release(self, keys) -> None:
        self.inner.release(keys)


def run_sessions(
    clients: Sequence[EdgeClient],
    engine: EdgeEngine,
    redis_url: str,
    cfg: EdgeConfig,
    on_tokens: Callable[[int], None] = lambda n: None,
    stop_at: float | None = None,
) -> list[Outcome]:
    """One greedy logits session per client, stepped together over the bus (as the demo's pool does).

    The session loop turns an error it did not expect into failed results (``internal``) for the sessions it
    touched; whatever still escapes it (it should not: that is one of the things a chaos run checks) fails every
    session with its message, so the run still reports."""
    from cogenesis.cluster.bus import EdgeBus
    from cogenesis.core.errors import CoGenesisError
    from cogenesis.core.protocol import error_code
    from cogenesis.edge_sim.device import PackedDevice
    from cogenesis.edge_sim.logits import run_logits_sessions

    device = CountingDevice(PackedDevice(engine.model, engine.pad_id, cfg.prefill_threads), on_tokens)
    started = time.time()
    try:
        bus = EdgeBus(redis_url)
    except CoGenesisError as exc:
        return failed_outcomes(clients, exc.message, error_code(exc), started)
    try:
        results = run_logits_sessions(list(clients), engine, bus, cfg, stop_at=stop_at, device=device)
    except CoGenesisError as exc:
        return failed_outcomes(clients, exc.message, error_code(exc), started)
    except Exception as exc:  # a raw exception reached the edge's caller: report it as such
        return failed_outcomes(clients, f"uncaught {type(exc).__name__}: {exc}", "internal", started)
    finally:
        bus.close()
    outcomes = [outcome_of(r, started) for r in results]
    for o, r in zip(outcomes, results):
        if r.stopped and o.error is None:  # cut by the scenario's time limit
            o.error, o.error_code = "cut at the scenario's time limit", "stuck"
    return outcomes


# ---- an edge pool subprocess (kill-edge-pool) ---------------------------------------------------------


class PoolSpec(msgspec.Struct, kw_only=True):
    """What one pool subprocess runs: which clients (global indexes, so seeds and records match the
    reference), on which records, with which edge settings (``EdgeConfig`` fields, small model resolved)."""

    clients: list[int]
    sessions: int  # the run's session count (records are cycled over it, as in the reference)
    data: str | None = None
    edge: dict = {}
    stop_after_s: float = 600.0
    # the pool that will be killed: once it has written this many tokens it waits (at most ``hold_s``) for the
    # kill, so the kill lands mid-run however fast the models are
    hold_at: int | None = None
    hold_s: float = 60.0


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def pool_main(redis_url: str, spec: PoolSpec, out_dir: Path) -> None:
    import torch

    from cogenesis.apps.demo import pick_records
    from cogenesis.core.config import EdgeConfig, validate
    from cogenesis.core.models import load_causal_lm
    from cogenesis.edge_sim.client import EdgeClient
    from cogenesis.edge_sim.engine import EdgeEngine

    cfg = validate(EdgeConfig, spec.edge, "chaos pool")
    torch.set_num_threads(cfg.torch_threads)
    model, tok = load_causal_lm(cfg.small_model)
    engine = EdgeEngine(model, tok, cfg.max_prompt_tokens)
    records = pick_records(spec.data, spec.sessions)
    clients = [EdgeClient(i, records[i], engine, cfg) for i in spec.clients]
    progress = out_dir / PROGRESS_FILE
    started = time.time()
    write_atomic(progress, msgspec.json.encode({"tokens": 0, "started_at": started}))

    held: list[int] = []

    def tokens(n: int) -> None:
        holding = spec.hold_at is not None and n >= spec.hold_at and not held
        write_atomic(progress, msgspec.json.encode({"tokens": n, "started_at": started, "holding": holding}))
        if holding:
            held.append(n)
            time.sleep(spec.hold_s)  # killed meanwhile (if not, the run goes on)

    outcomes = run_sessions(clients, engine, redis_url, cfg, tokens, time.perf_counter() + spec.stop_after_s)
    write_atomic(out_dir / RESULT_FILE, msgspec.json.encode(outcomes))


def read_progress(out_dir: Path) -> dict | None:
    """A pool's progress ({"tokens", "started_at"}), None before it began its sessions."""
    try:
        return msgspec.json.decode((out_dir / PROGRESS_FILE).read_bytes())
    except (FileNotFoundError, msgspec.DecodeError):
        return None


def read_outcomes(out_dir: Path) -> list[Outcome] | None:
    """A finished pool's outcomes (None: it wrote none, it was killed or failed)."""
    try:
        return msgspec.json.decode((out_dir / RESULT_FILE).read_bytes(), type=list[Outcome])
    except (FileNotFoundError, msgspec.DecodeError):
        return None


def pool_command(redis_url: str, spec: PoolSpec, out_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "cogenesis.apps.chaos_pool",
        "--redis-url",
        redis_url,
        "--out",
        str(out_dir),
        "--spec",
        msgspec.json.encode(spec).decode(),
    ]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="one edge pool of `cogenesis chaos` (kill-edge-pool)")
    p.add_argument("--redis-url", required=True)
    p.add_argument("--out", required=True, help="directory for the progress file and the outcomes")
    p.add_argument("--spec", required=True, help="PoolSpec as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s chaos-pool %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    pool_main(args.redis_url, msgspec.json.decode(args.spec, type=PoolSpec), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
