"""`cogenesis audit-privacy`: canaries planted in every private field, an adversarial device that copies them,
and every channel the cloud side can see captured and searched.

Fast tests check each part alone (planting, the channels' decoding and search, the adversarial device on
the real session loop with the in-process cloud engine). The slow ones run the whole audit on a real local
cluster with tiny models: with the outbound gate bypassed it must find leaks in every channel a device
sends through, and with the gate in place it must find none.
"""

from __future__ import annotations

import base64
import json

import msgspec
import pytest

from cogenesis.apps import adversary, audit_channels
from cogenesis.apps.audit_channels import Doc, SpanSearch
from cogenesis.apps.audit_privacy import AuditOptions, run_audit
from cogenesis.apps.canaries import KINDS, PLANTED_KINDS, WRITING_WORDS, Canary, by_kind, normalize, plant
from cogenesis.apps.cli import main
from cogenesis.core.config import CloudConfig, EdgeConfig
from cogenesis.core.data import load_records
from cogenesis.core.errors import ConfigError, PrivacyViolation
from cogenesis.core.privacy import PrivateSpans
from cogenesis.core.protocol import pack_ids
from cogenesis.deployments.audit import RequestCapture
from cogenesis.edge_sim import gate as gate_module
from cogenesis.edge_sim.sketch import sketch_request


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return plant(None, 3, tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _fields(record) -> dict[str, str]:
    """A context-aware record's private fields by the names the planting gives them."""
    named = {"instruction": record.task.partition(": ")[2], "profile": record.profile}
    for j, (title, text) in enumerate(record.history):
        named[f"history[{j}].title"], named[f"history[{j}].text"] = title, text
    return named


# ---- canaries ---------------------------------------------------------------------------------------------


def test_every_private_field_gets_a_canary_of_each_planted_kind(planted):
    records, canaries = planted
    assert len(records) == 3 and set(by_kind(canaries)) == set(KINDS)
    for r in records:
        fields = _fields(r)
        assert set(fields.values()) - {""} == set(r.private_fields())  # the names cover every private field
        mine = [c for c in canaries if c.tid == r.tid]
        for name, text in fields.items():
            planted_here = {c.kind for c in mine if c.field == name and c.kind in PLANTED_KINDS}
            assert planted_here == set(PLANTED_KINDS), (r.tid, name)
            assert all(normalize(c.text) in normalize(text) for c in mine if c.field == name)
        assert all(normalize(c.text) not in normalize(r.public_instruction) for c in mine)
    texts = [normalize(c.text) for c in canaries if c.kind in PLANTED_KINDS]
    assert len(set(texts)) == len(texts)  # every planted canary is unique


def test_writing_canaries_are_the_past_writings_own_words(planted, sample_records):
    _, canaries = planted
    writing = [c for c in canaries if c.kind == "writing"]
    originals = {r.tid: r for r in sample_records[:3]}
    assert len(writing) == sum(len(originals[t].history) for t in originals)
    for c in writing:
        j = int(c.field.split("[")[1].split("]")[0])
        text = originals[c.tid].history[j][1]
        assert len(c.text.split()) == WRITING_WORDS and c.text == " ".join(text.split()[:WRITING_WORDS])


def test_the_rest_of_each_record_is_unchanged(planted, sample_records):
    records, _ = planted
    for planted_record, original in zip(records, sample_records[:3]):
        assert planted_record.tid == original.tid and planted_record.gold == original.gold
        assert planted_record.public_instruction == original.public_instruction
        for (t0, x0), (t1, x1) in zip(original.history, planted_record.history):
            assert t1.startswith(t0) and x1.startswith(x0.rstrip())


def test_planting_is_seeded_and_never_shows_the_text(tmp_path, planted):
    a = plant(None, 3, tmp_path, seed=0)[1]
    b = plant(None, 3, tmp_path, seed=1)[1]
    assert [c.text for c in a] == [c.text for c in planted[1]] != [c.text for c in b]
    assert all(c.text not in repr(c) for c in a)


def test_paper_records_are_planted_too(tmp_path, shared_data_dir):
    records, canaries = plant(shared_data_dir / "paper_dev.json", 2, tmp_path)
    original = load_records(shared_data_dir / "paper_dev.json", 2)
    assert [r.public_instruction for r in records] == [r.public_instruction for r in original]  # the _wo pairing
    for r in records:
        mine = [c for c in canaries if c.tid == r.tid]
        assert {c.field for c in mine} == {
            f"history[{j}].{p}" for j in range(len(r.history)) for p in ("title", "text")
        }
        assert by_kind(mine)["writing"] == len(r.history)


# ---- channels: decoding and search -------------------------------------------------------------------------


def _step(session: str, step: int, ids: list[int]) -> bytes:
    return msgspec.msgpack.encode({"type": "step", "session_id": session, "step": step, "tokens": pack_ids(ids)})


def test_redis_monitor_decodes_token_streams_across_steps(redis_url, tok):
    import redis

    canary = Canary("name", "Quentin Brastovikel", "t1", "profile")
    ids = tok(" Dear " + canary.text + ", thanks", add_special_tokens=False).input_ids
    monitor = audit_channels.RedisMonitor(redis_url)
    monitor.start()
    assert monitor.ready.wait(10)
    client = redis.Redis.from_url(redis_url)
    open_msg = msgspec.msgpack.encode({"type": "open", "session_id": "s1", "instruction": "Write a note"})
    client.xadd("cg:open", {b"m": open_msg})
    for step in range(len(ids)):  # one token per step, each in a batch entry as an edge pool sends them
        batch = msgspec.msgpack.encode({"type": "batch", "items": [_step("s1", step + 1, [ids[step]])]})
        client.xadd("cg:in:r1", {b"m": batch})
    client.set("cg:note", 'Hello \x00 "quoted" \n world')
    client.close()
    monitor.stop()
    assert monitor.error is None and monitor.lines
    docs = audit_channels.redis_docs(monitor.lines, tok)
    streams = [d for d in docs if d.source == "redis:token stream"]
    assert [(d.session, d.sent) for d in streams] == [("s1", True)]
    assert canary.text in streams[0].text  # no single step carries it: only the joined stream does
    assert not any(canary.text in d.text for d in docs if d not in streams)
    assert any(d.text == "Write a note" and d.sent and d.session == "s1" for d in docs)
    assert any('Hello \x00 "quoted" \n world' in d.text for d in docs)  # MONITOR's escaping undone
    leaks = audit_channels.find_canaries(docs, [canary])
    assert [(lk.channel, lk.kind, lk.tid, lk.source) for lk in leaks] == [("redis", "name", "t1", "redis:token stream")]


def test_monitor_args_unescape_every_byte():
    payload = bytes(range(256))
    escaped = b"".join(
        b"\\" + bytes([c]) if c in b'"\\' else bytes([c]) if 32 <= c < 127 else b"\\x%02x" % c for c in payload
    )
    line = b'1700000000.1 [0 127.0.0.1:5000] "XADD" "k" "' + escaped + b'" "\\n\\t"'
    assert audit_channels.monitor_args(line) == [b"XADD", b"k", payload, b"\n\t"]


def test_http_bodies_are_captured_and_decoded(tmp_path, tok):
    canary = Canary("email", "vera.quolmix31@brandea.net", "t1", "profile")
    capture = RequestCapture(str(tmp_path / "http.jsonl"))
    capture.capture("/v1/sketch", msgspec.json.encode({"request_id": "q1", "instruction": f"Write to {canary.text}"}))
    stateless = {
        "type": "stateless",
        "session_id": "s2",
        "tokens": pack_ids(tok(" Hello", add_special_tokens=False).input_ids),
    }
    capture.capture("/v1/stateless", msgspec.msgpack.encode(stateless))
    capture.close()
    line = json.loads((tmp_path / "http.jsonl").read_text().splitlines()[0])
    assert line["route"] == "/v1/sketch" and base64.b64decode(line["body"]).startswith(b"{")
    docs = audit_channels.http_docs(tmp_path / "http.jsonl", tok)
    assert any(d.session == "q1" and d.sent and canary.text in d.text for d in docs)
    assert any(d.session == "s2" and d.sent and d.text == " Hello" for d in docs)  # token ids decoded
    assert [lk.source for lk in audit_channels.find_canaries(docs, [canary])] == ["http:/v1/sketch"]


def test_audit_log_streams_and_private_spans(tmp_path, planted):
    records, canaries = planted
    r = records[0]
    name = next(c for c in canaries if c.tid == r.tid and c.kind == "name")
    first, _, last = name.text.partition(" ")
    entries = [
        {"kind": "open", "id": "s1", "text": "<system> Write something"},
        {"kind": "step", "id": "s1", "step": 1, "appended": " Dear " + first, "text": "..."},
        {"kind": "step", "id": "s1", "step": 2, "appended": " " + last + ",", "text": "..."},
    ]
    (tmp_path / "audit.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    docs = audit_channels.audit_docs(tmp_path / "audit.jsonl")
    stream = [d for d in docs if d.sent]
    assert [(d.source, d.session) for d in stream] == [("audit:token stream", "s1")]
    assert [lk.kind for lk in audit_channels.find_canaries(docs, canaries)] == ["name"]
    spans = PrivateSpans.of(r.public_instruction, r.private_fields(), declared_public=True)
    search = SpanSearch({"s1": r.tid}, {r.tid: spans.find})
    hits = audit_channels.find_spans(docs, search)
    assert [(h.channel, h.tid, h.kind, h.spans) for h in hits] == [("audit_log", r.tid, "name", 1)]
    assert audit_channels.find_spans(docs, SpanSearch({}, {r.tid: spans.find})) == []  # unattributed: not searched


def test_canaries_are_found_in_look_alike_text():
    canary = Canary("string", "vorkelin-4471-quastrobe", "t", "profile")
    disguised = "ｖｏｒｋｅｌｉｎ-4471-\u200bQUASTROBE"  # full-width letters, a zero-width space, upper case
    docs = [Doc("ray_logs", "ray:a.log", "nothing here"), Doc("ray_logs", "ray:b.log", f"x {disguised} y")]
    leaks = audit_channels.find_canaries(docs, [canary])
    assert [(lk.channel, lk.source) for lk in leaks] == [("ray_logs", "ray:b.log")]
    assert audit_channels.find_canaries(docs[:1], [canary]) == []


# ---- the adversarial device ---------------------------------------------------------------------------------


def test_crafted_instructions_are_refused_by_the_gate(planted, tiny_small):
    from cogenesis.core.models import load_causal_lm
    from cogenesis.edge_sim.engine import EdgeEngine

    records, canaries = planted
    model, tokenizer = load_causal_lm(str(tiny_small))
    engine, cfg = EdgeEngine(model, tokenizer, 256), EdgeConfig()
    for kind in KINDS:
        canary = next(c for c in canaries if c.tid == records[0].tid and c.kind == kind)
        client = adversary.crafted_client(0, records[0], canary, engine, cfg)
        request = sketch_request(client, cfg)
        assert canary.text in request.instruction
        with pytest.raises(PrivacyViolation):
            client.gate.seal_json(request)


def test_copying_device_writes_canaries_the_stream_gate_keeps(planted, tiny_small, tiny_large, tmp_path):
    """The real session loop and gate with the cloud engine in-process: the device writes every canary
    whole; the cloud's audit log holds none of them."""
    from cogenesis.apps.engine_link import EngineLink
    from cogenesis.core.models import load_causal_lm
    from cogenesis.deployments.audit import AuditLog
    from cogenesis.deployments.engine import TransformersCloudEngine
    from cogenesis.edge_sim.client import EdgeClient
    from cogenesis.edge_sim.device import PackedDevice
    from cogenesis.edge_sim.engine import EdgeEngine
    from cogenesis.edge_sim.logits import run_logits_sessions

    records, canaries = planted
    small, stok = load_causal_lm(str(tiny_small))
    large, ltok = load_causal_lm(str(tiny_large))
    engine = EdgeEngine(small, stok, 256)
    chosen = [
        [next(c for c in canaries if c.tid == r.tid and c.kind == k) for k in ("string", "name", "phone")]
        for r in records[:2]
    ]
    plans = [adversary.plan(cs, stok) for cs in chosen]
    cfg = EdgeConfig(max_new_tokens=max(p.length for p in plans) + 2, ignore_eos=True, top_k=5)
    audit = AuditLog(str(tmp_path / "audit.jsonl"))
    device = adversary.CopyingDevice(PackedDevice(small, engine.pad_id), plans)
    clients = [EdgeClient(i, r, engine, cfg) for i, r in enumerate(records[:2])]
    results = run_logits_sessions(
        clients, engine, EngineLink(TransformersCloudEngine(large, ltok, audit=audit)), cfg, device=device
    )
    audit.close()
    assert [r.error for r in results] == [None, None]
    attempts = [a for p in plans for a in p.attempts]
    assert attempts and all(a.started and a.written == len(a.ids) for a in attempts)
    for res, p in zip(results, plans):
        assert all(normalize(a.canary.text) in normalize(res.text) for a in p.attempts)  # written on the device
    docs = audit_channels.audit_docs(tmp_path / "audit.jsonl")
    assert any(d.sent for d in docs)
    assert audit_channels.find_canaries(docs, [a.canary for a in attempts]) == []  # not one reached the cloud


def test_copying_device_forces_only_planned_positions():
    import torch

    class Flat:
        simulated = False

        def prefill(self, keys, prompts):
            return [torch.zeros(8) for _ in keys]

        def step(self, keys, tokens):
            return [torch.zeros(8) for _ in keys]

        def release(self, keys):
            pass

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [5, 6]})()

    p = adversary.plan([Canary("name", "x y", "t", "profile")], Tok(), gap=1)
    assert p.length == 4 and sorted(p.at) == [1, 2]
    device = adversary.CopyingDevice(Flat(), [p])
    key = object()
    assert torch.equal(device.prefill([key], [[1]])[0], torch.zeros(8))  # position 0: free
    lp = device.step([key], [3])[0]  # position 1: the canary's first token
    assert int(lp.argmax()) == 5 and float(lp[5]) == 0.0 and float(lp[4]) == adversary.FORCED_FLOOR
    lp = device.step([key], [5])[0]
    assert int(lp.argmax()) == 6
    device.step([key], [2])  # the session wrote something else: the attempt stops counting
    assert p.attempts[0].written == 1 and p.attempts[0].started


# ---- the report ------------------------------------------------------------------------------------------------


def test_the_report_counts_and_fails_on_leaks_and_on_what_did_not_run(planted, tok):
    from rich.console import Console

    from cogenesis.apps.audit_privacy import _report, _Run, tables
    from cogenesis.edge_sim.client import SessionResult

    records, canaries = planted
    name = next(c for c in canaries if c.kind == "name")
    plans = [adversary.plan([name], tok)]
    plans[0].attempts[0].written = 1
    run = _Run(
        AuditOptions(limit=3), records, canaries, lambda *a: None, [(None, PrivacyViolation("refused"))], [], plans, {}
    )
    run.logits = [SessionResult(0, records[0].tid, "logits", "", 0, 0.0, error="cloud gone", error_code="unreachable")]
    docs = [Doc(ch, f"{ch}:x", "public text") for ch in audit_channels.CHANNELS]
    clean = _report(run, EdgeConfig(), docs, [], [], [], 1.0)
    assert (
        clean["leaked"] == 0
        and not clean["ok"]
        and clean["run_errors"] == ["logits: 1 session(s) failed (not by the privacy gate)"]
    )
    assert (
        clean["sessions"]["sketch"]["own_requests_refused"] == 1
        and clean["attempts"]["logits"]["name"]["attempts"] == 1
    )
    run.logits = []
    leak = audit_channels.Leak("redis", "name", name.tid, name.field, "redis:token stream")
    report = _report(run, EdgeConfig(), docs, [leak], [], [], 1.0)
    assert report["leaked"] == 1 and not report["ok"] and report["channels"]["redis"]["leaks"]["name"] == 1
    assert _report(run, EdgeConfig(), docs[:2], [], [], [], 1.0)["capture_errors"][0].endswith("nothing was captured")
    console = Console(record=True, width=160)
    for table in tables(report):
        console.print(table)
    shown = console.export_text()
    assert "redis" in shown and "writing" in shown and name.text not in shown and name.text not in json.dumps(report)


# ---- options and the command line ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"limit": 0}, "--limit"),
        ({"batch": 0}, "--batch"),
        ({"modes": ("both",)}, "unknown mode"),
        ({"gap": -1}, "gap"),
    ],
)
def test_bad_options_fail_before_anything_starts(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        AuditOptions(**kwargs).validate()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--limit", "0"], "--limit must be at least 1"),
        (["--data", "/nonexistent/records.json"], "does not exist"),
        (["--top-k", "0"], "top_k"),
        (["--batch", "0"], "--batch must be at least 1"),
    ],
)
def test_bad_flags_and_data_are_clear_errors(capsys, flags, message):
    assert main(["audit-privacy", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "hint:" in err and "Traceback" not in err


def test_an_unknown_span_policy_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["audit-privacy", "--span-policy", "never"])
    assert "invalid choice" in capsys.readouterr().err


def test_help_describes_the_audit(capsys):
    with pytest.raises(SystemExit):
        main(["audit-privacy", "--help"])
    out = capsys.readouterr().out
    for flag in ("--data", "--limit", "--json", "--mode", "--large-model", "--small-model", "--span-policy"):
        assert flag in out
    assert "canaries" in out and "Exits 1 on any leak" in out


# ---- end to end on a real cluster (tiny models) -------------------------------------------------------------


def _configs(tiny_large, tiny_small) -> tuple[CloudConfig, EdgeConfig]:
    cloud = CloudConfig(large_model=str(tiny_large), replica_cpus=0.25, torch_threads=1)
    return cloud, EdgeConfig(small_model=str(tiny_small), max_prompt_tokens=256, top_k=5)


def _holds_no_private_text(report: dict, records, canaries) -> None:
    text = json.dumps(report)
    assert not any(c.text in text for c in canaries)
    assert not any(f in text for r in records for f in r.private_fields() if len(f) > 12)


@pytest.mark.slow
def test_the_audit_finds_leaks_when_the_gate_is_bypassed(tiny_large, tiny_small, monkeypatch, tmp_path):
    """A device whose gate knows nothing private: the audit sees every kind of canary in what it sent."""

    def blind(cls, record, privacy=None):
        return cls(record.public_instruction, [], declared_public=True, privacy=privacy)

    monkeypatch.setattr(gate_module.OutboundGate, "of_record", classmethod(blind))
    cloud, edge = _configs(tiny_large, tiny_small)
    report = run_audit(AuditOptions(limit=2, batch=4), cloud, edge)
    assert not report["ok"] and report["leaked"] > 0 and report["capture_errors"] == report["run_errors"] == []
    for mode in ("sketch", "logits"):
        assert all(report["attempts"][mode][k]["attempts"] == 2 for k in KINDS), report["attempts"]
    assert all(report["attempts"]["sketch"][k]["refused"] == 0 for k in KINDS)
    channels = report["channels"]
    for ch in ("audit_log", "redis", "http"):  # the model's input, the bus (token ids decoded), HTTP bodies
        assert all(channels[ch]["leaks"][k] >= 2 for k in KINDS), (ch, channels[ch])
        assert channels[ch]["private_spans"] > 0, ch
    assert {lk["channel"] for lk in report["leaks"]} >= {"audit_log", "redis", "http"}
    records, canaries = plant(None, 2, tmp_path)  # the same seed plants the same canaries
    _holds_no_private_text(report, records, canaries)


@pytest.mark.slow
def test_the_audit_finds_no_leak_with_the_gate(tiny_large, tiny_small, tmp_path, capsys):
    """The command as a user runs it: many attempts in both modes, no leak in any channel, exit 0."""
    out = tmp_path / "audit.json"
    flags = ["--limit", "2", "--batch", "4", "--json", str(out), "--large-model", str(tiny_large)]
    flags += ["--small-model", str(tiny_small), "--edge-prompt-tokens", "256", "--top-k", "5"]
    code = main(["audit-privacy", *flags])
    report = json.loads(out.read_text())
    assert report["capture_errors"] == [] and report["run_errors"] == [], report
    assert all(row["items"] > 0 for row in report["channels"].values())
    for mode in ("sketch", "logits"):
        assert all(report["attempts"][mode][k]["attempts"] == 2 for k in KINDS), report["attempts"]
    assert all(report["attempts"]["sketch"][k]["refused"] == 2 for k in KINDS)
    assert all(report["attempts"]["logits"][k]["complete"] == 2 for k in KINDS)
    assert report["leaks"] == [] and report["private_spans"] == [] and report["leaked"] == 0
    assert code == 0 and report["ok"]
    printed = capsys.readouterr().out
    assert "no leaks" in printed and "audit_log" in printed
    records, canaries = plant(None, 2, tmp_path)
    _holds_no_private_text(report, records, canaries)
    assert not any(c.text in printed for c in canaries)
