"""One client's whole session, run on its own (a fleet client's greenlet, a Locust user).

Sessions run side by side over one ``Device`` (``SharedDevice`` batches their small-model passes;
a ``ProfileDevice`` only takes a profile's time) and a ``Cloud`` handle (the bus's Redis URL and
the HTTP ingress). Results are ``SessionResult``s with TTFT and inter-token gaps in ``extra``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
import torch

from cogenesis.cluster.bus import EdgeBus
from cogenesis.core import metrics
from cogenesis.core.config import EdgeConfig
from cogenesis.core.errors import CoGenesisError
from cogenesis.core.sampling import sample
from cogenesis.edge_sim.client import EdgeClient, SessionResult
from cogenesis.edge_sim.device import Device
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.logits import run_logits_sessions

MODES = ("sketch", "logits")


@dataclass
class Cloud:
    redis_url: str
    http_url: str
    http: httpx.Client


def run_session(
    client: EdgeClient,
    mode: str,
    engine: EdgeEngine,
    device: Device,
    cloud: Cloud,
    cfg: EdgeConfig,
    stop_at: float | None = None,
) -> SessionResult:
    """Run one ``mode`` session for ``client``; failures come back as a result with ``error``."""
    t0 = time.perf_counter()
    try:
        if mode == "logits":
            bus = EdgeBus(cloud.redis_url)
            try:
                return run_logits_sessions([client], engine, bus, cfg, stop_at=stop_at, device=device)[0]
            finally:
                bus.close()
        if mode == "sketch":
            return _sketch_session(client, engine, device, cloud, cfg, t0)
        raise ValueError(f"unknown mode {mode!r}: use sketch or logits")
    except CoGenesisError as exc:
        metrics.session_done(mode, "failed", 0)  # raised before the session could end normally
        return SessionResult(client.index, client.record.tid, mode, "", 0, time.perf_counter() - t0, error=exc.message)


def _sketch_session(
    client: EdgeClient, engine: EdgeEngine, device: Device, cloud: Cloud, cfg: EdgeConfig, t0: float
) -> SessionResult:
    """Outline from the cloud (public instruction only), then the device writes the text locally."""
    network = getattr(device, "network", lambda: None)
    sketch, _, sketch_s = client.request_sketch(cloud.http, cloud.http_url)
    network()
    key = object()  # the session's slot on the device
    samp = cfg.sampling
    gen = torch.Generator().manual_seed(client.seed) if client.seed is not None else None
    out: list[int] = []
    times: list[float] = []
    try:
        lp = device.prefill([key], [client.sketch_prompt(sketch)])[0]
        while len(out) < cfg.max_new_tokens:
            token = 0 if lp is None else int(sample(lp[None], samp.temperature, samp.top_p, gen)[0])
            times.append(time.perf_counter())
            if lp is not None and token in engine.stop_ids and not cfg.ignore_eos:
                break
            out.append(token)
            if len(out) < cfg.max_new_tokens:
                lp = device.step([key], [token])[0]
    finally:
        device.release([key])
    simulated = device.simulated
    metrics.session_done("sketch", "ok", len(out))
    text = "" if simulated else engine.tok.decode(out, skip_special_tokens=True).strip()
    return SessionResult(
        client.index,
        client.record.tid,
        "sketch",
        text,
        len(out),
        time.perf_counter() - t0,
        ttft_s=(times[0] - t0) if times else None,
        round_trips=1,
        sketch=sketch,
        extra={"sketch_seconds": sketch_s, "simulated": simulated, "itl_s": [b - a for a, b in zip(times, times[1:])]},
    )
