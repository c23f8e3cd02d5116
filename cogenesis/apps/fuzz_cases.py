"""The inputs of ``cogenesis fuzz``: seeded generators of hostile messages for the gateway's WebSocket, the HTTP
routes of the gateway and of the cloud, and the Redis bus.

Each generator is a mutation fuzzer over valid messages: it builds a valid message of the protocol
(``cogenesis.core.protocol``) and breaks one thing in it (a field's type or range, its bytes, its size, its
version, the credential it comes with, the device that owns its session), or sends raw garbage. A case says what
it sends, which answers it must get (the session ids they name), and whether accepting it would be a breach
(another device's session, a forged token, a forbidden Redis command). With the same seed and the same targets a
generator makes the same cases, so a finding is reproduced from the seed and its case number. The kinds of case live
with their surface (``fuzz_ws``, ``fuzz_http``, ``fuzz_bus``). Nothing here touches the network:
``cogenesis.apps.fuzz_send`` sends the cases and classifies the answers.

What the fuzzer deliberately does not send: a valid next step of a session (it would change that session; only
replays, gaps and invalid steps), a body whose documented answer is a 5xx (an outline budget of a few ms: 504),
and Redis commands that would wreck the cluster if an ACL let them through (FLUSHALL, SHUTDOWN, XGROUP DESTROY):
the ACL cases are harmless when accepted, and an acceptance is reported as a breach.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import msgspec

from cogenesis.core.auth import mint
from cogenesis.core.config import LimitsConfig
from cogenesis.core.errors import ProtocolError
from cogenesis.core.protocol import (
    MAX_TOP_K,
    CloseSession,
    OpenSession,
    StepBatch,
    StepRequest,
    decode_request,
    pack_ids,
)

Surface = Literal["ws", "http", "bus"]
SURFACES: tuple[Surface, ...] = get_args(Surface)
# The credential a case comes with. device: the fuzzer's own device (A); other: a second device (B); worker and
# admin: those roles' tokens; the rest are not credentials: none, expired, forged (another key), tampered (claims
# edited after signing), bad_role and bad_claims (signed with the real key, claims that make no sense), malformed,
# basic (another scheme), long (past MAX_TOKEN_CHARS), query (the token in the URL, which is not taken).
BadCred = Literal[
    "none", "expired", "forged", "tampered", "bad_role", "bad_claims", "malformed", "basic", "long", "query"
]
Cred = Literal["device", "other", "burst", "worker", "admin", BadCred]
BAD_CREDS: tuple[BadCred, ...] = get_args(BadCred)
FrameKind = Literal["binary", "text", "bad_utf8", "raw"]
INSTRUCTION = "Write a short note about the weather."
GARBAGE = b"\xc1\xff fuzz: not a message \x00"  # 0xc1 is never valid msgpack


# ---- cases -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WsCase:
    """Frames sent on one WebSocket. ``conn``: "A" (device A's connection, which holds the victim session), "B"
    (device B's), or "fresh" (a connection of its own, with ``cred``, closed after the case). ``expect``: the
    session ids whose answers are required ("" for an answer that names none: an undecodable frame's).
    ``must_refuse``: a StepReply (or, for ``fresh``, an accepted connection that serves a frame) is a breach."""

    n: int
    kind: str
    conn: Literal["A", "B", "fresh"] = "A"
    cred: Cred = "device"
    frames: tuple[tuple[FrameKind, bytes], ...] = ()
    expect: tuple[str, ...] = ()
    must_refuse: bool = False
    close_after: tuple[str, ...] = ()  # sessions a valid open started: closed once answered
    note: str = ""

    @property
    def size(self) -> int:
        return sum(len(b) for _, b in self.frames)


@dataclass(frozen=True)
class HttpCase:
    """One HTTP request. ``target``: the gateway ("gateway", routes at its root) or the cloud ("cloud", under its
    route prefix). ``stream``: read the answer as server-sent events. ``public_only``: a 2xx answer may hold only
    ``{"ok": ...}`` (health without an admin token)."""

    n: int
    kind: str
    target: Literal["gateway", "cloud"] = "gateway"
    method: str = "POST"
    path: str = "/v1/sketch"
    cred: Cred = "device"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    must_refuse: bool = False
    stream: bool = False
    public_only: bool = False
    note: str = ""

    @property
    def size(self) -> int:
        return len(self.body)


@dataclass(frozen=True)
class BusCase:
    """One bus entry (``op`` "xadd": ``fields`` on ``stream``) or one Redis command (``op`` "command") as ``role``
    ("edge", "gateway"; "none": no credentials; "wrongpass": a known user, a wrong password). ``expect``: (list,
    session id) pairs whose answer must come on that reply list. ``must_refuse``: Redis must refuse the command
    (NOPERM / NOAUTH / WRONGPASS), or no StepReply may answer it."""

    n: int
    kind: str
    role: Literal["edge", "gateway", "none", "wrongpass"] = "edge"
    op: Literal["xadd", "command"] = "xadd"
    stream: str = ""
    fields: tuple[tuple[bytes, bytes], ...] = ()
    command: tuple[str, ...] = ()
    expect: tuple[tuple[str, str], ...] = ()
    must_refuse: bool = False
    close_after: tuple[str, ...] = ()
    note: str = ""

    @property
    def size(self) -> int:
        return sum(len(k) + len(v) for k, v in self.fields)


Case = WsCase | HttpCase | BusCase


def surface_of(case: Case) -> Surface:
    return "ws" if isinstance(case, WsCase) else "http" if isinstance(case, HttpCase) else "bus"


# ---- what the cases aim at ---------------------------------------------------------------------------------


@dataclass
class Targets:
    """What a generator aims at, learnt at run time: the replicas, the fuzzer's own victim sessions, the
    legitimate sessions seen on the bus. The lists grow while the fuzz runs (a watcher thread appends)."""

    limits: LimitsConfig = field(default_factory=LimitsConfig)
    vocab: int = 49152
    nonce: str = "fz"
    replicas: list[str] = field(default_factory=list)
    victim: str = ""  # device A's session (open and step 1 served), on A's connection
    victim_step: int = 1
    victim_token: int = 0
    victim_frames: list[bytes] = field(default_factory=list)  # A's open and step 1, as sent (replays)
    bus_victim: str = ""  # the bus worker's own session, bound to ``reply_to``
    bus_victim_replica: str = ""
    bus_victim_token: int = 0
    reply_to: str = "fz-reply"  # the bus worker's reply list
    stranger: str = "fz-stranger"  # a second list: cross-session steps come from it
    legit_sessions: list[str] = field(default_factory=list)
    legit_reply_to: list[str] = field(default_factory=list)


# ---- credentials -------------------------------------------------------------------------------------------


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hand_signed(key: bytes, claims: Any) -> str:
    """A token whose claims are whatever ``claims`` is, signed with ``key`` the way ``cogenesis.core.auth`` signs:
    what a holder of the real key could make that ``mint`` refuses to (an unknown role, claims of wrong types)."""
    signed = f"cgt1.{_b64(json.dumps(claims).encode())}"
    sig = _b64(hmac.new(key, signed.encode(), hashlib.sha256).digest())
    return f"{signed}.{sig}"


class Tokens:
    """Every credential a case may present (``Cred``), made once from the cluster key. ``subject``: device A's id;
    B is ``subject + "-b"``. Tokens are never logged or reported."""

    def __init__(self, key: bytes, subject: str = "fuzz-a", ttl_s: float = 6 * 3600) -> None:
        now = time.time()
        device = mint(key, subject, "device", ttl_s)
        body = device.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        tampered_body = _b64(json.dumps({**claims, "role": "admin"}, separators=(",", ":")).encode())
        self.values: dict[Cred, str | None] = {
            "device": device,
            "other": mint(key, subject + "-b", "device", ttl_s),
            "burst": mint(key, subject + "-burst", "device", ttl_s),
            "worker": mint(key, subject + "-worker", "worker", ttl_s),
            "admin": mint(key, subject + "-admin", "admin", ttl_s),
            "none": None,
            "expired": mint(key, subject, "device", 60, now=now - 7200),
            "forged": mint(os.urandom(32), subject, "admin", ttl_s),
            "tampered": f"cgt1.{tampered_body}.{device.rsplit('.', 1)[1]}",
            "bad_role": hand_signed(key, {"sub": subject, "role": "root", "iat": int(now), "exp": int(now) + 3600}),
            "bad_claims": hand_signed(key, {"sub": [subject], "role": "device", "iat": "now", "exp": None}),
            "malformed": "cgt1.not-base64!.x",
            "basic": device,  # sent as "Basic <token>"
            "long": "cgt1." + "A" * 4096 + ".x",
            "query": None,  # no header; the token goes in the URL's query string
        }
        self.query_token = device

    def header(self, cred: Cred) -> str | None:
        """The Authorization header a case sends (None: none)."""
        token = self.values[cred]
        if token is None:
            return None
        return f"Basic {token}" if cred == "basic" else f"Bearer {token}"


# ---- the generator -----------------------------------------------------------------------------------------

Builder = Callable[["Fuzzer", int], Case]


def _cut(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(1, max(2, len(data)))]


def _junk_value(rng: random.Random) -> Any:
    return rng.choice([None, -1, 0, 2**63, -(2**63), 1.5, float("inf"), "", "x" * 300, [], {}, [1, 2], {"a": 1}, True])


class Fuzzer:
    """Seeded cases for one surface's worker (``worker`` keeps workers' streams apart). ``weights``: the share of
    each kind (the tables below); a kind's builder gets the fuzzer and the case number."""

    def __init__(self, seed: int, targets: Targets, worker: str = "0") -> None:
        self.rng = random.Random(f"{seed}-{worker}")
        self.t = targets
        self.worker = worker
        self._serial = 0

    # ---- helpers -------------------------------------------------------------------------------------

    def sid(self, what: str = "s") -> str:
        self._serial += 1
        return f"fz-{self.t.nonce}-{self.worker}-{what}{self._serial}"

    def pick(self, table: Sequence[tuple[str, float, Builder]], n: int) -> Case:
        kinds = [k for k in table if k[1] > 0]
        _, _, build = self.rng.choices(kinds, weights=[w for _, w, _ in kinds])[0]
        return build(self, n)

    def open(self, sid: str | None = None, **over: Any) -> OpenSession:
        fields: dict[str, Any] = dict(session_id=sid or self.sid("o"), instruction=INSTRUCTION, top_k=5)
        fields["budget_ms"] = 30_000
        fields.update(over)
        return OpenSession(**fields)

    def bad_open(self, sid: str | None = None, reply_to: str = "") -> tuple[OpenSession, str]:
        """An open the limits must refuse (never prefilled): one field out of range."""
        lim = self.t.limits
        sid = sid or self.sid("bo")
        choice = self.rng.randrange(8)
        if choice == 0:
            over: dict[str, Any] = {"top_k": self.rng.choice([0, -1, MAX_TOP_K + 1, 10**6])}
        elif choice == 1:
            over = {"instruction": "x" * (lim.max_instruction_chars + self.rng.randint(1, 2000))}
        elif choice == 2:
            over = {"budget_ms": lim.max_budget_ms + self.rng.randint(1, 10**9)}
        elif choice == 3:
            over = {"lookahead": self.rng.choice([-1, 17, 1000])}
        elif choice == 4:
            over = {"resume": b"\x01\x02\x03\x04\x05", "resume_step": 3}
        elif choice == 5:
            over = {"resume": pack_ids([7] * (lim.max_session_tokens + 1)), "resume_step": 2}
        elif choice == 6:
            over = {"resume_step": -self.rng.randint(1, 10), "resume": pack_ids([7, 8])}
        else:
            over = {"top_k": 0, "instruction": ""}
        return self.open(sid, reply_to=reply_to, **over), f"open with {', '.join(over)} out of range"

    def mutated_dict(self, msg: Any) -> tuple[bytes, str]:
        """``msg`` as a msgpack map with one field replaced by a value of the wrong type or range, or removed."""
        raw = msgspec.to_builtins(msg)
        key = self.rng.choice([k for k in raw if k != "type"] + ["type", "v", "extra"])
        if key != "extra" and self.rng.random() < 0.2:
            raw.pop(key, None)
            return msgspec.msgpack.encode(raw), f"{key} removed"
        raw[key] = _junk_value(self.rng)
        return msgspec.msgpack.encode(raw), f"{key} of type {type(raw[key]).__name__}"

    def victim_step(self, **over: Any) -> StepRequest:
        fields: dict[str, Any] = dict(
            session_id=self.t.victim, step=self.t.victim_step, tokens=pack_ids([self.t.victim_token]), budget_ms=30_000
        )
        fields.update(over)
        return StepRequest(**fields)

    def legit_or(self, fallback: str) -> str:
        sessions = self.t.legit_sessions
        return self.rng.choice(sessions) if sessions and self.rng.random() < 0.6 else fallback

    # ---- WebSocket ------------------------------------------------------------------------------------

    def ws(self, n: int) -> WsCase:
        return self.pick(kinds()["ws"], n)  # type: ignore[return-value]

    def http(self, n: int) -> HttpCase:
        return self.pick(kinds()["http"], n)  # type: ignore[return-value]

    def bus(self, n: int) -> BusCase:
        return self.pick(kinds()["bus"], n)  # type: ignore[return-value]


def owed_by(data: bytes) -> tuple[str, ...] | None:
    """What a device message owes, as the gateway decodes it: ("",) when it does not decode (an answer naming no
    session), () for a close (no answer), else its session; None for a batch (its items owe)."""
    try:
        msg = decode_request(data)
    except ProtocolError:
        return ("",)
    if isinstance(msg, StepBatch):
        return None
    return () if isinstance(msg, CloseSession) else (msg.session_id,)


def kinds() -> dict[Surface, tuple[tuple[str, float, Builder], ...]]:
    """Every surface's kinds of case: (name, weight, builder), from ``fuzz_ws``, ``fuzz_http`` and ``fuzz_bus``."""
    from cogenesis.apps.fuzz_bus import BUS_KINDS
    from cogenesis.apps.fuzz_http import HTTP_KINDS
    from cogenesis.apps.fuzz_ws import WS_KINDS

    return {"ws": WS_KINDS, "http": HTTP_KINDS, "bus": BUS_KINDS}


SHARES: dict[Surface, float] = {"ws": 0.4, "http": 0.35, "bus": 0.25}


def split_count(count: int, shares: dict[Surface, float] = SHARES) -> dict[Surface, int]:
    """``count`` cases spread over the surfaces by ``shares`` (every case lands on one; rounding goes to ws)."""
    out = {s: int(count * shares[s]) for s in SURFACES}
    out["ws"] += count - sum(out.values())
    return out
