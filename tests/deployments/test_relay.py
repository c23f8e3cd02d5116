"""The gateway's relay without a socket: a ``Connection`` whose frames go to a list, over a real Redis (and one
that is not there). The WebSocket end to end is in test_gateway.py."""

import asyncio

import pytest

from cogenesis.cluster.bus import FIELD, OPEN_STREAM, alive_key, in_stream, reply_key
from cogenesis.cluster.redis_server import free_port
from cogenesis.core.config import GatewayConfig, LimitsConfig
from cogenesis.core.errors import Busy
from cogenesis.core.protocol import (
    CloseSession,
    ErrorReply,
    OpenSession,
    ReplyBatch,
    StepReply,
    StepRequest,
    decode_replies,
    decode_request,
    encode,
    pack_ids,
    pack_logprobs,
)
from cogenesis.deployments.relay import OWNER_TTL_S, GatewayRelay, connect_async, owner_key

TIMEOUT_S = 20.0


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def relay_for(url: str, **gateway) -> GatewayRelay:
    return GatewayRelay(connect_async(url), LimitsConfig(), GatewayConfig(**gateway), gateway_id="g1")


def reply(sid: str, step: int, replica: str = "r1") -> StepReply:
    return StepReply(session_id=sid, step=step, replica=replica, ids=pack_ids([1]), logprobs=pack_logprobs([0.0]))


def opening(sid: str) -> bytes:
    return encode(OpenSession(session_id=sid, instruction="a b", top_k=1, budget_ms=1000, reply_to="mine"))


def test_an_open_is_rewritten_to_the_connections_list_and_bound_by_hashes(redis_url):
    async def go():
        relay = relay_for(redis_url)
        frames: list[bytes] = []

        async def send(frame: bytes) -> None:
            frames.append(frame)

        conn = relay.connect("phone-1", send)
        await conn.handle(opening("s1"))
        ((_, entry),) = await relay.r.xrange(OPEN_STREAM)
        sent = decode_request(entry[FIELD])
        owner = await relay.r.get(owner_key("s1"))
        ttl = await relay.r.ttl(owner_key("s1"))
        keys = [k async for k in relay.r.scan_iter(match="cg:*")]
        # the replica answers, and a stranger's session reply lands on the list too: only ours goes out
        batch = ReplyBatch(items=[reply("s1", 0), reply("not-mine", 0)])
        await relay.r.lpush(reply_key(conn.reply_to), encode(batch))
        await asyncio.wait_for(conn._pump_once(), TIMEOUT_S)
        routed = conn.sessions["s1"].replica
        await conn.handle(encode(StepRequest(session_id="s1", step=1, tokens=pack_ids([4]), budget_ms=1000)))
        ((_, step_entry),) = await relay.r.xrange(in_stream("r1"))
        await conn.close()
        gone = await relay.r.exists(owner_key("s1"), reply_key(conn.reply_to))
        await relay.aclose()
        return sent, owner, ttl, keys, frames, routed, decode_request(step_entry[FIELD]), gone

    sent, owner, ttl, keys, frames, routed, step, gone = run(go())
    assert isinstance(sent, OpenSession) and sent.reply_to.startswith("gw-g1-") and sent.reply_to != "mine"
    assert owner is not None and b"phone-1" not in owner and 0 < ttl <= OWNER_TTL_S
    assert not [k for k in keys if b"s1" in k or b"phone-1" in k]
    assert [[r.session_id for r in decode_replies(f)] for f in frames] == [["s1"]]
    assert routed == "r1" and isinstance(step, StepRequest) and step.reply_to == sent.reply_to
    assert gone == 0


def test_a_redis_that_is_not_there_answers_unavailable(redis_url):
    async def go():
        relay = relay_for(f"redis://127.0.0.1:{free_port()}/0")
        frames: list[bytes] = []

        async def send(frame: bytes) -> None:
            frames.append(frame)

        conn = relay.connect("phone-1", send)
        await conn.handle(opening("s1"))
        await conn.close()
        await relay.aclose()
        return frames

    (frame,) = run(go())
    (answer,) = decode_replies(frame)
    assert isinstance(answer, ErrorReply) and answer.code == "unavailable" and answer.retry_after_ms > 0


def test_a_dead_replicas_in_flight_sessions_are_answered_replica_lost(redis_url):
    async def go():
        relay = relay_for(redis_url)
        frames: list[bytes] = []

        async def send(frame: bytes) -> None:
            frames.append(frame)

        conn = relay.connect("phone-1", send)
        await relay.r.set(alive_key("r1"), b"{}")
        await conn.handle(opening("a"))
        await relay.r.lpush(reply_key(conn.reply_to), encode(reply("a", 0)))
        await conn._pump_once()
        await conn.handle(encode(StepRequest(session_id="a", step=1, tokens=pack_ids([4]), budget_ms=1000)))
        await conn._check_replicas()  # r1 beats: nothing
        await relay.r.delete(alive_key("r1"))
        await conn._check_replicas()
        # a late reply of the dead replica to the resumed open is not taken as its answer
        await conn.handle(opening("a"))
        await relay.r.lpush(reply_key(conn.reply_to), encode(reply("a", 0, "r1")))
        await conn._pump_once()
        await conn.handle(encode(CloseSession(session_id="a")))
        await conn.close()
        await relay.aclose()
        return frames

    frames = run(go())
    answers = [r for f in frames for r in decode_replies(f)]
    assert [(type(a).__name__, a.step) for a in answers] == [("StepReply", 0), ("ErrorReply", 1)]
    assert answers[1].code == "replica_lost"


def test_a_full_replica_refuses_connections(redis_url):
    async def go():
        relay = relay_for(redis_url, max_connections=1)

        async def send(frame: bytes) -> None:
            pass

        relay.connect("a", send)
        with pytest.raises(Busy):
            relay.connect("b", send)
        await relay.aclose()

    run(go())
