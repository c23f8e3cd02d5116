"""Sketch mode: the cloud outlines the public instruction, the device writes the answer from outline + context.

Every sketch session runs here. Each client's request is built here and sealed by the client's own gate;
an ``OutlineSource`` only carries sealed requests to the cloud and answers with outlines: ``HttpOutlines``
through the cloud's HTTP ingress, or an in-process adapter over the cloud engine (eval's). The answer is
written one of two ways:

- ``write_sketches``: a group of clients together (the demo's pool, eval): one batched generation;
- ``write_sketch``: one client on a shared ``Device`` (a fleet client, a Locust user), token by token,
  with time to first token and the gaps between tokens measured.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import httpx
import msgspec
import torch

from cogenesis.cluster.bus import Sealed, wire_bytes
from cogenesis.core import metrics
from cogenesis.core.config import EdgeConfig
from cogenesis.core.errors import BusTimeout, ClusterError, CoGenesisError, PrivacyViolation, SessionError
from cogenesis.core.protocol import SketchReply, SketchRequest, error_code
from cogenesis.core.sampling import sample
from cogenesis.edge_sim.client import EdgeClient, SessionResult
from cogenesis.edge_sim.device import Device
from cogenesis.edge_sim.engine import EdgeEngine

log = logging.getLogger(__name__)

MAX_PARALLEL_REQUESTS = 32  # outline requests a group sends at once over HTTP


@dataclass(frozen=True)
class OutlineRequest:
    """One client's outline request, as its gate checked and sealed it."""

    client: int  # the asking client's index (attributes what the cloud received, locally; never sent)
    request: SketchRequest
    sealed: Sealed


@dataclass(frozen=True)
class Outline:
    sketch: str
    tokens: int  # what the cloud spent on it
    seconds: float  # from sending the request to having the outline


class OutlineSource(Protocol):
    def outlines(self, requests: Sequence[OutlineRequest]) -> list[Outline | Exception]:
        """One outline per request, in order, or the error that request failed with (raising fails them all)."""
        ...


class HttpOutlines:
    """Outlines from the cloud's HTTP ingress (``POST /v1/sketch`` with the sealed JSON body). A group's
    requests are all in flight at once (up to ``MAX_PARALLEL_REQUESTS``), so Serve batches them."""

    def __init__(self, http: httpx.Client, http_url: str, timeout_s: float) -> None:
        self.http = http
        self.url = f"{http_url}/v1/sketch"
        self.timeout_s = timeout_s

    def outlines(self, requests: Sequence[OutlineRequest]) -> list[Outline | Exception]:
        if len(requests) <= 1:  # one session (a fleet client, a Locust user): on the caller's own thread
            return [self._outline_or_error(r) for r in requests]
        with ThreadPoolExecutor(min(MAX_PARALLEL_REQUESTS, len(requests))) as ex:
            return list(ex.map(self._outline_or_error, requests))

    def _outline_or_error(self, req: OutlineRequest) -> Outline | Exception:
        try:
            return self.outline(req)
        except Exception as exc:  # reported with the client's session
            return exc

    def outline(self, req: OutlineRequest) -> Outline:
        t0 = time.perf_counter()
        reply = msgspec.json.decode(post_sealed(self.http, self.url, req.sealed, self.timeout_s), type=SketchReply)
        return Outline(reply.sketch, reply.tokens, time.perf_counter() - t0)


def post_sealed(http: httpx.Client, url: str, sealed: Sealed, timeout_s: float) -> bytes:
    """POST a gate-sealed body, exactly its bytes (anything but a genuine ``Sealed`` raises TypeError);
    errors become CoGenesisErrors that say what happened."""
    body = wire_bytes(sealed)
    try:
        resp = http.post(url, content=body, headers={"content-type": "application/json"}, timeout=timeout_s)
    except httpx.TimeoutException:
        raise BusTimeout(
            f"no answer from {url} within {timeout_s:.0f} s",
            hint="the cloud may be overloaded; raise --step-timeout or add replicas",
        ) from None
    except httpx.HTTPError as exc:
        raise ClusterError(f"cannot reach the cloud at {url}: {exc}", hint="is the cluster running?") from None
    if resp.status_code != 200:
        try:
            body = resp.json()
            detail = body.get("error") or body.get("detail") or resp.text[:200]
            detail = f"{detail} ({body['hint']})" if body.get("hint") else detail
        except ValueError:
            detail = resp.text[:200]
        raise SessionError(f"cloud answered {resp.status_code}: {detail}")
    return resp.content


def sketch_request(client: EdgeClient, cfg: EdgeConfig) -> SketchRequest:
    """The outline request: the public instruction only, with the cloud's decoding settings.

    Nothing in it is the client's own: the id is random, and a sampled outline gets a fresh random seed
    (the device's sampling seed, stable across its sessions, would link them; a greedy one needs none)."""
    return SketchRequest(
        request_id=uuid.uuid4().hex,
        instruction=client.record.public_instruction,
        kind=client.record.kind,
        max_tokens=cfg.sketch_max_tokens,
        temperature=cfg.sketch.temperature,
        top_p=cfg.sketch.top_p,
        repetition_penalty=cfg.sketch.repetition_penalty,
        seed=secrets.randbits(63) if cfg.sketch.temperature > 0 else None,
    )


def ask_outlines(clients: Sequence[EdgeClient], source: OutlineSource, cfg: EdgeConfig) -> list[Outline | Exception]:
    """Each client's gate seals its request; ``source`` answers all that passed at once."""
    sealed: list[OutlineRequest | Exception] = []
    for c in clients:
        req = sketch_request(c, cfg)
        try:
            sealed.append(OutlineRequest(c.index, req, c.gate.seal_json(req)))
        except PrivacyViolation as exc:
            sealed.append(exc)
    answers = iter(source.outlines([s for s in sealed if isinstance(s, OutlineRequest)]))
    return [s if isinstance(s, Exception) else next(answers) for s in sealed]


def write_sketches(
    clients: Sequence[EdgeClient], source: OutlineSource, engine: EdgeEngine, cfg: EdgeConfig
) -> list[SessionResult]:
    """Sketch sessions for ``clients`` together: every outline at once, then every answer in one batched
    generation (each client with its own seed). A client whose outline failed gets a failed result."""
    t0 = time.perf_counter()
    outlines = ask_outlines(clients, source, cfg)
    asked_s = time.perf_counter() - t0
    ok = [(c, o) for c, o in zip(clients, outlines) if isinstance(o, Outline)]
    t_gen = time.perf_counter()
    written = _generate(
        engine, cfg, [engine.prompt_ids(c.record, sketch=o.sketch) for c, o in ok], [c.seed for c, _ in ok]
    )
    gen_s = time.perf_counter() - t_gen
    results = {c.index: _written(c, o, engine, ids, gen_s) for (c, o), ids in zip(ok, written)}
    results.update({c.index: _failed(c, o, asked_s) for c, o in zip(clients, outlines) if isinstance(o, Exception)})
    return [results[c.index] for c in clients]


def write_sketch(
    client: EdgeClient, source: OutlineSource, engine: EdgeEngine, device: Device, cfg: EdgeConfig
) -> SessionResult:
    """One sketch session on a shared ``device``, token by token. Raises what the outline request raised."""
    t0 = time.perf_counter()
    (outline,) = ask_outlines([client], source, cfg)
    if isinstance(outline, Exception):
        raise outline
    getattr(device, "network", lambda: None)()  # a device profile's round trip
    out, times = _decode_on(device, engine, engine.prompt_ids(client.record, sketch=outline.sketch), client.seed, cfg)
    metrics.session_done("sketch", "ok", len(out))
    return SessionResult(
        client.index,
        client.record.tid,
        "sketch",
        "" if device.simulated else engine.tok.decode(out, skip_special_tokens=True).strip(),
        len(out),
        time.perf_counter() - t0,
        ttft_s=(times[0] - t0) if times else None,
        round_trips=1,
        sketch=outline.sketch,
        itl_s=[b - a for a, b in zip(times, times[1:])],
        sketch_seconds=outline.seconds,
        simulated=device.simulated,
    )


def _generate(
    engine: EdgeEngine, cfg: EdgeConfig, prompts: list[list[int]], seeds: list[int | None]
) -> list[list[int]]:
    if not prompts:
        return []
    return engine.generate(prompts, cfg.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_p, seeds)


def _decode_on(
    device: Device, engine: EdgeEngine, prompt: list[int], seed: int | None, cfg: EdgeConfig
) -> tuple[list[int], list[float]]:
    """Sample up to ``max_new_tokens`` on the device (a profile's device samples nothing: token 0).
    Returns the tokens and when each was chosen."""
    key = object()  # the session's slot on the device
    samp = cfg.sampling
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out: list[int] = []
    times: list[float] = []
    try:
        lp = device.prefill([key], [prompt])[0]
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
    return out, times


def _written(client: EdgeClient, outline: Outline, engine: EdgeEngine, ids: list[int], gen_s: float) -> SessionResult:
    metrics.session_done("sketch", "ok", len(ids))
    return SessionResult(
        client.index,
        client.record.tid,
        "sketch",
        engine.tok.decode(ids, skip_special_tokens=True).strip(),
        len(ids),
        outline.seconds + gen_s,
        round_trips=1,
        sketch=outline.sketch,
        sketch_seconds=outline.seconds,
        edge_seconds=gen_s,
    )


def _failed(client: EdgeClient, exc: Exception, seconds: float) -> SessionResult:
    message = exc.message if isinstance(exc, CoGenesisError) else f"{type(exc).__name__}: {exc}"
    log.warning("client %d sketch session failed: %s", client.index, message)
    metrics.session_done("sketch", "failed", 0)
    return SessionResult(
        client.index, client.record.tid, "sketch", "", 0, seconds, error=message, error_code=error_code(exc)
    )
