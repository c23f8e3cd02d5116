"""The OpenAI-compatible (vLLM) link's handling of completions replies, on a stand-in HTTP transport.

The real server is exercised by `cogenesis bench exchange --with-vllm` (README: Benchmarks)."""

import httpx
import numpy as np
import pytest

from cogenesis.core.errors import ProtocolError, SessionError
from cogenesis.edge_sim.links import OpenAILink


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
