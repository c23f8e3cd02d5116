"""The HTTP routes' limits, each refused with a message that names the limit (the routes: test_server)."""

import pytest

from cogenesis.core.config import LimitsConfig
from cogenesis.core.errors import TooLarge
from cogenesis.core.protocol import SketchRequest
from cogenesis.deployments.limits import check_outline, check_stateless

LIMITS = LimitsConfig(max_sketch_tokens=8, max_instruction_chars=64, max_budget_ms=1000, max_session_tokens=64)


def test_an_outline_within_the_limits_passes():
    check_outline(SketchRequest(request_id="a", instruction="x" * 64, max_tokens=8, budget_ms=1000), LIMITS)
    check_outline(SketchRequest(request_id="a", instruction="x", max_tokens=8, budget_ms=None), LIMITS)
    check_stateless(64, LIMITS)


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"max_tokens": 9}, "max_sketch_tokens"),
        ({"instruction": "x" * 65}, "max_instruction_chars"),
        ({"budget_ms": 1001}, "max_budget_ms"),
    ],
)
def test_each_outline_limit_is_too_large_naming_it(fields, names):
    request = SketchRequest(**{"request_id": "a", "instruction": "x", "max_tokens": 8, **fields})
    with pytest.raises(TooLarge) as refused:
        check_outline(request, LIMITS)
    assert names in (refused.value.hint or "")


def test_a_stateless_sequence_past_the_session_limit_is_too_large():
    with pytest.raises(TooLarge, match="65 token ids; at most 64"):
        check_stateless(65, LIMITS)
