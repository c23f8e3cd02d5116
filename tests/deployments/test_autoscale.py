"""The replicas' autoscaling policy (``deployments/autoscale.py``) and the Serve options it is deployed with."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.serve.config import AutoscalingConfig as ServeAutoscaling

from cogenesis.core.config import CloudConfig
from cogenesis.core.errors import ConfigError
from cogenesis.deployments.autoscale import POLICY_PATH, SessionPolicy, desired_replicas
from cogenesis.deployments.server import deployment_options


def load(sessions: dict, outlines: dict | None = None, waited: dict | None = None) -> dict:
    return {"sessions": sessions, "outlines": outlines or {}, "open_wait_s": waited or {}}


@pytest.mark.parametrize(
    ("sessions", "outlines", "current", "want"),
    [
        ({}, {}, 1, 1),  # nobody reported yet: at least one replica
        ({"a": 0.0}, {}, 3, 1),  # idle: down to one (Serve's min and delay decide when)
        ({"a": 4.0}, {}, 1, 1),  # exactly the target
        ({"a": 4.0, "b": 0.5}, {}, 2, 2),  # just over: one more
        ({"a": 9.0}, {"a": 3.0}, 1, 3),  # outlines count like sessions
        ({"a": 40.0, "b": 40.0}, {}, 2, 20),  # far over: Serve's max_replicas bounds it
    ],
)
def test_replicas_hold_every_session_at_the_target(sessions, outlines, current, want):
    assert desired_replicas(load(sessions, outlines), current, target_sessions=4, max_open_wait_s=2) == want


def test_opens_waiting_too_long_ask_for_one_more_replica_whatever_the_sessions():
    waited = load({"a": 1.0}, waited={"a": 2.5, "b": 0.1})
    assert desired_replicas(waited, current=2, target_sessions=4, max_open_wait_s=2) == 3
    on_time = load({"a": 1.0}, waited={"a": 1.9})
    assert desired_replicas(on_time, current=2, target_sessions=4, max_open_wait_s=2) == 1


def test_the_policy_object_reads_serves_context_and_keeps_no_state():
    policy = SessionPolicy(target_sessions=2, max_open_wait_s=5)
    ctx = SimpleNamespace(aggregated_metrics=load({"r1": 3.0, "r2": 2.0}), current_num_replicas=2)
    assert policy(ctx) == (3, {})
    assert policy(SimpleNamespace(aggregated_metrics=None, current_num_replicas=1)) == (1, {})
    with pytest.raises(ValueError, match="must be > 0"):
        SessionPolicy(target_sessions=0)


def test_fixed_replicas_are_deployed_without_autoscaling():
    opts = deployment_options(CloudConfig(num_replicas=3))
    assert opts["num_replicas"] == 3 and "autoscaling_config" not in opts
    assert "max_replicas_per_node" not in opts
    assert deployment_options(CloudConfig(max_replicas_per_node=1))["max_replicas_per_node"] == 1


def test_autoscaling_deploys_the_session_policy_with_its_bounds_and_arguments():
    cfg = CloudConfig(
        num_replicas=1,
        autoscaling={"min_replicas": 1, "max_replicas": 3, "target_sessions": 6, "upscale_delay_s": 1},
    )
    opts = deployment_options(cfg)
    assert opts["num_replicas"] == "auto"
    serve_cfg = ServeAutoscaling(**opts["autoscaling_config"])  # Serve itself accepts it
    assert (serve_cfg.min_replicas, serve_cfg.max_replicas, serve_cfg.upscale_delay_s) == (1, 3, 1.0)
    assert serve_cfg.policy.policy_function == POLICY_PATH
    policy = serve_cfg.policy.get_policy()(**serve_cfg.policy.policy_kwargs)
    assert policy.target_sessions == 6


def test_bad_bounds_are_a_clear_error():
    from cogenesis.core.config import validate

    with pytest.raises(ConfigError, match="min_replicas"):
        validate(CloudConfig, {"autoscaling": {"min_replicas": 3, "max_replicas": 2}})
