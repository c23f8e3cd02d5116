"""Where a session's small-model passes run: the device, real or simulated by a profile.

The logits loop (``cogenesis.edge_sim.logits``) asks its device for log-probs after a prompt (``prefill``)
and after each chosen token (``step``); ``release`` frees a session's state.

- ``PackedDevice``: the lockstep pool's device. All its sessions sit in one packed cache and step
  together (one forward pass a round, no re-packing); a session waiting for the cloud sits a pass out
  and keeps its row.
- ``SharedDevice``: one small model serving many independently running sessions (the fleet's
  clients, Locust users). Each session keeps its own cache; whatever the sessions asked for
  meanwhile runs as one batched forward pass, so sessions join and leave at any step.
- ``ProfileDevice``: a named device profile (``configs/devices.yaml``). No small model runs: each
  pass takes the profile's time, and tokens are sampled from the cloud's top-k. For load tests
  whose edge compute must not run on the cloud's CPU. Never the default.
- ``InstantDevice``: a simulated device that takes no time at all (no pass time, no round trip): the
  serving-efficiency bench's device, so that what is measured is the cloud alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cogenesis.core.errors import ConfigError
from cogenesis.core.kvbatch import KV, PackedBatch, batched_forward
from cogenesis.core.models import torch_threads

REAL = "real"
# Sessions one simulated edge process runs at once on the real small model (the rest wait for a
# slot): each one's prefill costs ~1 s of one core at 400 prompt tokens, and its cache ~10 MiB.
REAL_MAX_ACTIVE = 8
PROFILES_FILE = Path(__file__).resolve().parent.parent / "configs" / "devices.yaml"


class DeviceProfile(BaseModel):
    """A simulated device: how fast its small model runs and how far it is from the cloud."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    decode_tokens_per_s: float = Field(gt=0, description="Small-model decode speed (one token per pass).")
    prefill_tokens_per_s: float = Field(gt=0, description="Small-model prompt processing speed.")
    rtt_ms: float = Field(ge=0, description="Network round trip added to every cloud exchange.")
    description: str = ""

    def summary(self) -> str:
        return (
            f"{self.name} (simulated: {self.decode_tokens_per_s:g} tok/s decode, {self.prefill_tokens_per_s:g} "
            f"tok/s prefill, +{self.rtt_ms:g} ms RTT per cloud exchange)"
        )


def load_profiles(path: str | Path = PROFILES_FILE) -> dict[str, DeviceProfile]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"device profiles file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return {name: DeviceProfile(name=name, **spec) for name, spec in (raw.get("profiles") or {}).items()}
    except (ValidationError, TypeError) as exc:
        raise ConfigError(f"invalid device profile in {path}: {exc}") from None


def resolve_device(name: str, path: str | Path = PROFILES_FILE) -> DeviceProfile | None:
    """``real`` -> None (run the small model); a profile name -> its profile; else a clear error."""
    if name == REAL:
        return None
    profiles = load_profiles(path)
    if name not in profiles:
        raise ConfigError(
            f"unknown device {name!r}",
            hint=f"use 'real' or a profile from {path}: {', '.join(sorted(profiles)) or '(none)'}",
        )
    return profiles[name]


def describe(profile: DeviceProfile | None, where: str) -> str:
    """The device line every report prints (``where``: which process runs the small model)."""
    return f"real (the small model runs in each {where})" if profile is None else profile.summary()


def default_max_active(profile: DeviceProfile | None) -> int | None:
    """Sessions one simulated-edge process runs at once unless told: capped on the real device, not for a profile."""
    return REAL_MAX_ACTIVE if profile is None else None


def open_device(cfg, profile: DeviceProfile | None, offload: Offload, sleep: Callable[[float], None]):
    """The engine and device that one simulated-edge process (a fleet pool, a Locust process) shares among
    its clients. ``offload`` runs slow work (loading the model, forward passes) off the event loop;
    ``sleep`` is the loop's sleep. Returns (EdgeEngine, Device)."""
    from cogenesis.core.models import load_causal_lm, resolve_model
    from cogenesis.edge_sim.engine import EdgeEngine

    path = offload(lambda: resolve_model(cfg.small_model))  # the first use converts the embedded model
    if profile is None:
        torch.set_num_threads(cfg.torch_threads)
        model, tok = offload(lambda: load_causal_lm(path))
        engine = EdgeEngine(model, tok, cfg.max_prompt_tokens)
        return engine, SharedDevice(model, engine.pad_id, offload=offload, threads=cfg.torch_threads)
    from transformers import AutoTokenizer

    return EdgeEngine(None, offload(lambda: AutoTokenizer.from_pretrained(path)), cfg.max_prompt_tokens), ProfileDevice(
        profile, sleep
    )


class Device(Protocol):
    simulated: bool

    def prefill(self, keys: Sequence[object], prompts: Sequence[Sequence[int]]) -> list[torch.Tensor | None]:
        """Start sessions ``keys`` from their prompts; log-probs [V] after each (None: simulated)."""

    def step(self, keys: Sequence[object], tokens: Sequence[int]) -> list[torch.Tensor | None]:
        """Feed one token per session of ``keys``; log-probs [V] after it (None: simulated). Sessions it holds
        that are not in ``keys`` (waiting for the cloud) keep their state as it is."""

    def release(self, keys: Sequence[object]) -> None:
        """Free these sessions' state."""


class PackedDevice:
    """The lockstep pool's small model: its sessions' rows stay packed across steps.

    A session keeps its row from ``prefill`` until ``release``. One that the loop leaves out of a ``step`` (parked:
    the cloud refused it busy and it waits to be admitted) sits that pass out: its row takes no token and keeps
    its place, so when it is stepped again it goes on exactly where it stopped (``PackedBatch.step``).
    """

    simulated = False

    def __init__(self, model, pad_id: int, prefill_threads: int | None = None) -> None:
        self.batch = PackedBatch(model, pad_id)
        self.prefill_threads = prefill_threads
        self.rows: list[object] = []

    def prefill(self, keys, prompts):
        if self.rows:
            raise ValueError("a packed device starts all of its sessions at once")
        self.rows = list(keys)
        with torch_threads(self.prefill_threads):
            return list(self.batch.prefill(prompts))

    def step(self, keys, tokens):
        """Feed ``tokens`` to the rows of ``keys`` (any subset of the live sessions, in any order); every other row
        sits the pass out."""
        where = {id(k): b for b, k in enumerate(self.rows)}
        try:
            rows = [where[id(k)] for k in keys]
        except KeyError:
            raise ValueError(
                "step() for a session this packed device does not hold (never prefilled, or released)"
            ) from None
        feed = [0] * len(self.rows)
        for b, t in zip(rows, tokens):
            feed[b] = int(t)
        stepped = set(rows)
        lps = self.batch.step(feed, sitting_out=[b for b in range(len(self.rows)) if b not in stepped])
        return [lps[b] for b in rows]

    def release(self, keys) -> None:
        """Drop these sessions' rows (the others keep theirs); keys it does not hold are ignored."""
        gone = set(map(id, keys))
        rest = [k for k in self.rows if id(k) not in gone]
        if len(rest) != len(self.rows) and rest:
            where = {id(k): b for b, k in enumerate(self.rows)}
            self.batch.keep([where[id(k)] for k in rest])
        self.rows = rest


_T = TypeVar("_T")


class Offload(Protocol):
    """Runs ``fn`` somewhere that does not block the caller's event loop and returns its result."""

    def __call__(self, fn: Callable[[], _T], /) -> _T: ...


class SharedDevice:
    """One small model for many concurrently running sessions, each with its own KV cache.

    Callers block in ``prefill``/``step`` while a single worker runs everything pending as one
    batched pass (prompts in one, single tokens in another). ``offload`` runs the forward pass
    (under gevent: in a native thread, so the event loop keeps serving other users meanwhile).
    """

    simulated = False

    def __init__(
        self,
        model,
        pad_id: int,
        offload: Offload = lambda fn: fn(),
        threads: int | None = None,
        prefill_chunk: int = 2048,
    ) -> None:
        self.model = model
        self.prefill_chunk = prefill_chunk  # prompt tokens per pass between decode passes
        self.pad_id = pad_id
        self.offload = offload
        self.threads = threads
        self.caches: dict[int, KV] = {}
        self._pending: list[tuple[object, list[int], dict]] = []
        self._cv = threading.Condition()
        self._worker: threading.Thread | None = None
        self._closed = False
        self.passes = 0
        self.rows = 0

    def prefill(self, keys, prompts):
        for k in keys:
            self.caches.pop(id(k), None)
        return self._submit(keys, [list(p) for p in prompts])

    def step(self, keys, tokens):
        return self._submit(keys, [[int(t)] for t in tokens])

    def release(self, keys) -> None:
        for k in keys:
            self.caches.pop(id(k), None)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _submit(self, keys, token_lists):
        slots = [{"done": threading.Event()} for _ in keys]
        with self._cv:
            if self._closed:
                raise RuntimeError("the shared device is closed")
            self._pending.extend(zip(keys, token_lists, slots))
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="shared-device", daemon=True)
                self._worker.start()
            self._cv.notify()
        out = []
        try:
            for s in slots:
                s["done"].wait()
                if "error" in s:
                    raise s["error"]
                out.append(s["lp"])
        except BaseException:  # the caller is gone (a stopped Locust user): keep no state for it
            for s in slots:
                s["cancelled"] = True
            raise
        return out

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                work, self._pending = self._pending, []
            steps = [w for w in work if len(w[1]) == 1 and id(w[0]) in self.caches]
            prompts = [w for w in work if not (len(w[1]) == 1 and id(w[0]) in self.caches)]
            if steps:
                self._forward(steps)
            n, tokens = 0, 0  # one chunk of prompts a pass, so a burst of new sessions does not stall decoding
            while n < len(prompts) and (n == 0 or tokens + len(prompts[n][1]) <= self.prefill_chunk):
                tokens += len(prompts[n][1])
                n += 1
            if n:
                self._forward(prompts[:n])
            if prompts[n:]:  # the rest go first in the next pass
                with self._cv:
                    self._pending[:0] = prompts[n:]

    def _forward(self, group) -> None:
        pasts = [self.caches.get(id(k)) for k, _, _ in group]

        def run():
            with torch_threads(self.threads):
                return batched_forward(self.model, pasts, [t for _, t, _ in group], pad_id=self.pad_id)

        try:
            lps, caches = self.offload(run)
        except Exception as exc:  # every waiting session learns of it
            for _, _, slot in group:
                slot["error"] = exc
                slot["done"].set()
            return
        self.passes += 1
        self.rows += len(group)
        for (key, _, slot), lp, kv in zip(group, lps, caches):
            if slot.get("cancelled"):
                self.caches.pop(id(key), None)
                continue
            self.caches[id(key)] = kv
            slot["lp"] = lp[-1]
            slot["done"].set()


class ProfileDevice:
    """A simulated device: every pass takes the profile's time; no distribution of its own."""

    simulated = True

    def __init__(self, profile: DeviceProfile, sleep: Callable[[float], None] = time.sleep) -> None:
        self.profile = profile
        self.sleep = sleep

    def prefill(self, keys, prompts):
        self.sleep(max(map(len, prompts)) / self.profile.prefill_tokens_per_s)
        return [None] * len(keys)

    def step(self, keys, tokens):
        self.sleep(1.0 / self.profile.decode_tokens_per_s)
        return [None] * len(keys)

    def release(self, keys) -> None:
        pass

    def network(self) -> None:
        """The profile's round trip, once per cloud exchange."""
        if self.profile.rtt_ms:
            self.sleep(self.profile.rtt_ms / 1000.0)


class InstantDevice:
    """The serving-efficiency bench's device: zero pass time, zero RTT, tokens sampled from the cloud's top-k.

    No small model runs and nothing sleeps, so a pool of sessions on it costs this machine no compute of its own:
    ``cogenesis bench exchange``'s ``cogenesis-isolated`` variants measure the cloud (bus, replica, batching)
    alone. At sampling temperature 0 each token is the cloud's top-1: the large model's greedy text. It reads no
    prompt (``reads_prompts``), so the loop does not build the private prompts for it."""

    simulated = True
    reads_prompts = False

    def prefill(self, keys, prompts):
        return [None] * len(keys)

    def step(self, keys, tokens):
        return [None] * len(keys)

    def release(self, keys) -> None:
        pass

    def network(self) -> None:
        """No round trip is added to a cloud exchange."""
