"""A device's way to the cloud: ``GatewayLink``, logits sessions over one WebSocket to the gateway.

A device holds no Redis credentials and knows no replica: it connects to the gateway (``GET {url}/v1/ws``) with
its bearer token, and every frame it sends is exactly what its outbound gate sealed (``wire_bytes``), or a
``StepBatch`` envelope around such payloads (a round of several sessions goes as one frame, as the bus's
``send_many`` does). Its messages carry ``reply_to=""`` and never name a replica: the gateway routes them and
answers on the same connection (``StepReply``, ``ErrorReply`` or ``ReplyBatch`` frames). A reader thread files
the replies per session, with their arrival time on the edge's clock; every wait ends at the step timeout.

Faults, as the session loop (``cogenesis.edge_sim.logits``) takes them (``Failure``):

- ``replica_lost`` / ``unknown_session`` answers: the session is resumed (re-opened with its tokens);
- ``busy`` / ``rate_limited`` / ``unavailable``: retried after the answer's ``retry_after_ms``;
- ``forbidden`` / ``too_large`` / ``bad_request`` / ``deadline`` / ``internal``: the session fails (codes
  ``forbidden`` or ``cloud_error``);
- a dropped connection: the gateway closes every session of a connection that went away, so the sessions in flight
  fail resumable (``unknown_session``) and the next send reconnects (backoff, for up to ``reconnect_s``); the edge
  holds every token, so the session loop replays them on the new connection;
- a refused handshake (401/403, or a close with 4401/4403 right after it): ``AuthError`` / ``Forbidden`` from the
  constructor, and for sessions in flight a failure that is not retried (a token does not become valid by itself).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import websocket

from cogenesis.cluster.bus import Sealed, wire_bytes
from cogenesis.core.config import LimitsConfig
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
    ReplicaLost,
    SessionError,
    TooLarge,
    UnknownSession,
)
from cogenesis.core.protocol import (
    CloseSession,
    ErrorReply,
    StepBatch,
    StepReply,
    decode_replies,
    encode,
    now_us,
)
from cogenesis.edge_sim.links import Arrival, Closing, Failure, Opening, Step, open_request, step_request

if TYPE_CHECKING:
    from cogenesis.core.config import EdgeConfig
    from cogenesis.edge_sim.gate import OutboundGate

log = logging.getLogger(__name__)

WS_PATH = "/v1/ws"
CONNECT_TIMEOUT_S = 10.0
RECONNECT_FIRST_S = 0.05  # reconnect backoff: the first wait, doubled up to RECONNECT_CAP_S
RECONNECT_CAP_S = 2.0
AUTH_CLOSE = {4401: AuthError, 4403: Forbidden}  # the gateway's close codes for a refused token
TOKEN_HINT = (
    "the gateway refused the token: pass a valid, unexpired device token (--token or $COGENESIS_TOKEN; "
    "`cogenesis token create --device ID` makes one with the cluster's secrets)"
)
_KEEPALIVE = ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),)
_STALE_WHILE_OPENING = ("unknown_session", "replica_lost")  # answers to the request a (re-)open replaced


def ws_url(url: str) -> str:
    """The gateway's WebSocket endpoint for ``url``: ``http(s)://host[:port][/prefix]`` (the gateway's base URL)
    becomes ``ws(s)://host[:port][/prefix]/v1/ws``; a ``ws(s)://`` URL ending in ``/v1/ws`` is kept."""
    parts = urlsplit(url.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ClusterError(
            f"gateway URL {url!r} is not http(s):// or ws(s)://host:port",
            hint="pass the gateway's base URL, e.g. http://127.0.0.1:8000 (`cogenesis status` shows it)",
        )
    path = parts.path.rstrip("/")
    if not path.endswith(WS_PATH):
        path += WS_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def failure_of(reply: ErrorReply) -> Failure:
    """What an ``ErrorReply`` means to the session loop (see the module doc)."""
    what = f"cloud refused session {reply.session_id} step {reply.step}: {reply.code}: {reply.message}"
    retry = max(0, reply.retry_after_ms) / 1000
    exc: CoGenesisError
    if reply.code == "unknown_session":
        exc = UnknownSession(what)
    elif reply.code == "replica_lost":
        exc = ReplicaLost(what)
    elif reply.code == "rate_limited":
        exc = RateLimited(what, retry_after_s=retry or 1.0)
    elif reply.code == "busy":
        exc = Busy(what, retry_after_s=retry)
    elif reply.code == "unavailable":  # the gateway cannot reach the bus now: parked, re-opened when it can
        return Failure(what, "unreachable", retry_after_s=retry or 1.0)
    elif reply.code == "forbidden":
        exc = Forbidden(what, hint="a session belongs to the device that opened it")
    elif reply.code == "too_large":
        exc = TooLarge(what, hint="the request is past a limit of the cloud (CloudConfig.limits)")
    else:  # bad_request, deadline, internal, or a code of a newer gateway
        exc = SessionError(what)
    return Failure.of(exc)


@dataclass
class _Flight:
    """A session's request in flight: the step it waits for, when it left (edge clock), on which connection."""

    step: int
    sent_us: int
    generation: int
    opening: bool


class GatewayLink:
    """Logits sessions through the gateway's WebSocket (a ``CloudLink``; see the module doc).

    ``url``: the gateway's base URL (``ClusterInfo.gateway_url``) or its ``ws(s)://.../v1/ws`` endpoint; ``token``:
    the device's bearer token (sent at the upgrade only, never logged). ``reconnect_s``: how long a dropped
    connection is retried (``EdgeConfig.redis_retry_s``). ``limits``: the cloud's message limits; a round bigger
    than one frame may carry is split over several frames. Connects at once: a refused token raises here."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        reconnect_s: float = 30.0,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        limits: LimitsConfig | None = None,
    ) -> None:
        self.url = ws_url(url)
        self._token = token
        self.reconnect_s = reconnect_s
        self.connect_timeout_s = connect_timeout_s
        self.limits = limits or LimitsConfig()
        self._cond = threading.Condition()
        self._ws: websocket.WebSocket | None = None
        self._generation = 0
        self._broken = True  # no connection yet
        self._fatal: CoGenesisError | None = None  # the gateway refused the token: nothing is retried
        self._replies: dict[str, tuple[StepReply | ErrorReply, int]] = {}  # session -> newest reply, received_us
        self._in_flight: dict[str, _Flight] = {}
        self._failed: dict[str, Failure] = {}  # sessions whose request never left, or whose connection broke
        self._opened: set[str] = set()  # sessions this link opened and did not close
        self._closed = False
        self._connect()

    # ---- connection ----------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Open the WebSocket and start its reader; raises AuthError/Forbidden (token refused) or ClusterError."""
        try:
            ws = websocket.create_connection(
                self.url,
                timeout=self.connect_timeout_s,
                header=[f"Authorization: Bearer {self._token}"],
                sockopt=_KEEPALIVE,
                enable_multithread=True,
            )
        except websocket.WebSocketBadStatusException as exc:
            raise _refused(self.url, exc.status_code, exc.resp_body) from None
        except (OSError, websocket.WebSocketException) as exc:
            raise ClusterError(
                f"cannot reach the gateway at {self.url}: {type(exc).__name__}: {exc}",
                hint="is the cluster (its gateway) running? check the gateway URL",
            ) from None
        ws.settimeout(None)  # the reader blocks; every wait of the edge has its own deadline
        with self._cond:
            self._generation += 1
            self._ws, self._broken = ws, False
            generation = self._generation
        threading.Thread(
            target=self._read, args=(ws, generation), name=f"gateway-link-{generation}", daemon=True
        ).start()

    def _reconnect(self) -> CoGenesisError | None:
        """Connect again, with capped exponential backoff for up to ``reconnect_s``; None once connected, else
        the error the sessions fail with."""
        if self._fatal is not None:
            return self._fatal
        deadline = time.monotonic() + self.reconnect_s
        delay = RECONNECT_FIRST_S
        while True:
            try:
                self._connect()
                log.info("reconnected to the gateway at %s", self.url)
                return None
            except (AuthError, Forbidden) as exc:
                self._fatal = exc
                return exc
            except ClusterError as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    return ClusterError(
                        f"the gateway at {self.url} is unreachable (retried for {self.reconnect_s:.0f} s): "
                        f"{exc.message}",
                        hint="is the cluster (its gateway) running? raise edge.redis_retry_s to wait longer",
                    )
                time.sleep(min(delay, left))
                delay = min(2 * delay, RECONNECT_CAP_S)

    def _read(self, ws: websocket.WebSocket, generation: int) -> None:
        """The reader of one connection: file every reply under its session, with when it came."""
        why = "the gateway closed the connection"
        try:
            while True:
                opcode, frame = ws.recv_data_frame()
                at = now_us()
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    why = self._closed_by(frame.data, generation)
                    break
                if opcode != websocket.ABNF.OPCODE_BINARY:
                    log.warning("dropped a non-binary frame of %d bytes from the gateway", len(frame.data or b""))
                    continue
                try:
                    replies = decode_replies(frame.data)
                except ProtocolError:  # its content is not logged: only that it was dropped
                    log.warning("dropped a malformed frame of %d bytes from the gateway", len(frame.data))
                    continue
                self._file(replies, at)
        except (OSError, websocket.WebSocketException) as exc:
            why = f"the connection to the gateway broke ({type(exc).__name__})"
        self._lost(generation, why)

    def _closed_by(self, data: bytes, generation: int) -> str:
        """A close frame: its code and reason; a refused token is remembered (nothing is retried)."""
        code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
        reason = data[2:].decode("utf-8", "replace")[:200]
        refused = AUTH_CLOSE.get(code)
        if refused is not None:
            with self._cond:
                self._fatal = refused(f"the gateway at {self.url} refused the token ({code}: {reason})", TOKEN_HINT)
        return f"the gateway closed the connection ({code}{': ' + reason if reason else ''})"

    def _file(self, replies: list[StepReply | ErrorReply], at: int) -> None:
        with self._cond:
            for reply in replies:
                sid = reply.session_id
                if not sid:  # a refusal of a whole frame: every session waiting on this connection gets it
                    for waiting in list(self._in_flight):
                        self._keep(waiting, reply, at)
                    continue
                if sid in self._opened:
                    self._keep(sid, reply, at)
            self._cond.notify_all()

    def _keep(self, sid: str, reply: StepReply | ErrorReply, at: int) -> None:
        kept = self._replies.get(sid)
        if kept is None or kept[0].step <= reply.step:
            self._replies[sid] = (reply, at)

    def _lost(self, generation: int, why: str) -> None:
        """A connection ended: the sessions in flight on it fail (resumable, unless the token was refused)."""
        with self._cond:
            if generation != self._generation:
                return
            self._broken = True
            if self._closed:
                self._cond.notify_all()
                return
            fatal = self._fatal
            for sid, flight in list(self._in_flight.items()):
                if flight.generation == generation and sid not in self._replies:
                    del self._in_flight[sid]
                    self._failed[sid] = (
                        Failure.of(fatal)
                        if fatal is not None
                        else Failure(f"session {sid}: {why}", "unreachable", resume="unknown_session")
                    )
            self._cond.notify_all()
        log.warning("gateway link: %s", why)

    # ---- CloudLink -------------------------------------------------------------------------------------

    def open(self, sessions: Sequence[Opening], cfg: EdgeConfig) -> None:
        self._send([(o.session_id, o.resume_step, True, o.gate, open_request(o, cfg)) for o in sessions])

    def request(self, steps: Sequence[Step], cfg: EdgeConfig) -> None:
        self._send([(s.session_id, s.step, False, s.gate, step_request(s, cfg)) for s in steps])

    def _send(self, requests: Sequence[tuple[str, int, bool, OutboundGate, object]]) -> None:
        """Seal each (session, step awaited, opening, gate, message) and send them as one frame (or a few)."""
        sealed: list[tuple[str, int, bool, Sealed]] = []
        for sid, step, opening, gate, msg in requests:
            try:
                sealed.append((sid, step, opening, gate.seal(msg)))  # type: ignore[arg-type]
            except PrivacyViolation as exc:  # nothing of it left; the session ends alone
                self._failed[sid] = Failure.of(exc)
        if not sealed:
            return
        payloads = [wire_bytes(s) for _, _, _, s in sealed]
        error = self._ensure_connected()
        with self._cond:
            for sid, step, opening, _ in sealed:
                self._opened.add(sid)
                if error is not None:  # the gateway could not be reached (or refused the token): they end here
                    self._in_flight.pop(sid, None)
                    self._failed[sid] = error
                else:
                    self._in_flight[sid] = _Flight(step, now_us(), self._generation, opening)
        if error is None:
            self._write(payloads)  # a broken write fails the sessions in flight on it (resumable)

    def _ensure_connected(self) -> Failure | None:
        if not self._broken:
            return None
        problem = self._reconnect()
        return None if problem is None else Failure.of(problem)

    def _write(self, payloads: list[bytes]) -> None:
        """Send the payloads in as few frames as the limits allow; a failed write breaks the connection (its
        sessions fail resumable, and the next send reconnects)."""
        ws, generation = self._ws, self._generation
        if ws is None:
            return
        try:
            for frame in frames(payloads, self.limits):
                ws.send_binary(frame)
        except (OSError, websocket.WebSocketException) as exc:
            with contextlib.suppress(Exception):
                ws.shutdown()
            self._lost(generation, f"the connection to the gateway broke while sending ({type(exc).__name__})")

    def collect(self, session_ids: Sequence[str], cfg: EdgeConfig) -> list[Arrival]:
        return self.collect_until(session_ids, time.monotonic() + cfg.step_timeout_s)

    def collect_until(self, session_ids: Sequence[str], deadline: float) -> list[Arrival]:
        """The answers of these sessions' requests in flight, waiting until ``deadline`` (``time.monotonic()``)."""
        out: list[Arrival] = []
        with self._cond:
            pending = set()
            for sid in session_ids:
                if sid in self._failed:
                    out.append(Arrival(sid, self._failed.pop(sid)))
                elif sid in self._in_flight:
                    pending.add(sid)
            while pending:
                for sid in list(pending):
                    arrival = self._take(sid)
                    if arrival is not None:
                        out.append(arrival)
                        pending.discard(sid)
                left = deadline - time.monotonic()
                if not pending or left <= 0:
                    break
                self._cond.wait(left)
            for sid in pending:
                flight = self._in_flight.pop(sid)
                out.append(
                    Arrival(
                        sid,
                        Failure.of(
                            _timeout(f"session {sid}: no answer from the gateway for step {flight.step} in time")
                        ),
                    )
                )
        return out

    def _take(self, sid: str) -> Arrival | None:
        """The answer to ``sid``'s request in flight, if it came (called holding the lock)."""
        if sid in self._failed:
            self._in_flight.pop(sid, None)
            return Arrival(sid, self._failed.pop(sid))
        flight = self._in_flight.get(sid)
        kept = self._replies.get(sid)
        if flight is None or kept is None:
            return None
        reply, at = kept
        if isinstance(reply, ErrorReply):
            if flight.opening and reply.code in _STALE_WHILE_OPENING:
                del self._replies[sid]  # the answer to the request this open replaced
                return None
            if reply.step < flight.step and reply.step != 0:
                return None
            del self._replies[sid], self._in_flight[sid]
            return Arrival(sid, failure_of(reply))
        if reply.step < flight.step:
            return None  # a late duplicate of an earlier step
        del self._replies[sid], self._in_flight[sid]
        return Arrival(sid, reply, flight.sent_us, at)  # timed by the reader thread when it came

    def close(self, sessions: Sequence[Closing]) -> None:
        """Free the sessions on the cloud (best effort: a connection that broke had them closed by the gateway)."""
        ids = [c.session_id for c in sessions]
        mine = [c for c in sessions if c.session_id in self._opened]
        ws = self._ws
        if mine and ws is not None and not self._broken:
            with contextlib.suppress(OSError, websocket.WebSocketException):
                payloads = [wire_bytes(c.gate.seal(CloseSession(session_id=c.session_id))) for c in mine]
                for frame in frames(payloads, self.limits):
                    ws.send_binary(frame)
        with self._cond:
            for sid in ids:
                self._opened.discard(sid)
                self._in_flight.pop(sid, None)
                self._failed.pop(sid, None)
                self._replies.pop(sid, None)

    def shutdown(self) -> None:
        """Close the connection (the gateway closes what this link still held open)."""
        with self._cond:
            self._closed = True
            ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                ws.close(timeout=1)
            with contextlib.suppress(Exception):
                ws.shutdown()

    def __enter__(self) -> GatewayLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __repr__(self) -> str:  # never the token
        return f"GatewayLink({self.url}, {len(self._opened)} session(s))"


def frames(payloads: list[bytes], limits: LimitsConfig) -> list[bytes]:
    """The frames that carry ``payloads`` (each a sealed message's bytes): one alone, several as a ``StepBatch``,
    split so that no frame has more than ``max_batch_items`` items or ``max_message_bytes`` bytes."""
    out: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for payload in payloads:
        if group and (len(group) >= limits.max_batch_items or size + len(payload) + 64 > limits.max_message_bytes):
            out.append(_frame(group))
            group, size = [], 0
        group.append(payload)
        size += len(payload) + 5  # msgpack bin header
    if group:
        out.append(_frame(group))
    return out


def _frame(group: list[bytes]) -> bytes:
    return group[0] if len(group) == 1 else encode(StepBatch(items=group))


def _refused(url: str, status: int, body: bytes | None) -> CoGenesisError:
    detail = (body or b"").decode("utf-8", "replace").strip()[:200]
    what = f"the gateway at {url} refused the connection ({status}{': ' + detail if detail else ''})"
    if status == 401:
        return AuthError(what, TOKEN_HINT)
    if status == 403:
        return Forbidden(what, TOKEN_HINT + "; a device connects with a device token")
    if status == 429:
        return RateLimited(what)
    return ClusterError(what, hint="is the gateway deployed at this URL? (`cogenesis status` shows it)")


def _timeout(message: str) -> CoGenesisError:
    return BusTimeout(message, hint="is the cloud running? the gateway answers every request or says why not")


class DeviceLinks:
    """Many devices' sessions stepped together (a demo or benchmark pool), each device over its own connection
    with its own token: a ``CloudLink`` that hands each session to the ``GatewayLink`` of the client that opened
    it (``Opening.client``). ``token_for(client)``: that device's token."""

    def __init__(self, url: str, token_for, reconnect_s: float = 30.0, limits: LimitsConfig | None = None) -> None:
        self.url, self.token_for, self.reconnect_s, self.limits = url, token_for, reconnect_s, limits
        self.links: dict[int, GatewayLink] = {}
        self._of: dict[str, int] = {}  # session -> its client
        self._failed: dict[str, Failure] = {}  # sessions whose device could not connect (its token refused, ...)

    def link(self, client: int) -> GatewayLink:
        if client not in self.links:
            self.links[client] = GatewayLink(
                self.url, self.token_for(client), reconnect_s=self.reconnect_s, limits=self.limits
            )
        return self.links[client]

    def open(self, sessions: Sequence[Opening], cfg: EdgeConfig) -> None:
        for client, group in _grouped(sessions, lambda o: o.client).items():
            for o in group:
                self._of[o.session_id] = client
            try:
                link = self.link(client)
            except CoGenesisError as exc:  # this device's sessions end with why; the others go on
                self._failed.update((o.session_id, Failure.of(exc)) for o in group)
                continue
            link.open(group, cfg)

    def request(self, steps: Sequence[Step], cfg: EdgeConfig) -> None:
        for client, group in _grouped(steps, lambda s: self._of[s.session_id]).items():
            self.link(client).request(group, cfg)

    def collect(self, session_ids: Sequence[str], cfg: EdgeConfig) -> list[Arrival]:
        deadline = time.monotonic() + cfg.step_timeout_s  # one wait for all: the links' readers file meanwhile
        out = [Arrival(sid, self._failed.pop(sid)) for sid in session_ids if sid in self._failed]
        answered = {a.session_id for a in out}
        waiting = [sid for sid in session_ids if sid not in answered and self._of.get(sid) in self.links]
        for client, group in _grouped(waiting, lambda sid: self._of[sid]).items():
            out += self.links[client].collect_until(group, deadline)
        return out

    def close(self, sessions: Sequence[Closing]) -> None:
        held = [c for c in sessions if self._of.get(c.session_id) in self.links]
        for client, group in _grouped(held, lambda c: self._of[c.session_id]).items():
            self.links[client].close(group)
        for c in sessions:
            self._of.pop(c.session_id, None)
            self._failed.pop(c.session_id, None)

    def shutdown(self) -> None:
        for link in self.links.values():
            link.shutdown()
        self.links.clear()


def _grouped(items, key) -> dict:
    out: dict = {}
    for item in items:
        out.setdefault(key(item), []).append(item)
    return out
