"""The cloud engine called in-process (``cogenesis eval``): a ``CloudLink`` without Redis or Serve.

The edge's session loop (``cogenesis.edge_sim.logits``) hands it the same items it hands the bus
link; each message is sealed by the client's outbound gate, as it would be before leaving the
device, and the engine (``cogenesis.deployments.engine``) answers it directly. Replies are computed
at ``open``/``request`` and handed over at ``collect``. This lives with the applications because it
joins the two roles, the edge and the cloud, in one process.
"""

from __future__ import annotations

from collections.abc import Sequence

from cogenesis.core.config import EdgeConfig
from cogenesis.core.errors import SessionError
from cogenesis.core.protocol import now_us
from cogenesis.deployments.engine import CloudEngine, OpenArgs, StepArgs, TopK
from cogenesis.deployments.replies import TraceFields, step_reply
from cogenesis.edge_sim.links import Arrival, Closing, Failure, Opening, Step, open_request, step_request

_UNTRACED = TraceFields(server_us=0, model_us=0, queue_us=0)  # no bus: nothing to trace


class EngineLink:
    """Logits steps answered by a ``CloudEngine`` in this process (untimed: no round trip to trace)."""

    def __init__(self, engine: CloudEngine, replica: str = "in-process") -> None:
        self.engine = engine
        self.replica = replica
        self._pending: dict[str, Arrival] = {}
        self.opened: dict[str, int] = {}  # session id -> client index (to attribute the engine's audit log)

    def open(self, sessions: Sequence[Opening], cfg: EdgeConfig) -> None:
        for o in sessions:  # the gate checks what would leave the device
            self.opened[o.session_id] = o.client
            o.gate.seal(open_request(o, cfg))
        results = self.engine.open_many(
            [OpenArgs(o.session_id, o.instruction, cfg.top_k, cfg.lookahead, o.resume, o.resume_step) for o in sessions]
        )
        self._answer([(o.session_id, o.resume_step) for o in sessions], results)

    def request(self, steps: Sequence[Step], cfg: EdgeConfig) -> None:
        for s in steps:
            s.gate.seal(step_request(s, cfg))
        if steps:
            results = self.engine.step_many([StepArgs(s.session_id, s.step, s.tokens) for s in steps])
            self._answer([(s.session_id, s.step) for s in steps], results)

    def _answer(self, asked: list[tuple[str, int]], results: Sequence[TopK | SessionError]) -> None:
        sent = now_us()
        for (sid, step), result in zip(asked, results):
            reply = (
                Failure.of(result)
                if isinstance(result, Exception)
                else step_reply(sid, step, self.replica, result, _UNTRACED)
            )
            self._pending[sid] = Arrival(sid, reply, sent)

    def collect(self, session_ids: Sequence[str], cfg: EdgeConfig) -> list[Arrival]:
        return [self._pending.pop(sid) for sid in session_ids]

    def close(self, sessions: Sequence[Closing]) -> None:
        for c in sessions:
            self._pending.pop(c.session_id, None)
            self.engine.close(c.session_id)
