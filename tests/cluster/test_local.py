"""A real local cluster (a locked Redis, Ray, Serve's cloud and gateway apps) with tiny models: HTTP sketch and
bus logits as trusted workers, both through the gateway as devices, what an outsider is refused, clear errors.
Its Redis serves TLS where a TLS-capable redis-server is installed (Debian's, which ``make setup`` installs)."""

import json

import httpx
import pytest
import redis
import websocket

from cogenesis.cluster.bus import EdgeBus, connect
from cogenesis.cluster.local import LocalCluster
from cogenesis.cluster.redis_server import find_tls_redis_server
from cogenesis.core.auth import mint
from cogenesis.core.config import CloudConfig, EdgeConfig
from cogenesis.core.errors import ClusterError
from cogenesis.core.models import load_causal_lm
from cogenesis.core.secrets import SecretsDir, cluster_key
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.pool import EdgePool

pytestmark = pytest.mark.slow
TLS = find_tls_redis_server() is not None


@pytest.fixture(scope="module")
def cluster(tiny_large, tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    cfg = CloudConfig(
        large_model=str(tiny_large),
        audit_log=str(audit),
        replica_cpus=0.25,
        torch_threads=1,
        redis_tls=TLS,
        gateway={"replica_cpus": 0.25},
    )
    local = LocalCluster(cfg, start_timeout_s=240)
    info = local.start()
    yield local, info, audit
    local.stop()


def worker(info, role: str = "worker") -> dict[str, str]:
    return {"Authorization": f"Bearer {SecretsDir(info.secrets_dir).token(role)}"}  # type: ignore[arg-type]


def device_token(info, device: str = "dev-1") -> str:
    return mint(cluster_key(info.secrets_dir), device, "device", 600)


@pytest.fixture(scope="module")
def pool(tiny_small, sample_records):
    model, tok = load_causal_lm(str(tiny_small))
    cfg = EdgeConfig(
        max_new_tokens=6, sketch_max_tokens=16, max_prompt_tokens=384, sampling={"temperature": 0.0, "top_p": 1.0}
    )
    return EdgePool(sample_records[:3], EdgeEngine(model, tok, cfg.max_prompt_tokens), cfg)


def test_sketch_mode_over_serve_http(cluster, pool):
    _, info, _ = cluster
    results = pool.run_sketch(info.http_url, token=SecretsDir(info.secrets_dir).token("worker"))
    assert [r.error for r in results] == [None] * 3
    assert all(r.sketch is not None and r.tokens > 0 and r.round_trips == 1 for r in results)
    # a device asks the gateway, with its own token, and gets the same outlines (greedy)
    through = pool.run_sketch(info.gateway_url, token=lambda i: device_token(info, f"dev-{i}"))
    assert [r.sketch for r in through] == [r.sketch for r in results]


def test_logits_mode_over_the_bus_and_through_the_gateway(cluster, pool):
    _, info, _ = cluster
    assert info.redis_url.startswith("rediss://" if TLS else "redis://")
    results = pool.run_logits(info.redis_url)  # a trusted worker: the edge user, the cluster's password
    assert [r.error for r in results] == [None] * 3
    assert all(0 < r.tokens <= 6 for r in results)
    devices = pool.run_logits_gateway(info.gateway_url, lambda i: device_token(info, f"dev-{i}"))
    assert [r.error for r in devices] == [None] * 3
    assert [r.text for r in devices] == [r.text for r in results]


def test_an_outsider_is_refused_everywhere(cluster):
    """The issue's bar on a running cluster: 401 without a token (cloud routes, gateway routes, the WebSocket),
    403 for a device on the cloud's own routes, NOAUTH without Redis credentials, and the trusted edge worker's
    Redis user cannot FLUSHALL, MONITOR, CONFIG or KEYS."""
    _, info, _ = cluster
    sketch = {"type": "sketch", "request_id": "o", "instruction": "Write a poem"}
    for url in (
        f"{info.http_url}/v1/sketch",
        f"{info.gateway_url}/v1/sketch",
        f"{info.gateway_url}/v1/chat/completions",
    ):
        refused = httpx.post(url, json=sketch, timeout=30)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", url
    assert httpx.get(f"{info.http_url}/v1/stats", timeout=30).status_code == 401
    device = {"Authorization": f"Bearer {device_token(info)}"}
    assert httpx.post(f"{info.http_url}/v1/sketch", json=sketch, headers=device, timeout=30).status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException) as ws:
        websocket.create_connection(info.gateway_url.replace("http", "ws", 1) + "/v1/ws", timeout=30)
    assert ws.value.status_code == 401
    assert httpx.get(f"{info.http_url}/healthz", timeout=30).json() == {"ok": True}  # no details without a token

    with pytest.raises(ClusterError, match="NOAUTH"):
        connect(info.redis_url, role=None, secrets=None)
    edge = connect(info.redis_url, role="edge", secrets=info.secrets_dir)
    try:
        for command in (("FLUSHALL",), ("MONITOR",), ("CONFIG", "GET", "*"), ("KEYS", "*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                edge.execute_command(*command)
    finally:
        edge.close()


def test_http_errors_are_clear(cluster):
    _, info, _ = cluster
    bad = httpx.post(f"{info.http_url}/v1/sketch", content=b"{not json", headers=worker(info), timeout=30)
    assert bad.status_code == 400 and "malformed SketchRequest" in bad.json()["error"]
    empty = httpx.post(
        f"{info.http_url}/v1/sketch",
        json={"type": "sketch", "request_id": "e", "instruction": "  "},
        headers=worker(info),
        timeout=30,
    )
    assert empty.status_code == 422 and "empty instruction" in empty.json()["error"]
    assert httpx.get(f"{info.http_url}/healthz", timeout=30).json()["ok"] is True


def test_unknown_session_is_refused_by_the_replica(cluster):
    from cogenesis.core.errors import SessionError
    from cogenesis.core.protocol import StepRequest, deadline_in, pack_ids
    from cogenesis.edge_sim.gate import OutboundGate

    _, info, _ = cluster
    replica = httpx.get(f"{info.http_url}/healthz", headers=worker(info, "admin"), timeout=30).json()["replica"]
    bus = EdgeBus(info.redis_url)
    msg = StepRequest(session_id="never-opened", step=1, tokens=pack_ids([1]), budget_ms=30_000)
    bus.send_many([(replica, msg.session_id, OutboundGate(" ", []).seal(msg))])
    refused = bus.wait_many({"never-opened": 1}, deadline_in(30))["never-opened"]
    assert isinstance(refused, SessionError) and "unknown_session" in str(refused)


def test_audit_log_holds_public_instructions_only(cluster, pool, sample_records):
    _, _, audit = cluster
    entries = [json.loads(x) for x in audit.read_text().splitlines()]
    assert {"open", "step", "sketch"} <= {e["kind"] for e in entries}
    for rec in sample_records[:3]:
        assert any(rec.public_instruction in e["text"] for e in entries)
        for private in rec.private_fields():
            if len(private) > 40:
                assert all(private not in e["text"] for e in entries)


def test_stateless_baseline_writes_the_same_greedy_text_as_the_bus(cluster, pool):
    """The official code's protocol (whole sequence over HTTP, no server state) and CoGenesis's
    (session KV caches, batched steps over Redis) must produce the same fused greedy output."""
    from cogenesis.core.protocol import StatelessRequest, encode, pack_ids
    from cogenesis.edge_sim.links import StatelessLink
    from cogenesis.edge_sim.logits import run_logits_sessions

    _, info, _ = cluster
    bus = EdgeBus(info.redis_url)
    try:
        over_bus = run_logits_sessions(pool.clients, pool.engine, bus, pool.cfg)
    finally:
        bus.close()
    link = StatelessLink(info.http_url, pool.engine.tok, max_concurrency=3, token=worker(info)["Authorization"][7:])
    try:
        stateless = run_logits_sessions(pool.clients, pool.engine, link, pool.cfg)
    finally:
        link.shutdown()
    assert [r.error for r in stateless] == [None] * 3
    assert [r.text for r in stateless] == [r.text for r in over_bus]
    assert all(r.overhead_us and len(r.rtt_us) == r.round_trips for r in stateless)
    # bad input gets a typed error, not a crash
    bad = httpx.post(f"{info.http_url}/v1/stateless", content=b"junk", headers=worker(info), timeout=30)
    assert bad.status_code == 400 and b"bad_request" in bad.content
    huge = StatelessRequest(session_id="x", tokens=pack_ids([10**8]), top_k=3, budget_ms=60_000)
    refused = httpx.post(f"{info.http_url}/v1/stateless", content=encode(huge), headers=worker(info), timeout=30)
    assert refused.status_code == 422 and b"invalid token ids" in refused.content


def test_replica_pids_name_the_live_replica_processes(cluster):
    """What `cogenesis chaos` kills: the pid on the replica's heartbeat is its Ray actor's process."""
    import os

    from cogenesis.cluster.local import _replica_actor_pids

    local, info, _ = cluster
    replica = httpx.get(f"{info.http_url}/healthz", headers=worker(info, "admin"), timeout=30).json()["replica"]
    pids = local.replica_pids()
    assert list(pids) == [replica]
    assert pids[replica] == _replica_actor_pids()[replica] != os.getpid()
    os.kill(pids[replica], 0)  # alive (signal 0 only checks)


def test_a_start_that_fails_leaves_nothing_behind(monkeypatch, tmp_path):
    """An unreachable Redis fails the start before Ray: the temporary secrets and the environment it set are
    gone again, and the error says where it looked."""
    import os
    import tempfile

    from cogenesis.cluster.redis_server import free_port
    from cogenesis.core.secrets import ENV_DIR

    monkeypatch.delenv(ENV_DIR, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    local = LocalCluster(CloudConfig(), redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(ClusterError, match="cannot reach Redis"):
        local.start()
    assert ENV_DIR not in os.environ and list(tmp_path.iterdir()) == [] and local.secrets is None
