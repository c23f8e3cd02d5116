"""Logits sessions over the real bus: batching, lookahead and schedules change speed, not results."""

import json
import threading
import time

import pytest
import torch

from cogenesis.apps.engine_link import EngineLink
from cogenesis.cluster.bus import CloudBus, EdgeBus
from cogenesis.core import prompts
from cogenesis.core.config import EdgeConfig
from cogenesis.core.data import parse_context_aware
from cogenesis.core.fusion import fuse_constant
from cogenesis.core.fusion_net import Fuser, FusionNet, save
from cogenesis.core.models import load_causal_lm
from cogenesis.core.privacy import ngrams
from cogenesis.core.protocol import StepReply, pack_ids, pack_logprobs
from cogenesis.core.sampling import sampling_probs
from cogenesis.core.speculative import accept_draft
from cogenesis.deployments.audit import AuditLog
from cogenesis.deployments.engine import TransformersCloudEngine
from cogenesis.deployments.step_loop import StepLoop
from cogenesis.edge_sim.client import EdgeClient
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.gate import OutboundGate
from cogenesis.edge_sim.links import Arrival, Failure, Opening
from cogenesis.edge_sim.logits import run_logits_sessions

GREEDY = {"temperature": 0.0, "top_p": 1.0, "seed": 0}


def cfg(**kw):
    base = dict(top_k=5, max_new_tokens=10, max_prompt_tokens=512, sampling=GREEDY, fusion={"weight": 0.5})
    return EdgeConfig(**{**base, **kw})


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


def run(models, redis_url, records, config):
    (_, tok), (small, _) = models
    engine = EdgeEngine(small, tok, config.max_prompt_tokens)
    clients = [EdgeClient(i, rec, engine, config) for i, rec in enumerate(records)]
    bus = EdgeBus(redis_url)
    try:
        return run_logits_sessions(clients, engine, bus, config), clients
    finally:
        bus.close()


def reference(models, record, config):
    """Fused greedy decoding with both models in this process: no bus, no caches, no batching."""
    (large, tok), (small, _) = models
    engine = EdgeEngine(small, tok, config.max_prompt_tokens)
    cloud_ids = prompts.render(tok, prompts.cloud_messages(record.public_instruction))
    edge_ids, plain_ids = engine.prompt_ids(record), prompts.cloud_prompt_ids(tok, record.public_instruction)
    fuser = Fuser(config.fusion, config.top_k)
    out = []
    with torch.inference_mode():
        for _ in range(config.max_new_tokens):
            s_lp = small(torch.tensor([edge_ids + out])).logits[:, -1].log_softmax(-1)
            p_lp = small(torch.tensor([plain_ids + out])).logits[:, -1].log_softmax(-1)  # the context-free pass
            l_top = large(torch.tensor([cloud_ids + out])).logits[0, -1].log_softmax(-1).topk(config.top_k)
            l_lp = l_top.values.half().float()[None]  # the wire carries float16
            token = int(fuser(s_lp, l_top.indices[None], l_lp, p_lp).argmax(-1))
            if token in engine.stop_ids:
                break
            out.append(token)
    return tok.decode(out, skip_special_tokens=True).strip()


def test_session_matches_in_process_fusion(models, cloud, redis_url, sample_records):
    (results, clients) = run(models, redis_url, sample_records[:1], cfg())
    r = results[0]
    assert r.error is None and r.tokens > 0
    assert r.text == reference(models, sample_records[0], cfg())
    assert r.round_trips == r.tokens  # open + one step per token but the last
    assert clients[0].gate.sealed == r.round_trips + 1  # + close


@pytest.mark.parametrize("method", ["entropy", "contrast", "learned"])
def test_every_fusion_method_matches_in_process_fusion(models, cloud, redis_url, sample_records, tmp_path, method):
    fusion = {"method": method, "weight": 0.5}
    if method == "learned":
        torch.manual_seed(0)
        fusion["checkpoint"] = str(save(FusionNet("compact", k=5, hidden=8), tmp_path / "fusion.pt"))
    config = cfg(fusion=fusion)
    results, _ = run(models, redis_url, sample_records[:2], config)
    assert [r.text for r in results] == [reference(models, rec, config) for rec in sample_records[:2]]
    assert all(r.error is None and r.tokens > 0 for r in results)
    assert run(models, redis_url, sample_records[:1], cfg())[0][0].text != results[0].text or method == "entropy"


def test_in_process_engine_link_equals_the_bus(models, sample_records, tmp_path):
    (large, tok), (small, _) = models
    engine = TransformersCloudEngine(large, tok, audit=AuditLog(str(tmp_path / "audit.jsonl")))
    edge = EdgeEngine(small, tok, 512)
    config = cfg(fusion={"method": "contrast"})
    clients = [EdgeClient(i, rec, edge, config) for i, rec in enumerate(sample_records[:2])]
    link = EngineLink(engine)
    results = run_logits_sessions(clients, edge, link, config)
    assert [r.text for r in results] == [reference(models, rec, config) for rec in sample_records[:2]]
    assert sorted(link.opened.values()) == [0, 1] and engine.stats()["active_sessions"] == 0  # closed
    audited = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert {a["id"] for a in audited} == set(link.opened)


def test_pool_batching_equals_single_clients(models, cloud, redis_url, sample_records):
    batched, _ = run(models, redis_url, sample_records[:4], cfg())
    single = [run(models, redis_url, [rec], cfg())[0][0] for rec in sample_records[:4]]
    assert [r.text for r in batched] == [s.text for s in single]
    assert all(r.error is None and r.tokens > 0 for r in batched)


def test_lookahead_gives_identical_greedy_text_in_fewer_round_trips(models, cloud, redis_url, sample_records):
    plain, _ = run(models, redis_url, sample_records[:3], cfg(max_new_tokens=16))
    ahead, _ = run(models, redis_url, sample_records[:3], cfg(max_new_tokens=16, lookahead=4))
    assert [r.text for r in ahead] == [r.text for r in plain]
    accepted = sum(r.accepted_draft_tokens for r in ahead)
    assert accepted > 0
    assert sum(r.round_trips for r in ahead) < sum(r.round_trips for r in plain)
    for r in ahead:  # every position is covered by a reply (one per round trip) or an accepted draft
        assert r.round_trips + r.accepted_draft_tokens >= r.tokens


def test_pkt_schedule_skips_round_trips(models, cloud, redis_url, sample_records):
    every, _ = run(models, redis_url, sample_records[:2], cfg(max_new_tokens=14))
    pkt, _ = run(
        models, redis_url, sample_records[:2], cfg(max_new_tokens=14, schedule={"kind": "pkt", "p": 2, "k": 3, "t": 1})
    )
    for r in pkt:
        positions = r.tokens + (r.tokens < 14)  # a stop token was chosen at one more position
        assert r.fused_steps == sum(1 for i in range(positions) if i < 2 or (i - 4) % 4 < 1)
        assert r.round_trips < r.tokens
    assert sum(r.round_trips for r in pkt) < sum(r.round_trips for r in every)


def test_uncertainty_schedule_thresholds(models, cloud, redis_url, sample_records):
    never, _ = run(models, redis_url, sample_records[:1], cfg(schedule={"kind": "uncertainty", "tau": 1e9}))
    always, _ = run(models, redis_url, sample_records[:1], cfg(schedule={"kind": "uncertainty", "tau": 0.0}))
    assert never[0].fused_steps == 0 and never[0].round_trips == 1  # just the open
    assert always[0].fused_steps == always[0].tokens + (always[0].tokens < 10)


def test_speculative_acceptance_keeps_the_fused_distribution(models, sample_records):
    """On the tiny models' real distributions: drafts accepted by the rule reproduce q exactly."""
    (large, tok), (small, _) = models
    rec = sample_records[0]
    with torch.inference_mode():
        s_lp = small(torch.tensor([EdgeEngine(small, tok, 512).prompt_ids(rec)])).logits[:, -1].log_softmax(-1)
        l_top = (
            large(torch.tensor([prompts.render(tok, prompts.cloud_messages(rec.public_instruction))]))
            .logits[0, -1]
            .log_softmax(-1)
            .topk(5)
        )
    q = sampling_probs(fuse_constant(s_lp, l_top.indices[None], l_top.values[None], 0.5), 1.0, 1.0)[0]
    draft = int(l_top.indices[0])  # the cloud's greedy proposal
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    counts = torch.zeros_like(q)
    for _ in range(n):
        counts[accept_draft(q, draft, 1.0, gen)[0]] += 1
    support = q > 0.01
    assert torch.allclose((counts / n)[support], q[support], atol=0.012)
    assert counts[~(q > 0)].sum() == 0


def test_cloud_conditions_only_on_public_text(models, cloud, redis_url, sample_records):
    record = sample_records[1]
    (results, _) = run(models, redis_url, [record], cfg())
    deadline = time.monotonic() + 10  # CloseSession has no reply: wait for the replica to read it
    while cloud.engine.stats()["active_sessions"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cloud.engine.stats()["active_sessions"] == 0  # the client closed its session
    cloud.engine.audit.close()
    with open(cloud.engine.audit.path) as fh:
        entries = [json.loads(line) for line in fh]
    assert [e["kind"] for e in entries] == ["open"] + ["step"] * (results[0].round_trips - 1)
    assert all(record.public_instruction in e["text"] for e in entries)
    private_phrases = set().union(*(ngrams(f, 5) for f in record.private_fields())) - ngrams(
        record.public_instruction, 5
    )
    assert private_phrases  # the record does hold private text
    for e in entries:
        assert not ngrams(e["text"], 5) & private_phrases


def test_ignore_eos_writes_exactly_max_new_tokens(models, cloud, redis_url, sample_records):
    results, _ = run(models, redis_url, sample_records[:3], cfg(max_new_tokens=12, ignore_eos=True))
    assert [r.tokens for r in results] == [12, 12, 12]
    for r in results:  # every step was traced: round trip and bus overhead per reply
        assert len(r.rtt_us) == len(r.overhead_us) == r.round_trips
        assert all(0 <= o <= t for o, t in zip(r.overhead_us, r.rtt_us))


@pytest.mark.parametrize("method", ["constant", "contrast"])  # contrast: two rows per session
def test_shared_device_sessions_equal_the_lockstep_pool(method, models, cloud, redis_url, sample_records):
    """Sessions that run on their own threads over one SharedDevice (the fleet's and Locust's way)
    give the lockstep pool's greedy text, and their passes were batched."""
    from cogenesis.edge_sim.device import SharedDevice

    (_, tok), (small, _) = models
    config = cfg(fusion={"method": method})
    lockstep, _ = run(models, redis_url, sample_records[:4], config)
    engine = EdgeEngine(small, tok, config.max_prompt_tokens)
    device = SharedDevice(small, engine.pad_id)
    out = {}

    def one(i):
        bus = EdgeBus(redis_url)
        try:
            client = EdgeClient(i, sample_records[i], engine, config)
            out[i] = run_logits_sessions([client], engine, bus, config, device=device)[0]
        finally:
            bus.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    device.close()
    assert [out[i].text for i in range(4)] == [r.text for r in lockstep]
    assert all(out[i].error is None for i in range(4))
    assert device.rows > device.passes  # at least one pass served more than one session
    assert not device.caches  # every session released its cache


def test_profile_device_samples_the_cloud_top_k_and_takes_its_time(models, cloud, redis_url, sample_records):
    from cogenesis.edge_sim.device import DeviceProfile, ProfileDevice

    (large, tok), (small, _) = models
    config = cfg(max_new_tokens=6, ignore_eos=True)
    slept = []
    profile = DeviceProfile(name="test", decode_tokens_per_s=50, prefill_tokens_per_s=1000, rtt_ms=40)
    engine = EdgeEngine(None, tok, config.max_prompt_tokens)  # no small model at all
    client = EdgeClient(0, sample_records[0], engine, config)
    bus = EdgeBus(redis_url)
    try:
        r = run_logits_sessions([client], engine, bus, config, device=ProfileDevice(profile, slept.append))[0]
    finally:
        bus.close()
    assert r.error is None and r.tokens == 6
    cloud_ids = prompts.render(tok, prompts.cloud_messages(sample_records[0].public_instruction))
    with torch.inference_mode():  # greedy over the cloud's top-k alone is the large model's greedy path
        ids = list(cloud_ids)
        for _ in range(6):
            ids.append(int(large(torch.tensor([ids])).logits[0, -1].argmax()))
    assert r.text == tok.decode(ids[len(cloud_ids) :], skip_special_tokens=True).strip()
    prompt_len = len(engine.prompt_ids(sample_records[0]))
    assert slept[0] == pytest.approx(prompt_len / 1000)  # prefill
    assert slept.count(0.04) == r.round_trips  # one RTT per exchange
    assert slept.count(1 / 50) == 5  # one decode pass per token but the last


def test_profile_device_refuses_schedules_that_need_a_distribution(models, redis_url, sample_records):
    from cogenesis.core.errors import ConfigError
    from cogenesis.edge_sim.device import DeviceProfile, ProfileDevice

    (_, tok), _ = models
    config = cfg(schedule={"kind": "uncertainty"})
    engine = EdgeEngine(None, tok, config.max_prompt_tokens)
    profile = DeviceProfile(name="t", decode_tokens_per_s=1, prefill_tokens_per_s=1, rtt_ms=0)
    with pytest.raises(ConfigError, match="uncertainty"):
        run_logits_sessions(
            [EdgeClient(0, sample_records[0], engine, config)],
            engine,
            EdgeBus(redis_url),
            config,
            device=ProfileDevice(profile, lambda s: None),
        )


class _ScriptedLink:
    """A CloudLink that answers every request itself, the same top-k each time (``fail_at``: the step it refuses)."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.fail_at = fail_at
        self.items: list = []
        self.asked: dict[str, int] = {}
        self.closed: list = []

    def open(self, sessions, cfg):
        self.items += sessions
        self.asked.update((o.session_id, 0) for o in sessions)

    def request(self, steps, cfg):
        self.items += steps
        self.asked.update((s.session_id, s.step) for s in steps)

    def collect(self, session_ids, cfg):
        out = []
        for sid in session_ids:
            step = self.asked.pop(sid)
            if step == self.fail_at:
                out.append(Arrival(sid, Failure(f"cloud refused step {step}", "cloud_error")))
                continue
            top = StepReply(
                session_id=sid, step=step, replica="r9", ids=pack_ids([7, 8]), logprobs=pack_logprobs([-0.1, -2])
            )
            out.append(Arrival(sid, top, sent_us=100, received_us=350, waited_from_us=200))
        return out

    def close(self, sessions):
        self.closed += sessions


def _scripted(tokenizer_dir, record, link):
    from transformers import AutoTokenizer

    from cogenesis.edge_sim.device import DeviceProfile, ProfileDevice

    config = cfg(top_k=2, max_new_tokens=3, ignore_eos=True)
    engine = EdgeEngine(None, AutoTokenizer.from_pretrained(str(tokenizer_dir)), config.max_prompt_tokens)
    profile = DeviceProfile(name="t", decode_tokens_per_s=1e6, prefill_tokens_per_s=1e9, rtt_ms=0)
    client = EdgeClient(0, record, engine, config)
    return run_logits_sessions([client], engine, link, config, device=ProfileDevice(profile, lambda s: None))[0], engine


def test_the_loop_hands_links_typed_items_and_applies_their_arrivals(tokenizer_dir, sample_records):
    link = _ScriptedLink()
    r, engine = _scripted(tokenizer_dir, sample_records[0], link)
    assert (
        r.error is None and r.tokens == 3 and r.text == engine.tok.decode([7, 7, 7], skip_special_tokens=True).strip()
    )
    opening, *steps = link.items
    assert isinstance(opening, Opening) and opening.instruction == sample_records[0].public_instruction
    assert [(s.step, s.tokens, s.generated, s.replica) for s in steps] == [
        (1, (7,), (7,), "r9"),
        (2, (7,), (7, 7), "r9"),
    ]
    assert [c.replica for c in link.closed] == ["r9"] and link.closed[0].session_id == opening.session_id
    assert r.round_trips == 3 and r.fused_steps == 3 and r.rtt_us == [250] * 3
    assert r.overhead_us == []  # the replies carry no replica trace
    assert len(r.itl_s) == 2 and not r.stopped
    assert set(r.to_json()) == {"client", "tid", "mode", "text", "tokens", "seconds", "round_trips", "ttft_s"}


def test_a_failed_arrival_ends_its_session_with_the_links_message(tokenizer_dir, sample_records):
    r, _ = _scripted(tokenizer_dir, sample_records[0], _ScriptedLink(fail_at=2))
    assert r.error == "cloud refused step 2" and r.text == "" and r.tokens == 0 and r.round_trips == 3
    assert r.error_code == "cloud_error"  # what may leave the device of it
    assert r.to_json()["error"] == "cloud refused step 2" and "ttft_s" not in r.to_json()


# ---- the stream gate: what the small model writes of the private context never reaches the cloud ----------

NEIGHBOUR = parse_context_aware(
    {
        "tid": "neighbour",
        "conversations": [{"value": "Write a note to a new neighbour: mention my golf club"}],
        "additional_profile": "Name: Martin Reynolds\nEmail: martin.reynolds@example.com\nPhone: (503) 555-0134",
        "profile": [
            {"title": "A letter", "text": "Every Sunday morning I walk along the river with my old dog and think."}
        ],
    },
    "test record",
)
SPANS = {  # what an adversarial device copies, and words of it the cloud must never see
    "name": (" Martin Reynolds", ("martin", "reynolds")),
    "email": (" martin.reynolds@example.com", ("martin", "reynolds", "example")),
    "phone": (" 503-555-0134", ("503", "555", "0134")),
    "passage": (" I walk along the river with my old dog and think", ("river", "old dog")),
}


class _Copying:
    """An adversarial device: from position ``at`` on it writes ``span`` whatever its model prefers (all its
    probability on the span's next token), like a small model copying its private context verbatim."""

    simulated = False

    def __init__(self, inner, span: list[int], at: int) -> None:
        self.inner, self.span, self.at = inner, span, at
        self.pos: dict[int, int] = {}

    def prefill(self, keys, prompts):
        self.pos = {id(k): 0 for k in keys}
        return [self._force(k, lp) for k, lp in zip(keys, self.inner.prefill(keys, prompts))]

    def step(self, keys, tokens):
        out = self.inner.step(keys, tokens)
        for k in keys:
            self.pos[id(k)] += 1
        return [self._force(k, lp) for k, lp in zip(keys, out)]

    def release(self, keys):
        self.inner.release(keys)

    def _force(self, key, lp):
        i = self.pos[id(key)] - self.at
        if not 0 <= i < len(self.span):
            return lp
        forced = torch.full_like(lp, -1e4)
        forced[self.span[i]] = 0.0
        return forced


def _audited(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def copy_session(models, tmp_path, span: str, link_kind="engine", redis_url=None, at=3, **kw):
    """One NEIGHBOUR session whose device copies ``span`` from position ``at``; returns the result, what the
    cloud conditioned on (its audit log) and the span's token ids."""
    from cogenesis.edge_sim.device import PackedDevice

    (large, tok), (small, _) = models
    config = cfg(max_new_tokens=20, ignore_eos=True, **kw)
    edge = EdgeEngine(small, tok, config.max_prompt_tokens)
    ids = tok.encode(span, add_special_tokens=False)
    device = _Copying(PackedDevice(small, edge.pad_id), ids, at)
    client = EdgeClient(0, NEIGHBOUR, edge, config)
    audit = AuditLog(str(tmp_path / f"audit-{link_kind}.jsonl"))
    if link_kind == "engine":
        r = run_logits_sessions(
            [client], edge, EngineLink(TransformersCloudEngine(large, tok, audit=audit)), config, device=device
        )[0]
    else:
        engine = TransformersCloudEngine(large, tok, audit=audit)
        loop = StepLoop(engine, CloudBus(redis_url, "r1"), threading.Lock()).start()
        bus = EdgeBus(redis_url)
        try:
            r = run_logits_sessions([client], edge, bus, config, device=device)[0]
        finally:
            bus.close()
            loop.stop()
    audit.close()
    return r, _audited(tmp_path / f"audit-{link_kind}.jsonl"), ids


def _assert_cloud_saw_nothing_private(entries, words):
    spans = OutboundGate.of_record(NEIGHBOUR).spans
    assert entries and entries[0]["kind"] == "open"
    for e in entries:
        assert not spans.find(e["text"]), "the cloud conditioned on a private span"
        assert not any(w in e["text"].lower() for w in words)


@pytest.mark.parametrize("what", sorted(SPANS))
@pytest.mark.parametrize("policy", ["placeholder", "local"])
def test_a_copied_private_span_reaches_the_cloud_only_as_a_placeholder(models, tmp_path, what, policy):
    span, words = SPANS[what]
    r, entries, ids = copy_session(models, tmp_path, span, privacy={"span_policy": policy})
    assert r.error is None and r.tokens == 20
    assert span.strip() in r.text  # the device's own output keeps what it wrote
    _assert_cloud_saw_nothing_private(entries, words)
    appended = "".join(e.get("appended", "") for e in entries)
    assert "[private]" in appended  # the cloud got the placeholder in the span's place
    assert r.span_policy == policy and r.private_spans >= 1 and r.held_tokens >= 1
    assert r.to_json()["privacy"] == {
        "held_tokens": r.held_tokens,
        "private_spans": r.private_spans,
        "span_policy": policy,
    }
    # a position after a held token is written without fusion, and needs no round trip
    assert r.round_trips == r.fused_steps >= r.tokens - r.held_tokens
    if policy == "local":  # collaboration pauses for the whole span: one placeholder, no fusion inside it
        assert r.private_spans == 1 and appended.count("[private]") == 1
        assert r.fused_steps == r.tokens - r.held_tokens and r.held_tokens >= len(ids) - 4


@pytest.mark.parametrize("what", ["name", "passage"])
def test_refuse_ends_a_session_that_copies_a_private_span(models, tmp_path, what):
    span, words = SPANS[what]
    r, entries, _ = copy_session(models, tmp_path, span, privacy={"span_policy": "refuse"})
    assert r.error is not None and "span policy 'refuse'" in r.error and r.error_code == "privacy"
    assert not any(w in r.error.lower() for w in words)  # counts and kinds only
    assert r.span_policy == "refuse" and r.text == "" and r.tokens == 0
    _assert_cloud_saw_nothing_private(entries, words)


def test_a_short_name_never_leaves_over_the_bus_with_lookahead(models, tmp_path, redis_url):
    """Over the real bus, with drafts and the pkt schedule: the cloud never sees any token of the name, its
    session stays consistent (every step accepted in order), and the other positions keep their schedule."""
    span, words = SPANS["name"]
    config = {"lookahead": 2, "schedule": {"kind": "pkt", "p": 6, "k": 2, "t": 2}}
    r, entries, ids = copy_session(models, tmp_path, span, link_kind="bus", redis_url=redis_url, **config)
    assert r.error is None and r.tokens == 20 and "Martin Reynolds" in r.text
    _assert_cloud_saw_nothing_private(entries, words)
    tok = models[0][1]
    first = tok.decode(ids[:1]).strip().lower()
    assert not any(first in e.get("appended", "").lower() for e in entries)  # not even the first token
    assert r.private_spans == 1 and r.span_policy == "placeholder"
    for a, b in zip(entries, entries[1:]):  # the replica's context grows by exactly what the edge sent
        assert b["kind"] == "step" and b["text"] == a["text"] + b["appended"]


def _recording_fuser(monkeypatch):
    """Record every distribution the session loop fuses (the fused rows)."""
    import cogenesis.edge_sim.logits as logits_mod

    rows: list[torch.Tensor] = []

    class Recording(Fuser):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            rows.append(out.clone())
            return out

    monkeypatch.setattr(logits_mod, "Fuser", Recording)
    return rows


@pytest.mark.parametrize(
    "config",
    [{}, {"lookahead": 3, "schedule": {"kind": "pkt", "p": 3, "k": 2, "t": 2}}, {"schedule": {"kind": "uncertainty"}}],
    ids=["every", "lookahead-pkt", "uncertainty"],
)
def test_outside_private_spans_the_gate_changes_no_token_and_no_fused_row(models, sample_records, monkeypatch, config):
    """Sessions whose text opens no private span: the same tokens and fused rows as with no private context
    known to the gate (the gate disabled), bit for bit."""
    (large, tok), (small, _) = models
    conf = cfg(max_new_tokens=16, **config)
    records = sample_records[:3]

    def session(gated: bool):
        rows = _recording_fuser(monkeypatch)
        edge = EdgeEngine(small, tok, conf.max_prompt_tokens)
        clients = [EdgeClient(i, rec, edge, conf) for i, rec in enumerate(records)]
        if not gated:
            for c in clients:
                c.gate = OutboundGate(c.record.public_instruction, [], declared_public=True)
        results = run_logits_sessions(clients, edge, EngineLink(TransformersCloudEngine(large, tok)), conf)
        return results, rows

    gated, gated_rows = session(True)
    plain, plain_rows = session(False)
    assert all(r.error is None and r.held_tokens == 0 and r.span_policy is None for r in gated)
    assert [r.text for r in gated] == [r.text for r in plain] and all(r.tokens for r in gated)
    assert [r.fused_steps for r in gated] == [r.fused_steps for r in plain]
    assert [r.round_trips for r in gated] == [r.round_trips for r in plain]
    assert len(gated_rows) == len(plain_rows) > 0
    assert all(torch.equal(a, b) for a, b in zip(gated_rows, plain_rows))


UNSPLIT = parse_context_aware(  # no ": " split: the whole instruction is checked, and it names the profile's person
    {
        "tid": "unsplit",
        "conversations": [{"value": "Write a note to Martin Reynolds about the golf club"}],
        "additional_profile": "Name: Martin Reynolds",
        "profile": [{"title": "A letter", "text": "Every Sunday morning I walk along the river with my old dog."}],
    },
    "test record",
)


def test_a_refused_instruction_ends_only_its_own_session(models, tmp_path):
    (large, tok), (small, _) = models
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    edge = EdgeEngine(small, tok, 512)
    config = cfg()
    clients = [EdgeClient(0, UNSPLIT, edge, config), EdgeClient(1, NEIGHBOUR, edge, config)]
    link = EngineLink(TransformersCloudEngine(large, tok, audit=audit))
    refused, served = run_logits_sessions(clients, edge, link, config)
    audit.close()
    assert refused.error_code == "privacy" and refused.tokens == 0 and refused.round_trips == 0
    assert "martin" not in (refused.error or "").lower()  # the message names counts and kinds, not the text
    assert served.error is None and served.tokens > 0
    assert list(link.opened.values()) == [1]  # only the admitted session was opened on the cloud
    assert not any("martin" in e["text"].lower() for e in _audited(tmp_path / "audit.jsonl"))


# ---- faults on the real replica: the session resumes by replay, its text unchanged ------------------------


class _AtStep:
    """A device that calls ``hook(sessions)`` once, after its ``at``-th batched step (the edge's own thread)."""

    def __init__(self, inner, at: int, hook) -> None:
        self.inner, self.at, self.hook, self.steps = inner, at, hook, 0
        self.simulated = inner.simulated

    def prefill(self, keys, prompts):
        return self.inner.prefill(keys, prompts)

    def step(self, keys, tokens):
        self.steps += 1
        if self.steps == self.at:
            self.hook(keys)
        return self.inner.step(keys, tokens)

    def release(self, keys):
        self.inner.release(keys)


def _run_on(models, redis_url, records, config, device_hook=None, at=4):
    from cogenesis.edge_sim.device import PackedDevice

    (_, tok), (small, _) = models
    engine = EdgeEngine(small, tok, config.max_prompt_tokens)
    device = PackedDevice(small, engine.pad_id)
    if device_hook is not None:
        device = _AtStep(device, at, device_hook)
    clients = [EdgeClient(i, rec, engine, config) for i, rec in enumerate(records)]
    bus = EdgeBus(redis_url)
    try:
        return run_logits_sessions(clients, engine, bus, config, device=device)
    finally:
        bus.close()


def test_sessions_the_replica_forgot_resume_with_identical_text(models, cloud, redis_url, sample_records):
    """The replica loses every session mid-run (its cache gone): each next step is answered
    ``unknown_session``, the edge re-opens the session by replay, and writes what an undisturbed run writes."""
    config = cfg(max_new_tokens=12, ignore_eos=True, lookahead=2)
    records = sample_records[:3]
    undisturbed, _ = run(models, redis_url, records, config)

    def forget(lives):
        with cloud.lock:
            for lv in lives:
                cloud.engine.close(lv.session_id)

    results = _run_on(models, redis_url, records, config, forget)
    assert [r.text for r in results] == [r.text for r in undisturbed]
    assert all(r.error is None and r.tokens == 12 for r in results)
    assert [r.resumes for r in results] == [1, 1, 1]


def test_a_stopped_replicas_sessions_resume_on_another_with_identical_text(models, redis_url, sample_records, tmp_path):
    """Two replicas; the one holding the sessions stops mid-run: the edge resumes them on the other."""
    (large, tok), _ = models
    config = cfg(max_new_tokens=12, ignore_eos=True)
    records = sample_records[:2]
    first = StepLoop(TransformersCloudEngine(large, tok), CloudBus(redis_url, "r1"), threading.Lock()).start()
    try:
        undisturbed = _run_on(models, redis_url, records, config)
        second: list[StepLoop] = []

        def stop_first(lives):
            second.append(StepLoop(TransformersCloudEngine(large, tok), CloudBus(redis_url, "r2"), threading.Lock()))
            second[0].start()
            first.stop()

        results = _run_on(models, redis_url, records, config, stop_first)
    finally:
        first.stop()
        for loop in second:
            loop.stop()
    assert [r.text for r in results] == [r.text for r in undisturbed]
    assert all(r.error is None and r.tokens == 12 for r in results)
    assert all(r.resumes == 1 for r in results)


@pytest.mark.parametrize("method", ["constant", "contrast"])
def test_a_round_is_fused_in_one_call_and_equals_fusing_each_session_alone(models, sample_records, monkeypatch, method):
    (large, tok), (small, _) = models
    conf = cfg(max_new_tokens=6, fusion={"method": method, "weight": 0.5})
    widths = []
    import cogenesis.edge_sim.logits as logits_mod

    class Counting(Fuser):
        def __call__(self, small_lp, *args, **kwargs):
            widths.append(small_lp.shape[0])
            return super().__call__(small_lp, *args, **kwargs)

    monkeypatch.setattr(logits_mod, "Fuser", Counting)
    edge = EdgeEngine(small, tok, conf.max_prompt_tokens)
    clients = [EdgeClient(i, rec, edge, conf) for i, rec in enumerate(sample_records[:3])]
    results = run_logits_sessions(clients, edge, EngineLink(TransformersCloudEngine(large, tok)), conf)
    assert all(r.error is None and r.tokens for r in results)
    assert max(widths) == 3  # the round's three sessions in one call
    assert [r.text for r in results] == [reference(models, rec, conf) for rec in sample_records[:3]]
