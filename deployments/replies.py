"""The replica's StepReply, built in one place for the bus step loop and the HTTP stateless baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

from cogenesis.core.protocol import StepReply, pack_ids, pack_logprobs

if TYPE_CHECKING:
    from cogenesis.deployments.engine import TopK


class TraceFields(TypedDict):
    """A reply's tracing fields: durations on the replica's clock, as the transport that carried the request
    measured them (see ``StepReply``)."""

    server_us: int
    model_us: int
    queue_us: int


def step_reply(session_id: str, step: int, replica: str, top: TopK, trace: TraceFields) -> StepReply:
    return StepReply(
        session_id=session_id,
        step=step,
        replica=replica,
        ids=top.wire[0] if top.wire is not None else pack_ids(top.ids.ravel()),
        logprobs=top.wire[1] if top.wire is not None else pack_logprobs(top.logprobs.ravel()),
        draft=pack_ids(top.draft),
        prompt_tokens=top.context_len,
        compute_ms=round(top.compute_ms, 3),
        **trace,
    )
