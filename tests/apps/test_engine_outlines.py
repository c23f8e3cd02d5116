"""Eval's outline source: the cloud engine in-process behind the edge's one sketch path."""

import json

from cogenesis.apps.engine_outlines import EngineOutlines
from cogenesis.core.config import EdgeConfig
from cogenesis.core.models import load_causal_lm
from cogenesis.deployments.audit import AuditLog
from cogenesis.deployments.engine import TransformersCloudEngine
from cogenesis.edge_sim.client import EdgeClient
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.sketch import write_sketches


def test_outlines_come_from_the_engine_and_are_attributed_to_their_clients(
    tiny_large, tiny_small, sample_records, tmp_path
):
    large, ltok = load_causal_lm(str(tiny_large))
    small, stok = load_causal_lm(str(tiny_small))
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    source = EngineOutlines(TransformersCloudEngine(large, ltok, audit=audit))
    config = EdgeConfig(max_new_tokens=4, sketch_max_tokens=8, max_prompt_tokens=256, sampling={"seed": 0})
    engine = EdgeEngine(small, stok, 256)
    clients = [EdgeClient(i, r, engine, config) for i, r in zip((4, 7), sample_records[:2])]
    results = write_sketches(clients, source, engine, config)
    audit.close()
    assert all(r.error is None and r.sketch for r in results)
    assert sorted(source.asked.values()) == [4, 7]
    received = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    by_client = {source.asked[e["id"]]: e["text"] for e in received if e["id"] in source.asked}
    for c in clients:  # the engine got each client's public instruction, under that client's request id
        assert c.record.public_instruction in by_client[c.index]
