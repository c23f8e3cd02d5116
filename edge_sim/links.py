"""How an edge pool's logits sessions reach the cloud: a ``CloudLink``.

- ``BusLink``: the CoGenesis protocol. Sessions live on a replica (KV cache), each step sends only
  the new token ids over Redis, and a round's requests are pipelined together.
- ``StatelessLink``: the official code's protocol, kept as the benchmark's baseline. Every step
  POSTs the whole public sequence (prompt + generated ids) over HTTP and the cloud keeps nothing;
  one request per session per step, each computed alone.

A link only moves messages: the session loop (``cogenesis.edge_sim.logits``) decides what to ask. Every
message is sealed by the client's outbound gate. Each reply is traced: round trip and exchange
overhead (bus + serialization, not model time) go into the session's ``trace``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Protocol

import httpx

from cogenesis.cluster.bus import EdgeBus
from cogenesis.core import prompts
from cogenesis.core.errors import BusTimeout, ClusterError, CoGenesisError, ProtocolError, SessionError
from cogenesis.core.protocol import (
    CloseSession,
    ErrorReply,
    OpenSession,
    StatelessRequest,
    StepReply,
    StepRequest,
    deadline_in,
    decode_reply,
    now_us,
    pack_ids,
    pack_logprobs,
)

if TYPE_CHECKING:
    from cogenesis.core.config import EdgeConfig
    from cogenesis.edge_sim.logits import _Live

log = logging.getLogger(__name__)


class CloudLink(Protocol):
    def open(self, lives: Sequence[_Live], cfg: EdgeConfig) -> None:
        """Start every session; their first replies are collected by ``collect``."""

    def request(self, lives: Sequence[_Live], cfg: EdgeConfig) -> None:
        """Send each session's unsent tokens and ask for the next top-k."""

    def collect(self, lives: Sequence[_Live], cfg: EdgeConfig) -> None:
        """Wait (up to the step timeout) for the in-flight replies of ``lives``."""

    def close(self, lives: Sequence[_Live]) -> None:
        """Free whatever the cloud holds for these sessions (best effort)."""


def _fail(lv: _Live, exc: Exception) -> None:
    lv.error = exc.message if isinstance(exc, CoGenesisError) else f"{type(exc).__name__}: {exc}"
    lv.done = True
    log.warning("client %d logits session failed: %s", lv.client.index, lv.error)


class BusLink:
    """Logits steps over the Redis bus to the replica that owns each session."""

    def __init__(self, bus: EdgeBus) -> None:
        self.bus = bus
        self.reply_to = f"pool-{uuid.uuid4().hex}"  # one reply list for all of this pool's sessions

    def open(self, lives: Sequence[_Live], cfg: EdgeConfig) -> None:
        sent = now_us()
        self.bus.send_many(
            [
                (
                    None,
                    lv.session_id,
                    lv.client.gate.seal(
                        OpenSession(
                            session_id=lv.session_id,
                            instruction=lv.client.record.public_instruction,
                            top_k=cfg.top_k,
                            deadline_ms=deadline_in(cfg.step_timeout_s),
                            lookahead=cfg.lookahead,
                            sent_us=sent,
                            reply_to=self.reply_to,
                        )
                    ),
                )
                for lv in lives
            ]
        )
        for lv in lives:
            lv.sent(sent)

    def request(self, lives: Sequence[_Live], cfg: EdgeConfig) -> None:
        if not lives:
            return
        sent = now_us()
        items = []
        for lv in lives:
            step, tokens = lv.next_step()
            items.append(
                (
                    lv.replica,
                    lv.session_id,
                    lv.client.gate.seal(
                        StepRequest(
                            session_id=lv.session_id,
                            step=step,
                            tokens=pack_ids(tokens),
                            deadline_ms=deadline_in(cfg.step_timeout_s),
                            sent_us=sent,
                            reply_to=self.reply_to,
                        )
                    ),
                )
            )
        self.bus.send_many(items)
        for lv in lives:
            lv.sent(sent)

    def collect(self, lives: Sequence[_Live], cfg: EdgeConfig) -> None:
        waiting = {lv.session_id: lv for lv in lives if lv.in_flight and not lv.done}
        if not waiting:
            return
        since, arrivals = now_us(), {}
        got = self.bus.wait_many(
            {sid: lv.step for sid, lv in waiting.items()},
            deadline_in(cfg.step_timeout_s),
            arrivals,
            reply_to=dict.fromkeys(waiting, self.reply_to),
        )
        for sid, reply in got.items():
            lv = waiting[sid]
            if isinstance(reply, Exception):
                _fail(lv, reply)
            else:
                lv.take(reply, arrivals.get(sid, now_us()), since)

    def close(self, lives: Sequence[_Live]) -> None:
        closes = [
            (lv.replica, lv.session_id, lv.client.gate.seal(CloseSession(session_id=lv.session_id)))
            for lv in lives
            if lv.replica
        ]
        if closes:
            try:
                self.bus.send_many(closes)
            except Exception as exc:  # the sessions time out on the replica anyway
                log.warning("could not close %d session(s): %s", len(closes), exc)
        self.bus.forget(lv.session_id for lv in lives)


class StatelessLink:
    """The official code's exchange: the whole sequence over HTTP every step, no server state.

    Requests of one round go out concurrently (one thread each, up to ``max_concurrency``) while
    the edge runs its small model; the cloud computes each one alone (batch 1).
    """

    def __init__(self, http_url: str, tokenizer, max_concurrency: int = 256) -> None:
        self.url = f"{http_url.rstrip('/')}/v1/stateless"
        self.tok = tokenizer
        self.http = httpx.Client(limits=httpx.Limits(max_connections=max_concurrency))
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="stateless")
        self._prompt: dict[str, tuple[list[int], str]] = {}  # session -> (cloud prompt ids, its text)
        self._futures: dict[str, Future] = {}

    def open(self, lives: Sequence[_Live], cfg: EdgeConfig) -> None:
        for lv in lives:
            ids = prompts.cloud_prompt_ids(self.tok, lv.client.record.public_instruction)
            self._prompt[lv.session_id] = (ids, self.tok.decode(ids))
        self._send(lives, cfg, opening=True)

    def request(self, lives: Sequence[_Live], cfg: EdgeConfig) -> None:
        self._send(lives, cfg, opening=False)

    def _send(self, lives: Sequence[_Live], cfg: EdgeConfig, opening: bool) -> None:
        for lv in lives:
            if not opening:
                lv.next_step()
            ids, text = self._prompt[lv.session_id]
            sent = now_us()
            tokens = ids + lv.out
            sealed = lv.client.gate.seal(
                StatelessRequest(
                    session_id=lv.session_id,
                    tokens=pack_ids(tokens),
                    top_k=cfg.top_k,
                    deadline_ms=deadline_in(cfg.step_timeout_s),
                    sent_us=sent,
                ),
                prompt_text=text,
            )
            self._futures[lv.session_id] = self._submit(lv.session_id, tokens, sealed.payload, cfg)
            lv.sent(sent)

    def _submit(self, session_id: str, tokens: list[int], sealed: bytes, cfg: EdgeConfig) -> Future:
        """Start the POST of one gate-sealed step in the background."""
        return self.pool.submit(self._post, sealed, cfg.step_timeout_s)

    def _post(self, body: bytes, timeout_s: float) -> tuple[StepReply | ErrorReply, int]:
        try:
            resp = self.http.post(
                self.url, content=body, headers={"content-type": "application/msgpack"}, timeout=timeout_s
            )
        except httpx.TimeoutException:
            raise BusTimeout(
                f"no answer from {self.url} within {timeout_s:.0f} s",
                hint="the cloud may be overloaded; raise --step-timeout",
            ) from None
        except httpx.HTTPError as exc:
            raise ClusterError(f"cannot reach the cloud at {self.url}: {exc}", hint="is the cluster running?") from None
        try:
            return decode_reply(resp.content), now_us()
        except ProtocolError:
            raise SessionError(f"cloud answered {resp.status_code}: {resp.text[:200]}") from None

    def collect(self, lives: Sequence[_Live], cfg: EdgeConfig) -> None:
        since = now_us()
        for lv in [lv for lv in lives if lv.in_flight and not lv.done]:
            future = self._futures.pop(lv.session_id)
            try:
                reply, received = future.result(timeout=cfg.step_timeout_s + 5)
            except FutureTimeout:
                _fail(lv, BusTimeout(f"session {lv.session_id}: no stateless reply in time"))
                continue
            except Exception as exc:
                _fail(lv, exc)
                continue
            if isinstance(reply, ErrorReply):
                _fail(lv, SessionError(f"cloud refused session {lv.session_id}: {reply.code}: {reply.message}"))
            else:
                lv.take(reply, received, since)

    def close(self, lives: Sequence[_Live]) -> None:
        for lv in lives:
            self._prompt.pop(lv.session_id, None)
            self._futures.pop(lv.session_id, None)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.http.close()


class OpenAILink(StatelessLink):
    """An OpenAI-compatible completions server (vLLM) driven per step: the setup a user would pick
    instead of CoGenesis. Each step POSTs the whole sequence as token ids with ``max_tokens=1`` and
    ``logprobs=k``; the server's prefix cache avoids most of the recompute. Untraced (the server
    does not report its own time), so only round trips are measured."""

    def __init__(self, base_url: str, model: str, tokenizer, max_concurrency: int = 256) -> None:
        super().__init__(base_url, tokenizer, max_concurrency)
        self.url = f"{base_url.rstrip('/')}/v1/completions"
        self.model = model

    def _submit(self, session_id: str, tokens: list[int], sealed: bytes, cfg: EdgeConfig) -> Future:
        # the gate checked this step as a StatelessRequest; the same prompt ids and generated ids go out
        # in the completions API's JSON
        body = {
            "model": self.model,
            "prompt": tokens,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": cfg.top_k,
            "return_tokens_as_token_ids": True,
        }
        return self.pool.submit(self._post_json, session_id, len(tokens), body, cfg.step_timeout_s)

    def _post_json(self, session_id: str, step: int, body: dict, timeout_s: float) -> tuple[StepReply, int]:
        try:
            resp = self.http.post(self.url, json=body, timeout=timeout_s)
        except httpx.TimeoutException:
            raise BusTimeout(f"no answer from {self.url} within {timeout_s:.0f} s") from None
        except httpx.HTTPError as exc:
            raise ClusterError(f"cannot reach the server at {self.url}: {exc}") from None
        received = now_us()
        if resp.status_code != 200:
            raise SessionError(f"{self.url} answered {resp.status_code}: {resp.text[:200]}")
        try:
            top = resp.json()["choices"][0]["logprobs"]["top_logprobs"][0]  # {"token_id:123": logprob}
            pairs = sorted(((int(k.split(":", 1)[1]), float(v)) for k, v in top.items()), key=lambda p: -p[1])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ProtocolError(f"unexpected completions reply from {self.url}: {exc!r}") from None
        return StepReply(
            session_id=session_id,
            step=step,
            replica="openai",
            ids=pack_ids([i for i, _ in pairs]),
            logprobs=pack_logprobs([lp for _, lp in pairs]),
        ), received


class EngineLink:
    """The cloud engine called in-process (``cogenesis eval``): the same messages, sealed by the same
    gates, without Redis or Serve. Replies are computed at ``request`` and handed over at ``collect``."""

    def __init__(self, engine, replica: str = "in-process") -> None:
        self.engine = engine  # deployments.engine.CloudEngine
        self.replica = replica
        self._pending: dict[str, object] = {}
        self.opened: dict[str, int] = {}  # session id -> client index (to attribute the engine's audit log)

    def open(self, lives: Sequence[_Live], cfg: EdgeConfig) -> None:
        from cogenesis.deployments.engine import OpenArgs

        for lv in lives:  # the gate checks what would leave the device
            self.opened[lv.session_id] = lv.client.index
            lv.client.gate.seal(
                OpenSession(
                    session_id=lv.session_id,
                    instruction=lv.client.record.public_instruction,
                    top_k=cfg.top_k,
                    deadline_ms=deadline_in(cfg.step_timeout_s),
                    lookahead=cfg.lookahead,
                )
            )
        self._answer(
            lives,
            self.engine.open_many(
                [OpenArgs(lv.session_id, lv.client.record.public_instruction, cfg.top_k, cfg.lookahead) for lv in lives]
            ),
        )

    def request(self, lives: Sequence[_Live], cfg: EdgeConfig) -> None:
        from cogenesis.deployments.engine import StepArgs

        args = []
        for lv in lives:
            step, tokens = lv.next_step()
            lv.client.gate.seal(
                StepRequest(
                    session_id=lv.session_id,
                    step=step,
                    tokens=pack_ids(tokens),
                    deadline_ms=deadline_in(cfg.step_timeout_s),
                )
            )
            args.append(StepArgs(lv.session_id, step, tuple(tokens)))
        if args:
            self._answer(lives, self.engine.step_many(args))

    def _answer(self, lives: Sequence[_Live], results: list) -> None:
        from cogenesis.deployments.step_loop import step_reply

        sent = now_us()
        for lv, result in zip(lives, results):
            lv.sent(sent)
            self._pending[lv.session_id] = (
                result
                if isinstance(result, Exception)
                else step_reply(lv.session_id, lv.step, self.replica, result, {})
            )

    def collect(self, lives: Sequence[_Live], cfg: EdgeConfig) -> None:
        for lv in lives:
            if not lv.in_flight or lv.done:
                continue
            reply = self._pending.pop(lv.session_id)
            if isinstance(reply, Exception):
                _fail(lv, reply)
            else:
                lv.take(reply)

    def close(self, lives: Sequence[_Live]) -> None:
        for lv in lives:
            self._pending.pop(lv.session_id, None)
            self.engine.close(lv.session_id)
