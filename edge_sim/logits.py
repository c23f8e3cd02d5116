"""Logits-mode sessions for a pool of clients, stepped in lockstep with one batched small model.

Per round, for every live session: decide by the schedule whether this position is fused; if it
is and no cloud top-k covers it yet, ask the owning replica (all such requests pipelined, all
replies awaited together); choose the token (fused or small-only), accepting the cloud's draft
when the choice equals it, which keeps the next position covered without a round trip; then run
the small model on every session's new token in one batched pass. When the schedule is known in
advance, the request for the next position leaves before that pass, so the cloud computes while
the device does. How requests reach the cloud is a ``CloudLink`` (``cogenesis.edge_sim.links``): the Redis
bus (CoGenesis) or, for the benchmark's baseline, stateless HTTP.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from cogenesis.cluster.bus import EdgeBus
from cogenesis.core import metrics
from cogenesis.core.config import EdgeConfig
from cogenesis.core.errors import ConfigError
from cogenesis.core.fusion_net import Fuser
from cogenesis.core.prompts import cloud_prompt_ids
from cogenesis.core.protocol import StepReply
from cogenesis.core.sampling import sample, sampling_probs
from cogenesis.core.schedules import Schedule
from cogenesis.core.speculative import accept_draft
from cogenesis.edge_sim.client import EdgeClient, SessionResult
from cogenesis.edge_sim.device import Device, PackedDevice
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.links import BusLink, CloudLink

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Live:
    client: EdgeClient
    session_id: str
    gen: torch.Generator | None
    t0: float
    lp: torch.Tensor | None = None  # [V] small model's log-probs at the current position
    plain_lp: torch.Tensor | None = None  # [V] ... without the private context (contrast fusion only)
    plain_key: object = field(default_factory=object)  # this session's row on the no-context pass
    out: list[int] = field(default_factory=list)
    unsent: list[int] = field(default_factory=list)  # chosen tokens the cloud has not seen yet
    replica: str = ""
    step: int = 0  # last step number sent
    rows: tuple[np.ndarray, np.ndarray] | None = None  # cloud top-k rows [P, K] of the last reply
    drafts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    row: int | None = None  # which row covers the current position (None: not covered)
    in_flight: bool = False
    round_trips: int = 0
    fused: int = 0
    accepted: int = 0  # draft tokens accepted
    accepted_now: int = 0  # ... of the current reply's drafts
    ttft: float | None = None
    token_times: list[float] = field(default_factory=list)  # perf_counter at each chosen token
    error: str | None = None
    done: bool = False
    stopped: bool = False  # ended early by the caller's time budget
    sent_us: int = 0  # when the in-flight request left
    rtt_us: list[int] = field(default_factory=list)  # per reply: sent -> received
    overhead_us: list[int] = field(default_factory=list)  # per reply: bus + serialization (StepReply)

    def next_step(self) -> tuple[int, list[int]]:
        """Number the next request and hand over the tokens the cloud has not seen."""
        self.step += 1
        tokens, self.unsent = self.unsent, []
        return self.step, tokens

    def sent(self, at_us: int) -> None:
        self.sent_us, self.in_flight = at_us, True
        self.round_trips += 1

    def take(self, reply: StepReply, received_us: int = 0, waited_from_us: int = 0) -> None:
        self.reply_done()
        self.rows, self.drafts, self.row = reply.top_k(), reply.drafts(), 0
        self.replica, self.in_flight = reply.replica, False
        if received_us:
            self.rtt_us.append(received_us - self.sent_us)
            metrics.step_roundtrip_seconds.observe((received_us - self.sent_us) / 1e6)
            if reply.posted_us:  # traced by the replica
                self.overhead_us.append(reply.exchange_overhead_us(received_us, waited_from_us))

    def reply_done(self) -> None:
        """The current reply is used up: count how many of its drafts were accepted."""
        if self.drafts.size:
            metrics.lookahead_accepted_tokens.observe(self.accepted_now)
        self.accepted_now = 0


def schedule_of(cfg: EdgeConfig) -> Schedule:
    s = cfg.schedule
    return Schedule(s.kind, s.p, s.k, s.t, s.tau)


def run_logits_sessions(
    clients: list[EdgeClient],
    engine: EdgeEngine,
    link: CloudLink | EdgeBus,
    cfg: EdgeConfig,
    on_result=lambda r: None,
    stop_at: float | None = None,
    device: Device | None = None,
) -> list[SessionResult]:
    """Run one logits session per client, all stepped together; returns their results in order.

    ``stop_at`` (a ``time.perf_counter()`` instant, for time-boxed benchmarks): sessions still
    running then end early with what they wrote, marked ``extra["stopped"]``. ``device``: where
    the small-model passes run (default: one packed batch of these sessions).
    """
    link = BusLink(link) if isinstance(link, EdgeBus) else link
    sched = schedule_of(cfg)
    device = device or PackedDevice(engine.model, engine.pad_id, cfg.prefill_threads)
    if device.simulated and sched.kind != "every":
        raise ConfigError(
            f"a simulated device has no distribution of its own, so it cannot run the {sched.kind!r} schedule",
            hint="use --device real, or the 'every' schedule",
        )
    if device.simulated and cfg.fusion.method != "constant":
        raise ConfigError(
            f"a simulated device samples the cloud's top-k and fuses nothing, so {cfg.fusion.method!r} "
            "fusion cannot run on it",
            hint="use --device real for fusion methods other than constant",
        )
    fuser = Fuser(cfg.fusion, cfg.top_k, engine.vocab) if not device.simulated else None
    plain = None  # contrast fusion: the small model without the context, stepped beside the real one
    if fuser is not None and fuser.needs_plain:
        plain = (
            PackedDevice(engine.model, engine.pad_id, cfg.prefill_threads)
            if isinstance(device, PackedDevice)
            else device
        )
    network = getattr(device, "network", lambda: None)  # a profile's round trip per exchange
    lives = [
        _Live(
            c,
            uuid.uuid4().hex,
            torch.Generator().manual_seed(c.seed) if c.seed is not None else None,
            time.perf_counter(),
        )
        for c in clients
    ]
    try:
        link.open(lives, cfg)
        for lv, lp in zip(lives, device.prefill(lives, [engine.prompt_ids(lv.client.record) for lv in lives])):
            lv.lp = lp  # computed while the cloud prefills
        if plain is not None:
            plain_prompts = [cloud_prompt_ids(engine.tok, lv.client.record.public_instruction) for lv in lives]
            for lv, lp in zip(lives, plain.prefill([lv.plain_key for lv in lives], plain_prompts)):
                lv.plain_lp = lp
        link.collect(lives, cfg)
        network()
        while True:
            live = [lv for lv in lives if not lv.done]
            if not live:
                break
            if stop_at is not None and time.perf_counter() >= stop_at:
                for lv in live:
                    lv.stopped = lv.done = True
                break
            # 1. positions that need the cloud and are not covered: ask (if not already asked)
            need = [lv for lv in live if sched.fuses(len(lv.out), lv.lp) and lv.row is None]
            link.request([lv for lv in need if not lv.in_flight], cfg)
            if need:
                link.collect(need, cfg)
                network()
            # 2. choose every session's token
            for lv in [lv for lv in live if not lv.done]:
                _choose(lv, sched, cfg, engine, fuser)
            live = [lv for lv in live if not lv.done]
            if not live:
                break
            # 3. ask early for positions known to need the cloud, then run the small model meanwhile
            if sched.known_in_advance:
                link.request([lv for lv in live if lv.row is None and sched.fuses(len(lv.out))], cfg)
            for lv, lp in zip(live, device.step(live, [lv.out[-1] for lv in live])):
                lv.lp = lp
            if plain is not None:
                for lv, lp in zip(live, plain.step([lv.plain_key for lv in live], [lv.out[-1] for lv in live])):
                    lv.plain_lp = lp
    finally:
        device.release(lives)
        if plain is not None:
            plain.release([lv.plain_key for lv in lives])
        link.close(lives)
    results = [_result(lv, engine) for lv in lives]
    for r in results:
        on_result(r)
    return results


def _choose(lv: _Live, sched: Schedule, cfg: EdgeConfig, engine: EdgeEngine, fuser: Fuser | None) -> None:
    samp = cfg.sampling
    space = None  # None: target spans the vocabulary; else it spans these K token ids
    if sched.fuses(len(lv.out), lv.lp) and lv.row is not None:
        ids, lps = lv.rows[0][lv.row], lv.rows[1][lv.row]
        if lv.lp is None:  # a simulated device: the cloud's top-k alone (sampled over K, not the vocabulary)
            target, space = torch.from_numpy(lps).float()[None], ids
        else:
            t0 = time.perf_counter()
            target = fuser(
                lv.lp[None],
                torch.from_numpy(ids.astype(np.int64))[None],
                torch.from_numpy(lps)[None],
                None if lv.plain_lp is None else lv.plain_lp[None],
            )
            metrics.fusion_seconds.observe(time.perf_counter() - t0)
        lv.fused += 1
    else:
        target = lv.lp[None]
    draft = int(lv.drafts[lv.row]) if lv.row is not None and lv.row < lv.drafts.size else None
    if draft is not None and space is not None:  # the draft's index among the K ids (absent: cannot be accepted)
        hits = np.flatnonzero(space == draft)
        draft = int(hits[0]) if hits.size else None
    if draft is not None:  # a draft proposes this position's token
        q = sampling_probs(target, samp.temperature, samp.top_p)[0]
        token, accepted = accept_draft(q, draft, 1.0, lv.gen)
        lv.row = lv.row + 1 if accepted else None
        lv.accepted += accepted
        lv.accepted_now += accepted
    else:
        token = int(sample(target, samp.temperature, samp.top_p, lv.gen)[0])
        lv.row = None
    if space is not None:
        token = int(space[token])
    lv.ttft = lv.ttft if lv.ttft is not None else time.perf_counter() - lv.t0
    if token in engine.stop_ids and not cfg.ignore_eos:
        lv.done = True
        return
    lv.out.append(token)
    lv.unsent.append(token)
    lv.token_times.append(time.perf_counter())
    if len(lv.out) >= cfg.max_new_tokens:
        lv.done = True


def _result(lv: _Live, engine: EdgeEngine) -> SessionResult:
    seconds = time.perf_counter() - lv.t0
    lv.reply_done()
    metrics.session_done(
        "logits", "failed" if lv.error else "cut" if lv.stopped else "ok", 0 if lv.error else len(lv.out)
    )
    c = lv.client
    extra = {
        "fused_steps": lv.fused,
        "accepted_draft_tokens": lv.accepted,
        "rtt_us": lv.rtt_us,
        "overhead_us": lv.overhead_us,
        "stopped": lv.stopped,
        "itl_s": [b - a for a, b in zip(lv.token_times, lv.token_times[1:])],
    }
    if lv.error:
        return SessionResult(
            c.index, c.record.tid, "logits", "", 0, seconds, error=lv.error, round_trips=lv.round_trips, extra=extra
        )
    text = engine.tok.decode(lv.out, skip_special_tokens=True).strip()
    log.info(
        "client %d logits session %s: %d tokens, %d round trips in %.2f s",
        c.index,
        lv.session_id[:8],
        len(lv.out),
        lv.round_trips,
        seconds,
    )
    return SessionResult(
        c.index,
        c.record.tid,
        "logits",
        text,
        len(lv.out),
        seconds,
        ttft_s=lv.ttft,
        round_trips=lv.round_trips,
        extra=extra,
    )
