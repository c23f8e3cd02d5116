"""The WebSocket cases of ``cogenesis fuzz`` (``cogenesis.apps.fuzz_cases``): frames at the gateway's ``/v1/ws``
from device A (which holds a victim session), device B (who tries to take it), and fresh connections with a
credential of their own."""

from __future__ import annotations

from typing import Any

import msgspec

from cogenesis.apps.fuzz_cases import (
    BAD_CREDS,
    GARBAGE,
    Builder,
    Cred,
    Fuzzer,
    WsCase,
    _cut,
    owed_by,
)
from cogenesis.core.protocol import (
    PROTOCOL_VERSION,
    CloseSession,
    OpenSession,
    StepBatch,
    StepRequest,
    encode,
    pack_ids,
)


def _ws_garbage(f: Fuzzer, n: int) -> WsCase:
    size = f.rng.choice([0, 1, 7, 64, 1000, 60_000])
    data = (b"\xc1" + f.rng.randbytes(size - 1)) if size else b""
    return WsCase(n, "ws.garbage", frames=(("binary", data),), expect=("",), note=f"{size} random bytes")


def _ws_truncated(f: Fuzzer, n: int) -> WsCase:
    msg = f.rng.choice([f.open(), f.victim_step(), StepBatch(items=[encode(f.open()), encode(f.victim_step())])])
    data = encode(msg)
    cut = _cut(data, f.rng)
    return WsCase(n, "ws.truncated", frames=(("binary", cut),), expect=("",), note=f"{len(cut)}/{len(data)} bytes")


def _ws_not_a_message(f: Fuzzer, n: int) -> WsCase:
    value = f.rng.choice(
        [
            42,
            [1, 2, 3],
            {"type": "nope", "v": PROTOCOL_VERSION},
            {
                "type": "reply",
                "v": PROTOCOL_VERSION,
                "session_id": "x",
                "step": 0,
                "replica": "r",
                "ids": b"",
                "logprobs": b"",
            },
            {"type": "stateless", "v": PROTOCOL_VERSION, "session_id": "x", "tokens": b"", "top_k": 5, "budget_ms": 1},
            {"v": PROTOCOL_VERSION, "session_id": "x"},
            "open",
            None,
        ]
    )
    data = msgspec.msgpack.encode(value)
    return WsCase(n, "ws.not_a_message", frames=(("binary", data),), expect=("",), note=type(value).__name__)


def _ws_wrong_type(f: Fuzzer, n: int) -> WsCase:
    msg = f.rng.choice([f.open(top_k=0), f.victim_step(step=0), CloseSession(session_id=f.sid("c"))])
    data, note = f.mutated_dict(msg)
    # a mutation may still decode (an extra key; a value that fits): then the item is answered by its session (a
    # close: not at all); a fitting value may make the open valid, so it is closed afterwards
    owed = owed_by(data)
    owed = ("",) if owed is None else owed
    return WsCase(
        n,
        "ws.wrong_type",
        frames=(("binary", data),),
        expect=owed,
        close_after=(msg.session_id,) if isinstance(msg, OpenSession) else (),
        note=f"{type(msg).__name__}: {note}",
    )


def _ws_version(f: Fuzzer, n: int) -> WsCase:
    v = f.rng.choice([0, 1, 2, PROTOCOL_VERSION + 1, 99, -1])
    msg = f.open(v=v) if f.rng.random() < 0.5 else f.victim_step(v=v)
    return WsCase(n, "ws.version", frames=(("binary", encode(msg)),), expect=("",), note=f"v{v}")


def _ws_oversize(f: Fuzzer, n: int) -> WsCase:
    extra = f.rng.randint(1, 65_536)
    msg = f.open(instruction="x" * (f.t.limits.max_message_bytes + extra))
    return WsCase(
        n,
        "ws.oversize_frame",
        frames=(("binary", encode(msg)),),
        expect=("",),
        must_refuse=True,
        note=f"{f.t.limits.max_message_bytes + extra}+ bytes",
    )


def _ws_enormous(f: Fuzzer, n: int) -> WsCase:
    size = 4 * f.t.limits.max_message_bytes + f.rng.randint(1, 1024)
    return WsCase(
        n,
        "ws.enormous_frame",
        conn="fresh",
        frames=(("binary", b"\xc1" * size),),
        expect=("",),
        must_refuse=True,
        note=f"{size} bytes",
    )


def _ws_bad_open(f: Fuzzer, n: int) -> WsCase:
    msg, note = f.bad_open()
    return WsCase(
        n, "ws.bad_open", frames=(("binary", encode(msg)),), expect=(msg.session_id,), must_refuse=True, note=note
    )


def _ws_bad_session_id(f: Fuzzer, n: int) -> WsCase:
    sid = f.rng.choice(["", "a b", "x" * 129, "caf\u00e9", "\x00", "fz\nnl", "../../cg:open"])
    msg = f.rng.choice(
        [f.open(sid, top_k=0), StepRequest(session_id=sid, step=1, tokens=pack_ids([1]), budget_ms=1000)]
    )
    return WsCase(
        n,
        "ws.bad_session_id",
        frames=(("binary", encode(msg)),),
        expect=(sid,),
        must_refuse=True,
        note=f"session id of {len(sid)} chars",
    )


def _ws_victim(f: Fuzzer, n: int) -> WsCase:
    """Device A's own session, stepped wrongly: a replay (served from the replica's last reply), a gap, step 0 or
    negative, tokens that are not int32, too many tokens, ids out of the vocabulary (as the next step: the replica
    must refuse them without advancing), a budget past the limit."""
    lim, t = f.t.limits, f.t
    choice = f.rng.randrange(8)
    must = True
    if choice == 0:
        msg, note, must = f.victim_step(), "replay of the last step", False
    elif choice == 1:
        gap = f.rng.randint(2, 1000)
        msg, note = f.victim_step(step=t.victim_step + gap), f"gap of {gap}"
    elif choice == 2:
        msg, note = f.victim_step(step=f.rng.choice([0, -1, -(2**31)])), "step < 1"
    elif choice == 3:
        msg, note = f.victim_step(tokens=b"\x01\x00\x00\x00\x02"), "tokens of 5 bytes"
    elif choice == 4:
        k = lim.max_step_tokens + f.rng.randint(1, 100)
        msg, note = f.victim_step(step=t.victim_step + 1, tokens=pack_ids([7] * k)), f"{k} tokens"
    elif choice == 5:
        bad = f.rng.choice([t.vocab, t.vocab + 1000, -1, 2**31 - 1])
        msg, note = f.victim_step(step=t.victim_step + 1, tokens=pack_ids([bad])), "id out of the vocabulary"
    elif choice == 6:
        msg, note = f.victim_step(budget_ms=lim.max_budget_ms + 1), "budget past the limit"
    else:
        msg, note, must = f.victim_step(tokens=b""), "replay without tokens", False
    return WsCase(
        n, "ws.victim_step", frames=(("binary", encode(msg)),), expect=(t.victim,), must_refuse=must, note=note
    )


def _ws_cross_device(f: Fuzzer, n: int) -> WsCase:
    """Device B steps, closes, resumes or re-opens device A's session (steps and closes also of a legitimate
    device's session): forbidden. Re-opens aim only at A's session, which lives the whole run: a legitimate
    session that has ended frees its id, and B may then open a session of its own under it."""
    victim = f.t.victim
    choice = f.rng.randrange(5)
    if choice == 0:
        target = f.legit_or(victim)
        msg: Any = StepRequest(session_id=target, step=f.rng.randint(1, 40), tokens=pack_ids([5]), budget_ms=10_000)
        note = "step"
    elif choice == 1:
        target, note = victim, "resume"
        msg = f.open(target, resume=pack_ids([5, 6, 7]), resume_step=f.rng.randint(1, 40))
    elif choice == 2:
        target, msg, note = victim, f.open(victim), "re-open"
    elif choice == 3:
        # a close owes no answer when the session is gone; a live one's is refused forbidden (counted if it comes)
        target = f.legit_or(victim)
        msg, note = CloseSession(session_id=target), "close"
        who = "legit" if target != victim else "victim"
        return WsCase(
            n,
            "ws.cross_device",
            conn="B",
            cred="other",
            frames=(("binary", encode(msg)),),
            must_refuse=True,
            note=f"close of a {who} session",
        )
    else:
        frames = f.t.victim_frames
        data = f.rng.choice(frames) if frames else encode(f.victim_step())
        return WsCase(
            n,
            "ws.cross_device",
            conn="B",
            cred="other",
            frames=(("binary", data),),
            expect=(victim,),
            must_refuse=True,
            note="replay of A's frame",
        )
    who = "legit" if target != victim else "victim"
    return WsCase(
        n,
        "ws.cross_device",
        conn="B",
        cred="other",
        frames=(("binary", encode(msg)),),
        expect=(target,),
        must_refuse=True,
        note=f"{note} of a {who} session",
    )


def _ws_replay(f: Fuzzer, n: int) -> WsCase:
    """A replays its own frames, as sent (the step is answered from the replica's last reply)."""
    frames = f.t.victim_frames[1:] or [encode(f.victim_step())]
    return WsCase(
        n, "ws.replay", frames=(("binary", f.rng.choice(frames)),), expect=(f.t.victim,), note="A's step 1 again"
    )


def _ws_batch(f: Fuzzer, n: int) -> WsCase:
    """A StepBatch of a few items, each answered on its own: garbage, bad opens, wrong steps of A's session."""
    items: list[bytes] = []
    expect: list[str] = []
    for _ in range(f.rng.randint(1, 8)):
        kind = f.rng.randrange(5)
        if kind == 0:
            items.append(GARBAGE)
            expect.append("")
        elif kind == 1:
            msg, _ = f.bad_open()
            items.append(encode(msg))
            expect.append(msg.session_id)
        elif kind == 2:
            items.append(encode(f.victim_step(step=f.t.victim_step + f.rng.randint(2, 50))))
            expect.append(f.t.victim)
        elif kind == 3:
            items.append(encode(StepBatch(items=[GARBAGE])))
            expect.append("")
        else:
            items.append(encode(CloseSession(session_id=f.sid("c"))))  # nothing held: no answer
    return WsCase(
        n,
        "ws.batch",
        frames=(("binary", encode(StepBatch(items=items))),),
        expect=tuple(expect),
        note=f"{len(items)} items",
    )


def _ws_big_batch(f: Fuzzer, n: int) -> WsCase:
    k = f.t.limits.max_batch_items + f.rng.randint(1, 100)
    data = encode(StepBatch(items=[b"\xc1"] * k))
    return WsCase(
        n,
        "ws.batch_too_many",
        conn="fresh",
        frames=(("binary", data),),
        expect=("",),
        must_refuse=True,
        note=f"{k} items",
    )


def _ws_burst(f: Fuzzer, n: int) -> WsCase:
    """More items at once than a device's burst: the excess is refused rate_limited (a device of its own, so the
    other cases' device keeps its rate)."""
    k = f.rng.randint(1050, 1200)
    msgs = [f.open(f.sid("r"), top_k=0) for _ in range(k)]
    data = encode(StepBatch(items=[encode(m) for m in msgs]))
    return WsCase(
        n,
        "ws.rate_burst",
        conn="fresh",
        cred="burst",
        frames=(("binary", data),),
        expect=tuple(m.session_id for m in msgs),
        must_refuse=True,
        note=f"{k} items",
    )


def _ws_text(f: Fuzzer, n: int) -> WsCase:
    text = f.rng.choice(["hello", '{"type": "open"}', "\u2603" * 100, ""])
    return WsCase(n, "ws.text_frame", frames=(("text", text.encode()),), expect=("",), note=f"{len(text)} chars")


def _ws_bad_utf8(f: Fuzzer, n: int) -> WsCase:
    return WsCase(n, "ws.bad_utf8_text", conn="fresh", frames=(("bad_utf8", b"\xff\xfe\xc0"),), note="3 bytes")


def _ws_raw(f: Fuzzer, n: int) -> WsCase:
    data = f.rng.randbytes(f.rng.choice([1, 16, 512]))
    return WsCase(n, "ws.raw_bytes", conn="fresh", frames=(("raw", data),), note=f"{len(data)} bytes, no framing")


def _ws_auth(f: Fuzzer, n: int) -> WsCase:
    cred: Cred = f.rng.choice(BAD_CREDS)
    return WsCase(n, "ws.auth", conn="fresh", cred=cred, frames=(("binary", GARBAGE),), must_refuse=True, note=cred)


def _ws_roles(f: Fuzzer, n: int) -> WsCase:
    cred: Cred = f.rng.choice(["worker", "admin"])
    return WsCase(n, "ws.role", conn="fresh", cred=cred, frames=(("binary", GARBAGE),), expect=("",), note=cred)


def _ws_valid_open(f: Fuzzer, n: int) -> WsCase:
    """A valid open naming someone else's reply list: the gateway sets its own, so the answer comes back here."""
    forged = f.rng.choice([f"gw-x-{f.t.nonce}", "cg:reply:x", "x" * 200, *f.t.legit_reply_to[:3]])
    msg = f.open(reply_to=forged)
    return WsCase(
        n,
        "ws.forged_reply_to",
        frames=(("binary", encode(msg)),),
        expect=(msg.session_id,),
        close_after=(msg.session_id,),
        note=f"reply_to of {len(forged)} chars",
    )


WS_KINDS: tuple[tuple[str, float, Builder], ...] = (
    ("ws.garbage", 10, _ws_garbage),
    ("ws.truncated", 8, _ws_truncated),
    ("ws.not_a_message", 6, _ws_not_a_message),
    ("ws.wrong_type", 10, _ws_wrong_type),
    ("ws.version", 4, _ws_version),
    ("ws.oversize_frame", 1.5, _ws_oversize),
    ("ws.enormous_frame", 0.2, _ws_enormous),
    ("ws.bad_open", 10, _ws_bad_open),
    ("ws.bad_session_id", 4, _ws_bad_session_id),
    ("ws.victim_step", 12, _ws_victim),
    ("ws.cross_device", 12, _ws_cross_device),
    ("ws.replay", 4, _ws_replay),
    ("ws.batch", 6, _ws_batch),
    ("ws.batch_too_many", 0.3, _ws_big_batch),
    ("ws.rate_burst", 0.05, _ws_burst),
    ("ws.text_frame", 3, _ws_text),
    ("ws.bad_utf8_text", 0.5, _ws_bad_utf8),
    ("ws.raw_bytes", 0.5, _ws_raw),
    ("ws.auth", 5, _ws_auth),
    ("ws.role", 1, _ws_roles),
    ("ws.forged_reply_to", 0.3, _ws_valid_open),
)
