"""The Redis bus carrying logits-mode steps between edges and cloud replicas.

Keys (every one has a TTL; nothing private is ever written):
- ``cg:open``               stream, OpenSession requests; consumer group ``cloud`` spreads them over replicas
- ``cg:in:{replica}``       stream, StepRequest / CloseSession (or a ``StepBatch`` of an edge pool's round)
                            for the replica that owns the sessions
- ``cg:reply:{reply_to}``   list, replies (one or a ``ReplyBatch``) for an edge link's sessions
- ``cg:alive:{replica}``    string, replica heartbeat: JSON ``{"pid", "at"}``, written every ``heartbeat_s`` by a
                            thread of its own with a TTL of ``heartbeat_ttl_s``; a missing key means a dead replica
- ``cg:edge:{random}``      string, an edge bus's marker (random per ``EdgeBus``, TTL 600 s): when it is gone, Redis
                            restarted empty and the edge resumes what it had in flight
Stream entries are deleted once acknowledged, and admission bounds the sessions, so memory stays
flat however long the cluster runs; streams are never trimmed (MAXLEN would drop unread requests
silently). A dead replica's work is taken over by the survivors: its pending opens are claimed
(``CloudBus.claim``), its input stream answered and deleted (``CloudBus.take_stream``).

What an edge writes is only what its outbound gate sealed (``Sealed``): the edge bus sends a genuine
``Sealed``'s bytes and refuses anything else. ``reply_to`` is random per edge link (a fleet client's or
Locust user's session has its own link; a demo or benchmark pool's one link serves that batch of
sessions and is never reused), so it links no device's sessions to each other. Stream entry ids are
Redis's (its clock, the cloud's): a replica counts a request's budget from its entry's arrival.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cogenesis.core.errors import (
    BusTimeout,
    Busy,
    ClusterError,
    ProtocolError,
    ReplicaLost,
    SessionError,
    UnknownSession,
)
from cogenesis.core.protocol import ErrorReply, StepBatch, StepReply, decode_replies, encode, now_us
from cogenesis.core.secrets import ENV_DIR, ENV_REDIS_PASSWORD, RedisRole, SecretsDir, redis_credentials, secrets_dir

log = logging.getLogger(__name__)
_T = TypeVar("_T")

OPEN_STREAM = "cg:open"
GROUP = "cloud"
FIELD = b"m"
KEY_TTL_S = 600
REPLY_TTL_S = 600  # a reply may wait while its edge finishes a long prefill; the edge's deadline still bounds it


def in_stream(replica: str) -> str:
    return f"cg:in:{replica}"


def reply_key(reply_to: str) -> str:
    return f"cg:reply:{reply_to}"


def alive_key(replica: str) -> str:
    return f"cg:alive:{replica}"


IN_PREFIX = "cg:in:"


def read_alive(r: redis.Redis, replicas: Iterable[str]) -> dict[str, dict | None]:
    """Each replica's heartbeat (``{"pid", "at"}`` and what else it announces), or None where its key is missing: the replica is dead
    (or never started). One round trip."""
    names = list(dict.fromkeys(replicas))
    if not names:
        return {}
    out: dict[str, dict | None] = {}
    for name, raw in zip(names, r.mget([alive_key(n) for n in names])):
        if raw is None:
            out[name] = None
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            value = None
        # an older replica wrote the bare time: alive all the same
        out[name] = value if isinstance(value, dict) else {"pid": None, "at": value}
    return out


def live_replicas(r: redis.Redis) -> dict[str, dict]:
    """Every replica with a heartbeat on the bus, by name: its heartbeat (``pid``, ``at`` and, from current
    replicas, ``node``, ``node_ip``, ``sessions``, ``outlines``, ``requests``)."""
    prefix = alive_key("")
    names = sorted(k.decode()[len(prefix) :] for k in r.scan_iter(match=prefix + "*", count=1000))
    return {name: beat for name, beat in read_alive(r, names).items() if beat is not None}


SOCKET_TIMEOUT_S = 10.0  # no command waits longer on the socket; blocking pops wait in shorter slices
BLOCK_SLICE_S = 1.0  # an edge's blocking pop: it checks heartbeats between slices
DRAIN_COUNT = 1024  # replies a drain takes off one reply list at once


# what a bus call raises while Redis is away (down, restarting, unreachable): callers back off and retry
REDIS_DOWN: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)


ENV_REDIS_CA = "COGENESIS_REDIS_CA"


def safe_url(url: str) -> str:
    """``url`` without any user or password in it (for messages and logs)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url


def redis_auth(
    url: str,
    role: RedisRole | None,
    secrets: str | Path | SecretsDir | None = None,
    ca_file: str | None = None,
) -> dict[str, Any]:
    """redis-py keyword arguments for connecting to ``url`` as ``role``: ``username``/``password`` from
    ``redis_credentials`` (the environment, else the secrets directory: ``secrets``, else
    ``$COGENESIS_SECRETS_DIR``; none: an unlocked Redis), and for a ``rediss://`` URL the CA to verify it
    with (``ca_file``, else ``$COGENESIS_REDIS_CA``, else the secrets directory's ``redis/tls/ca.crt`` when
    the bundled Redis made one, else the system's CAs). Never put them in a URL or a log."""
    where = secrets.path if isinstance(secrets, SecretsDir) else secrets
    out: dict[str, Any] = {}
    if role is not None:
        creds = redis_credentials(role, where)
        if creds is not None:
            out.update(username=creds.username, password=creds.password)
    if url.startswith("rediss://"):
        ca = ca_file or os.environ.get(ENV_REDIS_CA)
        found = secrets_dir(where)
        if ca is None and found is not None and (found.path / "redis" / "tls" / "ca.crt").is_file():
            ca = str(found.path / "redis" / "tls" / "ca.crt")
        if ca is not None:
            out["ssl_ca_certs"] = ca
    return out


def _password_source(role: RedisRole | None, secrets: str | Path | SecretsDir | None) -> str:
    """Where ``role``'s password is read from (never the password), for a refused connection's hint."""
    if role is None:
        return "this client connects without credentials (no role): pass role= to connect"
    if os.environ.get(ENV_REDIS_PASSWORD):
        return f"user {role}'s password is read from ${ENV_REDIS_PASSWORD}"
    found = secrets_dir(secrets.path if isinstance(secrets, SecretsDir) else secrets)
    if found is None:
        return (
            f"this process has no secrets directory, so it connected as nobody: pass --secrets-dir or set {ENV_DIR} "
            "to the cluster's (the one its Redis was started with)"
        )
    return f"user {role}'s password is read from {found.password_file(role)}: is it the cluster's secrets directory?"


def connect(
    url: str,
    timeout_s: float = 5.0,
    role: RedisRole | None = None,
    secrets: str | Path | SecretsDir | None = None,
    ca_file: str | None = None,
) -> redis.Redis:
    """A client that fails fast with a clear error when Redis is not there, or refuses this role.

    ``role``: the ACL user to connect as (``cogenesis.cluster.acl``), its password from ``secrets`` or the
    environment (``redis_auth``); None connects without credentials (an unlocked Redis). A ``rediss://`` URL
    is TLS. The read timeout is explicit (redis-py 8 otherwise applies its own default, shorter than the
    bus's deadlines); blocking pops never ask for more than ``BLOCK_SLICE_S``.
    """
    client = redis.Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=30,
        **redis_auth(url, role, secrets, ca_file),
    )
    try:
        client.ping()
    except redis.AuthenticationError as exc:  # WRONGPASS, NOAUTH (a ConnectionError: caught first)
        client.close()
        text = str(exc).lower()  # redis-py drops the error code: NOAUTH (no credentials) or WRONGPASS
        code = "NOAUTH" if "required" in text or "authenticated" in text else "WRONGPASS"
        raise ClusterError(
            f"Redis at {safe_url(url)} refused {'user ' + role if role else 'a client without credentials'} ({code})",
            hint=_password_source(role, secrets),
        ) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        client.close()
        raise ClusterError(
            f"cannot reach Redis at {safe_url(url)}: {exc}",
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


class ExchangeLost(ReplicaLost):
    """Redis lost, or may have lost, a session's request or reply: it restarted empty, or the connection broke
    in the middle of an exchange. The session is resumed (cause ``redis``), like one whose replica died."""


GONE = "gone"  # ``_routable``: the reply's replica beat before and has stopped (it left after answering)
ALIVE_CHECK_S = 1.0  # how often a wait checks the heartbeats of the replicas it waits on (and Redis's marker)
ALIVE_GRACE_S = 5.0  # after Redis came back empty, replicas need a beat to write their heartbeat again
RECONNECT_FIRST_S = 0.05  # reconnect backoff: the first wait, doubled up to RECONNECT_CAP_S
RECONNECT_CAP_S = 2.0
STASH_MAX = 10_000  # replies kept for sessions nobody waits on yet; beyond, the oldest is dropped (logged)
FORGOTTEN_MAX = 10_000  # ended sessions remembered, so their late replies are dropped instead of kept
DEAD_MAX = 1_000  # replicas remembered as dead (their late replies to a re-opened session are ignored)
REPLICA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what a reply may name as its replica (whole), else it is malformed


class EdgeBus:
    """Edge side: send sealed requests, wait for replies with deadlines, notice what was lost.

    A round's steps for one replica travel as one stream entry (``StepBatch``) and the replica
    answers a pool with one reply message per served batch (``ReplyBatch``) on the pool's reply
    list (``reply_to``), so a round costs a few Redis commands whatever the number of sessions.
    Replies for sessions nobody is waiting on yet are kept until asked for (a bounded number).

    The edge holds every token it sent, so what Redis or a replica loses is not lost: the bus only has to
    *say* which sessions lost their exchange, and the session loop re-opens them by replay:

    - a replica whose heartbeat is gone (``cg:alive:{replica}`` missing) fails the sessions waiting on it
      with ``ReplicaLost`` within about ``ALIVE_CHECK_S`` of the key expiring, not at the step timeout;
    - a broken connection is retried with capped exponential backoff for ``redis_retry_s``: the sessions
      of the interrupted wait, and every session sent before Redis came back empty (its marker key is
      gone: it restarted), fail with ``ExchangeLost``; a send is simply sent again (a replica answers a
      repeated request from its cache). If Redis stays away, they fail with ``ClusterError`` (unreachable).

    No redis exception leaves the bus: a command fails fast (no silent retry by the client, which could
    pop a reply and lose it), and the bus decides what the failure means.
    """

    def __init__(
        self,
        url: str,
        redis_retry_s: float = 30.0,
        role: RedisRole = "edge",
        secrets: str | Path | SecretsDir | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.url = url
        self.redis_retry_s = redis_retry_s
        self.r = connect(url, role=role, secrets=secrets, ca_file=ca_file)  # a trusted worker, or the gateway
        self.r.set_retry(Retry(NoBackoff(), 0))
        # session -> newest reply not yet asked for, and when it came
        self._stash: dict[str, tuple[StepReply | ErrorReply, Received]] = {}
        self._forgotten: OrderedDict[str, None] = OrderedDict()
        self._dead: OrderedDict[str, None] = OrderedDict()  # replicas whose heartbeat was found missing
        self._holders: OrderedDict[str, str] = OrderedDict()  # session -> the replica its last reply came from
        # Redis's data epoch: bumped when Redis came back without this bus's marker (it restarted empty);
        # a session sent in an older epoch lost its request or reply
        self._marker = f"cg:edge:{os.urandom(12).hex()}"  # (``secrets`` is the argument here)
        self._epoch = 0
        self._sent_epoch: dict[str, int] = {}
        self._checked_at = 0.0  # monotonic: the last heartbeat check
        self._grace_until = 0.0
        self._gave_up = False  # Redis stayed away for redis_retry_s: later calls try once, not for as long again
        self._call(lambda: self.r.set(self._marker, b"1", ex=KEY_TTL_S))

    # ---- connection -------------------------------------------------------------------------------------

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` (Redis commands); on a connection error reconnect and run it again, for up to
        ``redis_retry_s``; then ClusterError (unreachable)."""
        deadline = time.monotonic() + self.redis_retry_s
        while True:
            try:
                return fn()
            except REDIS_DOWN as exc:
                log.warning("Redis at %s: %s; reconnecting", self.url, type(exc).__name__)
                if not self._reconnect(deadline):
                    raise self._unreachable() from None

    def _reconnect(self, deadline: float) -> bool:
        """Reconnect with capped exponential backoff until ``deadline``; True once Redis answers. Notices a
        restart (the marker is gone): sessions sent before it lost their exchange."""
        delay = RECONNECT_FIRST_S
        while True:
            try:
                self.r.ping()
                self._check_marker(self.r.exists(self._marker))
                self._gave_up = False
                return True
            except REDIS_DOWN:
                pass
            left = deadline - time.monotonic()
            if left <= 0 or self._gave_up:
                self._gave_up = True
                return False
            time.sleep(min(delay, left))
            delay = min(2 * delay, RECONNECT_CAP_S)

    def _check_marker(self, present: object) -> None:
        """Redis answered without this bus's marker: it restarted empty, and what it held is gone."""
        if present:
            return
        self._epoch += 1
        self._grace_until = time.monotonic() + ALIVE_GRACE_S
        self.r.set(self._marker, b"1", ex=KEY_TTL_S)
        log.warning("Redis at %s came back empty (restarted?): sessions in flight will be resumed", self.url)

    def _unreachable(self) -> ClusterError:
        return ClusterError(
            f"Redis at {self.url} is unreachable (retried for {self.redis_retry_s:.0f} s)",
            hint="is Redis (the cluster) running? raise --redis-retry or edge.redis_retry_s to wait longer",
        )

    # ---- sending ----------------------------------------------------------------------------------------

    def send_many(self, items: list[tuple[str | None, str, Sealed]]) -> None:
        """Send in one round trip: (replica or None for a new session, session_id, msg).

        Each ``msg`` must be a genuine ``Sealed`` (TypeError otherwise, before anything is sent); its
        bytes go out exactly as sealed. New sessions go one entry each to the shared open stream (so
        replicas share them out); everything for one replica goes as one ``StepBatch`` entry on its stream.
        Streams are never trimmed (a trimmed stream drops unread requests silently): replicas delete what
        they acknowledged, and admission bounds the sessions. A lost connection is retried (the whole
        round again: a replica answers a repeated request from its cache); ClusterError if Redis stays away."""
        payloads = [(replica, session_id, wire_bytes(msg)) for replica, session_id, msg in items]
        if not payloads:
            return

        def send() -> None:
            pipe = self.r.pipeline(transaction=False)
            per_replica: dict[str, list[bytes]] = {}
            opened = False
            for replica, session_id, payload in payloads:
                if replica is None:
                    pipe.delete(reply_key(session_id))
                    pipe.xadd(OPEN_STREAM, {FIELD: payload})
                    opened = True
                else:
                    per_replica.setdefault(replica, []).append(payload)
            for replica, batch in per_replica.items():
                entry = batch[0] if len(batch) == 1 else encode(StepBatch(items=batch))
                pipe.xadd(in_stream(replica), {FIELD: entry})
                pipe.expire(in_stream(replica), KEY_TTL_S)
            if opened:
                pipe.expire(OPEN_STREAM, KEY_TTL_S)
            pipe.execute()

        self._call(send)
        for _, session_id, _ in payloads:
            self._sent_epoch[session_id] = self._epoch

    # ---- waiting ----------------------------------------------------------------------------------------

    def wait_many(
        self,
        wanted: dict[str, int],
        deadline_ms: int,
        arrivals: dict[str, Received] | None = None,
        reply_to: dict[str, str] | None = None,
        replicas: dict[str, str] | None = None,
    ) -> dict[str, StepReply | Exception]:
        """Replies for many sessions ({session: step}); a failed session maps to its exception.

        ``deadline_ms``: this edge's own deadline (``deadline_in``, its clock; it never leaves the edge).
        ``reply_to`` maps a session to its reply list (default: its own). ``replicas`` maps a session to the
        replica holding it; a session not in it is opening (its open goes to whichever replica claims it,
        and no answer but a reply from a live replica, or a refusal, is its answer). Whatever is already
        posted is fetched in one pipelined round trip; otherwise blocking pops wait in slices of
        ``BLOCK_SLICE_S``, and about every ``ALIVE_CHECK_S`` the same round trip checks the heartbeats of
        the replicas waited on: the sessions of a dead one fail at once with ``ReplicaLost``.
        ``ExchangeLost`` (Redis lost the exchange) and ``ClusterError`` (Redis unreachable) as the class says.
        ``arrivals`` (if given) receives when each session's reply came (``Received``), for tracing.
        """
        out: dict[str, StepReply | Exception] = {}
        routes = reply_to or {}
        held = replicas or {}
        opening = set(wanted) - set(held) if replicas is not None else set()
        for sid in wanted:
            if sid in self._stash:
                self._accept(*self._stash.pop(sid), wanted, out, arrivals, opening, held, replicas is not None)
        self._lost_in_restart(wanted, out)
        started, drain, first = now_us(), True, True
        while len(out) < len(wanted):
            pending = [sid for sid in wanted if sid not in out]
            keys = sorted({reply_key(routes.get(sid, sid)) for sid in pending})
            watched = sorted({held[sid] for sid in pending if sid in held})
            check = time.monotonic() - self._checked_at >= ALIVE_CHECK_S
            timeout = 0.0
            if not drain:
                remaining = deadline_ms / 1000 - time.time()
                if remaining <= 0:
                    for sid in pending:
                        out[sid] = BusTimeout(
                            f"session {sid}: no reply for step {wanted[sid]} before its deadline",
                            hint="is the cloud running and reading the bus?",
                        )
                    break
                timeout = min(max(remaining, 0.01), BLOCK_SLICE_S)
            try:
                payloads, beats = self._poll(keys, timeout, watched if check else None)
            except REDIS_DOWN as exc:
                log.warning("Redis at %s: %s while waiting; reconnecting", self.url, type(exc).__name__)
                if self._reconnect(time.monotonic() + self.redis_retry_s):
                    for sid in pending:  # a reply may have been popped and lost with the connection
                        out[sid] = ExchangeLost(
                            f"session {sid}: the connection to Redis broke while waiting for step {wanted[sid]}"
                        )
                else:
                    for sid in pending:
                        out[sid] = self._unreachable()
                break
            got = Received(now_us(), started if first else None)  # the first drain finds what was already there
            drain, first = bool(payloads), False  # after a hit, more may be ready
            for payload in payloads:
                try:
                    replies = decode_replies(payload)
                except ProtocolError:  # its content is not logged: only that it was dropped
                    log.warning("dropped a malformed reply of %d bytes", len(payload))
                    continue
                for reply in replies:
                    self._accept(reply, got, wanted, out, arrivals, opening, held, replicas is not None)
            if beats is not None:
                self._heartbeats(beats, pending, held, out)
            self._lost_in_restart(wanted, out)
        return out

    def _poll(
        self, keys: list[str], timeout: float, watched: list[str] | None
    ) -> tuple[list[bytes], dict[str, bool] | None]:
        """One round trip: (if ``watched`` is given) the marker and these replicas' heartbeats, then the
        replies: everything posted (``timeout`` 0), or the next one within ``timeout`` seconds. Returns the
        replies' payloads and, when checked, which replicas still beat."""
        pipe = self.r.pipeline(transaction=False)
        if watched is not None:
            pipe.mget([self._marker] + [alive_key(name) for name in watched])
            pipe.expire(self._marker, KEY_TTL_S)
        if timeout > 0:
            pipe.brpop(keys, timeout=timeout)
        else:
            for k in keys:
                pipe.rpop(k, DRAIN_COUNT)
        results = pipe.execute()
        beats = None
        if watched is not None:
            (marker, *alive), _ = results[:2]
            results = results[2:]
            self._checked_at = time.monotonic()
            self._check_marker(marker)
            beats = {name: value is not None for name, value in zip(watched, alive)}
        if timeout > 0:
            return ([results[0][1]] if results[0] is not None else []), beats
        return [p for popped in results if popped for p in popped], beats

    def _heartbeats(
        self, beats: dict[str, bool], pending: list[str], held: dict[str, str], out: dict[str, StepReply | Exception]
    ) -> None:
        """Fail the sessions still waiting on a replica whose heartbeat is gone (not right after Redis came
        back empty: every heartbeat is gone then, until the replicas beat again)."""
        for name, beating in beats.items():
            if beating:
                self._dead.pop(name, None)
                self._seen_beating(name)
            elif time.monotonic() >= self._grace_until:
                self._dead[name] = None
                if self._beating is not None:
                    self._beating.pop(name, None)  # its heartbeat is gone: no longer taken as seen beating
                while len(self._dead) > DEAD_MAX:
                    self._dead.popitem(last=False)
        for sid in pending:
            replica = held.get(sid)
            if sid not in out and replica is not None and replica in self._dead:
                out[sid] = ReplicaLost(
                    f"session {sid}: replica {replica} stopped (no heartbeat)",
                    hint="the session is re-opened on another replica; are replicas crashing?",
                )

    def _lost_in_restart(self, wanted: dict[str, int], out: dict[str, StepReply | Exception]) -> None:
        for sid in wanted:
            if sid not in out and self._sent_epoch.get(sid, self._epoch) < self._epoch:
                out[sid] = ExchangeLost(f"session {sid}: Redis restarted while step {wanted[sid]} was in flight")

    def _accept(
        self,
        reply: StepReply | ErrorReply,
        got: Received,
        wanted: dict[str, int],
        out: dict,
        arrivals: dict[str, Received] | None,
        opening: set[str],
        held: dict[str, str],
        routing: bool,
    ) -> None:
        sid = reply.session_id
        if isinstance(reply, StepReply):
            routable = self._routable(reply, held.get(sid), routing)
            if routable is None:  # its replica could not be checked (Redis away): the reply is lost with it
                if sid in wanted and sid not in out and reply.step >= wanted[sid]:
                    out[sid] = ExchangeLost(f"session {sid}: Redis broke while checking the reply to step {reply.step}")
                return
            if routable == GONE:
                if sid not in wanted or sid in out:
                    self._keep(reply, got)  # judged again when its session waits for it
                elif sid in opening and self._holders.get(sid) == reply.replica:
                    pass  # the old holder's answer to its last request: stale, not the answer to this open
                elif reply.step >= wanted[sid]:
                    out[sid] = ReplicaLost(
                        f"session {sid}: its replica answered and then stopped (no heartbeat)",
                        hint="the session is re-opened on another replica",
                    )
                return
            if not routable:
                return
        if sid not in wanted or sid in out:  # for a session not asked about now: keep the newest
            self._keep(reply, got)
            return
        if reply.step < wanted[sid]:
            return  # late duplicate of an earlier step
        if sid in opening and (
            (isinstance(reply, ErrorReply) and reply.code == "unknown_session")
            or (isinstance(reply, StepReply) and reply.replica in self._dead)
        ):
            return  # the old replica's (or a survivor's answer to its) request, not the answer to this open
        out[sid] = _result(reply)
        if isinstance(reply, StepReply):
            self._holders.pop(sid, None)
            self._holders[sid] = reply.replica  # where the session lives now (its stale answers are told apart)
            while len(self._holders) > STASH_MAX:
                self._holders.popitem(last=False)
        self._sent_epoch.pop(sid, None)
        if arrivals is not None:
            arrivals[sid] = got

    _beating: OrderedDict[str, float] | None = None  # replica -> when its heartbeat was last seen (monotonic)

    def _seen_beating(self, name: str) -> None:
        if self._beating is None:
            self._beating = OrderedDict()
        self._beating.pop(name, None)
        self._beating[name] = time.monotonic()
        while len(self._beating) > DEAD_MAX:
            self._beating.popitem(last=False)

    def _routable(self, reply: StepReply, holder: str | None, routing: bool) -> bool | None | str:
        """Whether a reply may say where its session lives (its ``replica``, where the session's next steps go):
        the name must be a replica name (``REPLICA_NAME``); for a session held by a known replica, that one;
        for any other session in a routing wait (``replicas`` given) a replica with a live heartbeat (seen in
        the last ``ALIVE_CHECK_S``, else one ``EXISTS``; right after Redis came back empty any name passes:
        no replica has beaten again yet). A reply that fails the name checks is dropped (logged with its session
        and the name's size, never the name) and its session waits on: the genuine reply is a message of its own,
        still to come, and a session whose replica did die is failed by the heartbeat checks (``ReplicaLost``)
        and resumed. ``GONE``: a routed reply from a replica this edge saw beating before and that has none now
        (it took the open, answered it and left before the edge read the answer, as a replica scaled down
        does): nobody else will answer that open, so the session is resumed (``ReplicaLost``) rather than left
        to its deadline. None: Redis broke during the check."""
        sid, name = reply.session_id, reply.replica
        if not REPLICA_NAME.fullmatch(name):
            log.warning("dropped a reply for session %s naming no valid replica (%d characters)", sid, len(name))
            return False
        if holder is not None:
            if name == holder:
                return True
            log.warning("dropped a reply for session %s from a replica other than the one holding it", sid)
            return False
        if not routing:
            return True
        seen = self._beating.get(name) if self._beating is not None else None
        if seen is not None and time.monotonic() - seen < ALIVE_CHECK_S:
            return True
        try:
            beating = bool(self.r.exists(alive_key(name)))
        except REDIS_DOWN:
            return None
        if beating:
            self._seen_beating(name)
            return True
        if time.monotonic() < self._grace_until:
            return True
        if name in self._dead or (self._beating is not None and name in self._beating):
            log.warning("a reply for session %s came from a replica that has stopped since: it is resumed", sid)
            return GONE
        log.warning("dropped a reply for session %s from a replica without heartbeat", sid)
        return False

    def _keep(self, reply: StepReply | ErrorReply, got: Received) -> None:
        sid = reply.session_id
        if sid in self._forgotten:
            return  # its session ended: a late reply (or a duplicate of a resumed step) goes nowhere
        kept = self._stash.get(sid)
        if kept is not None and kept[0].step > reply.step:
            return
        self._stash.pop(sid, None)  # re-inserted as the newest
        self._stash[sid] = (reply, got)
        if len(self._stash) > STASH_MAX:
            del self._stash[next(iter(self._stash))]
            log.warning("dropped the oldest kept reply: more than %d replies for sessions nobody waits on", STASH_MAX)

    def forget(self, session_ids) -> None:
        """Drop kept replies of sessions that ended (and any that come for them later)."""
        for sid in session_ids:
            self._stash.pop(sid, None)
            self._sent_epoch.pop(sid, None)
            self._holders.pop(sid, None)
            self._forgotten[sid] = None
        while len(self._forgotten) > FORGOTTEN_MAX:
            self._forgotten.popitem(last=False)

    def close(self) -> None:
        with contextlib.suppress(*REDIS_DOWN):
            self.r.delete(self._marker)
        self.r.close()


def _result(reply: StepReply | ErrorReply) -> StepReply | SessionError:
    """A reply as the waiting session takes it: the reply, or the refusal as its error."""
    if isinstance(reply, StepReply):
        return reply
    what = f"cloud refused session {reply.session_id} step {reply.step}: {reply.code}: {reply.message}"
    if reply.code == "unknown_session":
        return UnknownSession(what)
    if reply.code == "busy":
        return Busy(what, retry_after_s=max(0, reply.retry_after_ms) / 1000)
    return SessionError(what)


class CloudBus:
    """Cloud side: read this replica's requests (and a share of new sessions), post replies, heartbeat,
    and take over the work of dead replicas.

    Every method may raise redis' ``ConnectionError``/``TimeoutError`` while Redis is away; the step loop
    backs off and retries. Groups and streams lost with a restarted (empty) Redis are recreated on the
    next read (NOGROUP)."""

    def __init__(
        self,
        url: str,
        replica: str,
        heartbeat_ttl_s: float = 4.0,
        secrets: str | Path | SecretsDir | None = None,
        ca_file: str | None = None,
    ) -> None:
        self.r = connect(url, role="replica", secrets=secrets, ca_file=ca_file)
        self.replica = replica
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.streams = {OPEN_STREAM: ">", in_stream(replica): ">"}
        self._ensure_groups()
        self.heartbeat()

    def _ensure_groups(self) -> None:
        """The consumer groups (and streams) this replica reads, and this replica a consumer of the open
        stream's group from the start: survivors find a dead replica among those consumers (Redis 6 adds a
        consumer only when an entry is delivered to it)."""
        for stream in self.streams:
            try:
                self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
            self.r.expire(stream, KEY_TTL_S)
        self.r.xgroup_createconsumer(OPEN_STREAM, GROUP, self.replica)

    def heartbeat(self, ttl_s: float | None = None, fields: dict | None = None) -> None:
        """Say this replica is alive for ``ttl_s`` more seconds (``{"pid", "at"}`` and ``fields``: where it runs
        and what it holds, which ``cogenesis status`` shows); keep its streams alive."""
        ttl_ms = max(1, int((ttl_s if ttl_s is not None else self.heartbeat_ttl_s) * 1000))
        beat = {**(fields or {}), "pid": os.getpid(), "at": round(time.time(), 3)}
        pipe = self.r.pipeline(transaction=False)
        pipe.set(alive_key(self.replica), json.dumps(beat), px=ttl_ms)
        for stream in self.streams:
            pipe.expire(stream, KEY_TTL_S)
        pipe.execute()

    def read(
        self, block_ms: int | None = 100, count: int = 1024, max_opens: int = 64
    ) -> list[tuple[str, bytes, bytes]]:
        """Pending (stream, entry id, payload) triples, waiting at most ``block_ms`` (None: not at all).

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
            if "NOGROUP" in str(exc):  # stream expired while idle, or Redis restarted empty: recreate, carry on
                self._ensure_groups()
                return []
            raise
        if not isinstance(resp, list):  # nothing came (RESP2, ``connect``'s protocol, answers a list otherwise)
            return []
        out: list[tuple[str, bytes, bytes]] = []
        for stream, entries in resp:
            name = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, fields in entries:
                out.append((name, entry_id, (fields or {}).get(FIELD, b"")))
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
        if not done and not replies:
            return
        pipe = self.r.pipeline(transaction=False)
        for reply_to, payload in replies:
            pipe.lpush(reply_key(reply_to), payload)
            pipe.expire(reply_key(reply_to), REPLY_TTL_S)
        for stream, entry_id in done:
            pipe.xack(stream, GROUP, entry_id)
            pipe.xdel(stream, entry_id)
        pipe.execute()

    # ---- dead replicas ------------------------------------------------------------------------------

    def dead_consumers(self) -> list[str]:
        """Other replicas of the open stream's group that are dead: no heartbeat, and silent on the bus for
        ``heartbeat_ttl_s`` at least (a live replica reads every 100 ms, even inside a long pass its
        heartbeat thread keeps its key)."""
        try:
            consumers = self.r.xinfo_consumers(OPEN_STREAM, GROUP)
        except redis.ResponseError:  # no stream or no group (Redis restarted): nobody to take over
            return []
        ttl_ms = int(self.heartbeat_ttl_s * 1000)
        names = {}
        for c in consumers:
            name = c["name"].decode() if isinstance(c["name"], bytes) else str(c["name"])
            if name != self.replica and int(c.get("idle", 0)) >= ttl_ms:
                names[name] = c
        alive = read_alive(self.r, names)
        return [name for name in names if alive.get(name) is None]

    def claim(self, consumer: str, batch: int = 1000) -> tuple[list[tuple[str, bytes, bytes]], bool]:
        """Take over ``consumer``'s pending entries on the open stream (read, never acknowledged: it died
        mid-pass); returns them as a read would, now pending for this replica, and whether none is left
        pending for ``consumer`` (only then may it be removed). Only entries idle for ``heartbeat_ttl_s``
        move, so two survivors never both take one."""
        min_idle = int(self.heartbeat_ttl_s * 1000)
        out: list[tuple[str, bytes, bytes]] = []
        previous: list[bytes] = []
        while True:
            pending: Any = self.r.xpending_range(OPEN_STREAM, GROUP, "-", "+", batch, consumername=consumer)
            ids: list[Any] = [p["message_id"] for p in pending]
            if not ids:
                return out, True
            if ids == previous:  # nothing moved: too recent, or another survivor holds them now
                return out, False
            previous = ids
            gone: list[bytes] = []
            claimed: Any = self.r.xclaim(OPEN_STREAM, GROUP, self.replica, min_idle, ids)
            for entry_id, fields in claimed:
                if fields:
                    out.append((OPEN_STREAM, entry_id, fields.get(FIELD, b"")))
                else:  # deleted after it was read: nothing left to serve
                    gone.append(entry_id)
            if gone:
                self.r.xack(OPEN_STREAM, GROUP, *gone)

    def own_pending(self) -> list[tuple[str, bytes, bytes]]:
        """Entries delivered to this replica and never acknowledged, as a read returns them (a reply lost with
        its connection); entries deleted meanwhile are acknowledged here. Only the loop that reads calls it,
        between passes, when none of them can be in hand."""
        out: list[tuple[str, bytes, bytes]] = []
        gone: dict[str, list[bytes]] = {}
        try:
            resp: Any = self.r.xreadgroup(GROUP, self.replica, {s: "0" for s in self.streams}, count=1000)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):  # Redis restarted empty: nothing was kept for anyone
                return []
            raise
        for stream, entries in resp or []:
            name = stream.decode() if isinstance(stream, bytes) else stream
            for entry_id, fields in entries:
                if fields:
                    out.append((name, entry_id, fields.get(FIELD, b"")))
                else:
                    gone.setdefault(name, []).append(entry_id)
        for name, ids in gone.items():
            self.r.xack(name, GROUP, *ids)
        return out

    def remove_consumer(self, consumer: str) -> None:
        """Forget a dead replica in the open stream's group (after its pending entries were claimed)."""
        with contextlib.suppress(redis.ResponseError):
            self.r.xgroup_delconsumer(OPEN_STREAM, GROUP, consumer)

    def take_stream(self, replica: str) -> list[tuple[bytes, bytes]]:
        """Every entry left on ``replica``'s input stream (pending or never read), and the stream deleted,
        atomically: two survivors never answer one entry twice, and nothing added meanwhile is lost."""
        pipe = self.r.pipeline(transaction=True)
        pipe.xrange(in_stream(replica), "-", "+")
        pipe.delete(in_stream(replica))
        entries, _ = pipe.execute()
        return [(entry_id, (fields or {}).get(FIELD, b"")) for entry_id, fields in entries or []]

    def orphan_streams(self) -> list[str]:
        """Replicas whose input stream holds entries older than ``heartbeat_ttl_s`` while their heartbeat is
        missing: written to after the replica died (and after a survivor took its stream). A full scan of
        the keyspace: call it rarely."""
        prefix = IN_PREFIX.encode()
        found = []
        for key in self.r.scan_iter(match=f"{IN_PREFIX}*", count=1000, _type="STREAM"):
            name = (key[len(prefix) :] if isinstance(key, bytes) else key[len(IN_PREFIX) :]).decode()
            if name != self.replica:
                found.append(name)
        if not found:
            return []
        alive = read_alive(self.r, found)
        now_s, _ = self.r.time()
        out = []
        for name in found:
            if alive.get(name) is not None:
                continue
            first: Any = self.r.xrange(in_stream(name), "-", "+", count=1)
            if first and entry_ms(first[0][0]) <= now_s * 1000 - self.heartbeat_ttl_s * 1000:
                out.append(name)
        return out

    def retire(self) -> list[tuple[bytes, bytes]]:
        """Leave the bus for good (the replica stops): its heartbeat deleted, so edges resume its sessions at
        once; every entry left on its input stream taken (``take_stream``) for the caller to answer; and it is
        removed from the open stream's group when nothing is pending for it there."""
        self.r.delete(alive_key(self.replica))
        left = self.take_stream(self.replica)
        try:
            if not self.r.xpending_range(OPEN_STREAM, GROUP, "-", "+", 1, consumername=self.replica):
                self.remove_consumer(self.replica)
        except redis.ResponseError:  # no open stream (Redis restarted): nothing to leave
            pass
        return left

    def close(self) -> None:
        try:
            self.r.delete(alive_key(self.replica))
        finally:
            self.r.close()
