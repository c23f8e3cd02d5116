"""The in-process engine link (``cogenesis eval``): the session loop's items reach a CloudEngine directly, sealed
by the client's gate, and come back as typed arrivals. (Its greedy text equals the in-process reference on real
tiny models: tests/edge_sim/test_logits.py::test_in_process_engine_link_equals_the_bus.)"""

import numpy as np
import pytest

from cogenesis.apps.engine_link import EngineLink
from cogenesis.core.config import EdgeConfig
from cogenesis.core.errors import PrivacyViolation, SessionError
from cogenesis.deployments.engine import OpenArgs, StepArgs, TopK
from cogenesis.edge_sim.gate import OutboundGate
from cogenesis.edge_sim.links import Arrival, Closing, Failure, Opening, Step

PUBLIC = "Write a birthday message for my colleague"
GATE = OutboundGate(PUBLIC, ["my colleague Dana Whitfield lives at 42 Willow Lane in Portland"])
CFG = EdgeConfig(top_k=2, lookahead=1)


def _top(first: int) -> TopK:
    return TopK(
        ids=np.array([[first, 3], [5, 6]], np.int32),
        logprobs=np.array([[-0.5, -1.0], [-0.2, -2.0]], np.float32),
        draft=np.array([first], np.int32),
        context_len=12,
        compute_ms=1.5,
    )


class _Engine:
    """Records what the link asked; refuses sessions named in ``refuse``."""

    def __init__(self, refuse=()):
        self.refuse = set(refuse)
        self.calls: list = []
        self.closed: list[str] = []

    def _answer(self, requests):
        self.calls.append(list(requests))
        return [
            SessionError(f"no room for {r.session_id}") if r.session_id in self.refuse else _top(9) for r in requests
        ]

    open_many = step_many = _answer

    def close(self, session_id):
        self.closed.append(session_id)
        return True


def test_opens_and_steps_come_back_as_untimed_arrivals():
    engine = _Engine()
    link = EngineLink(engine)
    link.open([Opening("a", 0, PUBLIC, GATE), Opening("b", 3, PUBLIC, GATE)], CFG)
    assert engine.calls[-1] == [OpenArgs("a", PUBLIC, 2, 1), OpenArgs("b", PUBLIC, 2, 1)]
    assert link.opened == {"a": 0, "b": 3}  # attributes the engine's audit log to clients
    arrivals = link.collect(["b", "a"], CFG)
    assert [a.session_id for a in arrivals] == ["b", "a"]
    for a in arrivals:
        assert isinstance(a, Arrival) and a.received_us is None  # nothing travelled: no round trip to trace
        ids, lps = a.reply.top_k()
        assert a.reply.step == 0 and a.reply.replica == "in-process" and a.reply.prompt_tokens == 12
        assert ids.tolist() == [[9, 3], [5, 6]] and a.reply.drafts().tolist() == [9]
    link.request([Step("a", 1, (9, 5), (9, 5), "in-process", GATE)], CFG)
    assert engine.calls[-1] == [StepArgs("a", 1, (9, 5))]
    (step,) = link.collect(["a"], CFG)
    assert step.reply.step == 1
    link.request([], CFG)  # nothing to ask: the engine is not called
    assert len(engine.calls) == 2


def test_engine_errors_become_failures():
    link = EngineLink(_Engine(refuse={"b"}))
    link.open([Opening("a", 0, PUBLIC, GATE), Opening("b", 1, PUBLIC, GATE)], CFG)
    arrivals = {a.session_id: a.reply for a in link.collect(["a", "b"], CFG)}
    assert arrivals["b"] == Failure("no room for b", "cloud_error") and not isinstance(arrivals["a"], Failure)


def test_the_gate_refuses_before_the_engine_sees_anything():
    engine = _Engine()
    link = EngineLink(engine)
    with pytest.raises(PrivacyViolation):
        link.open([Opening("a", 0, "Dana Whitfield lives at 42 Willow Lane", GATE)], CFG)
    assert engine.calls == []


def test_close_frees_every_session_and_drops_unread_replies():
    engine = _Engine()
    link = EngineLink(engine)
    link.open([Opening("a", 0, PUBLIC, GATE)], CFG)
    link.close([Closing("a", "in-process", GATE), Closing("never-answered", "", GATE)])
    assert engine.closed == ["a", "never-answered"] and not link._pending
