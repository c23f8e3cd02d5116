"""TransformersCloudEngine on a tiny real model: KV-cached steps equal full recomputation."""

import json

import msgspec
import pytest
import torch

from cogenesis.core import prompts
from cogenesis.core.config import CloudConfig
from cogenesis.core.errors import Busy, ConfigError, SessionError, UnknownSession
from cogenesis.core.models import load_causal_lm
from cogenesis.core.protocol import SketchRequest
from cogenesis.deployments.audit import AuditLog
from cogenesis.deployments.engine import (
    RETRY_MAX_S,
    RETRY_MIN_S,
    OpenArgs,
    SessionTooLarge,
    StepArgs,
    TransformersCloudEngine,
    build_engine,
    load_engine_factory,
    next_token,
)

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


def test_a_session_past_max_session_tokens_is_refused_before_any_forward_pass(model_tok):
    model, tok = model_tok
    prompt = len(prompts.render(tok, prompts.cloud_messages(INSTRUCTION)))
    engine = TransformersCloudEngine(model, tok, max_session_tokens=prompt + 3)
    before = engine.stats()["batches"]
    with pytest.raises(SessionTooLarge, match=f"{prompt + 4} tokens; at most {prompt + 3}"):
        engine.open("r", INSTRUCTION, 5, resume=[1, 2, 3, 4], resume_step=2)
    assert engine.stats()["batches"] == before and engine.stats()["active_sessions"] == 0
    engine.open("s", INSTRUCTION, 5)
    engine.step("s", 1, [3, 4])
    batches = engine.stats()["batches"]
    with pytest.raises(SessionTooLarge, match="max_session_tokens"):
        engine.step("s", 2, [5, 6])
    assert engine.stats()["batches"] == batches
    assert engine.step("s", 2, [5]).context_len == prompt + 3  # within the limit it goes on


def test_at_max_sessions_opens_are_refused_busy_and_no_session_is_evicted(engine):
    for i in range(4):
        engine.open(f"s{i}", INSTRUCTION, 3)
    with pytest.raises(Busy, match="max_sessions=4") as busy:
        engine.open("s4", INSTRUCTION, 3)
    assert RETRY_MIN_S <= busy.value.retry_after_s <= RETRY_MAX_S
    assert engine.stats()["active_sessions"] == 4 and engine.stats()["busy_opens"] == 1
    engine.step("s0", 1, [1])  # the least recently used session is still there
    assert engine.close("s3") is True
    assert engine.close("s3") is False
    engine.open("s4", INSTRUCTION, 3)  # room again
    assert engine.open("s1", INSTRUCTION, 3) is engine._sessions["s1"].last  # a replayed open needs no room


def test_idle_sessions_are_swept_and_make_room(model_tok):
    model, tok = model_tok
    engine = TransformersCloudEngine(model, tok, max_sessions=2, session_idle_s=60)
    engine.open("a", INSTRUCTION, 3)
    engine.open("b", INSTRUCTION, 3)
    assert engine.sweep_idle() == []
    engine._sessions["a"].last_used -= 61  # idle for longer than session_idle_s
    assert engine.sweep_idle() == ["a"]
    with pytest.raises(UnknownSession):
        engine.step("a", 1, [1])
    engine._sessions["b"].last_used -= 61
    engine.open("c", INSTRUCTION, 3)  # an open sweeps first: b is gone, c fits
    assert sorted(engine._sessions) == ["c"]


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


def test_sessions_joining_and_leaving_between_steps_change_no_other_session(model_tok):
    """Sessions take KV slots of one store as they come and free them as they go; the others are neither moved nor
    changed: every session writes what it writes alone, and the store never grows past what was open at once."""
    model, tok = model_tok
    single = {text: _greedy_session(TransformersCloudEngine(model, tok), "x", text, 6)[0] for text in INSTRUCTIONS}
    engine = TransformersCloudEngine(model, tok)
    open_now: dict[str, tuple[str, list[int], int]] = {}  # session -> (instruction, written, next step)
    finished: dict[str, list[int]] = {}
    plan = {0: [0, 1, 2], 2: [3], 3: [0, 1], 5: [2]}  # round -> instructions (indices) that open then
    for rnd in range(12):
        opens = [OpenArgs(f"r{rnd}-{i}", INSTRUCTIONS[i], 3) for i in plan.get(rnd, [])]
        for args, top in zip(opens, engine.open_many(opens)):
            open_now[args.session_id] = (args.instruction, [int(top.ids[0, 0])], 1)
        order = sorted(open_now, reverse=rnd % 2 == 1)  # any order: the engine sorts rows by slot
        steps = [StepArgs(sid, open_now[sid][2], (open_now[sid][1][-1],)) for sid in order]
        for args, top in zip(steps, engine.step_many(steps)):
            text, out, step = open_now[args.session_id]
            out.append(int(top.ids[0, 0]))
            open_now[args.session_id] = (text, out, step + 1)
        for sid in [sid for sid, (_, out, _) in open_now.items() if len(out) >= 6]:
            text, out, _ = open_now.pop(sid)
            finished[sid] = out[:6]
            assert out[:6] == single[text][:6], sid
            assert engine.close(sid)
    assert not open_now and len(finished) == sum(len(v) for v in plan.values())
    assert engine.stats()["kv_bytes"] == 0 and engine.store.slots <= 8


def test_eviction_recomputes_and_changes_nothing(model_tok):
    model, tok = model_tok
    reference = [_greedy_session(TransformersCloudEngine(model, tok), "x", text, 5) for text in INSTRUCTIONS[:2]]
    # every cache is evicted after each batch (no session counts as active: active_window_s=0)
    tight = TransformersCloudEngine(model, tok, kv_budget_bytes=1, active_window_s=0)
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


# ---- resumable opens ------------------------------------------------------------------------------


def test_a_resumed_session_answers_like_the_step_it_resumes_from(model_tok):
    model, tok = model_tok
    first = TransformersCloudEngine(model, tok)
    sent, fifth = _greedy_session(first, "s", INSTRUCTION, 5)
    fresh = TransformersCloudEngine(model, tok)  # another replica: it never saw the session
    top = fresh.open("s", INSTRUCTION, 5, resume=sent, resume_step=5)
    assert top.ids.tolist() == fifth.ids.tolist() and top.context_len == fifth.context_len
    assert torch.allclose(torch.from_numpy(top.logprobs), torch.from_numpy(fifth.logprobs), atol=1e-4)
    assert fresh.stats()["prefix_hits"] == 1  # the prompt head applies to a resume too
    served = fresh.counters.tokens_served
    assert fresh.open("s", INSTRUCTION, 5, resume=sent, resume_step=5) is top  # idempotent: no recompute
    assert fresh.counters.tokens_served == served
    # the session continues with step 6, as on the first replica
    nxt = int(top.ids[0, 1])
    after, ref = fresh.step("s", 6, [nxt]), first.step("s", 6, [nxt])
    assert after.ids.tolist() == ref.ids.tolist()
    with pytest.raises(SessionError, match="out of order"):
        fresh.step("s", 6 + 2, [nxt])
    # a resume that does not match what the replica holds replaces the session
    again = fresh.open("s", INSTRUCTION, 5, resume=sent[:3], resume_step=3)
    assert again.context_len == fifth.context_len - 2 and fresh._sessions["s"].step == 3
    fresh.step("s", 4, [sent[3]])


def test_resume_ids_are_validated_and_audited(model_tok, tmp_path):
    model, tok = model_tok
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    engine = TransformersCloudEngine(model, tok, audit=audit)
    with pytest.raises(SessionError, match="resume carries invalid token ids"):
        engine.open("r", INSTRUCTION, 5, resume=[1, 10**9], resume_step=2)
    with pytest.raises(SessionError, match="resume_step"):
        engine.open("r", INSTRUCTION, 5, resume=[1], resume_step=-1)
    hello = tok.convert_tokens_to_ids("Hello")
    engine.open("r", INSTRUCTION, 5, resume=[hello], resume_step=1)
    audit.close()
    (entry,) = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert entry["kind"] == "open" and entry["text"] == tok.decode(prompts.cloud_prompt_ids(tok, INSTRUCTION) + [hello])


# ---- admission: Busy instead of evicting an active session ----------------------------------------


def test_the_kv_budget_refuses_opens_rather_than_drop_an_active_cache(model_tok):
    model, tok = model_tok
    probe = TransformersCloudEngine(model, tok)
    probe.open("p", INSTRUCTION, 3)
    one = probe.stats()["kv_bytes"]  # one session's prompt
    engine = TransformersCloudEngine(model, tok, kv_budget_bytes=int(one * 1.5))
    engine.open("a", INSTRUCTION, 3)
    with pytest.raises(Busy, match="KV budget") as busy:
        engine.open("b", INSTRUCTION, 3)
    assert RETRY_MIN_S <= busy.value.retry_after_s <= RETRY_MAX_S
    engine.step("a", 1, [5])
    assert engine._sessions["a"].slot is not None and engine.stats()["evictions"] == 0
    # once a is no longer active its cache may go: b is admitted, a is recomputed on its next step
    engine._sessions["a"].last_used -= engine.active_window_s + 1
    engine.open("b", INSTRUCTION, 3)
    assert engine._sessions["a"].slot is None and engine.stats()["evictions"] == 1
    engine.step("a", 2, [6])
    assert engine.stats()["recomputes"] == 1


def test_an_active_cache_is_kept_even_over_budget(model_tok):
    """With nothing active an oversize prompt is admitted (else it would be refused forever); after
    its passes its cache stays while it is active, and a second open waits instead."""
    model, tok = model_tok
    engine = TransformersCloudEngine(model, tok, kv_budget_bytes=1)
    engine.open("a", INSTRUCTION, 3)
    for step in range(1, 4):
        engine.step("a", step, [5 + step])
    assert engine._sessions["a"].slot is not None
    assert engine.stats()["evictions"] == 0 and engine.stats()["recomputes"] == 0
    with pytest.raises(Busy):
        engine.open("b", INSTRUCTION, 3)


# ---- outlines in the batch -------------------------------------------------------------------------


def _generate_reference(model, tok, instruction, max_tokens, penalty=1.3):
    """The old sketch path: one ``model.generate`` call, greedy, with the repetition penalty."""
    ids = prompts.render(tok, prompts.sketch_messages(instruction)) + list(
        tok(prompts.SKETCH_PREFIX, add_special_tokens=False).input_ids
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_tokens,
            do_sample=False,
            repetition_penalty=penalty,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
    row = out[0, len(ids) :].tolist()
    return row[: next((i for i, t in enumerate(row) if t in (tok.eos_token_id, pad)), len(row))]


def test_a_greedy_outline_equals_model_generate(engine, model_tok):
    model, tok = model_tok
    ref = _generate_reference(model, tok, INSTRUCTION, 24)
    assert len(ref) == 24 and len(set(ref)) > 12  # a varied path
    (reply,) = engine.sketch([SketchRequest(request_id="k", instruction=INSTRUCTION, max_tokens=24)])
    assert reply.tokens == 24
    assert reply.sketch == prompts.clean_sketch(prompts.SKETCH_PREFIX + tok.decode(ref, skip_special_tokens=True))
    assert engine.counters.sketch_tokens == 24 and engine.stats()["tokens_served"] == 24
    assert engine.stats()["prefix_hits"] == 1  # the sketch prompt's fixed head was computed once and reused
    assert engine.stats()["outlines_done"] == 1 and engine.outlines_pending() == 0


def test_the_repetition_penalty_acts_as_in_model_generate(engine, model_tok):
    """A penalty below 1 favours repeats: on the tiny model it changes the greedy path (1.3 does not)."""
    model, tok = model_tok
    favoured = _generate_reference(model, tok, INSTRUCTION, 24, penalty=0.5)
    assert favoured != _generate_reference(model, tok, INSTRUCTION, 24, penalty=1.0)
    (reply,) = engine.sketch(
        [SketchRequest(request_id="k", instruction=INSTRUCTION, max_tokens=24, repetition_penalty=0.5)]
    )
    assert reply.tokens == len(favoured)
    assert reply.sketch == prompts.clean_sketch(prompts.SKETCH_PREFIX + tok.decode(favoured, skip_special_tokens=True))


def test_outlines_ride_in_the_logits_steps_passes_and_change_nothing(model_tok):
    model, tok = model_tok
    alone = [_greedy_session(TransformersCloudEngine(model, tok), "x", text, 6) for text in INSTRUCTIONS[:2]]
    outline_alone = TransformersCloudEngine(model, tok).sketch(
        [SketchRequest(request_id="o", instruction=INSTRUCTIONS[2], max_tokens=10)]
    )[0]
    engine = TransformersCloudEngine(model, tok)
    outlines = [
        SketchRequest(request_id="o", instruction=INSTRUCTIONS[2], max_tokens=10),
        SketchRequest(request_id="p", instruction=INSTRUCTIONS[3], max_tokens=40),
    ]
    assert engine.submit_outlines(outlines) == [None, None]
    tops = engine.open_many([OpenArgs(f"s{i}", text, 5) for i, text in enumerate(INSTRUCTIONS[:2])])
    batches, rows = engine.counters.batches, engine.counters.batch_sizes
    outs: list[list[int]] = [[], []]
    for step in range(1, 7):
        for i, top in enumerate(tops):
            outs[i].append(int(top.ids[0, 0]))
        tops = engine.step_many([StepArgs(f"s{i}", step, (outs[i][-1],)) for i in range(2)])
    # pass 1: the steps (one token each) and the outlines' prefills; passes 2-6: four single-token rows
    assert engine.counters.batches - batches == 2 + 5
    assert engine.counters.batch_sizes - rows == 4 + 5 * 4
    assert engine.counters.sketch_tokens == 12 and engine.stats()["outlines_active"] == 2
    assert outs == [a[0] for a in alone]
    for top, (_, ref) in zip(tops, alone):
        assert top.ids.tolist() == ref.ids.tolist()
        assert torch.allclose(torch.from_numpy(top.logprobs), torch.from_numpy(ref.logprobs), atol=1e-4)
    done = {}
    while engine.outlines_pending():
        engine.step_many([])
        done.update((e.request_id, e.reply) for e in engine.outline_events() if e.reply is not None)
    assert done["o"] == msgspec.structs.replace(outline_alone, compute_ms=done["o"].compute_ms)
    assert done["p"].tokens == 40


def test_outline_events_report_progress_then_the_reply(engine):
    assert engine.submit_outlines([SketchRequest(request_id="k", instruction=INSTRUCTION, max_tokens=3)]) == [None]
    assert engine.stats()["outlines_queued"] == 1 and engine.outline_events() == []
    engine.step_many([])
    engine.step_many([])
    (progress,) = engine.outline_events()  # coalesced: the latest progress only
    assert (progress.request_id, progress.tokens, progress.reply, progress.error) == ("k", 2, None, None)
    so_far = engine.tok.decode(engine._active["k"].out, skip_special_tokens=True)
    assert progress.text == prompts.clean_sketch(prompts.SKETCH_PREFIX + so_far)
    assert engine.outline_events() == []
    engine.step_many([])
    (done,) = engine.outline_events()
    assert done.reply is not None and done.reply.tokens == done.tokens == 3 and done.text == done.reply.sketch
    assert engine.outlines_pending() == 0 and engine.stats()["kv_bytes"] == 0
    assert engine.step_many([]) == [] and engine.outline_events() == []


def test_cancel_frees_an_outline(engine):
    reqs = [SketchRequest(request_id=k, instruction=INSTRUCTION, max_tokens=50) for k in ("a", "b")]
    engine.max_outlines = 1
    assert engine.submit_outlines(reqs) == [None, None]
    engine.step_many([])
    engine.step_many([])
    assert (engine.stats()["outlines_active"], engine.stats()["outlines_queued"]) == (1, 1)
    assert engine.stats()["kv_bytes"] > 0
    engine.cancel_outline("a")  # active
    engine.cancel_outline("b")  # queued
    engine.cancel_outline("nope")
    assert engine.outlines_pending() == 0 and engine.stats()["kv_bytes"] == 0
    assert engine.outline_events() == []
    batches = engine.counters.batches
    assert engine.step_many([]) == [] and engine.counters.batches == batches  # nothing left to decode


def test_a_full_outline_queue_answers_busy_and_bad_outlines_are_refused_one_by_one(model_tok):
    model, tok = model_tok
    engine = TransformersCloudEngine(model, tok, max_outlines=1, max_outline_queue=1)

    def req(rid, **kw):
        return SketchRequest(request_id=rid, instruction=INSTRUCTION, max_tokens=4, **kw)

    results = engine.submit_outlines(
        [req("a"), req("bad", top_p=0.0), req("a"), req("b"), req("c"), req("e", temperature=-1.0)]
    )
    assert results[0] is None and results[3] is None
    assert isinstance(results[1], SessionError) and "invalid decoding settings" in str(results[1])
    assert isinstance(results[2], SessionError) and "already pending" in str(results[2])
    assert isinstance(results[4], Busy) and RETRY_MIN_S <= results[4].retry_after_s <= RETRY_MAX_S
    assert isinstance(results[5], SessionError) and not isinstance(results[5], Busy)
    engine.step_many([])
    assert (engine.stats()["outlines_active"], engine.stats()["outlines_queued"]) == (1, 1)
    (again,) = engine.submit_outlines([req("c")])  # still full: one decoding, one waiting
    assert isinstance(again, Busy)


@pytest.mark.parametrize("passes_before", [0, 2])  # failing in the prompt head's pass, or in a batched pass
def test_a_failed_pass_fails_its_outlines_with_an_answer(engine, passes_before):
    engine.submit_outlines([SketchRequest(request_id="k", instruction=INSTRUCTION, max_tokens=8)])
    for _ in range(passes_before):
        engine.step_many([])

    def broken(**_):
        raise RuntimeError("out of memory")

    engine.model = broken
    with pytest.raises(RuntimeError):
        engine.step_many([])
    events = engine.outline_events()
    assert [(e.request_id, e.reply) for e in events] == [("k", None)] and "RuntimeError" in str(events[0].error)
    assert engine.outlines_pending() == 0 and engine.stats()["kv_bytes"] == 0
    assert engine.step_many([]) == []  # nothing left that would fail again


def test_sampled_outlines_follow_their_seed(engine):
    req = SketchRequest(request_id="a", instruction=INSTRUCTION, max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    first = engine.sketch([req])[0]
    again = engine.sketch([msgspec.structs.replace(req, request_id="b")])[0]
    other = engine.sketch([msgspec.structs.replace(req, request_id="c", seed=8)])[0]
    assert first.sketch == again.sketch and first.sketch != other.sketch


def test_next_token_applies_the_penalty_like_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    assert next_token(torch.tensor([0.0, 2.0, 1.8]), [1], 0.0, 1.0, 1.3) == 2  # 2.0 / 1.3 < 1.8
    assert next_token(torch.tensor([-5.0, -0.1, -0.12]), [1], 0.0, 1.0, 1.3) == 2  # -0.1 * 1.3 < -0.12
    assert next_token(torch.tensor([0.0, 2.0, 1.8]), [1], 0.0, 1.0, 1.0) == 1
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits, seen = torch.randn(64) * 3, torch.randint(0, 64, (12,)).tolist()
        ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), logits[None].clone())[0]
        assert next_token(logits, seen, 0.0, 1.0, 1.3) == int(ref.argmax())
        # a tiny top_p, or top_k 1, leaves only the best token to draw
        assert next_token(logits, seen, 1.0, 1e-6, 1.3, generator=gen) == int(ref.argmax())
        assert next_token(logits, seen, 2.0, 1.0, 1.3, top_k=1, generator=gen) == int(ref.argmax())


def test_build_engine_takes_its_limits_from_the_config(model_tok, monkeypatch):
    import cogenesis.core.models as models

    monkeypatch.setattr(models, "resolve_model", lambda spec: spec)
    monkeypatch.setattr(models, "load_causal_lm", lambda path: model_tok)
    engine = build_engine(CloudConfig(sketch_max_batch=3, sketch_max_queue=5, max_sessions=7, session_idle_s=9))
    assert (engine.max_outlines, engine.max_outline_queue, engine.max_sessions, engine.session_idle_s) == (3, 5, 7, 9)


def test_a_replys_wire_form_is_packed_once_per_pass_and_equals_packing_it_alone(model_tok):
    from cogenesis.core.protocol import pack_ids, pack_logprobs

    model, tok = model_tok
    engine = TransformersCloudEngine(model, tok)
    tops = engine.open_many([OpenArgs("a", INSTRUCTION, 3), OpenArgs("b", INSTRUCTIONS[1], 7, lookahead=2)])
    tops += engine.step_many([StepArgs("a", 1, (int(tops[0].ids[0, 0]),))])
    for top in tops:
        assert top.wire == (pack_ids(top.ids.ravel()), pack_logprobs(top.logprobs.ravel()))
