"""Sketch mode: the cloud outlines the public instruction, the device writes the answer from outline + context.

Every sketch session runs here. Each client's request is built here and sealed by the client's own gate;
an ``OutlineSource`` only carries sealed requests to the cloud and answers with outlines: ``HttpOutlines``
through the cloud's HTTP ingress, or an in-process adapter over the cloud engine (eval's). The answer is
written one of two ways:

- ``write_sketches``: a group of clients together (the demo's pool, eval): one batched generation;
- ``write_sketch``: one client on a shared ``Device`` (a fleet client, a Locust user), token by token,
  with time to first token and the gaps between tokens measured.

An outline request carries a time budget that scales with the tokens it may write (``sketch_budget_s``:
``step_timeout_s + sketch_max_tokens x sketch_token_s``); the replica counts it from the request's arrival,
and the edge's HTTP wait follows it. The cloud may refuse an outline it cannot serve in time (429, or 503 with
``Retry-After``): the request is sent again after the retry-after, with exponential backoff and jitter
(``busy_delay``), until ``admission_timeout_s`` from the first try; then the session fails ``busy``. The
endpoint may stream the outline as server-sent events (``progress`` while it is written, then ``done`` or
``error``); a plain JSON answer is read as well. A device asks the gateway (``POST {gateway_url}/v1/sketch``) with
its bearer token, a trusted worker the cloud's own route with a worker token: ``HttpOutlines(token=...)``; a refused
token is an ``AuthError`` (401) or ``Forbidden`` (403), with a hint.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import httpx
import msgspec
import torch

from cogenesis.cluster.bus import Sealed, wire_bytes
from cogenesis.core import metrics
from cogenesis.core.config import EdgeConfig
from cogenesis.core.errors import (
    AuthError,
    BusTimeout,
    Busy,
    ClusterError,
    CoGenesisError,
    Forbidden,
    PrivacyViolation,
    ProtocolError,
    RateLimited,
    SessionError,
    TooLarge,
)
from cogenesis.core.protocol import SketchProgress, SketchReply, SketchRequest, budget_of, decode_json, error_code
from cogenesis.core.sampling import sample
from cogenesis.edge_sim.client import EdgeClient, SessionResult, busy_delay
from cogenesis.edge_sim.device import Device
from cogenesis.edge_sim.engine import EdgeEngine

log = logging.getLogger(__name__)

MAX_PARALLEL_REQUESTS = 32  # outline requests a group sends at once over HTTP
HTTP_MARGIN_S = 5.0  # the edge waits for an outline its budget and this much more (the way there and back)
DEFAULT_RETRY_AFTER_S = 1.0  # a 429 without a (numeric) Retry-After


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
    busy_retries: int = 0  # times the cloud refused it busy before it was written


class OutlineSource(Protocol):
    def outlines(self, requests: Sequence[OutlineRequest]) -> list[Outline | Exception]:
        """One outline per request, in order, or the error that request failed with (raising fails them all)."""
        ...


OnProgress = Callable[[OutlineRequest, SketchProgress], None]
Token = str | Callable[[int], str] | None  # a bearer token, or each client's (by index), or none
OnToken = Callable[[int], "bool | None"]  # told every token written; False: stop writing
TOKEN_HINT = (
    "pass a valid token: a device's (`cogenesis token create --device ID`) for the gateway, a worker's for the "
    "cloud's own routes"
)


class HttpOutlines:
    """Outlines from the cloud's HTTP ingress (``POST /v1/sketch`` with the sealed JSON body). A group's
    requests are all in flight at once (up to ``MAX_PARALLEL_REQUESTS``), so the replica decodes them together.

    ``timeout_s``: the wait for a request without a budget (one with a budget waits the budget and
    ``HTTP_MARGIN_S``). ``stream``: ask for server-sent events (the outline's progress, ``on_progress``); a
    server that answers JSON is read all the same. A busy refusal (429, or 503 with ``Retry-After``) is
    retried until ``admission_timeout_s`` from the first try. ``token``: the bearer token sent with each request
    (one for all, or each client's by its index: a pool of devices); never logged."""

    def __init__(
        self,
        http: httpx.Client,
        http_url: str,
        timeout_s: float,
        admission_timeout_s: float = 120.0,
        stream: bool = True,
        on_progress: OnProgress | None = None,
        token: Token = None,
    ) -> None:
        self.http = http
        self.url = f"{http_url.rstrip('/')}/v1/sketch"
        self.timeout_s = timeout_s
        self.admission_timeout_s = admission_timeout_s
        self.stream = stream
        self.on_progress = on_progress
        self._token = token
        self._rng = random.Random()  # retry jitter (never a device's seed)

    def _headers(self, client: int, accept: str) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": accept}
        token = self._token(client) if callable(self._token) else self._token
        if token:
            headers["authorization"] = f"Bearer {token}"
        return headers

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
        """One outline, asked again while the cloud refuses it busy (within the admission timeout)."""
        t0, first = time.perf_counter(), time.monotonic()
        tries = 0
        while True:
            try:
                reply = self._ask(req)
                return Outline(reply.sketch, reply.tokens, time.perf_counter() - t0, tries)
            except Busy as exc:
                now = time.monotonic()
                left = first + self.admission_timeout_s - now
                if left <= 0:
                    raise Busy(
                        f"the cloud refused the outline busy for {now - first:.0f} s "
                        f"(admission_timeout_s {self.admission_timeout_s:g}): {exc.message}",
                        retry_after_s=exc.retry_after_s,
                    ) from None
                time.sleep(min(left, busy_delay(exc.retry_after_s, tries, self._rng)))
                tries += 1
                metrics.busy_retries.inc()

    def _ask(self, req: OutlineRequest) -> SketchReply:
        """Post the sealed request once and read the outline: streamed events or a JSON body."""
        wait_s = self.timeout_s if req.request.budget_ms is None else req.request.budget_ms / 1000 + HTTP_MARGIN_S
        accept = "text/event-stream, application/json" if self.stream else "application/json"
        body = wire_bytes(req.sealed)
        deadline = time.monotonic() + wait_s
        try:
            with self.http.stream(
                "POST",
                self.url,
                content=body,
                headers=self._headers(req.client, accept),
                timeout=wait_s,
            ) as resp:
                if resp.status_code != 200:
                    resp.read()
                    raise refusal(resp, self.url)
                if resp.headers.get("content-type", "").startswith("text/event-stream"):
                    return self._events(resp.iter_lines(), req, deadline, wait_s)
                return decode_json(resp.read(), SketchReply)
        except httpx.TimeoutException:
            raise _no_answer(self.url, wait_s) from None
        except httpx.HTTPError as exc:
            raise ClusterError(f"cannot reach the cloud at {self.url}: {exc}", hint="is the cluster running?") from None

    def _events(self, lines: Iterable[str], req: OutlineRequest, deadline: float, wait_s: float) -> SketchReply:
        """Read a streamed outline: ``progress`` events (to ``on_progress``), then ``done`` or ``error``."""
        for event, data in sse_events(lines):
            if time.monotonic() > deadline:
                raise _no_answer(self.url, wait_s)
            kind = event if event != "message" else _tagged(data)
            if kind in ("progress", "sketch_progress"):
                progress = decode_json(data.encode(), SketchProgress)
                if self.on_progress is not None:
                    self.on_progress(req, progress)
            elif kind in ("done", "sketch_reply"):
                return decode_json(data.encode(), SketchReply)
            elif kind == "error":
                raise _error_event(data)
            # anything else (a future event): skipped
        raise ProtocolError(f"the outline stream from {self.url} ended without an outline")


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """Server-sent events as (event name, data): ``event:``/``data:`` fields up to a blank line (several
    data lines joined by newlines); comments (``:`` keep-alives) skipped; unnamed events are ``message``."""
    event = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if data:
        yield event, "\n".join(data)


def _tagged(data: str) -> str:
    """The message type (its ``type`` tag) of an unnamed event's JSON data ("" if it has none)."""
    try:
        tag = msgspec.json.decode(data.encode()).get("type", "")
    except (msgspec.DecodeError, AttributeError):
        return ""
    return tag if isinstance(tag, str) else ""


def _no_answer(url: str, wait_s: float) -> BusTimeout:
    return BusTimeout(
        f"no outline from {url} within {wait_s:.0f} s",
        hint="the cloud may be overloaded; add replicas, or raise --step-timeout / edge.sketch_token_s",
    )


def _error_body(raw: bytes | str) -> dict:
    try:
        body = msgspec.json.decode(raw.encode() if isinstance(raw, str) else raw)
    except msgspec.DecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def _error_event(data: str) -> CoGenesisError:
    """An ``error`` event as the error it is: busy (retried), deadline (timeout), or a refusal."""
    body = _error_body(data)
    code = str(body.get("code") or "")
    message = str(body.get("error") or body.get("message") or body.get("detail") or data[:200])
    if code == "rate_limited":
        return RateLimited(f"the gateway refused the outline: {message}", _retry_ms(body) or DEFAULT_RETRY_AFTER_S)
    if code == "busy":
        return Busy(f"cloud refused the outline: {message}", retry_after_s=_retry_ms(body) or DEFAULT_RETRY_AFTER_S)
    if code in ("deadline", "timeout"):
        return BusTimeout(f"the cloud gave up on the outline: {message}", hint="raise edge.sketch_token_s")
    return SessionError(f"cloud failed the outline: {code or 'error'}: {message}")


def _retry_ms(body: dict) -> float | None:
    value = body.get("retry_after_ms")
    return value / 1000 if isinstance(value, (int, float)) and value >= 0 else None


def _retry_after(resp: httpx.Response) -> float | None:
    """The ``Retry-After`` header in seconds (None: none, or an HTTP date, which is not read)."""
    try:
        return max(0.0, float(resp.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def refusal(resp: httpx.Response, url: str) -> CoGenesisError:
    """A non-200 answer as an error: 429 (or 503 with ``Retry-After``) is ``Busy`` (retried); else the status
    and the body's error and hint."""
    body = _error_body(resp.content)
    detail = body.get("error") or body.get("detail") or resp.text[:200]
    detail = f"{detail} ({body['hint']})" if body.get("hint") else detail
    retry = _retry_after(resp)
    if resp.status_code == 429 or (resp.status_code == 503 and retry is not None):
        retry = retry if retry is not None else _retry_ms(body)
        return Busy(f"cloud answered {resp.status_code}: {detail}", retry_after_s=retry or DEFAULT_RETRY_AFTER_S)
    if resp.status_code == 401:
        return AuthError(f"{url} refused the request (401): {detail}", hint=TOKEN_HINT)
    if resp.status_code == 403:
        return Forbidden(f"{url} refused the request (403): {detail}", hint=TOKEN_HINT)
    if resp.status_code == 413:
        return TooLarge(f"{url} refused the request as too large (413): {detail}")
    return SessionError(f"cloud answered {resp.status_code}: {detail}")


def post_sealed(http: httpx.Client, url: str, sealed: Sealed, timeout_s: float, token: str | None = None) -> bytes:
    """POST a gate-sealed body, exactly its bytes (anything but a genuine ``Sealed`` raises TypeError), with
    ``token`` as its bearer; errors become CoGenesisErrors that say what happened (``refusal``)."""
    body = wire_bytes(sealed)
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    try:
        resp = http.post(url, content=body, headers=headers, timeout=timeout_s)
    except httpx.TimeoutException:
        raise _no_answer(url, timeout_s) from None
    except httpx.HTTPError as exc:
        raise ClusterError(f"cannot reach the cloud at {url}: {exc}", hint="is the cluster running?") from None
    if resp.status_code != 200:
        raise refusal(resp, url)
    return resp.content


def sketch_budget_s(cfg: EdgeConfig) -> float:
    """How long an outline may take: one reply's wait plus ``sketch_token_s`` per token it may write."""
    return cfg.step_timeout_s + cfg.sketch_max_tokens * cfg.sketch_token_s


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
        budget_ms=budget_of(sketch_budget_s(cfg)),
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
    client: EdgeClient,
    source: OutlineSource,
    engine: EdgeEngine,
    device: Device,
    cfg: EdgeConfig,
    on_token: OnToken | None = None,
) -> SessionResult:
    """One sketch session on a shared ``device``, token by token. Raises what the outline request raised.
    ``on_token``: told every token as it is written (a streaming caller); returning False stops the writing there."""
    t0 = time.perf_counter()
    (outline,) = ask_outlines([client], source, cfg)
    if isinstance(outline, Exception):
        raise outline
    getattr(device, "network", lambda: None)()  # a device profile's round trip
    prompt = engine.prompt_ids(client.record, sketch=outline.sketch)
    out, times = _decode_on(device, engine, prompt, client.seed, cfg, on_token)
    metrics.session_done("sketch", "ok", len(out))
    return SessionResult(
        client.index,
        client.record.tid,
        "sketch",
        "" if device.simulated else engine.tok.decode(out, skip_special_tokens=True).strip(),
        len(out),
        time.perf_counter() - t0,
        ids=[] if device.simulated else list(out),
        ttft_s=(times[0] - t0) if times else None,
        round_trips=1,
        sketch=outline.sketch,
        itl_s=[b - a for a, b in zip(times, times[1:])],
        sketch_seconds=outline.seconds,
        simulated=device.simulated,
        busy_retries=outline.busy_retries,
    )


def _generate(
    engine: EdgeEngine, cfg: EdgeConfig, prompts: list[list[int]], seeds: list[int | None]
) -> list[list[int]]:
    if not prompts:
        return []
    return engine.generate(prompts, cfg.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_p, seeds)


def _decode_on(
    device: Device,
    engine: EdgeEngine,
    prompt: list[int],
    seed: int | None,
    cfg: EdgeConfig,
    on_token: OnToken | None = None,
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
            if on_token is not None and on_token(token) is False:
                break
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
        ids=list(ids),
        round_trips=1,
        sketch=outline.sketch,
        sketch_seconds=outline.seconds,
        edge_seconds=gen_s,
        busy_retries=outline.busy_retries,
    )


def _failed(client: EdgeClient, exc: Exception, seconds: float) -> SessionResult:
    message = exc.message if isinstance(exc, CoGenesisError) else f"{type(exc).__name__}: {exc}"
    log.warning("client %d sketch session failed: %s", client.index, message)
    metrics.session_done("sketch", "failed", 0)
    return SessionResult(
        client.index, client.record.tid, "sketch", "", 0, seconds, error=message, error_code=error_code(exc)
    )
