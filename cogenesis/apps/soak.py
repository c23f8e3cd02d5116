"""``cogenesis soak``: the fleet at a steady load for a long time, with the memory of every process sampled.

A leak shows up only over time, in some process: so the soak starts (or uses) a background cluster
(``cogenesis up``'s: Redis, Ray, the Serve app), runs ``cogenesis edge``'s fleet against it for
``--minutes`` with a few clients that think between sessions, and every ``--interval`` seconds
records the resident memory (RSS, psutil) of every process involved, labelled by its role: Redis,
the Ray processes (GCS, raylet, agents, the Serve controller and proxy, each replica), the cluster's
own process, the edge pools and the soak driver itself. A process is found, at each sample, as a
descendant of the driver or of the cluster's process (so a replica Ray restarts is a new series).

The report (JSON, a table, a PNG) has per process and per role the RSS at the start, at the end,
its peak, and its growth in MiB/hour: a least-squares line over the second half of the process's
samples (the first half holds warm-up: models loading, caches filling, which is not a leak). The
sessions ok/failed are recorded with every sample, so a failure can be placed in time.

The pure parts (``classify``, ``growth_slope``, ``build_report``, ``table_rows``) take plain data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cogenesis.core.errors import ConfigError

log = logging.getLogger(__name__)

MIB = 1024 * 1024

# Ordered: the first match names the process (a replica's command line also holds "ray::", a worker's "raylet").
ROLES: tuple[tuple[str, str], ...] = (
    ("ray::ServeReplica", "replica"),
    ("ray::ServeController", "serve-controller"),
    ("ray::ProxyActor", "serve-proxy"),
    ("ray::DashboardAgent", "ray-dashboard-agent"),
    ("ray::RuntimeEnvAgent", "ray-runtime-env-agent"),
    ("ray::", "ray-worker"),  # an idle worker (ray::IDLE) or another task/actor
    ("ray/_private/workers/default_worker.py", "ray-worker"),  # a worker before it names itself
    ("cogenesis.edge_sim.fleet", "edge-pool"),
    ("cogenesis.cluster.daemon", "cluster"),  # the background cluster's process: Ray's driver
    ("ray/_private/log_monitor.py", "ray-log-monitor"),
    ("ray/autoscaler/_private/monitor.py", "ray-monitor"),
    ("ray/dashboard/dashboard.py", "ray-dashboard"),
)
EXECUTABLES = {"redis-server": "redis", "gcs_server": "ray-gcs", "raylet": "raylet"}  # by program name
ROLE_ORDER = (
    "soak",
    "cluster",
    "redis",
    "ray-gcs",
    "raylet",
    "serve-controller",
    "serve-proxy",
    "replica",
    "ray-dashboard",
    "ray-dashboard-agent",
    "ray-runtime-env-agent",
    "ray-log-monitor",
    "ray-monitor",
    "ray-worker",
    "edge-pool",
    "other",
)


def classify(cmdline: Sequence[str], is_driver: bool = False) -> str:
    """The role of a process from its command line (as psutil gives it); ``soak`` for the driver itself."""
    if is_driver:
        return "soak"
    if not cmdline:
        return "other"
    program = os.path.basename(cmdline[0])
    for name, role in EXECUTABLES.items():
        if program == name or program.startswith(name + " "):  # redis may retitle itself "redis-server host:port"
            return role
    joined = " ".join(cmdline)
    for needle, role in ROLES:
        if needle in joined:
            return role
    return "other"


def growth_slope(times_s: Sequence[float], mib: Sequence[float]) -> float | None:
    """MiB per hour: the least-squares slope over the second half (in time) of a series; None under 3 points."""
    if len(times_s) != len(mib):
        raise ValueError("times and values differ in length")
    if len(times_s) < 3:
        return None
    mid = times_s[0] + (times_s[-1] - times_s[0]) / 2
    pts = [(t, m) for t, m in zip(times_s, mib) if t >= mid]
    if len(pts) < 2:
        return None
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mm = sum(m for _, m in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    if var == 0:
        return None
    return sum((t - mt) * (m - mm) for t, m in pts) / var * 3600.0


# ---- options and samples ------------------------------------------------------------------------


@dataclass
class SoakOptions:
    minutes: float = 30.0
    interval_s: float = 10.0
    clients: int = 4  # a steady load this 2-core machine carries for hours, with the real small model
    mode: str = "mixed"
    think: str = "2..8"
    pools: int = 1
    device: str = "real"
    max_active: int | None = None
    data: str | None = None
    out_dir: str = "docs/soak"

    def validate(self) -> None:
        if self.minutes <= 0:
            raise ConfigError(f"--minutes must be > 0, got {self.minutes:g}")
        if self.interval_s <= 0:
            raise ConfigError(f"--interval must be > 0, got {self.interval_s:g}")
        if self.interval_s > self.minutes * 60 / 3:
            raise ConfigError(
                f"--interval {self.interval_s:g} s leaves under 3 samples in {self.minutes:g} min",
                hint="sample more often or soak longer",
            )


@dataclass
class Proc:
    pid: int
    role: str
    cmd: str  # the start of its command line (the program and its role's arguments; no private text runs here)


@dataclass
class Sample:
    t_s: float  # seconds since the soak started
    rss_mib: dict[int, float]  # pid -> RSS
    sessions: dict[str, int] = field(default_factory=dict)  # the fleet's counters then: ok, failed, tokens, active


class Sampler:
    """Samples the RSS of the driver's and the cluster's process trees every ``interval_s`` (its own thread)."""

    def __init__(self, roots: Iterable[int], interval_s: float, counts: Callable[[], dict[str, int]]) -> None:
        self.roots = list(roots)
        self.interval_s = interval_s
        self.counts = counts
        self.t0 = time.monotonic()
        self.samples: list[Sample] = []
        self.procs: dict[int, Proc] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> Sampler:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and take a last sample."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 30)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as exc:  # a sample lost is a gap in the series, not the end of the soak
                log.warning("soak: a memory sample failed: %s", exc)

    def processes(self) -> list[Any]:
        import psutil

        seen: dict[int, Any] = {}
        for root in self.roots:
            try:
                p = psutil.Process(root)
                for q in [p, *p.children(recursive=True)]:
                    seen.setdefault(q.pid, q)
            except psutil.NoSuchProcess:
                continue
        return list(seen.values())

    def sample(self) -> Sample:
        import psutil

        rss: dict[int, float] = {}
        for p in self.processes():
            try:
                with p.oneshot():
                    if p.status() == psutil.STATUS_ZOMBIE:
                        continue
                    mem = p.memory_info().rss
                    cmdline = p.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            role = classify(cmdline, is_driver=p.pid == os.getpid())
            with self._lock:
                known = self.procs.get(p.pid)
                if known is None or (known.role in ("ray-worker", "other") and role != known.role):
                    self.procs[p.pid] = Proc(p.pid, role, " ".join(cmdline)[:160])  # a worker became an actor
            rss[p.pid] = round(mem / MIB, 2)
        s = Sample(round(time.monotonic() - self.t0, 2), rss, dict(self.counts()))
        with self._lock:
            self.samples.append(s)
        return s

    def latest(self) -> Sample | None:
        with self._lock:
            return self.samples[-1] if self.samples else None

    def snapshot(self) -> tuple[list[Sample], dict[int, Proc]]:
        with self._lock:
            return list(self.samples), dict(self.procs)


# ---- the report (pure) --------------------------------------------------------------------------


def _stats(times: list[float], values: list[float]) -> dict:
    slope = growth_slope(times, values)
    return {
        "samples": len(values),
        "first_s": times[0] if times else None,
        "last_s": times[-1] if times else None,
        "start_mib": round(values[0], 1) if values else None,
        "end_mib": round(values[-1], 1) if values else None,
        "peak_mib": round(max(values), 1) if values else None,
        "slope_mib_per_h": round(slope, 2) if slope is not None else None,
    }


def _role_key(role: str) -> int:
    return ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER)


def build_report(
    samples: Sequence[Sample], procs: dict[int, Proc], extra: dict | None = None, load_end_s: float | None = None
) -> dict:
    """Per process, per role (the sum of its processes at each sample) and in total: start, end and peak RSS and
    the growth slope over the second half; the samples themselves; sessions over time.

    The figures are taken over the samples up to ``load_end_s`` (the end of the steady load: after it the
    fleet lets running sessions finish and its pools exit, which is no leak nor its absence); every sample
    stays in ``samples``."""
    all_samples = list(samples)
    if load_end_s is not None and sum(1 for s in samples if s.t_s <= load_end_s) >= 2:
        samples = [s for s in samples if s.t_s <= load_end_s]
    ordered = sorted(procs.values(), key=lambda p: (_role_key(p.role), min_t(all_samples, p.pid), p.pid))
    counts: dict[str, int] = {}
    processes = []
    for p in ordered:
        k = counts[p.role] = counts.get(p.role, 0) + 1
        many = sum(1 for q in ordered if q.role == p.role) > 1
        times = [s.t_s for s in samples if p.pid in s.rss_mib]
        values = [s.rss_mib[p.pid] for s in samples if p.pid in s.rss_mib]
        label = f"{p.role}#{k}" if many else p.role
        processes.append({"label": label, "role": p.role, "pid": p.pid, "cmd": p.cmd, **_stats(times, values)})
    roles = []
    for role in sorted({p.role for p in ordered}, key=_role_key):
        pids = {p.pid for p in ordered if p.role == role}
        series = [(s.t_s, sum(v for pid, v in s.rss_mib.items() if pid in pids)) for s in samples]
        series = [(t, v) for t, v in series if v > 0]
        roles.append({"role": role, "processes": len(pids), **_stats([t for t, _ in series], [v for _, v in series])})
    total = [(s.t_s, sum(s.rss_mib.values())) for s in samples if s.rss_mib]
    last = all_samples[-1].sessions if all_samples else {}
    return {
        **(extra or {}),
        "seconds": all_samples[-1].t_s if all_samples else 0.0,
        "load_end_s": load_end_s if load_end_s is not None else (samples[-1].t_s if samples else 0.0),
        "figures_until_s": samples[-1].t_s if samples else 0.0,  # the last sample the figures use
        "interval_s": (samples[1].t_s - samples[0].t_s) if len(samples) > 1 else None,
        "processes": [p for p in processes if p["samples"]],  # (a process seen only after the load: none)
        "roles": [r for r in roles if r["samples"]],
        "total": _stats([t for t, _ in total], [v for _, v in total]),
        "sessions_over_time": [{"t_s": s.t_s, **s.sessions} for s in all_samples],
        "sessions_last_sample": {k: last.get(k, 0) for k in ("ok", "failed", "tokens")},
        "samples": [{"t_s": s.t_s, "rss_mib": {str(pid): v for pid, v in s.rss_mib.items()}} for s in all_samples],
        "labels": {str(p["pid"]): p["label"] for p in processes},
    }


def min_t(samples: Sequence[Sample], pid: int) -> float:
    return next((s.t_s for s in samples if pid in s.rss_mib), float("inf"))


TABLE_HEADER = ("process", "pid", "start MiB", "end MiB", "peak MiB", "growth MiB/h (2nd half)")


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def _row(label: str, pid: str, st: dict) -> tuple[str, ...]:
    return (
        label,
        pid,
        _fmt(st["start_mib"]),
        _fmt(st["end_mib"]),
        _fmt(st["peak_mib"]),
        _fmt(st["slope_mib_per_h"], signed=True),
    )


def table_rows(report: dict) -> list[tuple[str, ...]]:
    """One row per process, then one per role with more than one process, then the total."""
    rows = [_row(p["label"], str(p["pid"]), p) for p in report["processes"]]
    rows += [_row(f"all {r['role']} ({r['processes']})", "", r) for r in report["roles"] if r["processes"] > 1]
    rows.append(_row("total", "", report["total"]))
    return rows


def markdown_table(report: dict) -> str:
    lines = ["| " + " | ".join(TABLE_HEADER) + " |", "|" + "---|" * len(TABLE_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(report)]
    return "\n".join(lines)


def plot(report: dict, out: Path) -> Path | None:
    """RSS over time, one line per process coloured by role (top); sessions ok/failed over time (bottom)."""
    if not report["samples"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = [r["role"] for r in report["roles"]]
    cmap = plt.get_cmap("tab20")
    colour = {role: cmap((2 * i + (2 * i) // 20) % 20) for i, role in enumerate(roles)}  # neighbours: other hues
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(10, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    shown: set[str] = set()
    for p in report["processes"]:
        pid = str(p["pid"])
        pts = [(s["t_s"] / 60, s["rss_mib"][pid]) for s in report["samples"] if pid in s["rss_mib"]]
        if not pts:
            continue
        label = None if p["role"] in shown else p["role"]
        shown.add(p["role"])
        top.plot([x for x, _ in pts], [y for _, y in pts], color=colour[p["role"]], label=label, linewidth=1.2)
    if report["load_end_s"] < report["seconds"]:
        for ax in (top, bottom):
            ax.axvspan(report["load_end_s"] / 60, report["seconds"] / 60, color="grey", alpha=0.15, lw=0)
        top.text(report["load_end_s"] / 60, 1.01, " load over: sessions finish", transform=top.get_xaxis_transform(),
                 fontsize=7, color="grey")  # fmt: skip
    top.set_yscale("log")
    top.set_ylabel("RSS (MiB, log)")
    top.legend(fontsize=7, ncol=3, loc="lower right")
    top.grid(alpha=0.3)
    over = report["sessions_over_time"]
    xs = [s["t_s"] / 60 for s in over]
    bottom.plot(xs, [s.get("ok", 0) for s in over], label="sessions ok", color="tab:green")
    bottom.plot(xs, [s.get("failed", 0) for s in over], label="sessions failed", color="tab:red")
    bottom.set_ylabel("sessions")
    bottom.set_xlabel("minutes into the soak")
    bottom.legend(fontsize=8, loc="upper left")
    bottom.grid(alpha=0.3)
    t = report["total"]
    fig.suptitle(
        f"cogenesis soak: RSS of every process ({report['load_end_s'] / 60:.0f} min of load; total "
        f"{_fmt(t['start_mib'])} -> {_fmt(t['end_mib'])} MiB, {_fmt(t['slope_mib_per_h'], True)} MiB/h)"
    )
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# ---- running it ---------------------------------------------------------------------------------


def run_soak(
    opts: SoakOptions,
    fleet_opts: Any,
    cloud: Any,
    state_dir: Path | None,
    progress: Callable[[str], None] = lambda line: None,
) -> dict:
    """Start (or use) the cluster, run the fleet for the duration while sampling; returns the report (also
    written to ``out_dir``: soak.json, soak.md, soak.png). The cluster is stopped if this started it, on any
    exit (Ctrl-C included); a report of what was sampled is written then too."""
    from cogenesis.apps.fleet import run_fleet
    from cogenesis.cluster import daemon

    opts.validate()
    fleet_opts.validate()
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    state, started = daemon.running(state_dir), False
    sampler: Sampler | None = None
    load_end_s = opts.minutes * 60
    fleet: dict | None = None
    report: dict = {}
    interrupted = False
    wall0 = time.time()
    try:
        if state is None:
            progress("starting the cluster")
            state, started = daemon.up(cloud, state_dir, progress=lambda m: progress(f"cluster: {m}"))
        sampler = Sampler([os.getpid(), state.pid], opts.interval_s, lambda: counts).start()
        t_end = time.monotonic() + opts.minutes * 60
        load_end_s = t_end - sampler.t0

        def on_progress(c: dict) -> None:
            counts.update({k: int(c.get(k, 0)) for k in ("ok", "failed", "tokens", "active", "connected")})
            progress(progress_line(c, sampler.latest() if sampler else None, t_end, opts.minutes))

        fleet = run_fleet(
            fleet_opts, state.redis_url, state.http_url, state.ray_address, on_progress, secrets_dir=state.secrets_dir
        )
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        if sampler is not None:
            with contextlib.suppress(Exception):
                sampler.stop()
        if started:
            progress("stopping the cluster")
            daemon.down(state_dir)
        if sampler is not None:
            report = finish(opts, sampler, load_end_s, fleet, started, state, interrupted, wall0)
    return report


def finish(
    opts: SoakOptions, sampler: Sampler, load_end_s: float, fleet: dict | None, started: bool, state, interrupted, wall0
) -> dict:
    """Build and write the report (soak.json, soak.md, soak.png in ``out_dir``)."""
    out = Path(opts.out_dir)
    samples, procs = sampler.snapshot()
    sessions = (
        dict(fleet["sessions"])
        if fleet
        else {"ok": samples[-1].sessions.get("ok", 0), "failed": samples[-1].sessions.get("failed", 0), "cut": 0}
    )
    extra = {
        "started_at": wall0,
        "interrupted": interrupted,
        "options": asdict(opts),
        "cluster": {
            "started_by_soak": started,
            "redis_url": state.redis_url if state else None,
            "http_url": state.http_url if state else None,
            "large_model": (state.config or {}).get("large_model") if state else None,
            "replicas": (state.config or {}).get("num_replicas") if state else None,
        },
        "fleet": fleet,
        "sessions": sessions,
    }
    report = build_report(samples, procs, extra, load_end_s)
    png = plot(report, out / "soak.png")
    report["png"] = str(png) if png else None
    report["json"], report["markdown"] = str(out / "soak.json"), str(out / "soak.md")
    (out / "soak.json").write_text(json.dumps(report, indent=1))
    (out / "soak.md").write_text(summary_markdown(report))
    return report


def summary_markdown(report: dict) -> str:
    s = report["sessions"]
    head = (
        f"cogenesis soak: {report['load_end_s'] / 60:.1f} min of load, {report['options']['clients']} clients "
        f"({report['options']['mode']}, think {report['options']['think']} s, device {report['options']['device']}), "
        f"RSS sampled every {report['options']['interval_s']:g} s; sessions {s['ok']} ok, {s['failed']} failed"
    )
    return head + "\n\n" + markdown_table(report) + "\n"


def progress_line(c: dict, latest: Sample | None, t_end: float, minutes: float) -> str:
    left = max(0.0, t_end - time.monotonic())
    done = minutes * 60 - left
    rss = f" | RSS {sum(latest.rss_mib.values()) / 1024:.2f} GiB in {len(latest.rss_mib)} processes" if latest else ""
    return (
        f"soak {int(done // 60)}:{int(done % 60):02d}/{int(minutes)}:{int(minutes * 60 % 60):02d} | sessions ok "
        f"{c.get('ok', 0)} failed {c.get('failed', 0)} | {c.get('tokens', 0)} tokens | {c.get('active', 0)} in a "
        f"session{rss}"
    )
