"""A logits session over the real bus equals the same fusion computed in one process (greedy)."""

import json
import threading

import pytest
import torch

from cluster.bus import CloudBus, EdgeBus
from cogenesis import prompts
from cogenesis.config import EdgeConfig
from cogenesis.fusion import fuse_constant
from cogenesis.models import load_causal_lm
from deployments.audit import AuditLog
from deployments.engine import TransformersCloudEngine
from deployments.step_loop import StepLoop
from edge_sim.client import EdgeClient
from edge_sim.engine import EdgeEngine
from edge_sim.gate import ngrams

CFG = EdgeConfig(top_k=5, max_new_tokens=12, max_prompt_tokens=512,
                 sampling={"temperature": 0.0, "top_p": 1.0, "seed": 0}, fusion={"weight": 0.5})


@pytest.fixture(scope="module")
def models(tiny_large, tiny_small):
    return load_causal_lm(str(tiny_large)), load_causal_lm(str(tiny_small))


@pytest.fixture
def cloud(models, redis_url, tmp_path):
    (large, tok), _ = models
    engine = TransformersCloudEngine(large, tok, audit=AuditLog(str(tmp_path / "audit.jsonl")))
    loop = StepLoop(engine, CloudBus(redis_url, "r1"), threading.Lock()).start()
    yield loop
    loop.stop()


def reference(large, small, tok, record, edge_engine, n, k, weight):
    """Fused greedy decoding with both models in this process, no bus, no caches."""
    cloud_ids = prompts.render(tok, prompts.cloud_messages(record.public_instruction))
    edge_ids = edge_engine.prompt_ids(record)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            s_lp = small(torch.tensor([edge_ids + out])).logits[:, -1].log_softmax(-1)
            l_top = large(torch.tensor([cloud_ids + out])).logits[0, -1].log_softmax(-1).topk(k)
            # the wire carries float16 logprobs: round the same way
            l_lp = l_top.values.half().float()[None]
            token = int(fuse_constant(s_lp, l_top.indices[None], l_lp, weight).argmax(-1))
            if token in edge_engine.stop_ids:
                break
            out.append(token)
    return out


def test_logits_session_matches_in_process_fusion(models, cloud, redis_url, sample_records):
    (large, tok), (small, _) = models
    engine = EdgeEngine(small, tok, CFG.max_prompt_tokens)
    record = sample_records[0]
    client = EdgeClient(0, record, engine, CFG)
    result = client.run_logits(EdgeBus(redis_url))
    expected = reference(large, small, tok, record, engine, CFG.max_new_tokens, CFG.top_k, CFG.fusion.weight)
    assert result.error is None
    assert result.tokens == len(expected) > 0
    assert result.text == tok.decode(expected, skip_special_tokens=True).strip()
    assert result.round_trips == result.tokens  # open + one step per token but the last
    assert client.gate.sealed == result.round_trips + 1  # + close


def test_cloud_conditions_only_on_public_text(models, cloud, redis_url, sample_records):
    (large, tok), (small, _) = models
    engine = EdgeEngine(small, tok, CFG.max_prompt_tokens)
    record = sample_records[1]
    result = EdgeClient(1, record, engine, CFG).run_logits(EdgeBus(redis_url))
    assert cloud.engine.stats()["active_sessions"] == 0  # the client closed its session
    cloud.engine.audit.close()
    with open(cloud.engine.audit.path) as fh:
        entries = [json.loads(line) for line in fh]
    assert [e["kind"] for e in entries] == ["open"] + ["step"] * (result.round_trips - 1)
    assert all(record.public_instruction in e["text"] for e in entries)
    private_phrases = set().union(*(ngrams(f, 5) for f in record.private_fields())) - ngrams(
        record.public_instruction, 5)
    assert private_phrases  # the record does hold private text
    for e in entries:
        assert not ngrams(e["text"], 5) & private_phrases
