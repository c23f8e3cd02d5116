"""The Redis bus carrying logits-mode steps between edges and cloud replicas.

Keys (every one has a TTL; nothing private is ever written):
- ``cg:open``               stream, OpenSession requests; consumer group ``cloud`` spreads them over replicas
- ``cg:in:{replica}``       stream, StepRequest / CloseSession (or a ``StepBatch`` of an edge pool's round)
                            for the replica that owns the sessions
- ``cg:reply:{reply_to}``   list, replies (one or a ``ReplyBatch``) for an edge link's sessions
- ``cg:alive:{replica}``    string, replica heartbeat
Stream entries are deleted once acknowledged, and streams are capped with MAXLEN, so memory
stays flat however long the cluster runs.

What an edge writes is only what its outbound gate sealed (``Sealed``): the edge bus sends a genuine
``Sealed``'s bytes and refuses anything else. ``reply_to`` is random per edge link (a fleet client's or
Locust user's session has its own link; a demo or benchmark pool's one link serves that batch of
sessions and is never reused), so it links no device's sessions to each other. Stream entry ids are
Redis's (its clock, the cloud's): a replica counts a request's budget from its entry's arrival.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import sys
import time
from typing import NamedTuple, NoReturn

import redis

from cogenesis.core.errors import BusTimeout, ClusterError, SessionError
from cogenesis.core.protocol import ErrorReply, StepBatch, StepReply, decode_replies, encode, now_us

log = logging.getLogger(__name__)

OPEN_STREAM = "cg:open"
GROUP = "cloud"
FIELD = b"m"
STREAM_MAXLEN = 100_000
KEY_TTL_S = 600
REPLY_TTL_S = 600  # a reply may wait while its edge finishes a long prefill; the edge's deadline still bounds it


def in_stream(replica: str) -> str:
    return f"cg:in:{replica}"


def reply_key(reply_to: str) -> str:
    return f"cg:reply:{reply_to}"


def alive_key(replica: str) -> str:
    return f"cg:alive:{replica}"


SOCKET_TIMEOUT_S = 10.0  # no command waits longer on the socket; blocking pops wait in shorter slices
BLOCK_SLICE_S = 5.0
DRAIN_COUNT = 1024  # replies a drain takes off one reply list at once


def connect(url: str, timeout_s: float = 5.0) -> redis.Redis:
    """A client that fails fast with a clear error when Redis is not there.

    The read timeout is explicit (redis-py 8 otherwise applies its own default, shorter than the
    bus's deadlines); blocking pops never ask for more than ``BLOCK_SLICE_S``.
    """
    client = redis.Redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=SOCKET_TIMEOUT_S, health_check_interval=30
    )
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ClusterError(
            f"cannot reach Redis at {url}: {exc}",
            hint="start the cluster (`cogenesis demo` starts its own Redis) or fix --redis-url",
        ) from None
    return client


def entry_ms(entry_id: bytes | str) -> int:
    """When Redis took a stream entry (its clock, unix ms), read from the entry's id (``<ms>-<seq>``)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0])


# ---- sealed payloads: the one way out of an edge ------------------------------------------------------

GATE_MODULE = "cogenesis.edge_sim.gate"


class SealKey:
    """The capability to make ``Sealed`` payloads. One exists per process; the edge's outbound gate
    (``cogenesis.edge_sim.gate``) claims it when imported (``claim_seal_key``), and nothing else can."""

    __slots__ = ()

    def __reduce__(self) -> NoReturn:
        raise TypeError("the seal key cannot be copied or pickled")

    def __copy__(self) -> NoReturn:
        raise TypeError("the seal key cannot be copied or pickled")

    def __deepcopy__(self, memo: dict) -> NoReturn:
        raise TypeError("the seal key cannot be copied or pickled")


_SEAL_KEY = SealKey()
_SEAL_SECRET = secrets.token_bytes(32)  # a Sealed is genuine only in the process that sealed it
_key_claimed = False


def claim_seal_key() -> SealKey:
    """Hand the seal key to the outbound gate: only ``cogenesis.edge_sim.gate`` may claim it, once."""
    global _key_claimed
    caller = sys._getframe(1).f_globals.get("__name__")
    if caller != GATE_MODULE or _key_claimed:
        raise RuntimeError(
            f"{caller} asked for the seal key: only {GATE_MODULE} seals payloads, and it claims the key once; "
            "seal messages with OutboundGate.seal / seal_json"
        )
    _key_claimed = True
    return _SEAL_KEY


def _tag(payload: bytes, kind: str) -> bytes:
    h = hashlib.blake2b(key=_SEAL_SECRET, digest_size=16)
    h.update(kind.encode())
    h.update(b"\0")
    h.update(payload)
    return h.digest()


class Sealed:
    """Bytes that passed the edge's outbound gate; an edge transport sends nothing else (``wire_bytes``).

    Only the seal key's holder (the gate) can make one; it carries a keyed digest of its bytes, so an
    edited, copied or hand-built one is not genuine. It cannot be changed, copied or pickled. (Python
    has no private memory: code that reads this module's private names can still forge one. This makes
    the one way out a checked interface, which every transport verifies, not a sandbox.)"""

    __slots__ = ("_tag", "kind", "payload")
    payload: bytes
    kind: str  # the sealed message's type name

    def __init__(self, key: SealKey, payload: bytes, kind: str) -> None:
        if key is not _SEAL_KEY:
            raise TypeError("only the edge's outbound gate makes sealed payloads: use OutboundGate.seal / seal_json")
        if not isinstance(payload, bytes):
            raise TypeError(f"a sealed payload is bytes, not {type(payload).__name__}")
        for name, value in (("payload", payload), ("kind", kind), ("_tag", _tag(payload, kind))):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> NoReturn:
        raise AttributeError("a sealed payload cannot be changed: seal a new message")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError("a sealed payload cannot be changed: seal a new message")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("a sealed payload cannot be copied or pickled: seal the message again")

    def __copy__(self) -> NoReturn:
        raise TypeError("a sealed payload cannot be copied or pickled: seal the message again")

    def __deepcopy__(self, memo: dict) -> NoReturn:
        raise TypeError("a sealed payload cannot be copied or pickled: seal the message again")

    def __repr__(self) -> str:
        return f"Sealed({self.kind}, {len(self.payload)} bytes)"


def wire_bytes(msg: object) -> bytes:
    """The bytes an edge transport may send: a genuine ``Sealed``'s payload, exactly. Anything else
    (raw bytes, a message, a forged or altered ``Sealed``) raises TypeError."""
    try:
        genuine = type(msg) is Sealed and hmac.compare_digest(msg._tag, _tag(msg.payload, msg.kind))  # type: ignore[attr-defined]
    except (AttributeError, TypeError):  # a Sealed built without its constructor has no (valid) fields
        genuine = False
    if not genuine:
        raise TypeError(
            f"edge transports send only payloads sealed by the outbound gate, not {type(msg).__name__}: "
            "seal the message with OutboundGate.seal / seal_json"
        )
    return msg.payload  # type: ignore[attr-defined]


class Received(NamedTuple):
    """When the edge had a reply (``now_us``, the edge's clock: it stays on the edge)."""

    at_us: int
    looked_us: int | None  # when the edge began the wait that found it already there (it arrived unobserved,
    # while the edge was busy elsewhere); None: it arrived while the edge waited, so ``at_us`` is its arrival


class EdgeBus:
    """Edge side: send sealed requests, wait for replies with deadlines.

    A round's steps for one replica travel as one stream entry (``StepBatch``) and the replica
    answers a pool with one reply message per served batch (``ReplyBatch``) on the pool's reply
    list (``reply_to``), so a round costs a few Redis commands whatever the number of sessions.
    Replies for sessions nobody is waiting on yet are kept until asked for.
    """

    def __init__(self, url: str) -> None:
        self.r = connect(url)
        # session -> newest reply not yet asked for, and when it came
        self._stash: dict[str, tuple[StepReply | ErrorReply, Received]] = {}

    def send_many(self, items: list[tuple[str | None, str, Sealed]]) -> None:
        """Send in one round trip: (replica or None for a new session, session_id, msg).

        Each ``msg`` must be a genuine ``Sealed`` (TypeError otherwise, before anything is sent); its
        bytes go out exactly as sealed. New sessions go one entry each to the shared open stream (so
        replicas share them out); everything for one replica goes as one ``StepBatch`` entry on its stream."""
        payloads = [(replica, session_id, wire_bytes(msg)) for replica, session_id, msg in items]
        pipe = self.r.pipeline(transaction=False)
        per_replica: dict[str, list[bytes]] = {}
        opened = False
        for replica, session_id, payload in payloads:
            if replica is None:
                pipe.delete(reply_key(session_id))
                pipe.xadd(OPEN_STREAM, {FIELD: payload}, maxlen=STREAM_MAXLEN, approximate=True)
                opened = True
            else:
                per_replica.setdefault(replica, []).append(payload)
        for replica, batch in per_replica.items():
            entry = batch[0] if len(batch) == 1 else encode(StepBatch(items=batch))
            pipe.xadd(in_stream(replica), {FIELD: entry}, maxlen=STREAM_MAXLEN, approximate=True)
            pipe.expire(in_stream(replica), KEY_TTL_S)
        if opened:
            pipe.expire(OPEN_STREAM, KEY_TTL_S)
        pipe.execute()

    def wait_many(
        self,
        wanted: dict[str, int],
        deadline_ms: int,
        arrivals: dict[str, Received] | None = None,
        reply_to: dict[str, str] | None = None,
    ) -> dict[str, StepReply | Exception]:
        """Replies for many sessions ({session: step}); a failed session maps to its exception.

        ``deadline_ms``: this edge's own deadline (``deadline_in``, its clock; it never leaves the edge).
        ``reply_to`` maps a session to its reply list (default: its own). Whatever is already posted
        is fetched in one pipelined round trip; otherwise one blocking pop waits for the next.
        ``arrivals`` (if given) receives when each session's reply came (``Received``), for tracing.
        """
        out: dict[str, StepReply | Exception] = {}
        routes = reply_to or {}
        for sid in wanted:
            if sid in self._stash:
                self._accept(*self._stash.pop(sid), wanted, out, arrivals)
        started, drain, first = now_us(), True, True
        while len(out) < len(wanted):
            keys = sorted({reply_key(routes.get(sid, sid)) for sid in wanted if sid not in out})
            if drain:
                pipe = self.r.pipeline(transaction=False)
                for k in keys:
                    pipe.rpop(k, DRAIN_COUNT)
                payloads = [p for popped in pipe.execute() if popped for p in popped]
            else:
                remaining = deadline_ms / 1000 - time.time()
                if remaining <= 0:
                    for sid, step in wanted.items():
                        out.setdefault(
                            sid,
                            BusTimeout(
                                f"session {sid}: no reply for step {step} before its deadline",
                                hint="is the cloud running and reading the bus?",
                            ),
                        )
                    break
                item = self.r.brpop(keys, timeout=min(max(remaining, 0.01), BLOCK_SLICE_S))
                payloads = [item[1]] if item is not None else []
            got = Received(now_us(), started if first else None)  # the first drain finds what was already there
            drain, first = bool(payloads), False  # after a hit, more may be ready
            for payload in payloads:
                for reply in decode_replies(payload):
                    self._accept(reply, got, wanted, out, arrivals)
        return out

    def _accept(
        self,
        reply: StepReply | ErrorReply,
        got: Received,
        wanted: dict[str, int],
        out: dict,
        arrivals: dict[str, Received] | None,
    ) -> None:
        sid = reply.session_id
        if sid not in wanted or sid in out:  # for a session not asked about now: keep the newest
            kept = self._stash.get(sid)
            if kept is None or kept[0].step <= reply.step:
                self._stash[sid] = (reply, got)
            return
        if reply.step < wanted[sid]:
            return  # late duplicate of an earlier step
        if isinstance(reply, ErrorReply):
            out[sid] = SessionError(f"cloud refused session {sid} step {reply.step}: {reply.code}: {reply.message}")
        else:
            out[sid] = reply
        if arrivals is not None:
            arrivals[sid] = got

    def forget(self, session_ids) -> None:
        """Drop kept replies of sessions that ended."""
        for sid in session_ids:
            self._stash.pop(sid, None)

    def close(self) -> None:
        self.r.close()


class CloudBus:
    """Cloud side: read this replica's requests (and a share of new sessions), post replies."""

    def __init__(self, url: str, replica: str) -> None:
        self.r = connect(url)
        self.replica = replica
        self.streams = {OPEN_STREAM: ">", in_stream(replica): ">"}
        self._ensure_groups()
        self.heartbeat()

    def _ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self.r.expire(stream, KEY_TTL_S)

    def heartbeat(self, ttl_s: int = 10) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(alive_key(self.replica), str(time.time()), ex=ttl_s)
        for stream in self.streams:
            pipe.expire(stream, KEY_TTL_S)
        pipe.execute()

    def read(self, block_ms: int = 100, count: int = 1024, max_opens: int = 64) -> list[tuple[str, bytes, bytes]]:
        """Pending (stream, entry id, payload) triples, waiting at most ``block_ms``.

        A blocking read wakes on the first entry of a burst (an edge pool pipelines a whole round),
        so non-blocking reads of this replica's stream follow until nothing more is pending: the
        burst becomes one batch. New sessions are taken ``max_opens`` at a time (their prefill is the
        expensive part): under a flood of opens, running sessions keep stepping every pass, and the
        opens left in the stream go to whichever replica reads next.
        """
        out = self._read_once(self.streams, block_ms, max(1, min(count, max_opens)))
        mine = {in_stream(self.replica): ">"}
        while out and len(out) < count:
            more = self._read_once(mine, None, count - len(out))
            if not more:
                break
            out.extend(more)
        return out

    def _read_once(self, streams: dict, block_ms: int | None, count: int) -> list[tuple[str, bytes, bytes]]:
        try:
            resp = self.r.xreadgroup(GROUP, self.replica, streams, count=count, block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # stream expired while idle: recreate and carry on
                self._ensure_groups()
                return []
            raise
        if not isinstance(resp, list):  # nothing came (RESP2, ``connect``'s protocol, answers a list otherwise)
            return []
        out: list[tuple[str, bytes, bytes]] = []
        for stream, entries in resp:
            name = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, fields in entries:
                out.append((name, entry_id, fields.get(FIELD, b"")))
        return out

    def backlog(self) -> int:
        """Entries still waiting: this replica's input stream plus the shared open stream (acknowledged
        entries are deleted, so a stream's length is what nobody has served yet)."""
        pipe = self.r.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xlen(stream)
        return sum(pipe.execute())

    def finish(self, done: list[tuple[str, bytes]], replies: list[tuple[str, bytes]]) -> None:
        """One pipeline: post replies (with TTL) to their reply lists, ack and delete consumed entries."""
        pipe = self.r.pipeline(transaction=False)
        for reply_to, payload in replies:
            pipe.lpush(reply_key(reply_to), payload)
            pipe.expire(reply_key(reply_to), REPLY_TTL_S)
        for stream, entry_id in done:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
        pipe.execute()

    def close(self) -> None:
        try:
            self.r.delete(alive_key(self.replica))
        finally:
            self.r.close()
