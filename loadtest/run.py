"""``cogenesis loadtest``: a headless Locust run against the local cluster, with a summary.

Locust runs as a subprocess (it monkey-patches with gevent; this process never imports it). Its
CSV and HTML reports land in ``--out``; the summary JSON (users reached, sessions ok/failed,
tokens/s, TTFT and ITL percentiles, the device) is built from its CSVs.

Locust's process must end by itself once it logs "Shutting down": ``locust_ended`` is ``exited`` then,
or ``killed`` when it was still alive ``exit_grace_s`` later and had to be stopped (its reports are
read all the same, and ``cogenesis loadtest`` fails: a process that does not exit is a defect).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cogenesis.core.config import command_default
from cogenesis.core.errors import ClusterError, ConfigError
from cogenesis.loadtest.profiles import load_shape

ROOT = Path(__file__).resolve().parent.parent
CLASSES = {"logits": ["LogitsUser"], "sketch": ["SketchUser"], "mixed": ["LogitsUser", "SketchUser"]}


def parse_duration(text: str) -> float:
    """Locust's run-time syntax: 90, 90s, 2m, 1h30m."""
    m = re.fullmatch(r"\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s?)?\s*", text or "")
    if not m or not any(m.groups()):
        raise ConfigError(f"run time {text!r} is not a duration", hint="e.g. 60s, 2m, 1h30m")
    h, mi, s = (int(g or 0) for g in m.groups())
    seconds = h * 3600 + mi * 60 + s
    if seconds <= 0:
        raise ConfigError(f"run time {text!r} must be > 0")
    return float(seconds)


@dataclass
class LoadtestOptions:
    users: int = 100
    spawn_rate: float = 10.0
    run_time: str = "60s"
    mode: str = "logits"
    device: str = "real"
    processes: int = 1
    shape: str | None = None  # a configs/loadtest/*.yaml profile (overrides users/spawn rate/run time)
    think_time: str = "5..15"
    max_new_tokens: int = command_default("loadtest", "edge.max_new_tokens")
    max_active: int = 0
    stop_timeout_s: float = 30.0
    exit_grace_s: float = 60.0  # after Locust says it is shutting down, its process must exit within this
    small_model: str = command_default("loadtest", "edge.small_model")
    data: str | None = None
    out_dir: str = "out/loadtest"
    json_path: str | None = None
    extra_args: tuple[str, ...] = ()
    transport: str = "ws"  # ws: users are devices on the gateway (a token each) | redis: trusted workers on the bus
    gateway_url: str = ""  # "": beside the cloud app's URL (``cogenesis.edge_sim.session.gateway_of``)

    def validate(self) -> None:
        if self.users < 1 or self.spawn_rate <= 0:
            raise ConfigError("--users must be >= 1 and --spawn-rate > 0")
        if self.mode not in CLASSES:
            raise ConfigError(f"unknown --mode {self.mode!r}", hint="use logits, sketch or mixed")
        if self.transport not in ("ws", "redis"):
            raise ConfigError(f"unknown --transport {self.transport!r}", hint="use ws (the gateway) or redis")
        if self.processes < 1:
            raise ConfigError("--processes must be >= 1")
        parse_duration(self.run_time)
        from cogenesis.edge_sim.device import resolve_device
        from cogenesis.edge_sim.fleet import parse_think

        resolve_device(self.device)
        parse_think(self.think_time)
        if self.shape:
            load_shape(self.shape)


def locust_command(opts: LoadtestOptions, redis_url: str, http_url: str, prefix: Path, html: Path) -> list[str]:
    files = "loadtest/locustfile.py" + (",loadtest/shapes.py" if opts.shape else "")
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        files,
        "--headless",
        "--csv",
        str(prefix),
        "--csv-full-history",
        "--html",
        str(html),
        "--stop-timeout",
        f"{int(opts.stop_timeout_s)}s",
        "--only-summary",
        "--cg-redis-url",
        redis_url,
        "--cg-http-url",
        http_url,
        "--cg-device",
        opts.device,
        "--cg-think-time",
        opts.think_time,
        "--cg-max-new-tokens",
        str(opts.max_new_tokens),
        "--cg-max-active",
        str(opts.max_active),
        "--cg-small-model",
        opts.small_model,
        "--cg-transport",
        opts.transport,
    ]
    if opts.gateway_url:
        cmd += ["--cg-gateway-url", opts.gateway_url]
    if opts.data:
        cmd += ["--cg-data", str(Path(opts.data).resolve())]
    if not opts.shape:
        cmd += ["-u", str(opts.users), "-r", str(opts.spawn_rate), "-t", opts.run_time]
    if opts.processes > 1:
        cmd += ["--processes", str(opts.processes)]
    return cmd + list(opts.extra_args) + CLASSES[opts.mode]


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(row: dict, key: str) -> float:
    try:
        return float(row.get(key) or 0)
    except ValueError:
        return 0.0


def _history(prefix: Path) -> dict:
    rows = _read_csv(Path(f"{prefix}_stats_history.csv"))
    agg = [r for r in rows if r.get("Name") == "Aggregated"]
    stamps = [_num(r, "Timestamp") for r in agg if _num(r, "User Count") > 0]
    return {
        "users": int(max((_num(r, "User Count") for r in agg), default=0)),
        "span_s": (max(stamps) - min(stamps)) if len(stamps) > 1 else 0.0,
        "last": agg[-1] if agg else {},
    }


def summarize(opts: LoadtestOptions, prefix: Path, seconds: float, exit_code: int, device_line: str) -> dict:
    stats = {(r["Type"], r["Name"]): r for r in _read_csv(Path(f"{prefix}_stats.csv"))}
    modes = [m for m in ("logits", "sketch") if (m, "session") in stats]
    per_mode, tokens, ok, failed = {}, 0.0, 0, 0
    for m in modes:
        s = stats[(m, "session")]
        n, f = int(_num(s, "Request Count")), int(_num(s, "Failure Count"))
        t = _num(s, "Average Content Size") * n  # content sizes are tokens; failures count 0
        pct = {
            name: {"p50": _num(stats[(m, name)], "50%"), "p99": _num(stats[(m, name)], "99%")}
            for name in ("ttft", "itl", "step", "request", "session")
            if (m, name) in stats
        }
        per_mode[m] = {
            "sessions_ok": n - f,
            "sessions_failed": f,
            "tokens": int(t),
            **{f"{k}_ms": v for k, v in pct.items()},
        }
        tokens, ok, failed = tokens + t, ok + n - f, failed + f
    failures = [
        {"type": r.get("Method"), "name": r.get("Name"), "error": r.get("Error"), "count": int(_num(r, "Occurrences"))}
        for r in _read_csv(Path(f"{prefix}_failures.csv"))
    ]
    exceptions = [
        {"count": int(_num(r, "Count")), "message": r.get("Message")}
        for r in _read_csv(Path(f"{prefix}_exceptions.csv"))
    ]  # errors in user code (not sessions)
    run_s = load_shape(opts.shape).run_time_s if opts.shape else parse_duration(opts.run_time)
    return {
        "users": opts.users if not opts.shape else None,
        "users_reached": _history(prefix)["users"],
        "spawn_rate": opts.spawn_rate,
        "run_time_s": run_s,
        "shape": opts.shape,
        "mode": opts.mode,
        "transport": opts.transport,
        "processes": opts.processes,
        "device": device_line,
        "think_time_s": opts.think_time,
        "max_new_tokens": opts.max_new_tokens,
        "test_s": round(seconds, 1),
        "sessions": {"ok": ok, "failed": failed},
        "tokens": int(tokens),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
        "modes": per_mode,
        "failures": failures,
        "exceptions": exceptions,
        "locust_exit_code": exit_code,
        "reports": {
            "csv": f"{prefix}_stats.csv",
            "history_csv": f"{prefix}_stats_history.csv",
            "html": str(prefix.parent / "report.html"),
            "log": str(prefix.parent / "locust.log"),
        },
        "options": asdict(opts),
    }


def run_loadtest(
    opts: LoadtestOptions,
    redis_url: str,
    http_url: str,
    progress=lambda line: None,
    secrets_dir: str | None = None,
    token: str | None = None,
) -> dict:
    """Run Locust headless and summarize it. ``secrets_dir`` (a path) and ``token`` reach Locust in its
    environment (``$COGENESIS_SECRETS_DIR``, ``$COGENESIS_TOKEN``), never on its command line or in the summary."""
    from cogenesis.edge_sim.device import describe, resolve_device

    opts.validate()
    profile = resolve_device(opts.device)
    device_line = describe(profile, "Locust process")
    out = Path(opts.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix, html, logfile = out / "locust", out / "report.html", out / "locust.log"
    for old in out.glob("locust_*.csv"):
        old.unlink()
    cmd = locust_command(opts, redis_url, http_url, prefix, html)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    if secrets_dir:
        env["COGENESIS_SECRETS_DIR"] = secrets_dir
    if token:
        env["COGENESIS_TOKEN"] = token
    if opts.shape:
        env["COGENESIS_SHAPE"] = str(Path(opts.shape).resolve())
    run_s = load_shape(opts.shape).run_time_s if opts.shape else parse_duration(opts.run_time)
    limit = run_s + opts.stop_timeout_s + 300  # + startup (model load) and reports
    t0 = time.perf_counter()
    finished_at: float | None = None  # when Locust logged "Shutting down": its work is done, its exit due
    ended = "exited"
    with open(logfile, "wb") as log:
        proc = subprocess.Popen(  # its own process group: its --processes workers are stopped with it
            cmd,
            cwd=str(ROOT),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while proc.poll() is None:
                now = time.perf_counter()
                if finished_at is None and locust_finished(logfile):
                    finished_at = now
                if finished_at is not None and now - finished_at > opts.exit_grace_s:
                    _stop(proc)  # reports are written; its process hangs in exit
                    ended = "killed"
                    break
                if finished_at is None and now - t0 > limit:
                    _stop(proc)
                    raise ClusterError(
                        f"Locust did not finish within {limit:.0f} s (stopped it)", hint=f"see {logfile}"
                    )
                last = _history(prefix)["last"]
                progress(
                    {
                        "elapsed_s": time.perf_counter() - t0,
                        "users": int(_num(last, "User Count")),
                        "requests": int(_num(last, "Total Request Count")),
                        "failures": int(_num(last, "Total Failure Count")),
                    }
                )
                time.sleep(1.0)
        except BaseException:
            _stop(proc)
            raise
    if finished_at is None and locust_finished(logfile):  # it logged its last line and exited between two polls
        finished_at = time.perf_counter()
    exit_s = round(time.perf_counter() - finished_at, 1) if finished_at is not None else None
    seconds = time.perf_counter() - t0
    if not Path(f"{prefix}_stats.csv").is_file():
        tail = "\n".join(logfile.read_text(errors="replace").splitlines()[-5:])
        raise ClusterError(
            f"Locust exited with code {proc.returncode} and wrote no report:\n{tail}", hint=f"full log: {logfile}"
        )
    span = _history(prefix)["span_s"] or seconds  # from the first user to the end, as Locust recorded it
    summary = summarize(opts, prefix, span, proc.returncode, device_line)
    summary["locust_ended"] = ended
    summary["locust_exit_s"] = exit_s  # from its "Shutting down" line to its process's end (as polled)
    plot = plot_history(prefix, out / "loadtest.png")
    summary["reports"]["png"] = str(plot) if plot else None
    json_path = Path(opts.json_path or out / "summary.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=1))
    summary["json"] = str(json_path)
    return summary


SHUTDOWN_LINE = b"Shutting down (exit code"  # what Locust logs once its run is over and its reports are due


def locust_finished(logfile: Path, tail_bytes: int = 65536) -> bool:
    """Has Locust logged that it is shutting down? (its log's tail, so a long log costs nothing)"""
    try:
        with open(logfile, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            return SHUTDOWN_LINE in f.read()
    except OSError:
        return False


def _stop(proc: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGTERM Locust's process group (it and its workers); SIGKILL the group once it has had ``timeout_s``
    (its leader may be gone while a worker hangs on)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def plot_history(prefix: Path, out: Path) -> Path | None:
    """Tokens/s and users over time, and latency percentiles over time, from Locust's history CSV."""
    rows = _read_csv(Path(f"{prefix}_stats_history.csv"))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = min(_num(r, "Timestamp") for r in rows)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    agg = [r for r in rows if r.get("Name") == "Aggregated"]
    users = top.twinx()
    users.plot(
        [_num(r, "Timestamp") - t0 for r in agg],
        [_num(r, "User Count") for r in agg],
        color="grey",
        linestyle=":",
        label="users",
    )
    users.set_ylabel("users")
    for mode in ("logits", "sketch"):
        sess = [r for r in rows if r.get("Type") == mode and r.get("Name") == "session"]
        if len(sess) < 2:
            continue
        ts = [_num(r, "Timestamp") - t0 for r in sess]
        tokens = [_num(r, "Total Request Count") * _num(r, "Total Average Content Size") for r in sess]
        rates = [
            max(0.0, (b - a) / (tb - ta)) if tb > ta else 0.0 for a, b, ta, tb in zip(tokens, tokens[1:], ts, ts[1:])
        ]
        top.plot(ts[1:], rates, label=f"{mode} tokens/s (completed sessions)")
        for name, style in (("itl", "-"), ("step", "--"), ("ttft", ":")):
            series = [r for r in rows if r.get("Type") == mode and r.get("Name") == name]
            if series:
                xs = [_num(r, "Timestamp") - t0 for r in series]
                for q, alpha in (("50%", 1.0), ("99%", 0.5)):
                    bottom.plot(
                        xs, [_num(r, q) for r in series], linestyle=style, alpha=alpha, label=f"{mode} {name} p{q[:-1]}"
                    )
    top.set_ylabel("tokens/s")
    top.legend(loc="upper left", fontsize=8)
    bottom.set_yscale("log")
    bottom.set_ylabel("ms (log)")
    bottom.set_xlabel("seconds into the test")
    bottom.legend(fontsize=7, ncol=2)
    fig.suptitle("cogenesis loadtest: throughput and latency over time")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
