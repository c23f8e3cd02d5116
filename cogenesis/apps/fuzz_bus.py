"""The bus cases of ``cogenesis fuzz`` (``cogenesis.apps.fuzz_cases``): entries on ``cg:open`` and ``cg:in:{replica}``
as the trusted ``edge`` user, and Redis commands each role must be refused."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from cogenesis.apps.fuzz_cases import (
    GARBAGE,
    Builder,
    BusCase,
    Fuzzer,
)
from cogenesis.cluster.bus import FIELD
from cogenesis.core.errors import ProtocolError
from cogenesis.core.protocol import (
    PROTOCOL_VERSION,
    OpenSession,
    StepBatch,
    StepRequest,
    decode_request,
    encode,
    pack_ids,
)

# ---- the bus ---------------------------------------------------------------------------------------------


def _streams(f: Fuzzer) -> list[str]:
    return ["cg:open"] + [f"cg:in:{r}" for r in f.t.replicas]


def _entry(f: Fuzzer, n: int, kind: str, payload: bytes, stream: str | None = None, **kw: Any) -> BusCase:
    return BusCase(n, kind, stream=stream or f.rng.choice(_streams(f)), fields=((FIELD, payload),), **kw)


def _bus_garbage(f: Fuzzer, n: int) -> BusCase:
    size = f.rng.choice([0, 1, 64, 4096])
    return _entry(f, n, "bus.garbage", b"\xc1" + f.rng.randbytes(size), note=f"{size + 1} bytes")


def _bus_no_field(f: Fuzzer, n: int) -> BusCase:
    fields = f.rng.choice([((b"x", encode(f.open())),), ((b"m2", b"1"), (b"other", b"2"))])
    return BusCase(n, "bus.other_field", stream=f.rng.choice(_streams(f)), fields=fields, note="no field m")


def _bus_not_a_message(f: Fuzzer, n: int) -> BusCase:
    value = f.rng.choice([42, [1, 2], {"type": "nope"}, {"type": "reply", "v": PROTOCOL_VERSION}, "x", None])
    return _entry(f, n, "bus.not_a_message", msgspec.msgpack.encode(value), note=type(value).__name__)


def _bus_wrong_type(f: Fuzzer, n: int) -> BusCase:
    msg = f.open(reply_to=f.t.reply_to, top_k=0)
    data, note = f.mutated_dict(msg)
    try:  # still an open to the fuzzer's list (an extra key; a value that fits): answered there
        got = decode_request(data)
        owed = (
            ((f.t.reply_to, got.session_id),) if isinstance(got, OpenSession) and got.reply_to == f.t.reply_to else ()
        )
    except ProtocolError:
        owed = ()
    return _entry(f, n, "bus.wrong_type", data, "cg:open", expect=owed, close_after=(msg.session_id,), note=note)


def _bus_version(f: Fuzzer, n: int) -> BusCase:
    v = f.rng.choice([0, 2, PROTOCOL_VERSION + 1, 99])
    return _entry(f, n, "bus.version", encode(f.open(v=v, reply_to=f.t.reply_to)), "cg:open", note=f"v{v}")


def _bus_bad_open(f: Fuzzer, n: int) -> BusCase:
    msg, note = f.bad_open(reply_to=f.t.reply_to)
    return _entry(
        f,
        n,
        "bus.bad_open",
        encode(msg),
        "cg:open",
        expect=((f.t.reply_to, msg.session_id),),
        must_refuse=True,
        note=note,
    )


def _bus_bad_reply_to(f: Fuzzer, n: int) -> BusCase:
    reply_to = f.rng.choice(["bad list", "x" * 81, "cg:reply:x", "../a", "caf\u00e9", "a*b", "\x00"])
    return _entry(
        f,
        n,
        "bus.bad_reply_to",
        encode(f.open(reply_to=reply_to, top_k=0)),
        "cg:open",
        note=f"reply_to of {len(reply_to)} chars",
    )


def _bus_unknown(f: Fuzzer, n: int) -> BusCase:
    sid = f.sid("u")
    msg = StepRequest(
        session_id=sid, step=f.rng.randint(1, 9), tokens=pack_ids([3]), budget_ms=10_000, reply_to=f.t.reply_to
    )
    stream = f"cg:in:{f.rng.choice(f.t.replicas)}" if f.t.replicas else "cg:open"
    return _entry(f, n, "bus.unknown_session", encode(msg), stream, expect=((f.t.reply_to, sid),), note="step")


def _bus_cross(f: Fuzzer, n: int) -> BusCase:
    """A step of a session bound to another reply list: the bus victim from the stranger's list, or a legitimate
    (gateway) session from ours. Refused forbidden, answered only to the stranger; a StepReply is a breach."""
    t = f.t
    if t.legit_sessions and f.rng.random() < 0.5:
        sid, reply_to, who = f.rng.choice(t.legit_sessions), t.reply_to, "legit"
    else:
        sid, reply_to, who = t.bus_victim, t.stranger, "bus victim"
    step = f.rng.choice([1, 2, f.rng.randint(1, 60)])
    msg = StepRequest(session_id=sid, step=step, tokens=pack_ids([5]), budget_ms=10_000, reply_to=reply_to)
    streams = [f"cg:in:{r}" for r in t.replicas] or ["cg:open"]
    stream = f"cg:in:{t.bus_victim_replica}" if who == "bus victim" and t.bus_victim_replica else f.rng.choice(streams)
    return _entry(
        f,
        n,
        "bus.cross_session",
        encode(msg),
        stream,
        expect=((reply_to, sid),),
        must_refuse=True,
        note=f"step {step} of a {who} session",
    )


def _bus_victim(f: Fuzzer, n: int) -> BusCase:
    t, lim = f.t, f.t.limits
    choice = f.rng.randrange(5)
    must = True
    base: dict[str, Any] = dict(
        session_id=t.bus_victim, step=1, tokens=pack_ids([t.bus_victim_token]), budget_ms=10_000, reply_to=t.reply_to
    )
    if choice == 0:
        over: dict[str, Any] = {}
        note, must = "replay", False
    elif choice == 1:
        over, note = {"step": f.rng.randint(3, 500)}, "gap"
    elif choice == 2:
        over, note = {"step": 2, "tokens": pack_ids([7] * (lim.max_step_tokens + 1))}, "too many tokens"
    elif choice == 3:
        over, note = {"step": 2, "tokens": pack_ids([t.vocab + 3])}, "id out of the vocabulary"
    else:
        over, note = {"step": 2, "budget_ms": lim.max_budget_ms + 1}, "budget past the limit"
    msg = StepRequest(**{**base, **over})
    stream = f"cg:in:{t.bus_victim_replica}" if t.bus_victim_replica else "cg:open"
    return _entry(
        f, n, "bus.victim_step", encode(msg), stream, expect=((t.reply_to, t.bus_victim),), must_refuse=must, note=note
    )


def _bus_batch(f: Fuzzer, n: int) -> BusCase:
    t = f.t
    items: list[bytes] = [GARBAGE]
    expect: list[tuple[str, str]] = []
    for _ in range(f.rng.randint(1, 6)):
        sid = f.sid("bu")
        items.append(
            encode(StepRequest(session_id=sid, step=1, tokens=pack_ids([1]), budget_ms=10_000, reply_to=t.reply_to))
        )
        expect.append((t.reply_to, sid))
    stream = f"cg:in:{f.rng.choice(t.replicas)}" if t.replicas else "cg:open"
    return _entry(
        f,
        n,
        "bus.batch",
        encode(StepBatch(items=items)),
        stream,
        expect=tuple(expect),
        note=f"{len(items)} items, one garbage",
    )


def _bus_oversize(f: Fuzzer, n: int) -> BusCase:
    size = f.t.limits.max_message_bytes + f.rng.randint(1, 4096)
    msg = f.open(reply_to=f.t.reply_to, instruction="x" * size)
    return _entry(f, n, "bus.oversize_entry", encode(msg), "cg:open", must_refuse=True, note=f"{size}+ bytes")


def _bus_forged_reply_to(f: Fuzzer, n: int) -> BusCase:
    """A valid open whose replies go to a legitimate gateway connection's list: that connection must drop them
    (the legitimate outputs stay identical). Closed afterwards."""
    lists = f.t.legit_reply_to
    target = f.rng.choice(lists) if lists else f"gw-fz-{f.t.nonce}"
    msg = f.open(reply_to=target)
    return _entry(
        f,
        n,
        "bus.forged_reply_to",
        encode(msg),
        "cg:open",
        close_after=(msg.session_id,),
        note="open answered to a gateway list",
    )


ACL_COMMANDS: dict[str, list[tuple[str, ...]]] = {
    # refused for both roles (neither is granted them), harmless if a broken ACL let one through
    "both": [
        ("CONFIG", "GET", "maxmemory"),
        ("KEYS", "cg:*"),
        ("ACL", "LIST"),
        ("CLIENT", "LIST"),
        ("DEBUG", "SLEEP", "0"),
        ("EVAL", "return 1", "0"),
        ("XINFO", "STREAM", "cg:open"),
        ("XPENDING", "cg:open", "cloud"),
        ("SET", "fz:acl:probe", "1"),
        ("XADD", "fz:acl:stream", "*", "m", "x"),
        ("SLOWLOG", "GET"),
        ("INFO", "server"),
        ("GET", "fz:acl:probe"),
    ],
    "edge": [("GET", "cg:owner:0"), ("SET", "cg:owner:0", "x")],
    "gateway": [
        ("SCAN", "0"),
        ("LPUSH", "cg:reply:fz-acl", "x"),
        ("LPUSH", "cg:fleet:fz", "x"),
        ("GET", "cg:fleet:fz"),
    ],
}


def _bus_acl(f: Fuzzer, n: int) -> BusCase:
    role: Literal["edge", "gateway", "none", "wrongpass"] = f.rng.choice(
        ["edge", "gateway", "edge", "gateway", "none", "wrongpass"]
    )
    if role in ("none", "wrongpass"):
        command: tuple[str, ...] = f.rng.choice([("PING",), ("GET", "cg:open"), ("XADD", "cg:open", "*", "m", "x")])
    else:
        command = f.rng.choice(ACL_COMMANDS["both"] + ACL_COMMANDS[role])
    return BusCase(
        n, "bus.acl", role=role, op="command", command=command, must_refuse=True, note=f"{role}: {command[0]}"
    )


BUS_KINDS: tuple[tuple[str, float, Builder], ...] = (
    ("bus.garbage", 10, _bus_garbage),
    ("bus.other_field", 4, _bus_no_field),
    ("bus.not_a_message", 5, _bus_not_a_message),
    ("bus.wrong_type", 8, _bus_wrong_type),
    ("bus.version", 3, _bus_version),
    ("bus.bad_open", 12, _bus_bad_open),
    ("bus.bad_reply_to", 4, _bus_bad_reply_to),
    ("bus.unknown_session", 8, _bus_unknown),
    ("bus.cross_session", 14, _bus_cross),
    ("bus.victim_step", 10, _bus_victim),
    ("bus.batch", 5, _bus_batch),
    ("bus.oversize_entry", 0.5, _bus_oversize),
    ("bus.forged_reply_to", 0.3, _bus_forged_reply_to),
    ("bus.acl", 16, _bus_acl),
)
