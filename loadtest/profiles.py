"""Load profiles (``configs/loadtest/*.yaml``): a shape and its parameters, and the user count it
asks for at each moment. Pure: imports no Locust (which monkey-patches with gevent on import)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field


class ShapeProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: str = Field(pattern="^(ramp|step|spike)$", description="ramp, step or spike")
    users: int = Field(ge=1, description="ramp: users at the top; step: users added per step; spike: baseline users")
    spawn_rate: float = Field(gt=0, description="users started (or stopped) per second")
    run_time_s: float = Field(gt=0, description="total length of the test")
    step_s: float = Field(60, gt=0, description="step: seconds per step")
    spike_users: int = Field(0, ge=0, description="spike: users during the spike")
    spike_at_s: float = Field(0, ge=0, description="spike: when it starts")
    spike_s: float = Field(0, ge=0, description="spike: how long it lasts")
    description: str = ""


def load_shape(path: str | Path) -> ShapeProfile:
    from cogenesis.core.config import validate
    from cogenesis.core.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"load profile {path} does not exist", hint="see configs/loadtest/ for ramp, step and spike")
    return validate(ShapeProfile, yaml.safe_load(path.read_text()) or {}, str(path))


def users_at(p: ShapeProfile, t: float) -> int | None:
    """Target user count ``t`` seconds into the test (None: the test is over)."""
    if t >= p.run_time_s:
        return None
    if p.shape == "ramp":  # up at spawn_rate, hold, then down at spawn_rate to end at zero
        return max(0, min(p.users, int(p.spawn_rate * t), int(p.spawn_rate * (p.run_time_s - t))))
    if p.shape == "step":
        return p.users * (int(t // p.step_s) + 1)
    in_spike = p.spike_at_s <= t < p.spike_at_s + p.spike_s
    return p.spike_users if in_spike else p.users
