"""The one StepReply builder, shared by the bus step loop and the HTTP stateless baseline."""

import numpy as np

from cogenesis.core.protocol import StepReply, decode_reply, encode, pack_ids, pack_logprobs
from cogenesis.deployments.engine import TopK
from cogenesis.deployments.replies import TraceFields, step_reply

TRACE = TraceFields(server_us=30, model_us=20, queue_us=7)


def test_a_reply_carries_every_position_and_the_draft():
    top = TopK(
        np.array([[4, 2], [9, 1]], np.int32),
        np.array([[-0.5, -1.0], [-0.25, -2.0]], np.float32),
        np.array([4]),
        12,
        3.14159,
    )
    reply = decode_reply(encode(step_reply("s", 3, "r1", top, TRACE)))
    assert isinstance(reply, StepReply)
    ids, logprobs = reply.top_k()
    assert ids.tolist() == [[4, 2], [9, 1]] and logprobs.tolist() == [[-0.5, -1.0], [-0.25, -2.0]]
    assert reply.drafts().tolist() == [4] and (reply.prompt_tokens, reply.compute_ms) == (12, 3.142)
    assert (reply.server_us, reply.model_us, reply.queue_us) == (30, 20, 7)


def test_a_stateless_reply_has_the_bytes_the_server_built_before():
    """No draft: the same bytes as the StepReply /v1/stateless used to build field by field."""
    top = TopK(
        np.array([[5, 6, 7]], np.int32), np.array([[-0.1, -1.5, -3.0]], np.float32), np.zeros(0, np.int32), 9, 2.5
    )
    before = StepReply(
        session_id="x",
        step=9,
        replica="r",
        ids=pack_ids(top.ids.ravel()),
        logprobs=pack_logprobs(top.logprobs.ravel()),
        prompt_tokens=top.context_len,
        compute_ms=round(top.compute_ms, 3),
        **TRACE,
    )
    assert encode(step_reply("x", 9, "r", top, TRACE)) == encode(before)
