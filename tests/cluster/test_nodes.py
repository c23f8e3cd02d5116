"""The multi-node sequence's pieces (``cluster/nodes.py``), without starting Ray: the ``ray start`` commands, the
environment every node and driver gets, the head's address read from its output, the bounds of ``--nodes``."""

import pytest

from cogenesis.cluster.nodes import MAX_NODES, RayNodes, head_command, node_env, node_ip_of, worker_command
from cogenesis.core.errors import ClusterError


def test_the_head_and_the_workers_are_the_documented_ray_start_commands():
    head = head_command(6385, 1, 8265, "/tmp/t")
    assert head[1:4] == ["start", "--head", "--block"] and "--port=6385" in head and "--dashboard-port=8265" in head
    assert "--temp-dir=/tmp/t" in head and "--include-dashboard=true" in head
    worker = worker_command("10.0.0.5:6385", 2)
    assert worker[1:3] == ["start", "--block"] and "--address=10.0.0.5:6385" in worker and "--num-cpus=2" in worker


def test_every_node_runs_with_token_auth_and_may_share_the_machine():
    env = node_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/s/ray.token"})
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == "/s/ray.token"
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"


def test_the_heads_address_is_read_from_its_output_colours_and_all():
    out = "starting\n2026 INFO scripts.py:1043 -- \x1b[37mLocal node IP\x1b[39m: \x1b[1m192.0.2.2\x1b[22m\nmore"
    assert node_ip_of(out) == "192.0.2.2"
    assert node_ip_of("still starting") is None


@pytest.mark.parametrize("count", [1, MAX_NODES + 1])
def test_a_multi_node_cluster_has_two_to_max_nodes(count, tmp_path):
    with pytest.raises(ClusterError, match=f"2 to {MAX_NODES} nodes"):
        RayNodes(count, {}, tmp_path)
