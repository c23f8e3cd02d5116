"""Faults seen from the edge: a replica dies, forgets a session, refuses busy, Redis restarts or goes away,
a reply is malformed. The cloud is played by ``FakeReplica`` threads that speak the bus contract with raw
Redis commands; their top-k is a pure function of a session's public context (instruction and the ids the
edge sent), so a replayed session gives the same output only if the edge replayed exactly what it sent:
a lost or repeated token changes every token after it."""

from __future__ import annotations

import json
import threading
import time
import zlib
from dataclasses import dataclass, field

import pytest
import redis
from transformers import AutoTokenizer

from cogenesis.cluster.bus import FIELD, GROUP, OPEN_STREAM, alive_key, in_stream, reply_key
from cogenesis.cluster.redis_server import RedisServer
from cogenesis.core import metrics
from cogenesis.core.config import EdgeConfig
from cogenesis.core.protocol import (
    CloseSession,
    ErrorReply,
    OpenSession,
    ReplyBatch,
    StepBatch,
    StepReply,
    StepRequest,
    decode_request,
    encode,
    pack_ids,
    pack_logprobs,
    unpack_ids,
)
from cogenesis.edge_sim.client import EdgeClient
from cogenesis.edge_sim.device import DeviceProfile, ProfileDevice
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.logits import run_logits_sessions

K = 3


def top_ids(instruction: str, ids: list[int]) -> list[int]:
    """The fake cloud's top-k after ``instruction`` + ``ids`` (best first): a hash of the whole context."""
    h = zlib.crc32(json.dumps([instruction, ids]).encode())
    return [1000 + (h + 7919 * j) % 9000 for j in range(K)]


def expected_ids(instruction: str, n: int) -> list[int]:
    """What a greedy simulated device writes over an undisturbed fake cloud: the top id, n times."""
    out: list[int] = []
    for _ in range(n):
        out.append(top_ids(instruction, out)[0])
    return out


@dataclass
class _Session:
    instruction: str
    ids: list[int]
    step: int
    reply_to: str


@dataclass
class FakeReplica:
    """A replica in a thread, per the bus contract: heartbeats (``cg:alive``), takes opens from the shared
    stream and steps from its own, answers on the edge's reply list, acknowledges and deletes entries.

    Faults on request: ``die_after`` (serve that many steps, then stop reading and beating, the entry in hand
    unanswered: a killed process), ``busy`` (refuse that many opens busy), ``forget_at`` (answer that step
    ``unknown_session`` once per session, or every step from it on with ``forget_always``), ``hold_at`` (read
    that step, tell ``held`` and answer nothing: the reply is lost), ``bad_at`` (answer that step with
    malformed rows), ``garbage_at`` (an undecodable entry before that step's reply), ``start_after_s``."""

    url: str
    name: str
    die_after: int | None = None
    busy: int = 0
    retry_after_ms: int = 50
    forget_at: int | None = None
    forget_always: bool = False
    hold_at: int | None = None
    bad_at: tuple[str, int] | None = None  # (instruction, step)
    garbage_at: int | None = None  # push an undecodable reply before answering this step
    start_after_s: float = 0.0
    beat_s: float = 0.2
    ttl_ms: int = 1000
    sessions: dict[str, _Session] = field(default_factory=dict)
    log: list[tuple[str, str, int]] = field(default_factory=list)  # (kind, session, step) served, in order
    held: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _forgotten: set = field(default_factory=set)
    steps_served: int = 0

    def start(self) -> FakeReplica:
        self.r = redis.Redis.from_url(self.url, socket_timeout=5)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _groups(self) -> None:
        for stream in (OPEN_STREAM, in_stream(self.name)):
            try:
                self.r.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _run(self) -> None:
        if self._stop.wait(self.start_after_s):
            return
        beat = 0.0
        ready = False
        while not self._stop.is_set():
            try:
                if not ready:
                    self._groups()
                    ready = True
                if time.monotonic() - beat >= self.beat_s:
                    self.r.set(alive_key(self.name), json.dumps({"pid": 0, "at": time.time()}), px=self.ttl_ms)
                    beat = time.monotonic()
                streams = {OPEN_STREAM: ">", in_stream(self.name): ">"}
                resp = self.r.xreadgroup(GROUP, self.name, streams, count=16, block=50)
                for stream, entries in resp or []:
                    for entry_id, fields in entries:
                        if not self._serve(stream.decode(), entry_id, fields[FIELD]):
                            return  # died: nothing more answered, no heartbeat
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                ready = False
            except (redis.ConnectionError, redis.TimeoutError):  # Redis restarting: try again
                ready = False
                time.sleep(0.05)

    def _serve(self, stream: str, entry_id: bytes, payload: bytes) -> bool:
        msg = decode_request(payload)
        items = [decode_request(b) for b in msg.items] if isinstance(msg, StepBatch) else [msg]
        replies: dict[str, list[StepReply | ErrorReply]] = {}
        for m in items:
            if isinstance(m, StepRequest) and self.die_after is not None and self.steps_served >= self.die_after:
                self._stop.set()
                return False
            if isinstance(m, StepRequest) and m.step == self.hold_at:
                self.held.set()  # read, never answered: lost with the restart
                continue
            reply = self._answer(m)
            if reply is not None:
                to = m.reply_to or m.session_id  # type: ignore[union-attr]
                replies.setdefault(to, []).append(reply)
        pipe = self.r.pipeline(transaction=False)
        for to, msgs in replies.items():
            if self.garbage_at is not None and any(r.step == self.garbage_at for r in msgs):
                pipe.lpush(reply_key(to), b"\xc1 not a reply")
            pipe.lpush(reply_key(to), encode(msgs[0]) if len(msgs) == 1 else encode(ReplyBatch(items=msgs)))
            pipe.expire(reply_key(to), 600)
        pipe.xack(stream, GROUP, entry_id)
        pipe.xdel(stream, entry_id)
        pipe.execute()
        return True

    def _answer(self, m) -> StepReply | ErrorReply | None:
        if isinstance(m, CloseSession):
            self.sessions.pop(m.session_id, None)
            self.log.append(("close", m.session_id, 0))
            return None
        if isinstance(m, OpenSession):
            if self.busy > 0:
                self.busy -= 1
                self.log.append(("busy", m.session_id, m.resume_step))
                return ErrorReply(
                    session_id=m.session_id, step=0, code="busy", message="full", retry_after_ms=self.retry_after_ms
                )
            ids = unpack_ids(m.resume).tolist()
            self.sessions[m.session_id] = _Session(m.instruction, ids, m.resume_step, m.reply_to)
            self.log.append(("resume" if m.resume or m.resume_step else "open", m.session_id, m.resume_step))
            return self._reply(m.session_id)
        assert isinstance(m, StepRequest)
        s = self.sessions.get(m.session_id)
        forget = self.forget_at is not None and (
            (m.step == self.forget_at and m.session_id not in self._forgotten)
            or (self.forget_always and m.step >= self.forget_at)
        )
        if s is None or forget:
            self.sessions.pop(m.session_id, None)
            self._forgotten.add(m.session_id)
            self.log.append(("unknown", m.session_id, m.step))
            return ErrorReply(session_id=m.session_id, step=m.step, code="unknown_session", message="no such session")
        if m.step == s.step + 1:
            s.ids += unpack_ids(m.tokens).tolist()
            s.step = m.step
        elif m.step != s.step:
            return ErrorReply(session_id=m.session_id, step=m.step, code="bad_request", message="out of order")
        self.steps_served += 1
        self.log.append(("step", m.session_id, m.step))
        return self._reply(m.session_id)

    def _reply(self, sid: str) -> StepReply:
        s = self.sessions[sid]
        ids = top_ids(s.instruction, s.ids)
        if self.bad_at == (s.instruction, s.step):
            return StepReply(session_id=sid, step=s.step, replica=self.name, ids=b"\x01\x02\x03\x04\x05", logprobs=b"")
        return StepReply(
            session_id=sid,
            step=s.step,
            replica=self.name,
            ids=pack_ids(ids),
            logprobs=pack_logprobs([-0.1 * (j + 1) for j in range(K)]),
        )


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def config(**kw) -> EdgeConfig:
    base = dict(
        top_k=K,
        max_new_tokens=12,
        ignore_eos=True,
        max_prompt_tokens=256,
        sampling={"temperature": 0.0, "top_p": 1.0, "seed": 0},
        step_timeout_s=60,  # far beyond these tests: a fault must be noticed by what the edge checks, not this
    )
    return EdgeConfig(**{**base, **kw})


def run(tok, url, records, cfg, redis_retry_s=30.0):
    from cogenesis.cluster.bus import EdgeBus

    engine = EdgeEngine(None, tok, cfg.max_prompt_tokens)  # a simulated device: greedy over the cloud's top-k
    profile = DeviceProfile(name="t", decode_tokens_per_s=1e6, prefill_tokens_per_s=1e9, rtt_ms=0)
    clients = [EdgeClient(i, rec, engine, cfg) for i, rec in enumerate(records)]
    bus = EdgeBus(url, redis_retry_s=redis_retry_s)
    try:
        return run_logits_sessions(clients, engine, bus, cfg, device=ProfileDevice(profile, lambda s: None))
    finally:
        bus.close()


def expected_text(tok, record, cfg) -> str:
    return tok.decode(expected_ids(record.public_instruction, cfg.max_new_tokens), skip_special_tokens=True).strip()


def _resumes(cause: str) -> float:
    return metrics.resumes.labels(cause)._value.get()


def test_an_undisturbed_run_writes_the_fake_clouds_greedy_path(tok, redis_url, sample_records):
    cfg = config()
    replica = FakeReplica(redis_url, "ra").start()
    try:
        results = run(tok, redis_url, sample_records[:2], cfg)
    finally:
        replica.stop()
    assert [r.text for r in results] == [expected_text(tok, rec, cfg) for rec in sample_records[:2]]
    assert all(r.error is None and r.resumes == 0 and r.busy_retries == 0 for r in results)
    assert "resumes" not in results[0].to_json()


def test_a_dead_replicas_sessions_resume_on_a_survivor_with_identical_output(tok, redis_url, sample_records):
    """Replica A stops after a few steps (no reply, no heartbeat); the edge notices the missing heartbeat
    (its step timeout is far away), re-opens A's sessions by replay, B takes them, and every session
    writes exactly what an undisturbed run writes."""
    cfg = config(max_new_tokens=16)
    records = sample_records[:4]
    a = FakeReplica(redis_url, "ra", die_after=6).start()
    b = FakeReplica(redis_url, "rb", start_after_s=0.5).start()  # the opens go to A
    before = _resumes("replica_lost") + _resumes("unknown_session")
    try:
        results = run(tok, redis_url, records, cfg)
    finally:
        a.stop()
        b.stop()
    assert [r.error for r in results] == [None] * 4
    assert [r.text for r in results] == [expected_text(tok, rec, cfg) for rec in records]
    assert [r.tokens for r in results] == [16] * 4
    on_a = {sid for kind, sid, _ in a.log if kind == "open"}
    assert on_a, "the consumer group gave replica A no session"
    resumed = {sid for kind, sid, _ in b.log if kind == "resume"}
    assert resumed == on_a  # every session of A, and only those, was replayed on B
    assert sum(r.resumes for r in results) == len(on_a)
    assert _resumes("replica_lost") + _resumes("unknown_session") - before == len(on_a)


def test_an_unknown_session_is_resumed_where_it_was(tok, redis_url, sample_records):
    cfg = config()
    replica = FakeReplica(redis_url, "ra", forget_at=5).start()
    before = _resumes("unknown_session")
    try:
        (r,) = run(tok, redis_url, sample_records[:1], cfg)
    finally:
        replica.stop()
    assert r.error is None and r.text == expected_text(tok, sample_records[0], cfg)
    assert r.resumes == 1 and _resumes("unknown_session") - before == 1
    (resume,) = [(kind, step) for kind, _, step in replica.log if kind == "resume"]
    assert resume == ("resume", 5)  # re-opened at its in-flight step, then stepping on from 6
    assert [step for kind, _, step in replica.log if kind == "step"] == [s for s in range(1, 12) if s != 5]
    assert r.to_json()["resumes"] == 1


def test_a_session_resumed_more_than_max_resumes_fails_replica_lost(tok, redis_url, sample_records):
    cfg = config(max_resumes=2)
    replica = FakeReplica(redis_url, "ra", forget_at=3, forget_always=True).start()
    try:
        (r,) = run(tok, redis_url, sample_records[:1], cfg)
    finally:
        replica.stop()
    assert r.error_code == "replica_lost" and "max_resumes 2" in (r.error or "")
    assert r.resumes == 2 and r.tokens == 0


def test_a_busy_open_is_retried_while_the_other_sessions_step(tok, redis_url, sample_records):
    cfg = config(max_new_tokens=8)
    replica = FakeReplica(redis_url, "ra", busy=3, retry_after_ms=200).start()
    before = metrics.busy_retries._value.get()
    try:
        results = run(tok, redis_url, sample_records[:2], cfg)
    finally:
        replica.stop()
    assert [r.text for r in results] == [expected_text(tok, rec, cfg) for rec in sample_records[:2]]
    assert all(r.error is None for r in results)
    assert sum(r.busy_retries for r in results) == 3 and metrics.busy_retries._value.get() - before == 3
    refused = [sid for kind, sid, _ in replica.log if kind == "busy"]
    admitted_late = next(sid for sid in refused if ("open", sid, 0) in replica.log and refused.count(sid) >= 2)
    other = next(sid for kind, sid, _ in replica.log if kind == "open" and sid != admitted_late)
    late_open = replica.log.index(("open", admitted_late, 0))
    # while one session waited for admission, the other kept stepping
    assert any(kind == "step" and sid == other for kind, sid, _ in replica.log[:late_open])


@pytest.fixture(scope="module")
def small(tiny_small):
    from cogenesis.core.models import load_causal_lm

    return load_causal_lm(str(tiny_small))


def run_real(small, url, records, cfg):
    """Sessions on the real small model, in the loop's own packed device (the demo pool's, chaos's)."""
    from cogenesis.cluster.bus import EdgeBus

    model, tok = small
    engine = EdgeEngine(model, tok, cfg.max_prompt_tokens)
    clients = [EdgeClient(i, rec, engine, cfg) for i, rec in enumerate(records)]
    bus = EdgeBus(url)
    try:
        return run_logits_sessions(clients, engine, bus, cfg)
    finally:
        bus.close()


def test_a_session_parked_busy_on_the_packed_device_writes_what_an_unparked_run_writes(
    small, redis_url, sample_records
):
    """Opens refused busy park their sessions while another steps on the packed small model; admitted later, they
    go on from their own device state (their rows sat the others' passes out), and every session writes exactly
    the token ids of a run in which nobody waited."""
    cfg = config(max_new_tokens=10)
    records = sample_records[:3]
    replica = FakeReplica(redis_url, "ra").start()
    try:
        undisturbed = run_real(small, redis_url, records, cfg)
    finally:
        replica.stop()
    assert all(r.error is None and len(r.ids) == r.tokens == 10 for r in undisturbed)
    replica = FakeReplica(redis_url, "rb", busy=2, retry_after_ms=100).start()
    try:
        results = run_real(small, redis_url, records, cfg)
    finally:
        replica.stop()
    assert [r.error for r in results] == [None] * 3
    assert [r.ids for r in results] == [r.ids for r in undisturbed]
    assert [r.text for r in results] == [r.text for r in undisturbed]
    assert sum(r.busy_retries for r in results) == 2
    refused = {sid for kind, sid, _ in replica.log if kind == "busy"}
    first_late_open = min(replica.log.index(("open", sid, 0)) for sid in refused)
    # while the refused sessions waited, another one stepped on the device: theirs sat its passes out
    assert any(kind == "step" and sid not in refused for kind, sid, _ in replica.log[:first_late_open])
    # a session that ended was closed at once, while the late ones still stepped (its slot is free for the waiting)
    (first,) = {sid for kind, sid, _ in replica.log if kind == "open"} - refused
    last_late_step = max(i for i, (kind, sid, _) in enumerate(replica.log) if kind == "step" and sid in refused)
    assert replica.log.index(("close", first, 0)) < last_late_step


class _Boom(RuntimeError):
    pass


def test_an_unexpected_error_in_one_sessions_work_fails_only_that_session(tok, redis_url, sample_records, monkeypatch):
    """A bug in one session's own work (here: its stream gate raises on its 4th token) ends that session ``internal``;
    the others write their undisturbed output, and nothing is raised to the caller."""
    from cogenesis.edge_sim.gate import OutboundGate

    cfg = config()
    real, made = OutboundGate.public_stream, []

    def public_stream(gate, session_id):  # the sessions start in client order: the second one's is broken
        stream = real(gate, session_id)
        made.append(stream)
        if len(made) == 2:
            push, n = stream.push, [0]

            def broken(token):
                n[0] += 1
                if n[0] == 4:
                    raise _Boom("the gate broke")
                return push(token)

            stream.push = broken  # type: ignore[method-assign]
        return stream

    monkeypatch.setattr(OutboundGate, "public_stream", public_stream)
    replica = FakeReplica(redis_url, "ra").start()
    try:
        results = run(tok, redis_url, sample_records[:3], cfg)
    finally:
        replica.stop()
    assert results[1].error_code == "internal" and "_Boom: the gate broke" in (results[1].error or "")
    assert results[1].ids == [] and results[1].tokens == 0
    for r, rec in [(results[0], sample_records[0]), (results[2], sample_records[2])]:
        assert r.error is None and r.text == expected_text(tok, rec, cfg)


def test_a_failed_device_pass_fails_the_sessions_of_that_round_without_raising(tok, redis_url, sample_records):
    """A batched small-model pass that raises touches every session it was running for: they end ``internal``
    with what happened, as results; the caller gets them, not the exception."""
    from cogenesis.cluster.bus import EdgeBus

    cfg = config()
    engine = EdgeEngine(None, tok, cfg.max_prompt_tokens)
    profile = DeviceProfile(name="t", decode_tokens_per_s=1e6, prefill_tokens_per_s=1e9, rtt_ms=0)

    class Broken(ProfileDevice):
        def step(self, keys, tokens):
            raise _Boom("the device broke")

    clients = [EdgeClient(i, rec, engine, cfg) for i, rec in enumerate(sample_records[:2])]
    replica = FakeReplica(redis_url, "ra").start()
    bus = EdgeBus(redis_url)
    try:
        results = run_logits_sessions(clients, engine, bus, cfg, device=Broken(profile, lambda s: None))
        deadline = time.monotonic() + 30
        while len([e for e in replica.log if e[0] == "close"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # the replica is told to close them
    finally:
        bus.close()
        replica.stop()
    assert [r.error_code for r in results] == ["internal", "internal"]
    assert all("_Boom: the device broke" in (r.error or "") for r in results)
    assert replica.sessions == {} and len([e for e in replica.log if e[0] == "close"]) == 2


def test_busy_until_the_admission_timeout_fails_busy(tok, redis_url, sample_records):
    cfg = config(admission_timeout_s=0.6)
    replica = FakeReplica(redis_url, "ra", busy=10**6, retry_after_ms=100).start()
    try:
        (r,) = run(tok, redis_url, sample_records[:1], cfg)
    finally:
        replica.stop()
    assert r.error_code == "busy" and "admission_timeout_s" in (r.error or "")
    assert r.busy_retries >= 1 and r.tokens == 0


def test_a_malformed_reply_fails_only_its_own_session(tok, redis_url, sample_records, caplog):
    cfg = config()
    bad = sample_records[0].public_instruction
    replica = FakeReplica(redis_url, "ra", bad_at=(bad, 4), garbage_at=7).start()
    try:
        results = run(tok, redis_url, sample_records[:3], cfg)
    finally:
        replica.stop()
    assert results[0].error_code == "bad_reply" and results[0].tokens == 0
    assert [r.text for r in results[1:]] == [expected_text(tok, rec, cfg) for rec in sample_records[1:3]]
    assert all(r.error is None for r in results[1:])  # the undecodable entry was dropped, its session went on
    dropped = [rec.getMessage() for rec in caplog.records if "malformed reply" in rec.getMessage()]
    assert dropped and all("not a reply" not in m for m in dropped)  # logged without its content


@pytest.fixture
def restartable():
    from cogenesis.cluster.redis_server import free_port

    port = free_port()
    server = RedisServer(port=port).start()
    box = {"server": server, "port": port}
    yield box
    box["server"].stop()


def test_a_redis_restart_mid_wait_is_survived_by_replay(tok, sample_records, restartable):
    """Redis restarts (empty) while a step is in flight and its reply is lost with it: the edge reconnects,
    resumes the session by replay and writes exactly the undisturbed output."""
    server = restartable["server"]
    cfg = config()
    replica = FakeReplica(server.url, "ra", hold_at=5).start()
    before = _resumes("redis")

    def restart():
        replica.held.wait(30)
        restartable["server"].stop()
        time.sleep(0.3)
        restartable["server"] = RedisServer(port=restartable["port"]).start()

    t = threading.Thread(target=restart)
    t.start()
    try:
        (r,) = run(tok, server.url, sample_records[:1], cfg)
    finally:
        t.join(30)
        replica.stop()
    assert replica.held.is_set()
    assert r.error is None and r.text == expected_text(tok, sample_records[0], cfg)
    assert r.resumes == 1 and _resumes("redis") - before == 1
    assert [(kind, step) for kind, _, step in replica.log if kind == "resume"] == [("resume", 5)]


def test_redis_gone_for_good_ends_sessions_unreachable(tok, sample_records, restartable):
    server = restartable["server"]
    cfg = config()
    replica = FakeReplica(server.url, "ra", hold_at=3).start()

    def kill():
        replica.held.wait(30)
        restartable["server"].stop()

    t = threading.Thread(target=kill)
    t.start()
    try:
        results = run(tok, server.url, sample_records[:2], cfg, redis_retry_s=1.0)
    finally:
        t.join(30)
        replica.stop()
    assert [r.error_code for r in results] == ["unreachable", "unreachable"]
    assert all("unreachable" in (r.error or "") for r in results)


def test_a_replica_stopped_by_a_scale_down_hands_its_sessions_to_another(tok, redis_url, sample_records, tiny_large):
    """Serve stops a replica it scales down through its graceful shutdown (``CloudServer.__del__``:
    ``StepLoop.stop``): the replica's heartbeat goes at once, the edges notice, and replay its sessions on the
    replica that stays, so every session writes exactly what a run on that replica alone writes."""
    from cogenesis.cluster.bus import CloudBus
    from cogenesis.core.config import CloudConfig
    from cogenesis.core.models import load_causal_lm
    from cogenesis.deployments.engine import TransformersCloudEngine
    from cogenesis.deployments.step_loop import StepLoop

    model, large_tok = load_causal_lm(str(tiny_large))
    cloud = CloudConfig(heartbeat_s=0.2)

    def replica(name: str) -> StepLoop:
        engine = TransformersCloudEngine(model, large_tok)
        bus = CloudBus(redis_url, name, heartbeat_ttl_s=cloud.heartbeat_ttl_s)
        return StepLoop(engine, bus, threading.Lock(), config=cloud).start()

    cfg = config(max_new_tokens=40)
    records = sample_records[:4]
    alone = replica("stays")
    try:
        reference = run(tok, redis_url, records, cfg)
    finally:
        alone.stop()
    assert [r.error for r in reference] == [None] * 4

    leaving = replica("leaves")  # up first: the consumer group hands it the opens
    time.sleep(0.3)
    stays = replica("stays-2")

    def scale_down() -> None:
        deadline = time.monotonic() + 30
        while leaving.requests < 12 and time.monotonic() < deadline:  # mid-session: some steps served
            time.sleep(0.01)
        leaving.stop()

    stopper = threading.Thread(target=scale_down)
    stopper.start()
    try:
        results = run(tok, redis_url, records, cfg)
    finally:
        stopper.join(60)
        leaving.stop()
        stays.stop()
    assert leaving.requests >= 12, "the leaving replica served no session before it stopped"
    assert [r.error for r in results] == [None] * 4
    assert [r.text for r in results] == [r.text for r in reference]
    assert [r.tokens for r in results] == [r.tokens for r in reference]
    assert sum(r.resumes for r in results) >= 1  # what the leaving replica held was replayed, not lost
