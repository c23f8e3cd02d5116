"""`cogenesis chaos`: the pure parts (alignment, reports, scenario parsing, poison that is malformed the way it
claims), the bus inspection on a real Redis, and (slow) every scenario end to end on tiny models."""

import json
import time

import msgspec
import pytest
import redis

from cogenesis.apps.chaos import (
    GARBAGE,
    REPLY,
    SCENARIOS,
    TABLE_COLUMNS,
    ChaosOptions,
    Check,
    ReplyListWatcher,
    align,
    answer_of,
    bus_backlog,
    busiest_replica,
    check_sessions,
    collect_replies,
    failure_lines,
    inject,
    kv_totals,
    max_gap,
    notes,
    parse_scenarios,
    poison_messages,
    recovery_s,
    scenario_report,
    table_rows,
)
from cogenesis.apps.chaos_pool import CountingDevice, Outcome, outcome_of
from cogenesis.cluster.bus import FIELD, GROUP, OPEN_STREAM, in_stream, reply_key
from cogenesis.core.errors import ConfigError, ProtocolError
from cogenesis.core.protocol import (
    MAX_TOP_K,
    ErrorReply,
    OpenSession,
    ReplyBatch,
    StepBatch,
    StepReply,
    StepRequest,
    decode_request,
    encode,
    unpack_ids,
)

# ---- alignment ------------------------------------------------------------------------------------------


def test_identical_outputs_align_with_nothing_lost():
    a = align([5, 6, 7, 8], [5, 6, 7, 8])
    assert a.identical and (a.lost, a.duplicated, a.changed, a.first_diff) == (0, 0, 0, None)


def test_a_token_written_twice_is_duplicated():
    a = align([5, 6, 7, 8, 9], [5, 6, 7, 7, 8, 9])
    assert not a.identical and (a.lost, a.duplicated, a.changed) == (0, 1, 0)
    assert a.first_diff in (2, 3)


def test_a_token_skipped_is_lost():
    a = align([5, 6, 7, 8, 9], [5, 6, 8, 9])
    assert (a.lost, a.duplicated, a.changed, a.first_diff) == (1, 0, 0, 2)


def test_a_truncated_output_lost_its_tail():
    assert (align([1, 2, 3, 4], [1, 2]).lost, align([1, 2, 3, 4], [1, 2]).first_diff) == (2, 2)


def test_a_divergence_counts_changed_tokens():
    a = align([1, 2, 3, 4, 5, 6], [1, 2, 30, 40, 50, 60])
    assert (a.lost, a.duplicated, a.changed, a.first_diff) == (0, 0, 4, 2)
    b = align([1, 2, 3], [1, 9, 9, 9])  # replacement with an extra id: changed 2, one duplicated
    assert (b.lost, b.duplicated, b.changed) == (0, 1, 2)


# ---- session checks, stalls, reports --------------------------------------------------------------------


def _o(client, ids, error=None, started=100.0, ttft=1.0, itl=None, **kw) -> Outcome:
    itl = [0.5] * (len(ids) - 1) if itl is None else itl
    code = "cloud_error" if error else None
    return Outcome(
        client=client, tid=f"t{client}", ids=ids, error=error, error_code=code, started_at=started, ttft_s=ttft,
        itl_s=itl, **kw,
    )  # fmt: skip


def test_check_sessions_aligns_ok_sessions_and_reports_failures():
    ref = {0: _o(0, [1, 2, 3]), 1: _o(1, [4, 5, 6]), 2: _o(2, [7, 8, 9])}
    got = [_o(2, [7, 8, 9]), _o(0, [1, 2, 2, 3]), _o(1, [4], error="no reply before its deadline")]
    checks = check_sessions(ref, got)
    assert [c.client for c in checks] == [0, 1, 2]
    assert (checks[0].ok, checks[0].identical, checks[0].duplicated) == (True, False, 1)
    assert checks[0].near_diff is not None and checks[0].near_diff["reference"][:2] == [1, 2]
    assert (checks[1].ok, checks[1].identical, checks[1].lost, checks[1].error) == (
        False,
        False,
        0,
        "no reply before its deadline",
    )
    assert (checks[2].ok, checks[2].identical) == (True, True)
    missing = check_sessions({}, [_o(5, [1])])[0]
    assert not missing.identical and missing.error == "no reference session"


def test_token_times_and_the_stall_across_a_fault():
    o = _o(0, [1, 2, 3, 4], started=100.0, ttft=2.0, itl=[0.5, 4.0, 0.5])  # tokens at 102, 102.5, 106.5, 107
    assert o.token_times() == [102.0, 102.5, 106.5, 107.0]
    calm = _o(1, [1, 2, 3], started=100.0, ttft=1.0, itl=[1.0, 1.0])  # 101, 102, 103
    assert recovery_s([o, calm], fault_at=103.0) == 4.0  # the gap 102.5 -> 106.5 spans the fault
    assert recovery_s([o, calm], fault_at=106.8) == 0.5  # only gaps ending after it
    assert recovery_s([o, calm], fault_at=None) is None
    assert recovery_s([o], fault_at=200.0) is None
    assert max_gap([o, calm]) == 4.0 and max_gap([_o(0, [1])]) is None


def test_outcome_of_takes_the_ids_and_reads_the_edge_counters_when_they_exist():
    from types import SimpleNamespace

    from cogenesis.edge_sim.client import SessionResult

    r = SessionResult(
        3, "t3", "logits", "text", 2, 1.5, ids=[10, 11], ttft_s=0.5, itl_s=[0.25], resumes=1, busy_retries=4
    )
    o = outcome_of(r, 50.0)
    assert (o.client, o.ids, o.resumes, o.busy_retries, o.ok, o.started_at) == (3, [10, 11], 1, 4, True, 50.0)
    assert msgspec.json.decode(msgspec.json.encode([o]), type=list[Outcome]) == [o]
    # an edge that does not count them (None), or counts per cause (summed)
    fields = {"client": 1, "tid": "t1", "ids": [], "error": None, "error_code": None, "ttft_s": None, "itl_s": []}
    fields["seconds"] = 0
    assert outcome_of(SimpleNamespace(**fields), 0.0).resumes is None
    per_cause = outcome_of(SimpleNamespace(**fields, resumes={"replica_lost": 1, "redis": 2}), 0.0)
    assert per_cause.resumes == 3 and per_cause.busy_retries is None


def test_scenario_report_passes_only_when_everything_holds():
    ref = {i: _o(i, [1, 2, 3]) for i in range(2)}
    fault = {"at": 101.2, "killed": "abc", "pid": 42}
    good = scenario_report("kill-replica", "main", ref, [_o(0, [1, 2, 3]), _o(1, [1, 2, 3])], 9.0, fault)
    assert good["passed"] and good["identical"] == 2 and good["failed"] == 0
    assert good["fault"] == {"killed": "abc", "pid": 42, "at_s": 1.2}
    assert good["recover_s"] == 0.5 and good["tokens"]["lost"] == 0
    assert good["resumes"] is None  # the edge did not count them

    differs = scenario_report("kill-replica", "main", ref, [_o(0, [1, 3], resumes=1), _o(1, [1, 2, 3])], 9.0, fault)
    assert not differs["passed"] and differs["tokens"]["lost"] == 1 and differs["resumes"] == 1

    failed = scenario_report("poison", "main", ref, [_o(0, [1, 2, 3]), _o(1, [], error="boom")], 9.0, fault)
    assert not failed["passed"] and failed["errors"] == {"boom": 1}

    check = scenario_report(
        "poison", "main", ref, [_o(0, [1, 2, 3]), _o(1, [1, 2, 3])], 9.0, fault, [Check("x", False)]
    )
    assert not check["passed"]

    missing = scenario_report("poison", "main", ref, [_o(0, [1, 2, 3])], 9.0, fault)
    assert not missing["passed"]  # a session that did not report is not a pass


def test_table_rows_and_failure_lines():
    ref = {0: _o(0, [1, 2, 3])}
    ok = scenario_report("overload", "overload", ref, [_o(0, [1, 2, 3], busy_retries=2)], 5.0, None)
    bad = scenario_report(
        "restart-redis",
        "main",
        ref,
        [_o(0, [1, 2, 9])],
        5.0,
        {"at": 100.5, "down_s": 1.0},
        [Check("replicas heartbeat again", False, "not within 60 s")],
    )
    ok["max_sessions"], ok["busy_refusals"] = 1, 3
    rows = table_rows([ok, bad])
    assert rows[0][0] == "overload" and rows[0][-1] == "PASS" and rows[0][10] == "2" and rows[0][6] == "-"
    assert rows[1][-1] == "FAIL" and rows[1][1] == "1/0" and rows[1][2] == "0/1" and rows[1][11] == "0/1"
    assert all(len(row) == len(TABLE_COLUMNS) for row in rows)
    assert (notes(ok), notes(bad)) == ("max_sessions 1; 3 busy refusals", "Redis down 1 s")
    lines = failure_lines({"scenarios": [ok, bad]})
    assert any("check replicas heartbeat again failed: not within 60 s" in ln for ln in lines)
    assert any("client 0 differs from the reference at token 2" in ln for ln in lines)
    assert not failure_lines({"scenarios": [ok]})


def test_render_table_names_every_scenario():
    from rich.console import Console

    from cogenesis.apps.chaos import render_table

    ref = {0: _o(0, [1, 2])}
    report = {
        "settings": {"sessions": 1},
        "scenarios": [scenario_report(n, "main", ref, [_o(0, [1, 2])], 1.0, {"at": 100.0}) for n in SCENARIOS],
    }
    console = Console(width=200, record=True)
    console.print(render_table(report))
    text = console.export_text()
    assert all(name in text for name in SCENARIOS) and "PASS" in text


def test_notes_of_kill_edge_pool_and_poison():
    ref = {0: _o(0, [1])}
    s = scenario_report("kill-edge-pool", "main", ref, [_o(0, [1])], 1.0, {"at": 100.0})
    s["kv"] = {
        "orphaned_sessions": 2,
        "at_kill": {"active_sessions": 4, "kv_bytes": 8 * 2**20},
        "after_sweep": {"active_sessions": 0, "kv_bytes": 0},
        "swept": 2,
        "orphans_swept_after_s": 21.0,
    }
    assert notes(s) == (
        "KV 8.0 MiB (4 sessions) at the kill -> 0.0 MiB; 2 session(s) swept (the kill orphaned 2; the sweeper also "
        "closes any other idle one), the orphans' count reached 21.00 s after the kill"
    )
    p = scenario_report("poison", "main", ref, [_o(0, [1])], 1.0, {"at": 100.0})
    p["poison"] = [{"ok": True}, {"ok": False}]
    p["bus"] = {"cg:open": {"pending": 1, "length": 2}}
    assert notes(p) == "1/2 as expected; 3 entries left on the bus"
    p["crash"] = "KeyError: x"
    assert notes(p) == "harness: KeyError: x"


def test_counter_delta_counts_only_replicas_that_answered_after():
    from cogenesis.apps.chaos import counter_delta

    assert counter_delta({"a": 2.0, "dead": 5.0}, {"a": 4.0, "new": 1.0}) == 3  # the dead replica's counts left
    assert counter_delta({"a": 2.0}, {}) is None


def test_kv_totals_sum_the_replicas():
    stats = {"a": {"active_sessions": 2, "kv_bytes": 100}, "b": {"active_sessions": 1, "kv_bytes": 50}}
    assert kv_totals(stats) == {"replicas": 2, "active_sessions": 3, "kv_bytes": 150}
    assert kv_totals({}) == {"replicas": 0, "active_sessions": 0, "kv_bytes": 0}


# ---- scenarios and options ---------------------------------------------------------------------------------


def test_parse_scenarios_in_run_order():
    assert parse_scenarios(None) == list(SCENARIOS) == parse_scenarios(["all"])
    assert parse_scenarios(["overload", "poison", "overload"]) == ["poison", "overload"]
    assert parse_scenarios(["kill-replica", "all"]) == list(SCENARIOS)
    with pytest.raises(ConfigError, match="unknown scenario.*kill-everything"):
        parse_scenarios(["kill-everything"])


def test_options_are_validated():
    ChaosOptions().validate()
    with pytest.raises(ConfigError, match="overload needs at least 4 sessions"):
        ChaosOptions(sessions=2, scenarios=("overload",)).validate()
    with pytest.raises(ConfigError, match="kill-edge-pool needs at least 2 sessions"):
        ChaosOptions(sessions=1, scenarios=("kill-edge-pool",)).validate()
    with pytest.raises(ConfigError, match="fault-after"):
        ChaosOptions(fault_after=1.0).validate()
    ChaosOptions(sessions=1, scenarios=("poison",)).validate()


def test_cli_parses_chaos_and_help_explains_every_scenario(capsys):
    from cogenesis.apps.cli import build_parser

    args = build_parser().parse_args(["chaos", "--scenario", "poison", "--scenario", "overload", "--sessions", "8"])
    assert args.scenarios == ["poison", "overload"] and args.sessions == 8 and args.json_path == "docs/chaos/chaos.json"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chaos", "--help"])
    out = capsys.readouterr().out
    assert all(f"{name}:" in out for name in SCENARIOS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["chaos", "--scenario", "nope"])


# ---- poison ------------------------------------------------------------------------------------------------


def _poison():
    probes = {"batch": ("sid-b", "r1"), "short": ("sid-s", "r2"), "range": ("sid-r", "r1")}
    return {p.name: p for p in poison_messages(probes, ["r1", "r2"], vocab=1000, reply_to="me", nonce="n")}


def test_raw_garbage_and_a_wrong_version_do_not_decode():
    items = _poison()
    for name in ("garbage on cg:open", "msgpack that is no message, on cg:open", "garbage on cg:in:r1"):
        with pytest.raises(ProtocolError, match="malformed"):
            decode_request(items[name].payload)
        assert items[name].answer is None  # it names no session: nobody to answer
    old = next(p for n, p in items.items() if n.startswith("wrong protocol version"))
    with pytest.raises(ProtocolError, match="version"):
        decode_request(old.payload)
    assert old.stream == OPEN_STREAM and old.answer is None
    assert items["garbage on the edges' reply lists"].stream == "replies"


def test_poison_that_names_a_session_must_get_its_error():
    items = _poison()
    topk = decode_request(next(p for n, p in items.items() if n.startswith("oversize top_k")).payload)
    assert isinstance(topk, OpenSession) and topk.top_k > MAX_TOP_K and topk.reply_to == "me"

    short = items["step tokens of 5 bytes (not int32)"]
    msg = decode_request(short.payload)
    assert isinstance(msg, StepRequest) and (short.session_id, short.stream, short.answer) == (
        "sid-s",
        in_stream("r2"),
        "bad_request",
    )
    with pytest.raises(ProtocolError, match="not a multiple of 4"):
        unpack_ids(msg.tokens)

    ranged = items["out-of-range token ids"]
    ids = unpack_ids(decode_request(ranged.payload).tokens)
    assert ranged.answer == "bad_request" and all(i < 0 or i >= 1000 for i in ids)

    for replica in ("r1", "r2"):
        unknown = items[f"unknown session on cg:in:{replica}"]
        assert isinstance(decode_request(unknown.payload), StepRequest) and unknown.answer == "unknown_session"
        assert unknown.stream == in_stream(replica) and unknown.session_id.endswith(replica)


def test_a_batch_with_one_bad_item_has_a_good_one_to_serve():
    p = _poison()["StepBatch with one bad item (the good one served)"]
    batch = decode_request(p.payload)
    assert isinstance(batch, StepBatch) and len(batch.items) == 2
    with pytest.raises(ProtocolError):
        decode_request(batch.items[0])
    good = decode_request(batch.items[1])
    assert isinstance(good, StepRequest) and good.session_id == "sid-b" and good.step == 1
    assert list(unpack_ids(good.tokens)) == [1000] and (p.answer, p.stream) == (REPLY, in_stream("r1"))


def test_without_probes_only_sessionless_poison_and_unknown_sessions_remain():
    names = [p.name for p in poison_messages({}, ["r1"], 1000, "me", "n")]
    assert "out-of-range token ids" not in names and "unknown session on cg:in:r1" in names


def test_answer_of():
    assert answer_of(None) is None
    reply = StepReply(session_id="s", step=1, replica="r", ids=b"", logprobs=b"")
    assert answer_of(reply) == REPLY
    assert answer_of(ErrorReply(session_id="s", step=1, code="bad_request", message="x")) == "bad_request"


# ---- the bus, on a real Redis ------------------------------------------------------------------------------


def test_bus_backlog_counts_pending_and_unread_entries(redis_url):
    r = redis.Redis.from_url(redis_url)
    for stream in (OPEN_STREAM, in_stream("r1")):
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    r.xadd(OPEN_STREAM, {FIELD: b"x"})
    r.xadd(OPEN_STREAM, {FIELD: b"y"})
    r.xreadgroup(GROUP, "r1", {OPEN_STREAM: ">"}, count=1)  # read, never acknowledged: pending
    backlog = bus_backlog(r)
    assert backlog == {OPEN_STREAM: {"pending": 1, "length": 2}, in_stream("r1"): {"pending": 0, "length": 0}}
    r.close()


def test_busiest_replica_is_the_one_written_to_last(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.xadd(in_stream("r1"), {FIELD: b"x"}, id="1000-0")
    r.xadd(in_stream("r2"), {FIELD: b"x"}, id="2000-0")
    entry = r.xadd(in_stream("r2"), {FIELD: b"x"})
    r.xdel(in_stream("r2"), entry)  # served and deleted: the stream still knows its last id
    assert busiest_replica(r, ["r1", "r2", "r3"]) == "r2"
    r.close()


def test_inject_poisons_streams_and_the_edges_reply_lists(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.lpush(reply_key("edge-a"), b"real")
    items = poison_messages({}, ["r1"], 1000, "me", "n")
    inject(r, items, ["edge-a", "edge-b"])
    assert r.lrange(reply_key("edge-a"), 0, -1) == [GARBAGE, b"real"] and r.lrange(reply_key("edge-b"), 0, -1) == [
        GARBAGE
    ]
    assert r.llen(reply_key("me")) == 0  # the harness's own list is left alone
    on_open = [fields[FIELD] for _, fields in r.xrange(OPEN_STREAM)]
    assert GARBAGE in on_open and r.xlen(in_stream("r1")) == 2
    r.close()


def test_reply_lists_are_learnt_from_the_requests_edges_send(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.xadd(
        in_stream("r1"), {FIELD: encode(StepRequest(session_id="old", step=1, tokens=b"", budget_ms=1, reply_to="x"))}
    )
    with ReplyListWatcher(redis_url, [OPEN_STREAM, in_stream("r1")], exclude="me") as watcher:
        time.sleep(0.3)  # the edges' traffic after the watch began
        step = StepRequest(session_id="s1", step=1, tokens=b"", budget_ms=1, reply_to="pool-a")
        mine = StepRequest(session_id="p", step=1, tokens=b"", budget_ms=1, reply_to="me")
        r.xadd(in_stream("r1"), {FIELD: encode(StepBatch(items=[encode(step), GARBAGE, encode(mine)]))})
        r.xadd(OPEN_STREAM, {FIELD: encode(OpenSession(session_id="s2", instruction="i", top_k=3, budget_ms=1))})
        r.xadd(OPEN_STREAM, {FIELD: GARBAGE})
        deadline = time.monotonic() + 10
        while len(watcher.found) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    # a batch's items each name their list; an open without reply_to is answered on its session's list; what
    # was sent before the watch began, and the harness's own list, are not in it
    assert watcher.found == ["pool-a", "s2"]
    r.close()


def test_collect_replies_by_session_and_step(redis_url):
    r = redis.Redis.from_url(redis_url)
    a = StepReply(session_id="a", step=0, replica="r1", ids=b"", logprobs=b"")
    b = ErrorReply(session_id="b", step=1, code="bad_request", message="x")
    r.lpush(reply_key("me"), b"\xc1 not a reply")  # skipped, not fatal
    r.lpush(reply_key("me"), encode(ReplyBatch(items=[a, b])))
    got = collect_replies(r, "me", {("a", 0), ("b", 1)}, timeout_s=5)
    assert set(got) == {("a", 0), ("b", 1)} and got[("b", 1)].code == "bad_request"
    assert collect_replies(r, "me", {("c", 0)}, timeout_s=1) == {}  # bounded wait
    r.close()


# ---- the counting device ----------------------------------------------------------------------------------


class _Inner:
    network = "inner's"

    def __init__(self):
        self.calls = []

    def prefill(self, keys, prompts):
        self.calls.append(("prefill", len(keys)))
        return [None] * len(keys)

    def step(self, keys, tokens):
        self.calls.append(("step", list(tokens)))
        return [None] * len(keys)

    def release(self, keys):
        self.calls.append(("release", len(keys)))


def test_counting_device_counts_tokens_before_each_pass_and_passes_everything_on():
    inner, counts = _Inner(), []
    dev = CountingDevice(inner, lambda n: counts.append((n, len(inner.calls))))
    dev.prefill(["a", "b"], [[1], [2]])
    dev.step(["a", "b"], [7, 8])
    dev.step(["b"], [10])
    dev.release(["a", "b"])
    assert counts == [(2, 1), (3, 2)] and dev.tokens == 3  # told before the pass runs (a fault lands mid-run)
    assert dev.network == "inner's" and not dev.simulated
    assert inner.calls == [("prefill", 2), ("step", [7, 8]), ("step", [10]), ("release", 2)]


# ---- every scenario end to end (slow: a real cluster, tiny models) ----------------------------------------


@pytest.mark.slow
def test_every_scenario_end_to_end(tiny_large, tiny_small, tmp_path):
    """``--scenario all`` through the CLI on a small setting (one cluster for the first four scenarios, one for
    overload, as a user's run): in every scenario every session ok and identical to the reference, every check
    held."""
    from cogenesis.apps.cli import main

    out = tmp_path / "chaos.json"
    argv = ["chaos", "--scenario", "all", "--sessions", "4", "--max-new-tokens", "12"]
    argv += ["--large-model", str(tiny_large), "--small-model", str(tiny_small), "--edge-prompt-tokens", "192"]
    argv += ["--session-idle", "10", "--timeout", "300", "--json", str(out)]
    rc = main(argv)
    report = json.loads(out.read_text())
    assert [s["scenario"] for s in report["scenarios"]] == list(SCENARIOS), failure_lines(report)
    for s in report["scenarios"]:
        scenario = s["scenario"]
        assert (s["failed"], s["identical"], s["sessions"]) == (0, 4, 4), failure_lines(report)
        assert s["tokens"]["lost"] == s["tokens"]["duplicated"] == s["tokens"]["changed"] == 0, scenario
        assert all(c["ok"] for c in s["checks"]), (scenario, s["checks"])
        assert s["passed"], scenario
        if scenario != "overload":
            assert s["fault"] and "at_s" in s["fault"], scenario
        if scenario == "kill-edge-pool":
            assert s["kv"]["after_sweep"]["active_sessions"] == 0 and s["kv"]["after_sweep"]["kv_bytes"] == 0
        if scenario == "poison":
            assert all(b == {"pending": 0, "length": 0} for b in s["bus"].values())
    assert report["passed"] and rc == 0


def test_kv_sampler_finds_when_the_orphans_were_swept():
    from cogenesis.apps.chaos import _KvSampler

    sampler = _KvSampler("http://unused", [], None, {})  # type: ignore[arg-type]
    sampler.samples = [
        {"t_s": 1.0, "active_sessions": 16, "kv_bytes": 9, "swept": 0},
        {"t_s": 61.0, "active_sessions": 9, "kv_bytes": 5, "swept": 7},
        {"t_s": 62.0, "active_sessions": 8, "kv_bytes": 4, "swept": 8},
    ]
    assert sampler.swept_after(8) == 62.0 and sampler.swept_after(7) == 61.0 and sampler.swept_after(9) is None
