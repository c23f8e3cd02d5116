"""Load profiles (configs/loadtest/): shapes over time, and clear errors."""

import pytest

from cogenesis.core.errors import ConfigError
from cogenesis.loadtest.profiles import ShapeProfile, load_shape, users_at


def test_shipped_profiles_load_and_end():
    for name in ("ramp", "step", "spike"):
        p = load_shape(f"configs/loadtest/{name}.yaml")
        assert p.shape == name
        assert users_at(p, p.run_time_s) is None  # the test ends
        assert users_at(p, p.run_time_s / 2) > 0


def test_ramp_goes_up_holds_and_comes_down():
    p = ShapeProfile(shape="ramp", users=100, spawn_rate=10, run_time_s=60)
    assert [users_at(p, t) for t in (0, 5, 10, 30, 50, 55, 59.9)] == [0, 50, 100, 100, 100, 50, 1]


def test_step_adds_users_every_step():
    p = ShapeProfile(shape="step", users=50, spawn_rate=50, step_s=10, run_time_s=35)
    assert [users_at(p, t) for t in (0, 9.9, 10, 25, 34)] == [50, 50, 100, 150, 200]


def test_spike_rises_for_its_window_only():
    p = ShapeProfile(shape="spike", users=20, spawn_rate=100, spike_users=200, spike_at_s=10, spike_s=5, run_time_s=30)
    assert [users_at(p, t) for t in (0, 9.9, 10, 14.9, 15, 29)] == [20, 20, 200, 200, 20, 20]


def test_bad_profiles_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_shape(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("shape: zigzag\nusers: 0\nspawn_rate: 1\nrun_time_s: 10\n")
    with pytest.raises(ConfigError, match="shape") as err:
        load_shape(bad)
    assert "users" in err.value.message
