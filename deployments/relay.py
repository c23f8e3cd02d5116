"""The device gateway's relay: one device's WebSocket frames to the Redis bus and its replies back.

A device never holds Redis credentials: the gateway (``cogenesis.deployments.gateway``) authenticates it with a
bearer token, and this relay, connected as the ``gateway`` Redis user, carries its messages. Per connection:

- every binary frame is one encoded ``OpenSession``, ``StepRequest``, ``CloseSession`` or ``StepBatch`` of
  those (``cogenesis.core.protocol``); each item is decoded, checked against ``CloudConfig.limits``, charged to
  the device's rate limit (``RateLimiter``, shared by the replica's connections) and checked for ownership;
- a session is bound at open to the token's subject in Redis (``cg:owner:{sha256(session id)}`` holds
  ``sha256(subject)``, SET NX with a TTL refreshed while the session lives): another device's step, close or
  resume of it is refused ``forbidden``. Session ids and subjects appear in keys and values only hashed;
- ``reply_to`` is rewritten to the connection's own random list (``gw-<gateway id>-<connection id>``): a device
  cannot choose where replies go, nor read another connection's. Opens go to ``cg:open``, steps and closes to
  ``cg:in:{replica}`` of the replica holding the session, which the relay learns from that replica's replies
  (only replicas can write ``cg:reply:*``), never from the device;
- a reader task pops the reply list and forwards replies as binary frames; about every ``ALIVE_CHECK_S`` it
  checks the heartbeats of the replicas its in-flight sessions wait on, and answers the sessions of a dead
  one ``replica_lost`` (the device resumes them with an ``OpenSession`` carrying ``resume``);
- Redis errors answer ``unavailable`` with ``retry_after_ms`` (the reader reconnects with backoff); when the
  device disconnects, its sessions are closed on their replicas, their ownership keys and its reply list deleted.

Every item gets an answer (a reply, or an ``ErrorReply``) except closes, which have none. The relay decodes
public protocol messages to route and check them; it never logs their contents (session ids and sizes only).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from cogenesis.cluster.bus import (
    ALIVE_CHECK_S,
    DRAIN_COUNT,
    FIELD,
    KEY_TTL_S,
    OPEN_STREAM,
    RECONNECT_CAP_S,
    RECONNECT_FIRST_S,
    SOCKET_TIMEOUT_S,
    alive_key,
    in_stream,
    redis_auth,
    reply_key,
)
from cogenesis.core import metrics
from cogenesis.core.auth import RateLimiter
from cogenesis.core.config import GatewayConfig, LimitsConfig
from cogenesis.core.errors import Busy, ProtocolError, RateLimited
from cogenesis.core.protocol import (
    MAX_TOP_K,
    CloseSession,
    ErrorReply,
    OpenSession,
    ReplyBatch,
    StepBatch,
    StepReply,
    StepRequest,
    decode_replies,
    decode_request,
    encode,
)
from cogenesis.core.secrets import RedisRole

log = logging.getLogger("cogenesis.gateway")

OWNER_PREFIX = "cg:owner:"
OWNER_TTL_S = KEY_TTL_S  # an owner key outlives an idle session's sweep on its replica
OWNER_REFRESH_S = KEY_TTL_S / 5  # how often a connection renews its sessions' owner keys
POP_TIMEOUT_S = 1.0  # the reader's blocking pop; it checks heartbeats between pops
SEND_TIMEOUT_S = 30.0  # a device that does not read its frames this long is disconnected
CLOSE_TIMEOUT_S = 10.0  # what a disconnect's clean-up may take (closes, key deletes)
UNAVAILABLE_RETRY_MS = 1000  # retry_after_ms of an ``unavailable`` answer
MAX_LOOKAHEAD = 16
ENORMOUS_FACTOR = 4  # a frame this many times past limits.max_message_bytes closes the connection (1009)
REPLICA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SESSION_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces; it only ever enters keys hashed
DEAD_MAX = 1000
REDIS_DOWN: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError, asyncio.TimeoutError)
REDIS_ERRORS: tuple[type[Exception], ...] = (*REDIS_DOWN, redis.RedisError)

Send = Callable[[bytes], Awaitable[None]]
Request = OpenSession | StepRequest | CloseSession


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def owner_key(session_id: str) -> str:
    """The key binding a session to its device: the session id hashed (nothing listable by id)."""
    return OWNER_PREFIX + _sha256(session_id)


def connect_async(
    url: str,
    role: RedisRole | None = None,
    secrets: str | None = None,
    ca_file: str | None = None,
    timeout_s: float = 5.0,
) -> aioredis.Redis:
    """An asyncio client as ``cogenesis.cluster.bus.connect`` makes a sync one: explicit timeouts, no silent
    retries (a retried pop could lose a reply), ``role``'s credentials and a ``rediss://`` URL's CA as
    ``redis_auth`` finds them (keyword arguments, never in the URL)."""
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=30,
        retry=Retry(NoBackoff(), 0),
        **redis_auth(url, role, secrets, ca_file),
    )


class Refusal(Exception):
    """An item the relay answers with an ``ErrorReply`` instead of relaying it."""

    def __init__(self, code: str, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after_ms = code, message, retry_after_ms

    def reply(self, session_id: str, step: int) -> ErrorReply:
        return ErrorReply(
            session_id=session_id, step=step, code=self.code, message=self.message, retry_after_ms=self.retry_after_ms
        )


def _unavailable(what: str) -> Refusal:
    return Refusal("unavailable", f"the gateway cannot reach the bus ({what}); retry", UNAVAILABLE_RETRY_MS)


@dataclass
class _Session:
    """What a connection knows of one of its sessions."""

    replica: str | None = None  # the replica holding it (from its replies); None: its open is in flight
    waiting: int | None = None  # the step the device waits for; None: nothing in flight
    tokens: int = 0  # ids the device sent (resume + steps), against limits.max_session_tokens
    closing: bool = False  # closed by the device while its open was in flight: closed where it lands


def _where(item: Request) -> tuple[str, int]:
    """The session and step an answer to ``item`` names."""
    if isinstance(item, OpenSession):
        return item.session_id, item.resume_step if item.resume else 0
    if isinstance(item, StepRequest):
        return item.session_id, item.step
    return item.session_id, 0


class GatewayRelay:
    """One gateway replica's relay: the Redis client, the rate limiter and the per-device session counts its
    connections share. ``connect(subject, send)`` opens a ``Connection`` for an authenticated device."""

    def __init__(
        self,
        r: aioredis.Redis,
        limits: LimitsConfig,
        gateway: GatewayConfig,
        gateway_id: str | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.r = r
        self.limits = limits
        self.gateway = gateway
        self.id = gateway_id or secrets.token_hex(4)
        if not REPLICA_NAME.match(self.id) or len(self.id) > 32:
            raise ValueError(f"gateway id {self.id!r}: use 1-32 letters, digits, _ or -")
        self.limiter = limiter or RateLimiter(gateway.rate_per_s, gateway.burst)
        self.connections: dict[str, Connection] = {}
        self.sessions_of: dict[str, int] = {}  # subject -> sessions its connections hold here
        self.dead: OrderedDict[str, None] = OrderedDict()  # replicas found without a heartbeat
        self.relayed = {"in": 0, "out": 0}
        self.refused: dict[str, int] = {}

    def connect(self, subject: str, send: Send) -> Connection:
        """A connection for the device ``subject`` sending frames with ``send``; Busy when the replica holds
        ``gateway.max_connections`` already (the gateway closes the socket with 1013)."""
        if len(self.connections) >= self.gateway.max_connections:
            self.refuse("busy")
            raise Busy(f"this gateway replica holds {len(self.connections)} connections, its maximum", 1.0)
        conn = Connection(self, subject, send)
        self.connections[conn.id] = conn
        metrics.gateway_connections.set(len(self.connections))
        return conn

    def refuse(self, reason: str, n: int = 1) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + n
        metrics.refusals.labels(reason).inc(n)

    def count(self, direction: str, n: int = 1) -> None:
        self.relayed[direction] += n
        (metrics.gateway_requests if direction == "in" else metrics.gateway_replies).inc(n)

    def mark_dead(self, replica: str, dead: bool) -> None:
        if not dead:
            self.dead.pop(replica, None)
            return
        self.dead[replica] = None
        while len(self.dead) > DEAD_MAX:
            self.dead.popitem(last=False)

    async def ping(self) -> bool:
        """Redis answers (within the client's timeouts)."""
        try:
            return bool(await asyncio.wait_for(self.r.ping(), SOCKET_TIMEOUT_S))
        except REDIS_ERRORS:
            return False

    def stats(self) -> dict[str, Any]:
        return {
            "gateway": self.id,
            "connections": len(self.connections),
            "sessions": sum(len(c.sessions) for c in self.connections.values()),
            "devices": len({c.subject for c in self.connections.values()}),
            "relayed": dict(self.relayed),
            "refused": dict(sorted(self.refused.items())),
        }

    async def aclose(self) -> None:
        for conn in list(self.connections.values()):
            await conn.close()
        await self.r.aclose()


class Connection:
    """One device's WebSocket: ``handle`` each frame, run ``pump`` as a task (replies to the device), and
    ``close`` when the socket ends. ``send`` writes one binary frame to the device."""

    def __init__(self, relay: GatewayRelay, subject: str, send: Send) -> None:
        self.relay = relay
        self.subject = subject
        self.id = secrets.token_hex(8)
        self.reply_to = f"gw-{relay.id}-{self.id}"
        self.sessions: dict[str, _Session] = {}
        self.closed = False
        self._send = send
        self._send_lock = asyncio.Lock()  # the handler and the reader both write frames
        self._reader: asyncio.Task | None = None
        self._owner = _sha256(subject)
        self._checked_at = 0.0
        self._refreshed_at = time.monotonic()

    @property
    def r(self) -> aioredis.Redis:
        return self.relay.r

    @property
    def limits(self) -> LimitsConfig:
        return self.relay.limits

    # ---- device -> bus ----------------------------------------------------------------------------

    async def handle(self, frame: bytes) -> None:
        """Relay one frame; refused items are answered in one frame (an ``ErrorReply`` or a ``ReplyBatch``)."""
        answers = await self._relay(frame)
        if answers:
            for answer in answers:
                self.relay.refuse(answer.code)
            await self.emit(answers)

    async def refuse_text(self) -> None:
        """A text frame: the protocol is binary msgpack."""
        self.relay.refuse("bad_request")
        await self.emit([Refusal("bad_request", "text frames are not taken: send binary msgpack frames").reply("", 0)])

    async def _relay(self, frame: bytes) -> list[ErrorReply]:
        if len(frame) > self.limits.max_message_bytes:
            message = f"a frame of {len(frame)} bytes is over the limit of {self.limits.max_message_bytes}"
            return [Refusal("too_large", message).reply("", 0)]
        try:
            msg = decode_request(frame)
        except ProtocolError as exc:
            return [Refusal("bad_request", exc.message).reply("", 0)]
        answers: list[ErrorReply] = []
        items: list[Request] = []
        if isinstance(msg, StepBatch):
            if len(msg.items) > self.limits.max_batch_items:
                message = f"a batch of {len(msg.items)} items is over the limit of {self.limits.max_batch_items}"
                return [Refusal("too_large", message).reply("", 0)]
            for raw in msg.items:
                try:
                    item = decode_request(raw)
                except ProtocolError as exc:
                    answers.append(Refusal("bad_request", exc.message).reply("", 0))
                    continue
                if isinstance(item, StepBatch):
                    answers.append(Refusal("bad_request", "a batch may not hold another batch").reply("", 0))
                    continue
                items.append(item)
        else:
            items.append(msg)
        opens: list[bytes] = []
        per_replica: dict[str, list[bytes]] = {}
        released: list[str] = []
        sent: list[tuple[str, int]] = []
        for item in items:
            sid, step = _where(item)
            try:
                self._spend()
                routed = await self._admit(item, released)
            except Refusal as refusal:
                answers.append(refusal.reply(sid, step))
                continue
            if routed is None:
                continue
            replica, payload = routed
            (opens if replica is None else per_replica.setdefault(replica, [])).append(payload)
            if not isinstance(item, CloseSession):
                sent.append((sid, step))
        try:
            await self._post(opens, per_replica, released)
        except REDIS_DOWN as exc:
            log.warning("gateway %s: Redis %s while relaying %d item(s)", self.relay.id, type(exc).__name__, len(items))
            for sid, step in sent:
                session = self.sessions.get(sid)
                if session is not None:
                    session.waiting = None
                answers.append(_unavailable(type(exc).__name__).reply(sid, step))
        else:
            self.relay.count("in", len(opens) + sum(len(v) for v in per_replica.values()))
        return answers

    def _spend(self) -> None:
        try:
            self.relay.limiter.take(self.subject)
        except RateLimited as exc:
            raise Refusal("rate_limited", exc.message, max(1, int(exc.retry_after_s * 1000))) from None

    def _check_budget(self, budget_ms: int) -> None:
        if budget_ms > self.limits.max_budget_ms:
            raise Refusal("too_large", f"budget_ms={budget_ms} is over the limit of {self.limits.max_budget_ms}")

    def _count_ids(self, buf: bytes, what: str) -> int:
        if len(buf) % 4:
            raise Refusal("bad_request", f"{what} of {len(buf)} bytes is not a multiple of 4 (int32 ids)")
        return len(buf) // 4

    async def _admit(self, item: Request, released: list[str]) -> tuple[str | None, bytes] | None:
        """Check ``item`` and update the session table: (replica or None for the open stream, bytes to post),
        None when nothing is posted (a close of a session not held), or a ``Refusal``."""
        sid = item.session_id
        if not SESSION_ID.match(sid):
            raise Refusal("bad_request", "a session id is 1-128 printable ASCII characters without spaces")
        try:
            if isinstance(item, OpenSession):
                return await self._open(item)
            if isinstance(item, StepRequest):
                return await self._step(item)
            return await self._close(item, released)
        except REDIS_DOWN as exc:
            raise _unavailable(type(exc).__name__) from None

    async def _open(self, item: OpenSession) -> tuple[str | None, bytes]:
        sid = item.session_id
        if len(item.instruction) > self.limits.max_instruction_chars:
            raise Refusal(
                "too_large",
                f"an instruction of {len(item.instruction)} characters is over the limit of "
                f"{self.limits.max_instruction_chars}",
            )
        if not 1 <= item.top_k <= MAX_TOP_K:
            raise Refusal("bad_request", f"top_k={item.top_k} is outside 1..{MAX_TOP_K}")
        if not 0 <= item.lookahead <= MAX_LOOKAHEAD:
            raise Refusal("bad_request", f"lookahead={item.lookahead} is outside 0..{MAX_LOOKAHEAD}")
        if item.resume_step < 0:
            raise Refusal("bad_request", f"resume_step={item.resume_step} is negative")
        self._check_budget(item.budget_ms)
        tokens = self._count_ids(item.resume, "a resume")
        if tokens > self.limits.max_session_tokens:
            raise Refusal(
                "too_large", f"a resume of {tokens} ids is over the limit of {self.limits.max_session_tokens}"
            )
        session = self.sessions.get(sid)
        if session is None and self.relay.sessions_of.get(self.subject, 0) >= self.limits.max_sessions_per_device:
            raise Refusal(
                "busy",
                f"this device holds {self.limits.max_sessions_per_device} sessions, its maximum: close one first",
                5000,
            )
        await self._bind(sid)
        if session is None:
            session = self.sessions[sid] = _Session()
            self.relay.sessions_of[self.subject] = self.relay.sessions_of.get(self.subject, 0) + 1
        # a re-open (a resume, or an open repeated after a refusal) goes to whichever replica claims it
        session.replica, session.closing, session.tokens = None, False, tokens
        session.waiting = item.resume_step if item.resume else 0
        return None, encode(msgspec.structs.replace(item, reply_to=self.reply_to))

    async def _bind(self, sid: str) -> None:
        """Bind ``sid`` to this device, or find it bound to this device already; ``forbidden`` otherwise."""
        key = owner_key(sid)
        if await self.r.set(key, self._owner, nx=True, ex=OWNER_TTL_S):
            return
        found = await self.r.get(key)
        if found is not None and _text(found) != self._owner:
            raise Refusal("forbidden", f"session {sid} belongs to another device")
        await self.r.set(key, self._owner, ex=OWNER_TTL_S)  # ours (or it expired just now): renewed

    async def _other_owner(self, sid: str) -> bool:
        found = await self.r.get(owner_key(sid))
        return found is not None and _text(found) != self._owner

    async def _step(self, item: StepRequest) -> tuple[str | None, bytes]:
        sid = item.session_id
        session = self.sessions.get(sid)
        if session is None:
            if await self._other_owner(sid):
                raise Refusal("forbidden", f"session {sid} belongs to another device")
            raise Refusal("bad_request", f"session {sid} is not open on this connection: open (or resume) it first")
        if session.replica is None:
            raise Refusal("bad_request", f"session {sid}: step before the open's reply (wait for step 0)")
        if item.step < 1:
            raise Refusal("bad_request", f"step {item.step}: steps count from 1")
        self._check_budget(item.budget_ms)
        tokens = self._count_ids(item.tokens, "a step's tokens")
        if tokens > self.limits.max_step_tokens:
            raise Refusal("too_large", f"a step of {tokens} ids is over the limit of {self.limits.max_step_tokens}")
        if session.tokens + tokens > self.limits.max_session_tokens:
            raise Refusal("too_large", f"session {sid} would hold more than {self.limits.max_session_tokens} sent ids")
        session.tokens += tokens
        session.waiting = item.step
        return session.replica, encode(msgspec.structs.replace(item, reply_to=self.reply_to))

    async def _close(self, item: CloseSession, released: list[str]) -> tuple[str | None, bytes] | None:
        sid = item.session_id
        session = self.sessions.get(sid)
        if session is None:
            if await self._other_owner(sid):
                raise Refusal("forbidden", f"session {sid} belongs to another device")
            return None  # nothing held: nothing to close
        if session.replica is None:
            session.closing = True  # its open is in flight: closed where it lands
            return None
        self._forget(sid)
        released.append(owner_key(sid))
        return session.replica, self._close_payload(sid)

    def _close_payload(self, sid: str) -> bytes:
        msg: Any = CloseSession(session_id=sid)
        if "reply_to" in CloseSession.__struct_fields__:  # a protocol whose closes name their list
            msg = msgspec.structs.replace(msg, reply_to=self.reply_to)
        return encode(msg)

    def _forget(self, sid: str) -> None:
        if self.sessions.pop(sid, None) is not None:
            left = self.relay.sessions_of.get(self.subject, 1) - 1
            if left > 0:
                self.relay.sessions_of[self.subject] = left
            else:
                self.relay.sessions_of.pop(self.subject, None)

    async def _post(self, opens: list[bytes], per_replica: dict[str, list[bytes]], released: list[str]) -> None:
        """One pipeline: opens one entry each on the open stream, everything for a replica as one entry (a
        ``StepBatch`` when more than one) on its input stream, released owner keys deleted."""
        if not opens and not per_replica and not released:
            return
        pipe = self.r.pipeline(transaction=False)
        for payload in opens:
            pipe.xadd(OPEN_STREAM, {FIELD: payload})
        if opens:
            pipe.expire(OPEN_STREAM, KEY_TTL_S)
        for replica, batch in per_replica.items():
            entry = batch[0] if len(batch) == 1 else encode(StepBatch(items=batch))
            pipe.xadd(in_stream(replica), {FIELD: entry})
            pipe.expire(in_stream(replica), KEY_TTL_S)
        if released:
            pipe.delete(*released)
        await asyncio.wait_for(pipe.execute(), SOCKET_TIMEOUT_S)

    # ---- bus -> device ----------------------------------------------------------------------------

    async def emit(self, replies: Sequence[StepReply | ErrorReply]) -> None:
        """Send replies as one frame (one reply, or a ``ReplyBatch``)."""
        if replies:
            await self.send(encode(replies[0]) if len(replies) == 1 else encode(ReplyBatch(items=list(replies))))

    async def send(self, frame: bytes) -> None:
        async with self._send_lock:
            await asyncio.wait_for(self._send(frame), SEND_TIMEOUT_S)

    def start(self) -> asyncio.Task:
        """Start the reader (``pump``) on the running loop; ``close`` stops it."""
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self.pump())
        return self._reader

    @property
    def reading(self) -> bool:
        """The reader runs (False: it ended, e.g. it could not write to the device)."""
        return self._reader is not None and not self._reader.done()

    async def pump(self) -> None:
        """The reader: forward replies until the connection closes. Redis errors answer the in-flight
        sessions ``unavailable`` (their replies may be lost) and reconnect with capped backoff. It stops on
        ``closed`` as well as on cancellation (a cancellation can be lost inside ``asyncio.wait_for``)."""
        delay = RECONNECT_FIRST_S
        while not self.closed:
            try:
                await self._pump_once()
                delay = RECONNECT_FIRST_S
            except REDIS_DOWN as exc:
                log.warning("gateway %s: Redis %s while reading replies; retrying", self.relay.id, type(exc).__name__)
                waiting = [(sid, s.waiting) for sid, s in self.sessions.items() if s.waiting is not None]
                for sid, _ in waiting:
                    self.sessions[sid].waiting = None
                if waiting:
                    self.relay.refuse("unavailable", len(waiting))
                    await self.emit([_unavailable(type(exc).__name__).reply(sid, step) for sid, step in waiting])
                await asyncio.sleep(delay)
                delay = min(2 * delay, RECONNECT_CAP_S)
            except Exception as exc:  # the device's socket broke or stopped reading: the connection ends
                log.info("gateway %s: reader of %s ended: %s", self.relay.id, self.id, type(exc).__name__)
                return

    async def _pump_once(self) -> None:
        now = time.monotonic()
        if now - self._checked_at >= ALIVE_CHECK_S:
            self._checked_at = now
            await self._check_replicas()
        if now - self._refreshed_at >= OWNER_REFRESH_S:
            self._refreshed_at = now
            await self._refresh_owners()
        key = reply_key(self.reply_to)
        popped: Any = await asyncio.wait_for(
            self.r.brpop([key], timeout=POP_TIMEOUT_S), POP_TIMEOUT_S + SOCKET_TIMEOUT_S
        )
        if popped is None:
            return
        payloads = [popped[1]]
        more: Any = await asyncio.wait_for(self.r.rpop(key, DRAIN_COUNT), SOCKET_TIMEOUT_S)
        payloads.extend(more or [])
        closes: dict[str, list[bytes]] = {}
        released: list[str] = []
        for payload in payloads:
            await self._forward(payload, closes, released)
        if closes or released:
            await self._post([], closes, released)

    async def _forward(self, payload: bytes, closes: dict[str, list[bytes]], released: list[str]) -> None:
        try:
            replies = decode_replies(payload)
        except ProtocolError:
            log.warning("gateway %s: dropped a malformed reply of %d bytes", self.relay.id, len(payload))
            return
        kept = [reply for reply in replies if self._take(reply, closes, released)]
        if not kept:
            return
        self.relay.count("out", len(kept))
        await self.send(payload if len(kept) == len(replies) else encode(ReplyBatch(items=kept)))

    def _take(self, reply: StepReply | ErrorReply, closes: dict[str, list[bytes]], released: list[str]) -> bool:
        """Learn from a reply (the session's replica, the end of its wait); whether it goes to the device."""
        sid = reply.session_id
        session = self.sessions.get(sid)
        if session is None:
            return False  # not a session of this connection (closed, or never ours)
        opening = session.replica is None
        if isinstance(reply, StepReply):
            if opening:
                if reply.replica in self.relay.dead or not REPLICA_NAME.match(reply.replica):
                    return False  # a dead replica's late answer: the open's answer comes from a live one
                if session.waiting is not None and reply.step < session.waiting:
                    return False  # an earlier exchange's late reply
                session.replica = reply.replica
                if session.closing:  # the device closed it while its open was in flight
                    self._forget(sid)
                    closes.setdefault(reply.replica, []).append(self._close_payload(sid))
                    released.append(owner_key(sid))
                    return False
        else:
            if opening and reply.code == "unknown_session":
                return False  # an old replica's answer to an earlier step, not the answer to this open
            if opening:  # the open was refused: the session is not held anywhere
                self._forget(sid)
                released.append(owner_key(sid))
                return not session.closing
            if reply.code == "unknown_session":
                session.replica = None  # the replica lost it: the device resumes it with an open
        if session.waiting is not None and reply.step >= session.waiting:
            session.waiting = None
        return True

    async def _check_replicas(self) -> None:
        """Answer ``replica_lost`` to the in-flight sessions of replicas whose heartbeat is gone."""
        waiting = {sid: s for sid, s in self.sessions.items() if s.waiting is not None and s.replica is not None}
        watched = sorted({s.replica for s in waiting.values() if s.replica is not None})
        if not watched:
            return
        beats = await asyncio.wait_for(self.r.mget([alive_key(name) for name in watched]), SOCKET_TIMEOUT_S)
        dead = {name for name, beat in zip(watched, beats) if beat is None}
        for name in watched:
            self.relay.mark_dead(name, name in dead)
        lost: list[StepReply | ErrorReply] = []
        for sid, session in waiting.items():
            if session.replica in dead and session.waiting is not None:
                message = f"replica {session.replica} stopped (no heartbeat): resume the session with an open"
                lost.append(ErrorReply(session_id=sid, step=session.waiting, code="replica_lost", message=message))
                session.replica, session.waiting = None, None
        if lost:
            log.info("gateway %s: %d session(s) lost their replica", self.relay.id, len(lost))
            self.relay.refuse("replica_lost", len(lost))
            await self.emit(lost)

    async def _refresh_owners(self) -> None:
        if not self.sessions:
            return
        pipe = self.r.pipeline(transaction=False)
        for sid in self.sessions:
            pipe.expire(owner_key(sid), OWNER_TTL_S)
        await asyncio.wait_for(pipe.execute(), SOCKET_TIMEOUT_S)

    # ---- the end ----------------------------------------------------------------------------------

    async def close(self) -> None:
        """The device is gone: close its sessions on their replicas (opens still in flight are closed if their
        reply is already posted; otherwise their replica's idle sweep frees them), delete their owner keys and
        the reply list. Idempotent; bounded by ``CLOSE_TIMEOUT_S``."""
        if self.closed:
            return
        self.closed = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait({self._reader}, timeout=POP_TIMEOUT_S + SOCKET_TIMEOUT_S)
        try:
            await asyncio.wait_for(self._clean_up(), CLOSE_TIMEOUT_S)
        except REDIS_ERRORS as exc:
            log.warning("gateway %s: could not close %d session(s): %s", self.relay.id, len(self.sessions), exc)
        finally:
            for sid in list(self.sessions):
                self._forget(sid)
            self.relay.connections.pop(self.id, None)
            metrics.gateway_connections.set(len(self.relay.connections))

    async def _clean_up(self) -> None:
        key = reply_key(self.reply_to)
        if any(s.replica is None for s in self.sessions.values()):  # learn where the in-flight opens landed
            drained: Any = await self.r.rpop(key, DRAIN_COUNT)
            for payload in drained or []:
                with contextlib.suppress(ProtocolError):
                    for reply in decode_replies(payload):
                        session = self.sessions.get(reply.session_id)
                        if (
                            session is not None
                            and session.replica is None
                            and isinstance(reply, StepReply)
                            and REPLICA_NAME.match(reply.replica)
                            and reply.replica not in self.relay.dead
                        ):
                            session.replica = reply.replica
        closes: dict[str, list[bytes]] = {}
        for sid, session in self.sessions.items():
            if session.replica is not None:
                closes.setdefault(session.replica, []).append(self._close_payload(sid))
        await self._post([], closes, [owner_key(sid) for sid in self.sessions] + [key])
        if self.sessions:
            log.info("gateway %s: device left; closed %d session(s)", self.relay.id, len(self.sessions))
