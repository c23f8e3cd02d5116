"""The Redis bus carrying logits-mode steps between edges and cloud replicas.

Keys (every one has a TTL; nothing private is ever written):
- ``cg:open``               stream, OpenSession requests; consumer group ``cloud`` spreads them over replicas
- ``cg:in:{replica}``       stream, StepRequest / CloseSession (or a ``StepBatch`` of an edge pool's round)
                            for the replica that owns the sessions
- ``cg:reply:{reply_to}``   list, replies (one or a ``ReplyBatch``) for an edge pool or one session
- ``cg:alive:{replica}``    string, replica heartbeat
Stream entries are deleted once acknowledged, and streams are capped with MAXLEN, so memory
stays flat however long the cluster runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Sealed:
    """Bytes that passed the edge's outbound gate. The edge bus sends nothing else."""

    payload: bytes
    kind: str


class EdgeBus:
    """Edge side: send sealed requests, wait for replies with deadlines.

    A round's steps for one replica travel as one stream entry (``StepBatch``) and the replica
    answers a pool with one reply message per served batch (``ReplyBatch``) on the pool's reply
    list (``reply_to``), so a round costs a few Redis commands whatever the number of sessions.
    Replies for sessions nobody is waiting on yet are kept until asked for.
    """

    def __init__(self, url: str) -> None:
        self.r = connect(url)
        self._stash: dict[str, StepReply | ErrorReply] = {}  # session -> newest reply not yet asked for

    def _check(self, msg: Sealed) -> bytes:
        if not isinstance(msg, Sealed):
            raise TypeError("the edge bus only sends messages sealed by the outbound gate")
        return msg.payload

    def send_many(self, items: list[tuple[str | None, str, Sealed]]) -> None:
        """Send in one round trip: (replica or None for a new session, session_id, msg).

        New sessions go one entry each to the shared open stream (so replicas share them out);
        everything for one replica goes as one ``StepBatch`` entry on its stream."""
        pipe = self.r.pipeline(transaction=False)
        per_replica: dict[str, list[bytes]] = {}
        opened = False
        for replica, session_id, msg in items:
            payload = self._check(msg)
            if replica is None:
                pipe.delete(reply_key(session_id))
                pipe.xadd(OPEN_STREAM, {FIELD: payload}, maxlen=STREAM_MAXLEN, approximate=True)
                opened = True
            else:
                per_replica.setdefault(replica, []).append(payload)
        for replica, payloads in per_replica.items():
            entry = payloads[0] if len(payloads) == 1 else encode(StepBatch(items=payloads))
            pipe.xadd(in_stream(replica), {FIELD: entry}, maxlen=STREAM_MAXLEN, approximate=True)
            pipe.expire(in_stream(replica), KEY_TTL_S)
        if opened:
            pipe.expire(OPEN_STREAM, KEY_TTL_S)
        pipe.execute()

    def wait_many(
        self,
        wanted: dict[str, int],
        deadline_ms: int,
        arrivals: dict[str, int] | None = None,
        reply_to: dict[str, str] | None = None,
    ) -> dict[str, StepReply | Exception]:
        """Replies for many sessions ({session: step}); a failed session maps to its exception.

        ``reply_to`` maps a session to its reply list (default: its own). Whatever is already posted
        is fetched in one pipelined round trip; otherwise one blocking pop waits for the next.
        ``arrivals`` (if given) receives each session's receive time (``now_us``) for tracing.
        """
        out: dict[str, StepReply | Exception] = {}
        routes = reply_to or {}
        for sid in wanted:
            if sid in self._stash:
                self._accept(self._stash.pop(sid), wanted, out, arrivals, now_us())
        drain = True
        while len(out) < len(wanted):
            keys = sorted({reply_key(routes.get(sid, sid)) for sid in wanted if sid not in out})
            if drain:
                pipe = self.r.pipeline(transaction=False)
                for k in keys:
                    pipe.rpop(k)
                payloads = [v for v in pipe.execute() if v is not None]
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
            drain = bool(payloads)  # after a hit, more may be ready
            got_us = now_us()
            for payload in payloads:
                for reply in decode_replies(payload):
                    self._accept(reply, wanted, out, arrivals, got_us)
        return out

    def _accept(
        self, reply: StepReply | ErrorReply, wanted: dict[str, int], out: dict, arrivals: dict | None, got_us: int
    ) -> None:
        sid = reply.session_id
        if sid not in wanted or sid in out:  # for a session not asked about now: keep the newest
            kept = self._stash.get(sid)
            if kept is None or kept.step <= reply.step:
                self._stash[sid] = reply
            return
        if reply.step < wanted[sid]:
            return  # late duplicate of an earlier step
        if isinstance(reply, ErrorReply):
            out[sid] = SessionError(f"cloud refused session {sid} step {reply.step}: {reply.code}: {reply.message}")
        else:
            out[sid] = reply
        if arrivals is not None:
            arrivals[sid] = got_us

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
