"""An edge pool's side of `cogenesis edge`: its options, its clients' modes and statistics, and the typed
messages it publishes (the launcher and whole fleets: tests/apps/test_fleet.py)."""

import msgspec
import pytest

from cogenesis.core.errors import ConfigError
from cogenesis.edge_sim.fleet import (
    FleetOptions,
    LatencySamples,
    PoolCounts,
    PoolFailed,
    PoolProgress,
    PoolSummary,
    Reservoir,
    RssMb,
    decode_done,
    decode_progress,
    mode_of,
    parse_think,
)


def test_options_are_checked_before_anything_starts():
    with pytest.raises(ConfigError, match="exactly one"):
        FleetOptions(duration_s=None, sessions_per_client=None).validate()
    with pytest.raises(ConfigError, match="think-time"):
        FleetOptions(think_s=(5, 1)).validate()
    with pytest.raises(ConfigError, match="mode"):
        FleetOptions(mode="telepathy").validate()
    with pytest.raises(ConfigError, match="A..B"):
        parse_think("soon")
    assert parse_think("2..7") == (2.0, 7.0) and parse_think("3") == (3.0, 3.0)


def test_mixed_mode_alternates_by_client_and_session():
    assert [mode_of("mixed", c, s) for c in (0, 1) for s in (0, 1)] == ["sketch", "logits", "logits", "sketch"]
    assert mode_of("logits", 3, 4) == "logits"


def test_reservoir_is_bounded_and_uniform():
    r = Reservoir(size=100, seed=0)
    for i in range(10_000):
        r.add(i)
    assert len(r.items) == 100 and r.seen == 10_000
    assert 3000 < sum(r.items) / 100 < 7000  # a sample of the whole stream, not its head


def test_pool_messages_round_trip_as_typed_json():
    counts = PoolCounts(connected=2, active=1, max_active=2, ok=3, failed=1, tokens=30)
    summary = PoolSummary(
        pool=1,
        clients=2,
        seconds=4.5,
        counts=counts,
        errors={"timeout": 1, "stuck": 2},
        rss_mb=RssMb(start=100.0, end=120.5, peak=130.0),
        samples=LatencySamples(ttft=[0.1], itl=[0.01, 0.02], session=[1.0]),
        device_passes=None,
        device_rows=None,
    )
    assert decode_done(msgspec.json.encode(summary)) == summary
    assert decode_done(msgspec.json.encode(PoolFailed(pool=0, code="setup"))) == PoolFailed(0, "setup")
    progress = PoolProgress(pool=1, clients=2, counts=counts, rss_mb=120.5)
    assert decode_progress(msgspec.json.encode(progress)) == progress
    with pytest.raises(msgspec.ValidationError):  # a result without its counters is refused, not half-read
        decode_done(b'{"type": "summary", "pool": 0}')
    with pytest.raises(msgspec.ValidationError):  # errors are codes, never text
        decode_done(msgspec.json.encode({**msgspec.to_builtins(summary), "errors": {"cannot reach Dana": 1}}))
    with pytest.raises(msgspec.ValidationError):
        decode_done(b'{"type": "failed", "pool": 0, "code": "model not found at /home/dana"}')


def test_options_travel_to_the_pool_process_as_json():
    opts = FleetOptions(clients=7, think_s=(1.0, 2.5), duration_s=None, sessions_per_client=3, edge={"top_k": 5})
    back = msgspec.json.decode(msgspec.json.encode(opts), type=FleetOptions)
    assert back == opts and back.think_s == (1.0, 2.5)


CANARY = "CANARY-7f3a Dana Whitfield 42 Willow Lane"


def _every_value(r) -> list[bytes]:
    """Every key of a Redis database, and every value under it, whatever its type."""
    out: list[bytes] = []
    for key in r.scan_iter(count=1000):
        out.append(key)
        kind = r.type(key)
        if kind == b"string":
            out.append(r.get(key))
        elif kind == b"list":
            out += r.lrange(key, 0, -1)
        elif kind == b"hash":
            for k, v in r.hgetall(key).items():
                out += [k, v]
        elif kind == b"set":
            out += list(r.smembers(key))
        elif kind == b"zset":
            out += [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            for _, fields in r.xrange(key):
                for k, v in fields.items():
                    out += [k, v]
        else:
            raise AssertionError(f"unexpected Redis type {kind!r} at {key!r}")
    return out


def test_a_pool_pushes_no_text_of_its_failures_to_redis(redis_url, sample_records, monkeypatch, caplog):
    """Sessions that fail with a message holding private text (a refused step, a crash) and a pool that
    cannot run: Redis gets counts and codes; the messages stay in the pool's own log."""
    import httpx
    import redis

    import cogenesis.edge_sim.session as session
    from cogenesis.core.config import EdgeConfig
    from cogenesis.core.errors import SessionError
    from cogenesis.edge_sim.fleet import PoolClients, ProgressPublisher, publish_done, report_failure
    from cogenesis.edge_sim.session import Cloud

    def refused(*args, **kwargs):
        raise SessionError(f"cloud refused session s step 3: bad_request: {CANARY}")

    def crashed(*args, **kwargs):
        raise RuntimeError(CANARY)

    monkeypatch.setattr(session, "run_logits_sessions", refused)
    monkeypatch.setattr(session, "write_sketch", crashed)
    opts = FleetOptions(clients=4, mode="mixed", duration_s=None, sessions_per_client=2, think_s=(0.0, 0.0))
    clients = PoolClients(0, opts, EdgeConfig(), sample_records, None, None, None)  # type: ignore[arg-type]
    rdb = redis.Redis.from_url(redis_url)
    with httpx.Client() as http:
        clients.run(Cloud(redis_url, "http://cloud.invalid", http))
    ProgressPublisher(rdb, "run1", clients, "127.0.0.1:9").publish()
    summary = clients.summary()
    publish_done(rdb, "run1", summary)
    failed = report_failure(rdb, "run2", 1, OSError(f"no model at /home/{CANARY}"))
    assert summary.counts.failed == 8 and summary.errors == {"cloud_error": 4, "internal": 4}
    assert failed == PoolFailed(1, "internal")
    values = _every_value(rdb)
    rdb.close()
    assert any(b"cloud_error" in v for v in values)  # the counts did reach Redis ...
    assert not [v for v in values if b"CANARY" in v or b"Dana" in v]  # ... and nothing of the messages
    assert CANARY in caplog.text  # which the pool's own log keeps
