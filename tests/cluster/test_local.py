"""A real local cluster (Redis + Ray + Serve) with tiny models: HTTP sketch, bus logits, clear errors."""

import json

import httpx
import pytest

from cogenesis.cluster.bus import EdgeBus
from cogenesis.cluster.local import LocalCluster
from cogenesis.core.config import CloudConfig, EdgeConfig
from cogenesis.core.models import load_causal_lm
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.pool import EdgePool

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tiny_large, tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    cfg = CloudConfig(large_model=str(tiny_large), audit_log=str(audit), replica_cpus=0.25, torch_threads=1)
    local = LocalCluster(cfg, start_timeout_s=240)
    info = local.start()
    yield local, info, audit
    local.stop()


@pytest.fixture(scope="module")
def pool(tiny_small, sample_records):
    model, tok = load_causal_lm(str(tiny_small))
    cfg = EdgeConfig(
        max_new_tokens=6, sketch_max_tokens=16, max_prompt_tokens=384, sampling={"temperature": 0.0, "top_p": 1.0}
    )
    return EdgePool(sample_records[:3], EdgeEngine(model, tok, cfg.max_prompt_tokens), cfg)


def test_sketch_mode_over_serve_http(cluster, pool):
    _, info, _ = cluster
    results = pool.run_sketch(info.http_url)
    assert [r.error for r in results] == [None] * 3
    assert all(r.sketch is not None and r.tokens > 0 and r.round_trips == 1 for r in results)


def test_logits_mode_over_the_bus(cluster, pool):
    _, info, _ = cluster
    results = pool.run_logits(info.redis_url)
    assert [r.error for r in results] == [None] * 3
    assert all(0 < r.tokens <= 6 for r in results)


def test_http_errors_are_clear(cluster):
    _, info, _ = cluster
    bad = httpx.post(f"{info.http_url}/v1/sketch", content=b"{not json", timeout=30)
    assert bad.status_code == 400 and "malformed SketchRequest" in bad.json()["error"]
    empty = httpx.post(
        f"{info.http_url}/v1/sketch", json={"type": "sketch", "request_id": "e", "instruction": "  "}, timeout=30
    )
    assert empty.status_code == 422 and "empty instruction" in empty.json()["error"]
    assert httpx.get(f"{info.http_url}/healthz", timeout=30).json()["ok"] is True


def test_unknown_session_is_refused_by_the_replica(cluster):
    from cogenesis.core.errors import SessionError
    from cogenesis.core.protocol import StepRequest, deadline_in, pack_ids
    from cogenesis.edge_sim.gate import OutboundGate

    _, info, _ = cluster
    replica = httpx.get(f"{info.http_url}/healthz", timeout=30).json()["replica"]
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
    link = StatelessLink(info.http_url, pool.engine.tok, max_concurrency=3)
    try:
        stateless = run_logits_sessions(pool.clients, pool.engine, link, pool.cfg)
    finally:
        link.shutdown()
    assert [r.error for r in stateless] == [None] * 3
    assert [r.text for r in stateless] == [r.text for r in over_bus]
    assert all(r.overhead_us and len(r.rtt_us) == r.round_trips for r in stateless)
    # bad input gets a typed error, not a crash
    bad = httpx.post(f"{info.http_url}/v1/stateless", content=b"junk", timeout=30)
    assert bad.status_code == 400 and b"bad_request" in bad.content
    huge = StatelessRequest(session_id="x", tokens=pack_ids([10**8]), top_k=3, budget_ms=60_000)
    refused = httpx.post(f"{info.http_url}/v1/stateless", content=encode(huge), timeout=30)
    assert refused.status_code == 422 and b"invalid token ids" in refused.content


def test_replica_pids_name_the_live_replica_processes(cluster):
    """What `cogenesis chaos` kills: the pid on the replica's heartbeat is its Ray actor's process."""
    import os

    from cogenesis.cluster.local import _replica_actor_pids

    local, info, _ = cluster
    replica = httpx.get(f"{info.http_url}/healthz", timeout=30).json()["replica"]
    pids = local.replica_pids()
    assert list(pids) == [replica]
    assert pids[replica] == _replica_actor_pids()[replica] != os.getpid()
    os.kill(pids[replica], 0)  # alive (signal 0 only checks)
