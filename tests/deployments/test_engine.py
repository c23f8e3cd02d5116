"""TransformersCloudEngine on a tiny real model: KV-cached steps equal full recomputation."""

import json

import pytest
import torch

from cogenesis.core import prompts
from cogenesis.core.config import CloudConfig
from cogenesis.core.errors import ConfigError, SessionError, UnknownSession
from cogenesis.core.models import load_causal_lm
from cogenesis.core.protocol import SketchRequest
from cogenesis.deployments.audit import AuditLog
from cogenesis.deployments.engine import TransformersCloudEngine, build_engine, load_engine_factory

INSTRUCTION = "Write a short invitation for a charity event"


@pytest.fixture(scope="module")
def model_tok(tiny_large):
    return load_causal_lm(str(tiny_large))


@pytest.fixture
def engine(model_tok):
    model, tok = model_tok
    return TransformersCloudEngine(model, tok, max_sessions=4)


def _reference_topk(model, ids, k):
    with torch.inference_mode():
        lp = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    top = lp.topk(k)
    return top.indices.tolist(), top.values


def test_cached_steps_match_full_recompute(engine, model_tok):
    model, tok = model_tok
    prompt_ids = prompts.render(tok, prompts.cloud_messages(INSTRUCTION))
    top = engine.open("s", INSTRUCTION, 8)
    ids = list(prompt_ids)
    for step in range(1, 6):
        token = int(top.ids[0, step % 3])  # not always the argmax, to exercise arbitrary paths
        ids.append(token)
        top = engine.step("s", step, [token])
        ref_ids, ref_lp = _reference_topk(model, ids, 8)
        assert top.ids[0].tolist() == ref_ids
        assert torch.allclose(torch.from_numpy(top.logprobs[0]), ref_lp, atol=1e-4)
        assert top.context_len == len(ids)


def test_opens_share_the_cached_prompt_head_and_match_full_prefill(engine, model_tok):
    """Prefix caching: every session's prompt opens with the same system prompt, computed once;
    an open that starts from it gives the full prefill's top-k."""
    model, tok = model_tok
    for sid, instruction in (("a", INSTRUCTION), ("b", "Write a short note about rivers.")):
        top = engine.open(sid, instruction, 8)
        ref_ids, ref_lp = _reference_topk(model, prompts.render(tok, prompts.cloud_messages(instruction)), 8)
        assert top.ids[0].tolist() == ref_ids
        assert torch.allclose(torch.from_numpy(top.logprobs[0]), ref_lp, atol=1e-4)
    stats = engine.stats()
    head = len(engine._prompt_head()[0])
    assert head >= 10  # the chat template's system prompt
    assert stats["prefix_hits"] == 2 and stats["prefix_tokens_saved"] == 2 * head


def test_replayed_step_is_answered_without_recompute(engine):
    engine.open("s", INSTRUCTION, 5)
    first = engine.step("s", 1, [42])
    served = engine.counters.tokens_served
    again = engine.step("s", 1, [42])
    assert again is first
    assert engine.counters.tokens_served == served


def test_out_of_order_and_unknown_sessions_are_refused(engine):
    engine.open("s", INSTRUCTION, 5)
    with pytest.raises(SessionError, match="out of order"):
        engine.step("s", 3, [1])
    with pytest.raises(UnknownSession, match="unknown session"):
        engine.step("nope", 1, [1])
    with pytest.raises(SessionError, match="invalid token"):
        engine.step("s", 1, [10**9])
    with pytest.raises(SessionError, match="invalid token"):
        engine.step("s", 1, [])


def test_bad_open_requests(engine):
    with pytest.raises(SessionError, match="empty instruction"):
        engine.open("e", "   ", 5)
    with pytest.raises(SessionError, match="top_k"):
        engine.open("e", INSTRUCTION, 51)
    engine.open("dup", INSTRUCTION, 5)
    engine.step("dup", 1, [3])
    with pytest.raises(SessionError, match="already open"):
        engine.open("dup", INSTRUCTION, 5)


def test_close_frees_and_lru_limit_holds(engine):
    for i in range(6):
        engine.open(f"s{i}", INSTRUCTION, 3)
    assert engine.stats()["active_sessions"] == 4  # max_sessions
    with pytest.raises(UnknownSession):
        engine.step("s0", 1, [1])  # least recently used went first
    assert engine.close("s5") is True
    assert engine.close("s5") is False


def test_sketch_batch_equals_single_requests_under_greedy(engine):
    reqs = [
        SketchRequest(request_id=str(i), instruction=text, max_tokens=12, temperature=0.0)
        for i, text in enumerate([INSTRUCTION, "Outline a blog post about pottery classes for beginners"])
    ]
    batched = engine.sketch(reqs)
    single = [engine.sketch([r])[0] for r in reqs]
    assert [r.request_id for r in batched] == ["0", "1"]
    assert [b.sketch for b in batched] == [s.sketch for s in single]
    assert all(0 < b.tokens <= 12 for b in batched)


def test_sketch_rejects_empty_instruction(engine):
    with pytest.raises(SessionError, match="empty instruction"):
        engine.sketch([SketchRequest(request_id="x", instruction=" ")])


def test_audit_log_records_what_the_model_conditions_on(model_tok, tmp_path):
    model, tok = model_tok
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    engine = TransformersCloudEngine(model, tok, audit=audit)
    engine.open("a", INSTRUCTION, 4)
    engine.step("a", 1, [tok.convert_tokens_to_ids("Hello")])
    engine.sketch([SketchRequest(request_id="k", instruction=INSTRUCTION, max_tokens=4, temperature=0.0)])
    audit.close()
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines] == ["open", "step", "sketch"]
    assert all(INSTRUCTION in x["text"] for x in lines)
    assert lines[1]["text"].endswith("Hello") and lines[1]["appended"] == "Hello"


INSTRUCTIONS = [
    INSTRUCTION,
    "Outline a blog post about pottery",
    "Draft a toast for a 30th wedding anniversary",
    "Describe a weekend DIY project",
]


def _greedy_session(engine, sid, instruction, n):
    top = engine.open(sid, instruction, 5)
    out = []
    for step in range(1, n + 1):
        out.append(int(top.ids[0, 0]))
        top = engine.step(sid, step, [out[-1]])
    return out, top


def test_batched_steps_equal_single_sessions_under_greedy(model_tok):
    model, tok = model_tok
    single = [_greedy_session(TransformersCloudEngine(model, tok), "x", text, 6) for text in INSTRUCTIONS]
    batched = TransformersCloudEngine(model, tok)
    from cogenesis.deployments.engine import OpenArgs, StepArgs

    tops = batched.open_many([OpenArgs(f"s{i}", text, 5) for i, text in enumerate(INSTRUCTIONS)])
    outs = [[] for _ in INSTRUCTIONS]
    for step in range(1, 7):
        for i, top in enumerate(tops):
            outs[i].append(int(top.ids[0, 0]))
        tops = batched.step_many([StepArgs(f"s{i}", step, (outs[i][-1],)) for i in range(len(INSTRUCTIONS))])
    assert outs == [s[0] for s in single]
    for top, (_, ref) in zip(tops, single):
        assert top.ids.tolist() == ref.ids.tolist()
        assert torch.allclose(torch.from_numpy(top.logprobs), torch.from_numpy(ref.logprobs), atol=1e-4)
    assert batched.stats()["mean_batch_size"] > 3  # steps really were batched


def test_eviction_recomputes_and_changes_nothing(model_tok):
    model, tok = model_tok
    reference = [_greedy_session(TransformersCloudEngine(model, tok), "x", text, 5) for text in INSTRUCTIONS[:2]]
    tight = TransformersCloudEngine(model, tok, kv_budget_bytes=1)  # every cache is evicted after each batch
    got = [_greedy_session(tight, f"s{i}", text, 5) for i, text in enumerate(INSTRUCTIONS[:2])]
    assert [g[0] for g in got] == [r[0] for r in reference]
    for (_, top), (_, ref) in zip(got, reference):
        assert torch.allclose(torch.from_numpy(top.logprobs), torch.from_numpy(ref.logprobs), atol=1e-4)
    stats = tight.stats()
    assert stats["evictions"] >= 10 and stats["recomputes"] >= 8 and stats["kv_bytes"] == 0


def test_lookahead_draft_is_the_models_greedy_path(model_tok):
    model, tok = model_tok
    engine = TransformersCloudEngine(model, tok)
    plain, _ = _greedy_session(TransformersCloudEngine(model, tok), "x", INSTRUCTION, 5)
    top = engine.open("s", INSTRUCTION, 5, lookahead=4)
    assert top.ids.shape == (5, 5) and len(set(plain)) > 1
    assert top.draft.tolist() == plain[:4]  # d1 is the argmax after the prompt, d2 the argmax after d1, ...
    assert top.ids[:, 0].tolist() == plain[:5]
    for row in range(1, 5):  # each draft row is the top-k after the draft prefix
        ref_ids, ref_lp = _reference_topk(
            model, prompts.render(tok, prompts.cloud_messages(INSTRUCTION)) + plain[:row], 5
        )
        assert top.ids[row].tolist() == ref_ids
        assert torch.allclose(torch.from_numpy(top.logprobs[row]), ref_lp, atol=1e-4)
    # the edge accepts two draft tokens and then picks its own: the cache is cropped, not rebuilt
    own = int(top.ids[2, 1])
    sent = plain[:2] + [own]
    after = engine.step("s", 1, sent)
    ref_ids, _ = _reference_topk(model, prompts.render(tok, prompts.cloud_messages(INSTRUCTION)) + sent, 5)
    assert after.ids[0].tolist() == ref_ids and after.draft.size == 4
    assert engine.stats()["recomputes"] == 0


def test_the_yield_point_runs_every_few_outline_tokens(engine):
    calls = []
    engine.set_yield_point(lambda: calls.append(1))
    (reply,) = engine.sketch([SketchRequest(request_id="k", instruction=INSTRUCTION, max_tokens=12, temperature=0.0)])
    assert reply.tokens == 12 and len(calls) == 3  # every 4 tokens


def test_shutdown_closes_the_audit_log(model_tok, tmp_path):
    model, tok = model_tok
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    TransformersCloudEngine(model, tok, audit=audit).shutdown()
    with pytest.raises(OSError):
        audit.write("open", "a", "after shutdown")


def test_the_engine_factory_is_loaded_from_its_import_path():
    assert load_engine_factory(CloudConfig().engine_factory) is build_engine
    with pytest.raises(ConfigError, match="cannot load the engine factory 'nowhere:build_engine'"):
        load_engine_factory("nowhere:build_engine")
    with pytest.raises(ConfigError, match="cannot load the engine factory"):
        load_engine_factory("cogenesis.deployments.engine:no_such_factory")
    with pytest.raises(ConfigError, match="is not callable"):
        load_engine_factory("cogenesis.deployments.engine:MAX_LOOKAHEAD")
