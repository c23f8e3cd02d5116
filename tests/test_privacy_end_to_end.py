"""Canaries planted in every private field never reach the cloud: not its model input (audit log),
not Redis (a real MONITOR of every command), not the cloud's logs, not the edge's logs.

Real embedded models, real Redis, real Ray Serve, both modes. What the small model copies into
the text it writes in logits mode stays on the device too: the stream gate holds a token that could
begin a private span and sends a placeholder for the span (``cogenesis.edge_sim.gate``); the test
reports how many canaries the small model copied, and requires that none reached the cloud.
"""

import json
import logging
import tempfile
import threading
from pathlib import Path

import pytest
import redis

from cogenesis.cluster.local import LocalCluster
from cogenesis.core.auth import mint
from cogenesis.core.config import CloudConfig, EdgeConfig
from cogenesis.core.data import load_records, sample_data_path
from cogenesis.core.models import load_causal_lm, resolve_model
from cogenesis.core.secrets import SecretsDir, cluster_key
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.pool import EdgePool

pytestmark = pytest.mark.slow

CANARIES = {
    "instruction": "Quibblefrost Lantern Society",
    "profile": "Zorvanek Medical Bracelet 4471",
    "history": "Ostrapel Harbor Bakery",
}


def planted_records(tmp_path: Path, n: int = 2):
    raw = json.loads(sample_data_path().read_text())[:n]
    for rec in raw:
        rec["conversations"][0]["value"] += f" Mention the {CANARIES['instruction']}."
        rec["additional_profile"] += f"\nPrivacy_info: wears a {CANARIES['profile']}"
        rec["profile"][0]["text"] += f" We met at {CANARIES['history']} every Sunday."
    path = tmp_path / "planted.json"
    path.write_text(json.dumps(raw))
    records = load_records(path)
    for rec in records:  # the planting worked: every canary is private, none public
        assert all(any(c in f for f in rec.private_fields()) for c in CANARIES.values())
        assert not any(c in rec.public_instruction for c in CANARIES.values())
    return records


class Monitor(threading.Thread):
    """Every command Redis executes, as Redis prints it (a real MONITOR connection)."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        with self.client.monitor() as mon:
            self.ready.set()
            while not self.stop.is_set():
                try:
                    self.lines.append(mon.next_command()["command"])
                except Exception:
                    break


def found(text: str) -> set[str]:
    return {c for c in CANARIES.values() if c.lower() in text.lower()}


def test_private_context_never_reaches_the_cloud(tmp_path, caplog, redis_server, record_property):
    caplog.set_level(logging.DEBUG)
    records = planted_records(tmp_path)
    monitor = Monitor(redis_server.url)
    monitor.start()
    assert monitor.ready.wait(10)
    audit = tmp_path / "audit.jsonl"
    ray_dir = tempfile.mkdtemp(prefix="cgray")
    cloud = CloudConfig(large_model=resolve_model("embedded:large"), audit_log=str(audit), replica_cpus=0.25)
    edge = EdgeConfig(max_new_tokens=24, sketch_max_tokens=64, max_prompt_tokens=768)
    cluster = LocalCluster(cloud, redis_url=redis_server.url, ray_temp_dir=ray_dir)
    info = cluster.start()
    try:
        small, tok = load_causal_lm(resolve_model("embedded:small"))
        pool = EdgePool(records, EdgeEngine(small, tok, edge.max_prompt_tokens), edge)
        worker = SecretsDir(info.secrets_dir).token("worker")
        device = mint(cluster_key(info.secrets_dir), "device-1", "device", 600)
        sketch = pool.run_sketch(info.http_url, token=worker)  # a trusted worker on the cloud's own route
        logits = pool.run_logits(info.redis_url)  # a trusted worker on the bus
        through = pool.run_logits_gateway(info.gateway_url, lambda i: device)  # a device through the gateway
    finally:
        cluster.stop()
        monitor.stop.set()
        redis.Redis.from_url(redis_server.url).ping()  # wake the monitor
        monitor.join(5)
    assert [r.error for r in sketch + logits + through] == [None] * 6
    assert monitor.lines, "MONITOR saw no traffic"

    # 1. the cloud model's input: opens, sketches and steps never (copied spans are replaced on the device)
    entries = [json.loads(x) for x in audit.read_text().splitlines()]
    assert {"open", "step", "sketch"} <= {e["kind"] for e in entries}
    assert not any(found(e["text"]) for e in entries if e["kind"] in ("open", "sketch"))
    copied = set().union(*(found(r.text) for r in logits + through))
    step_leaks = set().union(*(found(e["text"]) for e in entries if e["kind"] == "step"))
    assert not step_leaks, (
        f"canaries reached the cloud in step inputs: {len(step_leaks)} (the stream gate must hold them)"
    )
    record_property("canaries_copied_into_logits_output", len(copied))
    print(
        f"\nmeasured: {len(copied)} of {len(CANARIES)} canaries copied by the small model into "
        f"logits-mode output ({sorted(copied) or 'none'}); sketch outputs with canaries: "
        f"{sum(bool(found(r.text)) for r in sketch)} of {len(sketch)} (never sent)"
    )

    # 2. Redis: nothing private in any command (payloads are binary ids; text would show up here)
    assert not found("\n".join(monitor.lines))

    # 3. cloud logs (every Ray/Serve log file of this cluster) and 4. the edge process's logs
    ray_logs = "\n".join(p.read_text(errors="replace") for p in Path(ray_dir).rglob("*.log") if p.is_file())
    assert ray_logs, "no Ray logs were found to check"
    assert not found(ray_logs)
    assert not found(caplog.text)
