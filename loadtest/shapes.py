"""Load shapes: ramp, step and spike, read from a profile in ``configs/loadtest/``.

    COGENESIS_SHAPE=configs/loadtest/spike.yaml locust -f loadtest/locustfile.py,loadtest/shapes.py --headless
    cogenesis loadtest --shape configs/loadtest/spike.yaml

A profile names its shape and its parameters (see the files). Without ``COGENESIS_SHAPE`` this
file defines no shape, so Locust's own ``-u/-r/-t`` apply.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from locust import LoadTestShape

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # plain `locust -f` from a checkout
from cogenesis.loadtest.profiles import ShapeProfile, load_shape, users_at

ENV = "COGENESIS_SHAPE"


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
