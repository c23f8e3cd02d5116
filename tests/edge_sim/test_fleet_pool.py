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
        errors={"boom": 1},
        rss_mb=RssMb(start=100.0, end=120.5, peak=130.0),
        samples=LatencySamples(ttft=[0.1], itl=[0.01, 0.02], session=[1.0]),
        device_passes=None,
        device_rows=None,
    )
    assert decode_done(msgspec.json.encode(summary)) == summary
    assert decode_done(msgspec.json.encode(PoolFailed(pool=0, fatal="no model"))) == PoolFailed(0, "no model")
    progress = PoolProgress(pool=1, clients=2, counts=counts, rss_mb=120.5)
    assert decode_progress(msgspec.json.encode(progress)) == progress
    with pytest.raises(msgspec.ValidationError):  # a result without its counters is refused, not half-read
        decode_done(b'{"type": "summary", "pool": 0}')


def test_options_travel_to_the_pool_process_as_json():
    opts = FleetOptions(clients=7, think_s=(1.0, 2.5), duration_s=None, sessions_per_client=3, edge={"top_k": 5})
    back = msgspec.json.decode(msgspec.json.encode(opts), type=FleetOptions)
    assert back == opts and back.think_s == (1.0, 2.5)
