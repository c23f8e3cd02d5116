"""The links' typed seam (items in, arrivals out) and the HTTP links on a stand-in transport.

The real servers are exercised by tests/cluster/test_local.py (stateless) and `cogenesis bench exchange
--with-vllm` (README: Benchmarks)."""

import httpx
import msgspec
import numpy as np
import pytest
from transformers import AutoTokenizer

from cogenesis.core import prompts
from cogenesis.core.config import EdgeConfig
from cogenesis.core.errors import BusTimeout, ProtocolError, SessionError
from cogenesis.core.protocol import (
    ErrorReply,
    StatelessRequest,
    StepReply,
    encode,
    pack_ids,
    pack_logprobs,
    unpack_ids,
)
from cogenesis.edge_sim.gate import OutboundGate
from cogenesis.edge_sim.links import Failure, OpenAILink, Opening, StatelessLink, Step

PUBLIC = "Write a birthday message for my colleague"


class _Tok:
    def decode(self, ids):
        return " ".join(map(str, ids))


def _link(handler):
    link = OpenAILink("http://vllm.invalid", "m", _Tok(), max_concurrency=2)
    link.http = httpx.Client(transport=httpx.MockTransport(handler))
    return link


def test_completions_top_logprobs_become_a_step_reply():
    seen = {}

    def handler(request):
        seen.update(__import__("json").loads(request.content))
        return httpx.Response(
            200,
            json={
                "choices": [
                    {"logprobs": {"top_logprobs": [{"token_id:7": -2.0, "token_id:3": -0.5, "token_id:11": -1.0}]}}
                ]
            },
        )

    link = _link(handler)
    try:
        reply, received = link._post_json("s", 4, {"prompt": [1, 2, 3, 4], "logprobs": 3}, 5.0)
    finally:
        link.shutdown()
    ids, lps = reply.top_k()
    assert ids.tolist() == [[3, 11, 7]] and np.allclose(lps, [[-0.5, -1.0, -2.0]])
    assert reply.posted_us == 0 and received > 0  # untraced: round trips only
    assert seen["prompt"] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "status, body, error", [(500, {"error": "boom"}, SessionError), (200, {"choices": []}, ProtocolError)]
)
def test_bad_replies_are_clear_errors(status, body, error):
    link = _link(lambda request: httpx.Response(status, json=body))
    try:
        with pytest.raises(error):
            link._post_json("s", 1, {}, 5.0)
    finally:
        link.shutdown()


def test_failures_say_what_went_wrong():
    assert Failure.of(BusTimeout("no reply for step 3", hint="is the cloud up?")) == Failure("no reply for step 3")
    assert Failure.of(ValueError("bad")) == Failure("ValueError: bad")


def test_stateless_link_takes_items_and_returns_timed_arrivals(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    posted: list[list[int]] = []

    def handler(request):
        req = msgspec.msgpack.decode(request.content, type=StatelessRequest)
        posted.append(unpack_ids(req.tokens).tolist())
        if req.session_id == "bad":
            return httpx.Response(200, content=encode(ErrorReply(session_id="bad", step=0, code="busy", message="x")))
        top = StepReply(
            session_id=req.session_id, step=0, replica="r1", ids=pack_ids([4, 5]), logprobs=pack_logprobs([-0.1, -1])
        )
        return httpx.Response(200, content=encode(top))

    link = StatelessLink("http://cloud.invalid", tok, max_concurrency=2)
    link.http = httpx.Client(transport=httpx.MockTransport(handler))
    gate, cfg = OutboundGate(PUBLIC, []), EdgeConfig(top_k=2)
    try:
        link.open([Opening("s", 0, PUBLIC, gate), Opening("bad", 1, PUBLIC, gate)], cfg)
        opened = {a.session_id: a for a in link.collect(["s", "bad"], cfg)}
        link.request([Step("s", 1, (4,), (4,), "r1", gate)], cfg)
        (stepped,) = link.collect(["s"], cfg)
    finally:
        link.shutdown()
    prompt = prompts.cloud_prompt_ids(tok, PUBLIC)
    assert posted[0] == prompt and posted[-1] == prompt + [4]  # the whole public sequence, every step
    assert opened["bad"].reply == Failure("cloud refused session bad: busy: x")
    for a in (opened["s"], stepped):
        assert isinstance(a.reply, StepReply) and a.reply.top_k()[0].tolist() == [[4, 5]]
        assert a.received_us is not None and 0 < a.sent_us <= a.received_us  # timed: the loop traces it
    assert gate.sealed == 3  # every request was sealed, each with the prompt text it carries
