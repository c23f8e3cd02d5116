"""Load shapes: ramp, step and spike, read from a profile in ``configs/loadtest/``.

    COGENESIS_SHAPE=configs/loadtest/spike.yaml locust -f loadtest/locustfile.py,loadtest/shapes.py --headless
    cogenesis loadtest --shape configs/loadtest/spike.yaml

A profile names its shape and its parameters (see the files). Without ``COGENESIS_SHAPE`` this
file defines no shape, so Locust's own ``-u/-r/-t`` apply.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from locust import LoadTestShape
from pydantic import BaseModel, ConfigDict, Field

ENV = "COGENESIS_SHAPE"


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
    from cogenesis.config import validate
    from cogenesis.errors import ConfigError

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


class _ProfileShape(LoadTestShape):
    abstract = True

    def __init__(self, profile: ShapeProfile) -> None:
        super().__init__()
        self.profile = profile

    def tick(self):
        users = users_at(self.profile, self.get_run_time())
        return None if users is None else (users, self.profile.spawn_rate)


if os.environ.get(ENV):
    _PROFILE = load_shape(os.environ[ENV])

    class ProfileShape(_ProfileShape):
        """The shape named by $COGENESIS_SHAPE."""

        def __init__(self) -> None:
            super().__init__(_PROFILE)
