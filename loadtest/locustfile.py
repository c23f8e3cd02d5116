"""Locust load test: every user is an edge device running whole CoGenesis sessions.

    locust -f loadtest/locustfile.py                        # web UI on :8089
    locust -f loadtest/locustfile.py --headless -u 200 -r 20 -t 2m LogitsUser
    locust -f loadtest/locustfile.py --processes 4 ...      # or --master / --worker on many machines
    cogenesis loadtest --users 2000 --spawn-rate 200 --run-time 60s   # the wrapped, reported run

Users talk to the cluster the way devices do (``--cg-transport ws``, the default): logits steps over the
gateway's WebSocket and outlines from the gateway, each user with a device token of its own (minted with the
cluster's key, or ``--cg-token``/``$COGENESIS_TOKEN`` for all); websocket-client and httpx, which gevent makes
cooperative. ``--cg-transport redis`` runs them as trusted in-cluster workers instead: logits steps on the Redis bus
(the ``edge`` Redis user), outlines from the cloud app's own route. Per Locust process, the users share one small
model (a ``SharedDevice`` batching their passes in a native thread) or a device profile
(``--cg-device phone``, ``configs/devices.yaml``). Each user holds one record's private context;
it never leaves the user's process. Without ``--cg-redis-url``/``--cg-http-url`` the cluster of
``cogenesis up`` is used.

Request events (``response_time`` in ms; ``response_length`` in tokens where it applies):
- ``<mode> session``: a whole session (length: tokens written); a failed session is a failure, reported
  by its error code (``cogenesis.core.protocol.ErrorCode``): its message stays in this process's log.
- ``logits step``: one cloud round trip of a logits session; ``sketch request``: the outline.
- ``<mode> ttft``: time to the first token; ``<mode> itl``: every gap between two tokens.

A Locust process (and each ``--processes`` worker) ends by itself when its run is over: slow work goes
through ``cogenesis.edge_sim.native.offload``, which leaves no thread for interpreter exit to wait on,
and the quit event closes the device and the HTTP client (``cogenesis loadtest`` fails if it must kill it).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import sys
import time
from pathlib import Path

from gevent.lock import BoundedSemaphore, Semaphore
from locust import User, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # plain `locust -f` from a checkout

log = logging.getLogger("cogenesis.loadtest")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per outline request otherwise


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    from cogenesis.apps.flags import LOCUST

    g = parser.add_argument_group("CoGenesis")
    g.add_argument("--cg-redis-url", default="", help="bus Redis URL (default: the `cogenesis up` cluster's)")
    g.add_argument("--cg-http-url", default="", help="cloud HTTP URL (default: the `cogenesis up` cluster's)")
    g.add_argument("--cg-device", default="real", help="real, or a device profile name (configs/devices.yaml)")
    g.add_argument(
        "--cg-max-active",
        type=int,
        default=0,
        help="sessions at once per Locust process (0: 8 on the real device, no cap for a profile)",
    )
    g.add_argument("--cg-think-time", default="5..15", help="A..B seconds between a user's sessions")
    g.add_argument("--cg-data", default="", help="CoGenesis JSON file (default: the shipped sample, cycled)")
    g.add_argument("--cg-state-dir", default="", help="state directory of `cogenesis up` (default: its own)")
    g.add_argument(
        "--cg-transport",
        choices=["ws", "redis"],
        default="ws",
        help="ws: users are devices on the gateway, a token each; redis: trusted workers on the bus",
    )
    g.add_argument("--cg-gateway-url", default="", help="the gateway's URL (default: the `cogenesis up` cluster's)")
    g.add_argument(
        "--cg-token",
        default="",
        help="one device token for every user (default: $COGENESIS_TOKEN, else one minted per user with the "
        "cluster's key); prefer the environment variable",
    )
    LOCUST.add_to(g, grouped=False)  # the edge's config fields, with `cogenesis loadtest`'s defaults


class Runtime:
    """What a Locust process's users share: the cluster handles, the records, the device."""

    def __init__(self, opts) -> None:
        import gevent
        import httpx

        from cogenesis.apps.flags import LOCUST
        from cogenesis.core.config import EdgeConfig
        from cogenesis.core.data import load_records, sample_data_path
        from cogenesis.core.errors import ClusterError
        from cogenesis.edge_sim.device import default_max_active, describe, open_device, resolve_device
        from cogenesis.edge_sim.fleet import parse_think
        from cogenesis.edge_sim.native import offload  # slow work in a native thread: heartbeats go on meanwhile
        from cogenesis.edge_sim.session import Cloud, gateway_of, token_source

        redis_url, http_url, gateway_url = opts.cg_redis_url, opts.cg_http_url, opts.cg_gateway_url
        if not (redis_url and http_url):
            from cogenesis.cluster.daemon import running

            state = running(opts.cg_state_dir or None)
            if state is None:
                raise ClusterError(
                    "no cluster to load: none is running and no --cg-redis-url/--cg-http-url given",
                    hint="start one with `cogenesis up`",
                )
            redis_url, http_url = redis_url or state.redis_url, http_url or state.http_url
            gateway_url = gateway_url or getattr(state, "gateway_url", None) or ""
            if state.secrets_dir:  # the running cluster's: every Redis client here connects as `edge` with it
                os.environ.setdefault("COGENESIS_SECRETS_DIR", state.secrets_dir)
        self.cfg = LOCUST.config(opts, EdgeConfig)
        self.think = parse_think(opts.cg_think_time)
        self.records = load_records(opts.cg_data or sample_data_path())
        self.profile = resolve_device(opts.cg_device)
        self.engine, self.device = open_device(self.cfg, self.profile, offload, gevent.sleep)
        cap = opts.cg_max_active or default_max_active(self.profile)
        self.slots = BoundedSemaphore(cap) if cap else None
        self.transport = opts.cg_transport
        tokens = token_source(self.transport, token=opts.cg_token or None, subject=f"locust-{os.getpid()}")
        self.cloud = Cloud(
            redis_url,
            http_url,
            httpx.Client(limits=httpx.Limits(max_connections=256)),
            self.transport,
            gateway_url or gateway_of(http_url),
            tokens,
        )
        self._announce_metrics(redis_url)
        self.device_line = describe(self.profile, "Locust process")
        where = self.cloud.gateway_url if self.transport == "ws" else http_url
        log.info("device: %s; transport %s; cluster: %s, %s", self.device_line, self.transport, redis_url, where)

    def _announce_metrics(self, redis_url: str) -> None:
        """Serve this process's edge metrics and keep announcing them on the bus (for `cogenesis top`)."""
        import gevent
        import redis

        from cogenesis.core import metrics

        address = metrics.serve(metrics.EDGE)
        from cogenesis.cluster.bus import connect

        bus = connect(redis_url, role="edge")  # a trusted worker: secrets from $COGENESIS_SECRETS_DIR

        def refresh() -> None:
            while True:
                try:
                    metrics.announce(bus, "edge", f"locust-{os.getpid()}", address)
                except redis.RedisError as exc:
                    log.warning("could not announce metrics at %s: %s", address, exc)
                gevent.sleep(10)

        gevent.spawn(refresh)


_runtime: Runtime | None = None
_runtime_lock = Semaphore()
_indices = itertools.count()


def runtime(environment) -> Runtime:
    global _runtime
    with _runtime_lock:  # the first user of this process builds it (after --processes forks)
        if _runtime is None:
            _runtime = Runtime(environment.parsed_options)
    return _runtime


@events.quit.add_listener
def _shutdown(**_) -> None:
    """End what this process started, so its interpreter exits by itself: the small model's worker (a pass in
    flight finishes first, else C++ aborts) and the HTTP client. Threads that interpreter exit would still
    wait on are named in the log (``edge_sim/native.py`` says why there should be none)."""
    import gevent

    from cogenesis.edge_sim.native import threads_blocking_exit

    if _runtime is not None:
        if hasattr(_runtime.device, "close"):
            _runtime.device.close()
        _runtime.cloud.http.close()
    pool, deadline = gevent.get_hub().threadpool, time.monotonic() + 10
    while pool.task_queue.unfinished_tasks > 0 and time.monotonic() < deadline:  # bounded: never hang the exit
        gevent.sleep(0.05)
    if pool.task_queue.unfinished_tasks:
        log.warning("quit: %d small-model task(s) still running", pool.task_queue.unfinished_tasks)
    if waiting := threads_blocking_exit():
        log.warning("quit: interpreter exit will wait for: %s", ", ".join(waiting))


@events.test_start.add_listener
def _announce(environment, **_) -> None:
    opts = environment.parsed_options
    if opts is not None and not getattr(opts, "worker", False):
        print(
            f"cogenesis loadtest: device {opts.cg_device}"
            + (" (a simulated profile)" if opts.cg_device != "real" else " (the real small model)"),
            file=sys.stderr,
        )


class EdgeUser(User):
    """One simulated device: thinks, runs a whole session, thinks again."""

    abstract = True
    mode = "logits"

    def on_start(self) -> None:
        rt = runtime(self.environment)
        self.index = next(_indices)
        self.record = rt.records[self.index % len(rt.records)]  # this device's private context (never copied)
        self._sleep(random.uniform(0, rt.think[1]))  # devices do not all start at once

    def wait_time(self) -> float:
        return random.uniform(*runtime(self.environment).think)

    def _sleep(self, seconds: float) -> None:
        import gevent

        gevent.sleep(seconds)

    @task
    def session(self) -> None:
        from cogenesis.edge_sim.client import EdgeClient
        from cogenesis.edge_sim.session import run_session

        rt = runtime(self.environment)
        if rt.slots is not None:
            rt.slots.acquire()
        try:
            t0 = time.perf_counter()
            client = EdgeClient(self.index, self.record, rt.engine, rt.cfg)  # gate and session state: this session's
            r = run_session(client, self.mode, rt.engine, rt.device, rt.cloud, rt.cfg)
        finally:
            if rt.slots is not None:
                rt.slots.release()
        self._report(r, t0)

    def _report(self, r, t0: float) -> None:
        fire = self.environment.events.request.fire
        kind = self.mode
        if r.error:
            log.warning("user %d: %s session failed: %s", self.index, kind, r.error)  # this process's log only
            fire(
                request_type=kind,
                name="session",
                response_time=r.seconds * 1000,
                response_length=0,
                exception=RuntimeError(f"session failed: {r.error_code}"),  # a code: no text leaves the device
                context={"client": self.index},
            )
            return
        fire(
            request_type=kind,
            name="session",
            response_time=r.seconds * 1000,
            response_length=r.tokens,
            exception=None,
            context={"client": self.index},
        )
        if kind == "logits":
            for rtt in r.rtt_us:
                fire(
                    request_type=kind,
                    name="step",
                    response_time=rtt / 1000,
                    response_length=1,
                    exception=None,
                    context={},
                )
        elif r.sketch_seconds is not None:
            fire(
                request_type=kind,
                name="request",
                response_time=r.sketch_seconds * 1000,
                response_length=0,
                exception=None,
                context={},
            )
        if r.ttft_s is not None:
            fire(
                request_type=kind,
                name="ttft",
                response_time=r.ttft_s * 1000,
                response_length=0,
                exception=None,
                context={},
            )
        for gap in r.itl_s:
            fire(request_type=kind, name="itl", response_time=gap * 1000, response_length=0, exception=None, context={})


class LogitsUser(EdgeUser):
    """A device in logits mode: fuses the cloud's top-k with its own model at every step."""

    mode = "logits"


class SketchUser(EdgeUser):
    """A device in sketch mode: one outline from the cloud, then it writes on its own."""

    mode = "sketch"


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The heavy imports happen once here, before `--processes` forks and before any worker's heartbeat
# has to go on: importing them inside a user would stall the gevent loop for seconds.
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

import cogenesis.core.models  # noqa: E402
import cogenesis.edge_sim.session  # noqa: E402,F401
