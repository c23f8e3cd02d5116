"""The Redis bus carrying logits-mode steps between edges and cloud replicas.

Keys (every one has a TTL; nothing private is ever written):
- ``cg:open``               stream, OpenSession requests; consumer group ``cloud`` spreads them over replicas
- ``cg:in:{replica}``       stream, StepRequest / CloseSession for the replica that owns the session
- ``cg:reply:{session}``    list, StepReply / ErrorReply for one session (edge pops with a timeout)
- ``cg:route:{session}``    string, the replica owning the session
- ``cg:alive:{replica}``    string, replica heartbeat
Stream entries are deleted once acknowledged, and streams are capped with MAXLEN, so memory
stays flat however long the cluster runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from cogenesis.errors import BusTimeout, ClusterError, SessionError
from cogenesis.protocol import ErrorReply, StepReply, decode_reply, now_us

log = logging.getLogger(__name__)

OPEN_STREAM = "cg:open"
GROUP = "cloud"
FIELD = b"m"
STREAM_MAXLEN = 100_000
KEY_TTL_S = 600
REPLY_TTL_S = 120


def in_stream(replica: str) -> str:
    return f"cg:in:{replica}"


def reply_key(session_id: str) -> str:
    return f"cg:reply:{session_id}"


def route_key(session_id: str) -> str:
    return f"cg:route:{session_id}"


def alive_key(replica: str) -> str:
    return f"cg:alive:{replica}"


def connect(url: str, timeout_s: float = 5.0) -> redis.Redis:
    """A client that fails fast with a clear error when Redis is not there."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, health_check_interval=30)
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise ClusterError(f"cannot reach Redis at {url}: {exc}",
                           hint="start the cluster (`cogenesis demo` starts its own Redis) or fix --redis-url") from None
    return client


@dataclass(frozen=True)
class Sealed:
    """Bytes that passed the edge's outbound gate. The edge bus sends nothing else."""

    payload: bytes
    kind: str


class EdgeBus:
    """Edge side: send sealed requests, wait for replies with deadlines."""

    def __init__(self, url: str) -> None:
        self.r = connect(url)

    def _check(self, msg: Sealed) -> bytes:
        if not isinstance(msg, Sealed):
            raise TypeError("the edge bus only sends messages sealed by the outbound gate")
        return msg.payload

    def send_open(self, msg: Sealed, session_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(reply_key(session_id))
        pipe.xadd(OPEN_STREAM, {FIELD: self._check(msg)}, maxlen=STREAM_MAXLEN, approximate=True)
        pipe.expire(OPEN_STREAM, KEY_TTL_S)
        pipe.execute()

    def send_to(self, replica: str, msg: Sealed) -> None:
        stream = in_stream(replica)
        pipe = self.r.pipeline(transaction=False)
        pipe.xadd(stream, {FIELD: self._check(msg)}, maxlen=STREAM_MAXLEN, approximate=True)
        pipe.expire(stream, KEY_TTL_S)
        pipe.execute()

    def send_many(self, items: list[tuple[str | None, str, Sealed]]) -> None:
        """Pipeline many sends in one round trip: (replica or None for a new session, session_id, msg)."""
        pipe = self.r.pipeline(transaction=False)
        streams = set()
        for replica, session_id, msg in items:
            stream = OPEN_STREAM if replica is None else in_stream(replica)
            if replica is None:
                pipe.delete(reply_key(session_id))
            pipe.xadd(stream, {FIELD: self._check(msg)}, maxlen=STREAM_MAXLEN, approximate=True)
            streams.add(stream)
        for stream in streams:
            pipe.expire(stream, KEY_TTL_S)
        pipe.execute()

    def wait_many(self, wanted: dict[str, int], deadline_ms: int,
                  arrivals: dict[str, int] | None = None) -> dict[str, StepReply | Exception]:
        """Replies for many sessions ({session: step}); a failed session maps to its exception.

        Every reply already posted is fetched in one pipelined round trip; then one blocking pop
        waits for the next, and the rest are drained again. ``arrivals`` (if given) receives each
        session's receive time (``now_us``) for exchange tracing.
        """
        out: dict[str, StepReply | Exception] = {}
        keys = {reply_key(sid): sid for sid in wanted}
        drain = True
        while len(out) < len(wanted):
            pending = [k for k, sid in keys.items() if sid not in out]
            if drain:
                pipe = self.r.pipeline(transaction=False)
                for k in pending:
                    pipe.rpop(k)
                items = [(k, v) for k, v in zip(pending, pipe.execute()) if v is not None]
            else:
                remaining = deadline_ms / 1000 - time.time()
                if remaining <= 0:
                    for sid, step in wanted.items():
                        out.setdefault(sid, BusTimeout(f"session {sid}: no reply for step {step} before its deadline",
                                                       hint="is the cloud running and reading the bus?"))
                    break
                item = self.r.brpop(pending, timeout=max(remaining, 0.01))
                items = [item] if item is not None else []
            drain = bool(items)  # after a hit, others are likely ready too
            got_us = now_us()
            for key, payload in items:
                sid = keys[key.decode() if isinstance(key, bytes) else key]
                reply = decode_reply(payload)
                if reply.step < wanted[sid]:
                    continue  # late duplicate of an earlier step
                if isinstance(reply, ErrorReply):
                    out[sid] = SessionError(
                        f"cloud refused session {sid} step {reply.step}: {reply.code}: {reply.message}")
                else:
                    out[sid] = reply
                if arrivals is not None:
                    arrivals[sid] = got_us
        return out

    def wait_reply(self, session_id: str, step: int, deadline_ms: int) -> StepReply:
        """Block until the reply for ``step`` arrives or the deadline passes. Older replies are skipped."""
        while True:
            remaining = deadline_ms / 1000 - time.time()
            if remaining <= 0:
                raise BusTimeout(f"session {session_id}: no reply for step {step} before its deadline",
                                 hint="is the cloud running and reading the bus? see `cogenesis demo` logs")
            item = self.r.brpop([reply_key(session_id)], timeout=max(remaining, 0.01))
            if item is None:
                continue
            reply = decode_reply(item[1])
            if reply.step < step:
                continue  # late duplicate of an earlier step
            if isinstance(reply, ErrorReply):
                raise SessionError(f"cloud refused session {session_id} step {reply.step}: "
                                   f"{reply.code}: {reply.message}")
            return reply

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

    def read(self, block_ms: int = 100, count: int = 1024) -> list[tuple[str, bytes, bytes]]:
        """Up to ``count`` pending (stream, entry id, payload) triples, waiting at most ``block_ms``.

        A blocking read wakes on the first entry of a burst (an edge pool pipelines a whole round),
        so non-blocking reads follow until nothing more is pending: the burst becomes one batch.
        """
        out = self._read_once(block_ms, count)
        while out and len(out) < count:
            more = self._read_once(None, count - len(out))
            if not more:
                break
            out.extend(more)
        return out

    def _read_once(self, block_ms: int | None, count: int) -> list[tuple[str, bytes, bytes]]:
        try:
            resp = self.r.xreadgroup(GROUP, self.replica, self.streams, count=count, block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # stream expired while idle: recreate and carry on
                self._ensure_groups()
                return []
            raise
        out = []
        for stream, entries in resp or []:
            name = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, fields in entries:
                out.append((name, entry_id, fields.get(FIELD, b"")))
        return out

    def finish(self, done: list[tuple[str, bytes]], replies: list[tuple[str, bytes]],
               routes: list[str] = (), route_ttl_s: int = KEY_TTL_S) -> None:
        """One pipeline: post replies (with TTL), record routes, ack and delete consumed entries."""
        pipe = self.r.pipeline(transaction=False)
        for session_id, payload in replies:
            pipe.lpush(reply_key(session_id), payload)
            pipe.expire(reply_key(session_id), REPLY_TTL_S)
        for session_id in routes:
            pipe.set(route_key(session_id), self.replica, ex=route_ttl_s)
        for stream, entry_id in done:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
        pipe.execute()

    def close(self) -> None:
        try:
            self.r.delete(alive_key(self.replica))
        finally:
            self.r.close()
