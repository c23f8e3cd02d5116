"""`cogenesis fuzz`: the generators (seeded, hostile the way they claim), the classifier of answers, the report, the
ACL cases against a real locked Redis, and (slow) a small run end to end on tiny models."""

import json

import msgspec
import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from cogenesis.apps.chaos_pool import Outcome
from cogenesis.apps.fuzz import LegitWatcher, outline_requests, outline_text, replica_changes
from cogenesis.apps.fuzz_cases import (
    BAD_CREDS,
    SURFACES,
    BusCase,
    Fuzzer,
    HttpCase,
    Targets,
    Tokens,
    WsCase,
    hand_signed,
    kinds,
    split_count,
    surface_of,
)
from cogenesis.apps.fuzz_report import (
    LegitRun,
    Tally,
    compare_outlines,
    legit_report,
    passed,
    summary_lines,
    table_rows,
    totals,
)
from cogenesis.apps.fuzz_send import (
    FINDINGS,
    BusSender,
    Matcher,
    Result,
    _assign,
    classify_http,
    classify_redis,
    classify_replies,
    sse_events,
)
from cogenesis.core.auth import verify
from cogenesis.core.config import LimitsConfig
from cogenesis.core.errors import AuthError, ProtocolError
from cogenesis.core.protocol import (
    MAX_TOP_K,
    ErrorReply,
    OpenSession,
    StepBatch,
    StepReply,
    StepRequest,
    decode_request,
    encode,
    unpack_ids,
)

KEY = b"k" * 32


def targets(**over) -> Targets:
    t = Targets(
        replicas=["r1", "r2"],
        victim="fz-victim",
        victim_frames=[b"open", b"step"],
        bus_victim="fz-bus",
        bus_victim_replica="r1",
        reply_to="fz-list",
        stranger="fz-stranger",
        legit_sessions=["legit-1"],
        legit_reply_to=["gw-a-b"],
    )
    for k, v in over.items():
        setattr(t, k, v)
    return t


def cases(surface: str, n: int = 600, seed: int = 0, t: Targets | None = None) -> list:
    f = Fuzzer(seed, t or targets(), surface)
    return [getattr(f, surface)(i) for i in range(n)]


# ---- generators ----------------------------------------------------------------------------------------


def test_same_seed_same_cases_other_seed_other_cases():
    assert cases("ws", 80) == cases("ws", 80)
    assert cases("http", 80) == cases("http", 80) and cases("bus", 80) == cases("bus", 80)
    assert cases("ws", 80) != cases("ws", 80, seed=1)


def test_every_kind_is_made_and_belongs_to_its_surface():
    for surface in SURFACES:
        made = {c.kind for c in cases(surface, 4000)}
        table = {k for k, w, _ in kinds()[surface] if w >= 1}
        assert table <= made, table - made
        assert all(k.startswith(surface + ".") for k in made)
        assert {surface_of(c) for c in cases(surface, 50)} == {surface}


def test_split_count_spreads_every_case():
    for n in (0, 1, 7, 10_000):
        parts = split_count(n)
        assert sum(parts.values()) == n and set(parts) == set(SURFACES)
    assert split_count(10_000) == {"ws": 4000, "http": 3500, "bus": 2500}


def test_bad_opens_break_a_limit_and_are_never_valid():
    lim = LimitsConfig()
    for c in cases("ws", 1500):
        if c.kind != "ws.bad_open":
            continue
        msg = decode_request(c.frames[0][1])
        assert isinstance(msg, OpenSession) and c.expect == (msg.session_id,) and c.must_refuse
        ids = len(msg.resume) // 4
        broken = (
            not 1 <= msg.top_k <= MAX_TOP_K
            or len(msg.instruction) > lim.max_instruction_chars
            or msg.budget_ms > lim.max_budget_ms
            or not 0 <= msg.lookahead <= 16
            or len(msg.resume) % 4
            or ids > lim.max_session_tokens
            or msg.resume_step < 0
        )
        assert broken, msg.session_id


def test_no_case_is_a_valid_next_step_of_the_victim():
    """A's own cases never move its victim on: a next step (victim_step + 1) is always invalid (too many or bad ids).
    (B's steps of it are the attack: refused forbidden whatever they hold.)"""
    t = targets(victim_step=3, victim_token=42)
    vocab = t.vocab

    def decoded(data: bytes) -> list:
        try:
            msg = decode_request(data)
        except ProtocolError:
            return []
        return [m for i in msg.items for m in decoded(i)] if isinstance(msg, StepBatch) else [msg]

    for c in cases("ws", 3000, t=t):
        if c.conn == "B":
            continue
        for kind, data in c.frames:
            for m in decoded(data) if kind == "binary" else []:
                if isinstance(m, StepRequest) and m.session_id == t.victim and m.step == t.victim_step + 1:
                    ids = unpack_ids(m.tokens)
                    assert len(ids) > t.limits.max_step_tokens or ((ids < 0) | (ids >= vocab)).any(), c


def test_cross_device_cases_come_from_device_b_and_must_be_refused():
    got = [c for c in cases("ws", 2000) if c.kind == "ws.cross_device"]
    assert got and all(c.conn == "B" and c.cred == "other" and c.must_refuse for c in got)
    assert {c.expect[0] for c in got if c.expect} == {"fz-victim", "legit-1"}
    closes = [c for c in got if "close" in c.note]  # a close owes no answer (a sentinel follows it)
    assert closes and all(not c.expect for c in closes)
    reopens = [c for c in got if c.note.startswith(("re-open", "resume"))]  # only of A's session, which lives
    assert reopens and all(c.expect == ("fz-victim",) for c in reopens)


def test_auth_cases_use_a_fresh_connection_and_a_bad_credential():
    got = [c for c in cases("ws", 2000) if c.kind == "ws.auth"]
    assert got and all(c.conn == "fresh" and c.cred in BAD_CREDS and c.must_refuse for c in got)


def test_frames_past_the_limits():
    lim = LimitsConfig()
    for c in cases("ws", 4000):
        if c.kind in ("ws.oversize_frame", "ws.enormous_frame"):
            assert c.size > lim.max_message_bytes and c.expect == ("",)
        if c.kind == "ws.batch_too_many":
            assert len(msgspec.msgpack.decode(c.frames[0][1])["items"]) > lim.max_batch_items


def test_http_cases_carry_their_credential_and_limits():
    lim = LimitsConfig()
    hs = cases("http", 3000)
    assert all(isinstance(c, HttpCase) for c in hs)
    assert all(c.size > lim.max_body_bytes for c in hs if c.kind == "http.huge_body")
    assert all(c.cred in BAD_CREDS and c.must_refuse for c in hs if c.kind == "http.auth")
    assert {c.target for c in hs if c.kind == "http.cloud"} == {"cloud"}
    health = [c for c in hs if c.kind == "http.healthz"]
    assert health and all(c.public_only and c.cred != "admin" for c in health)
    for c in hs:
        if c.kind == "http.chat_bad_field":  # a chat body always asks for one token (never a 160-token outline)
            body = json.loads(c.body)
            assert body["max_tokens"] == 1 or "max_tokens" in c.note


def test_bus_cases_target_the_bus_and_the_fuzzers_lists():
    t = targets()
    bs = cases("bus", 3000, t=t)
    assert all(isinstance(c, BusCase) for c in bs)
    for c in bs:
        if c.op == "xadd":
            assert c.stream in ("cg:open", "cg:in:r1", "cg:in:r2"), c.stream
        for lst, _ in c.expect:
            assert lst in (t.reply_to, t.stranger)
    cross = [c for c in bs if c.kind == "bus.cross_session"]
    assert cross and all(c.must_refuse for c in cross)
    victim = [c for c in cross if c.expect[0][1] == "fz-bus"]
    assert victim and all(c.expect[0][0] == "fz-stranger" and c.stream == "cg:in:r1" for c in victim)
    acl = [c for c in bs if c.kind == "bus.acl"]
    assert acl and all(c.op == "command" and c.must_refuse for c in acl)
    assert not any(c.command[0].upper() in ("FLUSHALL", "FLUSHDB", "SHUTDOWN", "XGROUP") for c in acl)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), surface=st.sampled_from(SURFACES))
def test_any_seed_makes_well_formed_cases(seed, surface):
    for c in cases(surface, 30, seed=seed):
        assert c.kind in {k for k, _, _ in kinds()[surface]}
        if isinstance(c, WsCase):
            assert c.frames and all(kind in ("binary", "text", "bad_utf8", "raw") for kind, _ in c.frames)
            assert c.conn in ("A", "B", "fresh")
        elif isinstance(c, BusCase):
            assert (c.op == "command") == bool(c.command)


def test_tokens_every_bad_credential_fails_verification():
    tokens = Tokens(KEY, subject="fuzz-x")
    assert verify(KEY, tokens.values["device"]).sub == "fuzz-x"
    assert verify(KEY, tokens.values["other"]).sub == "fuzz-x-b"
    assert verify(KEY, tokens.values["admin"]).role == "admin"
    for cred in ("expired", "forged", "tampered", "bad_role", "bad_claims", "malformed", "long"):
        with pytest.raises(AuthError):
            verify(KEY, tokens.values[cred])
    assert tokens.header("none") is None and tokens.header("query") is None
    assert tokens.header("basic").startswith("Basic ") and tokens.header("device").startswith("Bearer ")


def test_hand_signed_claims_verify_as_signed_but_are_refused():
    with pytest.raises(AuthError, match="role"):
        verify(KEY, hand_signed(KEY, {"sub": "x", "role": "root", "iat": 0, "exp": 2**40}))


# ---- classification -------------------------------------------------------------------------------------


def reply(sid="s", step=1) -> StepReply:
    return StepReply(session_id=sid, step=step, replica="r", ids=b"", logprobs=b"")


def error(code: str, sid="s") -> ErrorReply:
    return ErrorReply(session_id=sid, step=1, code=code, message="m")


def test_classify_replies():
    assert classify_replies(True, [error("bad_request")], 0)[0] == "refused"
    assert classify_replies(False, [reply()], 0)[0] == "accepted"
    assert classify_replies(True, [reply()], 0)[0] == "breach"
    for code in ("internal", "unavailable", "replica_lost", "made_up"):
        assert classify_replies(False, [error(code)], 0)[0] == "server_error"
    assert classify_replies(False, [], 1)[0] == "hung"
    assert classify_replies(False, [], 1, dropped=True)[0] == "dropped"
    assert classify_replies(True, [], 1, close_code=4401)[0] == "refused"
    assert classify_replies(True, [error("too_large")], 0, close_code=1009)[0] == "refused"
    assert classify_replies(False, [], 1, close_code=1011)[0] == "server_error"
    assert classify_replies(False, [], 0)[0] == "sent"
    assert classify_replies(False, [error("bad_request")], 0, bad_frames=1)[0] == "server_error"


def test_classify_http():
    case = HttpCase(1, "http.x", must_refuse=True)
    assert classify_http(case, 401, b"")[0] == "refused"
    assert classify_http(case, 500, b"")[0] == "server_error"
    assert classify_http(case, 504, b"")[0] == "server_error"
    assert classify_http(case, 200, b"{}")[0] == "breach"
    assert classify_http(HttpCase(1, "http.x"), 200, b"{}")[0] == "accepted"
    assert classify_http(HttpCase(1, "http.x"), 200, b"", events=["progress", "error"])[0] == "refused"
    health = HttpCase(1, "http.healthz", public_only=True)
    assert classify_http(health, 200, b'{"ok": true}')[0] == "accepted"
    assert classify_http(health, 200, b'{"ok": true, "connections": 3}')[0] == "breach"


def test_classify_redis():
    case = BusCase(1, "bus.acl", op="command", command=("KEYS", "*"), must_refuse=True)
    assert classify_redis(case, redis.exceptions.NoPermissionError("NOPERM no permissions"))[0] == "refused"
    assert classify_redis(case, redis.AuthenticationError("Authentication required."))[0] == "refused"
    assert classify_redis(case, redis.ResponseError("WRONGPASS invalid username-password pair"))[0] == "refused"
    assert classify_redis(case, None)[0] == "breach"
    assert classify_redis(case, redis.ConnectionError("x"))[0] == "dropped"


def test_matcher_takes_owed_answers_then_wildcards_and_counts_stale_ones():
    m = Matcher(["a", "a", ""])
    assert m.take("a") and m.take("zz") and m.take("a") and m.missing == 0
    assert not m.take("a") and m.stale == 1
    strict = Matcher(["a"], wild=None)
    assert not strict.take("b") and strict.missing == 1


def test_sse_events():
    text = 'event: progress\ndata: {"tokens": 1}\n\nevent: done\ndata: {}\n\n'
    assert sse_events(text) == ["progress", "done"]
    chat = 'data: {"choices": []}\n\ndata: {"error": {"message": "x"}}\n\ndata: [DONE]\n\n'
    assert sse_events(chat) == ["message", "error", "done"]


def test_bus_answers_go_to_their_cases_by_step():
    gap = BusCase(1, "bus.victim_step", fields=((b"m", encode(StepRequest(session_id="v", step=9, tokens=b"", budget_ms=1))),),
                  expect=(("l", "v"),), must_refuse=True)  # fmt: skip
    replay = BusCase(2, "bus.victim_step", fields=((b"m", encode(StepRequest(session_id="v", step=1, tokens=b"", budget_ms=1))),),
                     expect=(("l", "v"),))  # fmt: skip
    got = [
        (("l", "v", 1), reply("v", 1)),
        (("l", "v", 9), ErrorReply(session_id="v", step=9, code="bad_request", message="")),
    ]
    out = _assign([gap, replay], got, {})
    assert isinstance(out[1][0][0], ErrorReply) and isinstance(out[2][0][0], StepReply)
    assert out[1][1] == out[2][1] == 0
    lost = _assign([gap], [], {})
    assert lost[1] == ([], 1, 0)


# ---- the report -----------------------------------------------------------------------------------------


def outcome(client: int, ids: list[int], error: str | None = None) -> Outcome:
    return Outcome(client=client, tid=f"t{client}", ids=ids, error=error)


def test_legit_report_compares_every_round_with_the_reference():
    ref = LegitRun(outcomes=[outcome(0, [1, 2, 3]), outcome(1, [4, 5])], outlines=["a", "b"])
    same = LegitRun(outcomes=[outcome(0, [1, 2, 3]), outcome(1, [4, 5])], outlines=["a", "b"])
    worse = LegitRun(
        outcomes=[outcome(0, [1, 9, 3]), outcome(1, [], "boom")], outlines=["a", None], outline_errors=["x"]
    )
    rep = legit_report(ref, [same, worse])
    assert (rep["rounds"], rep["sessions"], rep["identical"], rep["failed"]) == (2, 4, 2, 1)
    assert (rep["outlines"], rep["outlines_identical"]) == (4, 3)
    assert [d["round"] for d in rep["differing_sessions"]] == [2, 2]
    assert compare_outlines(["a"], [None]) == [{"index": 0, "identical": False, "chars": None, "failed": True}]


def test_outline_requests_and_texts():
    reqs = outline_requests(["Write about X"], 8)
    assert [p for p, _ in reqs] == ["/v1/sketch", "/v1/chat/completions"]
    assert all(b["temperature"] == 0.0 and b["max_tokens"] == 8 for _, b in reqs)
    assert outline_text("/v1/sketch", b'{"sketch": "1. a", "tokens": 3}') == "1. a"
    assert outline_text("/v1/chat/completions", b'{"choices": [{"message": {"content": "1. b"}}]}') == "1. b"


def test_replica_changes():
    before = {"SERVE_REPLICA::a": 1, "SERVE_REPLICA::b": 2}
    assert replica_changes(before, dict(before)) == []
    events = {c["event"] for c in replica_changes(before, {"SERVE_REPLICA::a": 5, "SERVE_REPLICA::c": 3})}
    assert events == {"restarted", "gone", "new"}


def report_of(tally: Tally, **over) -> dict:
    ref = LegitRun(outcomes=[outcome(0, [1])], outlines=["a"])
    report = {
        "settings": {"count": tally.done},
        "fuzz": {"sent": tally.done, "seconds": 1.0, "rate_per_s": 1.0, **tally.to_json()},
        "legit": legit_report(ref, [ref]),
        "crashes": [],
        "stuck": {"entries": 0, "streams": {}},
        "findings": [
            msgspec.structs.asdict(f) if hasattr(f, "__struct_fields__") else f.__dict__ for f in tally.findings
        ],
    }
    report.update(over)
    report["totals"] = totals(report)
    report["passed"] = passed(report)
    return report


def test_a_clean_report_passes_and_any_finding_fails_it():
    tally = Tally()
    tally.add(
        [Result(1, "ws", "ws.garbage", "refused", "bad_request"), Result(2, "http", "http.valid", "accepted", "200")]
    )
    clean = report_of(tally)
    assert clean["passed"] and clean["totals"] == {
        "crashes": 0, "5xx": 0, "stuck": 0, "hung": 0, "breaches": 0, "changed_outputs": 0, "harness_errors": 0
    }  # fmt: skip
    assert table_rows(clean)[-1][:2] == ["all", "2"]
    assert not report_of(tally, crashes=[{"event": "gone"}])["passed"]
    assert not report_of(tally, stuck={"entries": 3, "streams": {"cg:open": {"pending": 3, "length": 0}}})["passed"]
    for verdict in FINDINGS:
        bad = Tally()
        bad.add([Result(3, "bus", "bus.acl", verdict, "x", "edge: KEYS")])
        rep = report_of(bad)
        assert not rep["passed"] and any(line.startswith(verdict) for line in summary_lines(rep))


def test_the_watcher_learns_legitimate_opens_only():
    sessions, lists = [], []
    w = LegitWatcher(None, sessions, lists)  # type: ignore[arg-type]
    w.learn(encode(OpenSession(session_id="dev-1", instruction="x", top_k=5, budget_ms=1, reply_to="gw-a-b")))
    w.learn(encode(OpenSession(session_id="fz-1", instruction="x", top_k=5, budget_ms=1, reply_to="gw-a-c")))
    w.learn(encode(OpenSession(session_id="dev-1", instruction="x", top_k=5, budget_ms=1, reply_to="gw-a-b")))
    w.learn(b"\xc1 garbage")
    assert sessions == ["dev-1"] and lists == ["gw-a-b"]


# ---- the ACL cases against a real locked Redis ------------------------------------------------------------


@pytest.fixture
def locked_redis(tmp_path):
    from cogenesis.cluster.redis_server import RedisServer
    from cogenesis.core.secrets import SecretsDir

    secrets = SecretsDir.create(tmp_path / "secrets")
    with RedisServer(secrets=secrets) as server:
        yield server.url, secrets


def test_every_acl_case_is_refused_by_a_locked_redis(locked_redis):
    url, secrets = locked_redis
    t = targets(replicas=[])
    sender = BusSender(url, str(secrets.path), t, timeout_s=1.0)
    try:
        acl = [c for c in cases("bus", 2000, t=t) if c.kind == "bus.acl"]
        seen = {(c.role, c.command) for c in acl}
        assert len(seen) > 20
        results = sender.send_chunk(acl)
        assert {r.verdict for r in results} == {"refused"}, [r for r in results if r.verdict != "refused"][:3]
    finally:
        sender.finish()


# ---- end to end (slow: a real cluster, tiny models) ------------------------------------------------------


@pytest.mark.slow
def test_fuzz_end_to_end(tiny_large, tiny_small, tmp_path):
    """``cogenesis fuzz`` with a small count on tiny models: the report's structure, every case classified, and
    no finding: no crash, no 5xx, nothing stuck or hung, no breach, every legitimate output identical."""
    from cogenesis.apps.cli import main

    out = tmp_path / "fuzz.json"
    argv = ["fuzz", "--count", "300", "--sessions", "2", "--outlines", "1", "--max-new-tokens", "8"]
    argv += ["--large-model", str(tiny_large), "--small-model", str(tiny_small), "--edge-prompt-tokens", "192"]
    argv += ["--grace", "30", "--timeout", "600", "--json", str(out)]
    rc = main(argv)
    report = json.loads(out.read_text())
    lines = summary_lines(report)
    assert set(report) >= {"settings", "reference", "fuzz", "legit", "crashes", "stuck", "findings", "totals", "passed"}
    by_surface = report["fuzz"]["by_surface"]
    assert set(by_surface) == set(SURFACES)
    assert sum(sum(v.values()) for v in by_surface.values()) == 300 + report["settings"]["ws_workers"], lines
    assert report["totals"] == {
        "crashes": 0, "5xx": 0, "stuck": 0, "hung": 0, "breaches": 0, "changed_outputs": 0, "harness_errors": 0
    }, lines  # fmt: skip
    assert report["legit"]["identical"] == report["legit"]["sessions"] >= 2, lines
    assert report["legit"]["outlines_identical"] == report["legit"]["outlines"] >= 2, lines
    assert report["passed"] and rc == 0
