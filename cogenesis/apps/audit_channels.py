"""What the cloud side can see, captured and searched (``cogenesis audit-privacy``).

Channels (``CHANNELS``), each read into ``Doc``s of text:
- ``audit_log``: the engine's audit log (``CloudConfig.audit_log``), the text the large model conditioned on;
- ``redis``: every command Redis executed (a ``MONITOR`` connection), msgpack payloads decoded and the token
  ids devices sent (``tokens`` fields) decoded back to text, per session in step order;
- ``http``: every HTTP request body the replicas received (``CloudConfig.capture_http``), decoded likewise;
- ``ray_logs``: every file of the Ray session's log directory (Ray, Serve, replicas, workers);
- ``cluster_log``: this process's log records (the cluster it runs) and the Redis server's log;
- ``metrics``: every announced /metrics endpoint, this process's edge metrics and the cloud's /v1/stats.

A ``Doc`` names its source (never its text) and, where the channel shows it, the session or request it
belongs to and whether it is text a device sent (an instruction, a token stream) as opposed to the cloud's
own templates around it. Searching: ``find_canaries`` (normalized substring match of every canary) and
``find_spans`` (a matcher of a record's private spans, on text a device sent, attributed to its record).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgspec
import redis

from cogenesis.apps.canaries import Canary, normalize
from cogenesis.cluster.bus import redis_auth
from cogenesis.core import metrics
from cogenesis.core.auth import bearer_header
from cogenesis.core.protocol import unpack_ids
from cogenesis.core.secrets import SecretsDir, stored_token

CHANNELS = ("audit_log", "redis", "http", "ray_logs", "cluster_log", "metrics")
TOKEN_FIELDS = ("tokens",)  # msgpack fields holding int32 token ids a device sent
_ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|.)", re.DOTALL)
_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}


@dataclass(frozen=True)
class Doc:
    """One piece of what a channel showed."""

    channel: str
    source: str  # where it was seen: "audit:step", "redis:XADD", "http:/v1/sketch", a log file's name, ...
    text: str
    session: str | None = None  # the session or request id it belongs to, where the channel shows one
    sent: bool = False  # text a device sent (an instruction, a token stream), apart from the cloud's templates


# ---- Redis: MONITOR, msgpack payloads, token ids ------------------------------------------------------------


class RedisMonitor(threading.Thread):
    """Every command Redis executes, as the raw lines of a ``MONITOR`` connection (a second connection)."""

    def __init__(self, url: str, secrets: str | Path | SecretsDir | None = None) -> None:
        super().__init__(daemon=True, name="redis-monitor")
        self.url = url
        self._auth = redis_auth(url, "admin", secrets)  # MONITOR: only the admin user may watch the bus
        self.client = redis.Redis.from_url(url, socket_timeout=None, **self._auth)  # waits however long
        self.lines: list[bytes] = []
        self.ready = threading.Event()
        self._marker = f"cogenesis-monitor-end-{uuid.uuid4().hex}".encode()
        self._stopping = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            with self.client.monitor() as mon:
                self.ready.set()
                while True:
                    line = mon.connection.read_response()
                    if isinstance(line, bytes):
                        if self._marker in line:  # every command before ``stop`` has been read
                            return
                        self.lines.append(line)
        except Exception as exc:  # reported as the channel's capture error
            if not self._stopping.is_set():
                self.error = type(exc).__name__
        finally:
            self.ready.set()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Read every command executed so far (up to a marker sent on another connection), then stop."""
        self._stopping.set()
        try:
            waker = redis.Redis.from_url(self.url, socket_timeout=5, **self._auth)
            waker.echo(self._marker)
            waker.close()
        except redis.RedisError:
            pass  # Redis is gone: the read fails and the thread ends
        if self.ident is not None:  # started
            self.join(timeout_s)
        self.client.close()


def monitor_args(line: bytes) -> list[bytes]:
    """The arguments of one MONITOR line (``ts [db addr] "CMD" "arg" ...``), unescaped to their bytes."""
    _, _, command = line.partition(b"] ")
    return [_ESCAPE.sub(_unescape, m.group(1)) for m in _ARG.finditer(command)]


def _unescape(m: re.Match[bytes]) -> bytes:
    code = m.group(1)
    if code[:1] == b"x" and len(code) == 3:
        return bytes([int(code[1:], 16)])
    return _ESCAPES.get(code, code)


class PayloadReader:
    """Text from payloads as the cloud side receives them: msgpack or JSON walked for every string,
    token ids (``TOKEN_FIELDS``) decoded with the tokenizer, a session's step tokens joined in step order."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.vocab = len(tokenizer)
        self.streams: dict[str, dict[int, list[int]]] = {}  # session -> step -> token ids

    def pieces(self, payload: bytes) -> Iterator[tuple[str, str | None, bool]]:
        """``(text, session, sent)`` of one payload; a session's step tokens are kept for ``stream_docs``."""
        value = _structured(payload)
        if value is None:
            yield payload.decode("utf-8", errors="replace"), None, False
        else:
            yield from self._walk(value)

    def _walk(self, value: Any) -> Iterator[tuple[str, str | None, bool]]:
        if isinstance(value, str):
            yield value, None, False
        elif isinstance(value, bytes):
            inner = _structured(value)
            if inner is not None:
                yield from self._walk(inner)
        elif isinstance(value, list):
            for item in value:
                yield from self._walk(item)
        elif isinstance(value, dict):
            yield from self._message(value)

    def _message(self, msg: dict) -> Iterator[tuple[str, str | None, bool]]:
        session = msg.get("session_id") if isinstance(msg.get("session_id"), str) else msg.get("request_id")
        session = session if isinstance(session, str) else None
        for key, value in msg.items():
            if key in TOKEN_FIELDS and isinstance(value, bytes) and len(value) % 4 == 0:
                ids = [int(i) for i in unpack_ids(value)]
                if session is not None and isinstance(msg.get("step"), int):  # a step: one piece of a stream
                    self.streams.setdefault(session, {})[msg["step"]] = ids
                else:  # a whole sequence (the stateless baseline)
                    yield self.decode(ids), session, True
            elif key == "instruction" and isinstance(value, str):
                yield value, session, True
            else:
                yield from self._walk(value)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode([i for i in ids if 0 <= i < self.vocab]))

    def stream_docs(self, channel: str) -> list[Doc]:
        """Each session's step tokens, in step order, as one text (what the session's stream carried)."""
        return [
            Doc(
                channel, f"{channel}:token stream", self.decode([t for s in sorted(steps) for t in steps[s]]), sid, True
            )
            for sid, steps in self.streams.items()
        ]


def _structured(payload: bytes) -> Any:
    """A msgpack or JSON map/list in ``payload``, or None (a plain string, a number, not decodable)."""
    for decode in (msgspec.msgpack.decode, msgspec.json.decode):
        try:
            value = decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError):
            continue
        if isinstance(value, (dict, list)):
            return value
    return None


def redis_docs(lines: Iterable[bytes], tokenizer: Any) -> list[Doc]:
    """Every MONITOR line's decoded text (one Doc per line and session), and each session's token stream."""
    reader = PayloadReader(tokenizer)
    docs: list[Doc] = []
    for line in lines:
        args = monitor_args(line)
        if not args:
            continue
        source = "redis:" + args[0].decode("ascii", errors="replace").upper()
        loose: list[str] = []
        for arg in args:
            for text, session, sent in reader.pieces(arg):
                if session is None and not sent:
                    loose.append(text)
                else:
                    docs.append(Doc("redis", source, text, session, sent))
        docs.append(Doc("redis", source, " ".join(loose)))
    return docs + reader.stream_docs("redis")


# ---- the audit log and HTTP bodies ------------------------------------------------------------------------


def _jsonl(path: Path) -> Iterator[dict]:
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            yield entry


def audit_docs(path: Path) -> list[Doc]:
    """Every audit entry's text (the cloud's prompt around what a device sent), and per session the
    tokens its steps appended, in step order (what the device's stream sent)."""
    docs: list[Doc] = []
    streams: dict[str, dict[int, str]] = {}
    for entry in _jsonl(path):
        kind, sid = str(entry.get("kind", "")), entry.get("id")
        sid = sid if isinstance(sid, str) else None
        docs.extend(
            Doc("audit_log", f"audit:{kind}", v, sid) for k, v in entry.items() if isinstance(v, str) and k != "id"
        )
        if kind == "step" and sid is not None and isinstance(entry.get("appended"), str):
            streams.setdefault(sid, {})[int(entry.get("step", 0))] = entry["appended"]
    docs.extend(
        Doc("audit_log", "audit:token stream", "".join(s[k] for k in sorted(s)), sid, True)
        for sid, s in streams.items()
    )
    return docs


def http_docs(path: Path, tokenizer: Any) -> list[Doc]:
    """Every captured request body (``deployments.audit.RequestCapture``), decoded like Redis payloads."""
    reader = PayloadReader(tokenizer)
    docs: list[Doc] = []
    for entry in _jsonl(path):
        source = f"http:{entry.get('route', '?')}"
        try:
            body = base64.b64decode(str(entry.get("body", "")), validate=True)
        except ValueError:
            continue
        docs.extend(Doc("http", source, text, session, sent) for text, session, sent in reader.pieces(body))
    return docs + reader.stream_docs("http")


# ---- logs and metrics --------------------------------------------------------------------------------------


def wait_quiet(root: Path, quiet_s: float = 2.0, timeout_s: float = 30.0) -> None:
    """Wait until no file under ``root`` has changed for ``quiet_s`` (at most ``timeout_s``): Ray's
    processes flush their logs as they exit, after ``ray.shutdown`` has returned."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        newest = max((p.stat().st_mtime for p in root.rglob("*") if p.is_file() and not p.is_symlink()), default=0.0)
        if time.time() - newest >= quiet_s:
            return
        time.sleep(0.5)


def ray_log_docs(ray_dir: Path) -> list[Doc]:
    """Every file under the Ray sessions' log directories (``<temp dir>/session_*/logs``; not
    ``session_latest``, a link to one of them)."""
    sessions = [s for s in sorted(ray_dir.glob("session_*")) if s.is_dir() and not s.is_symlink()]
    return [
        Doc("ray_logs", f"ray:{p.name}", p.read_text(encoding="utf-8", errors="replace"))
        for s in sessions
        for p in sorted((s / "logs").rglob("*"))
        if p.is_file() and not p.is_symlink()
    ]


class LogCapture(logging.Handler):
    """This process's log records at INFO and above, formatted (``cluster_log``); ``attach``/``detach``
    lower the root logger's level only for this handler (other handlers keep what they printed)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._kept: list[tuple[logging.Handler, int]] = []
        self._root_level = logging.WARNING
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted is shown as logging shows it: not at all
            self.handleError(record)

    def attach(self) -> LogCapture:
        root = logging.getLogger()
        self._root_level = root.level
        self._kept = [(h, h.level) for h in root.handlers]
        for h, level in self._kept:
            h.setLevel(max(level, root.level))
        root.addHandler(self)
        root.setLevel(min(root.level, logging.INFO))
        return self

    def detach(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self)
        root.setLevel(self._root_level)
        for h, level in self._kept:
            h.setLevel(level)


def cluster_log_docs(lines: Sequence[str], redis_log: Path | None) -> list[Doc]:
    """This process's log records (``LogCapture``) and the Redis server's log file (read it before the
    server stops: its directory goes with it)."""
    docs = [Doc("cluster_log", "cluster:process log", "\n".join(lines))]
    if redis_log is not None and redis_log.is_file():
        docs.append(Doc("cluster_log", "cluster:redis.log", redis_log.read_text(encoding="utf-8", errors="replace")))
    return docs


def metrics_docs(
    redis_url: str, http_url: str, timeout_s: float = 5.0, secrets: str | Path | SecretsDir | None = None
) -> tuple[list[Doc], list[str]]:
    """Every announced metrics endpoint's exposition, this process's edge metrics and the cloud's /v1/stats;
    and the endpoints that could not be read."""
    from prometheus_client import generate_latest

    from cogenesis.cluster.bus import connect

    client = connect(redis_url, role="admin", secrets=secrets)
    try:
        found = metrics.targets(client)
    finally:
        client.close()
    docs = [Doc("metrics", "metrics:this process (edge)", generate_latest(metrics.EDGE).decode())]
    urls = [(f"metrics:{role}", f"http://{a}/metrics") for role, addrs in found.items() for a in addrs]
    urls.append(("metrics:/v1/stats", f"{http_url}/v1/stats"))
    where = secrets.path if isinstance(secrets, SecretsDir) else secrets
    admin = stored_token("admin", where)  # /v1/stats is an admin's (a cluster without secrets: open)
    failed = []
    for source, url in urls:
        headers = bearer_header(admin) if url.endswith("/v1/stats") else None
        try:
            reply = httpx.get(url, headers=headers, timeout=timeout_s)
            reply.raise_for_status()
            docs.append(Doc("metrics", source, reply.text))
        except httpx.HTTPError as exc:
            failed.append(f"{source} ({type(exc).__name__})")
    return docs, failed


# ---- searching ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leak:
    """A canary seen in a channel (the canary's text is never part of it)."""

    channel: str
    kind: str
    tid: str
    field: str
    source: str


def find_canaries(docs: Sequence[Doc], canaries: Sequence[Canary]) -> list[Leak]:
    """Every (channel, canary) pair where the canary's normalized text occurs in the channel's normalized
    text, with the first source that shows it."""
    by_channel: dict[str, list[tuple[str, str]]] = {}
    for d in docs:
        by_channel.setdefault(d.channel, []).append((d.source, normalize(d.text)))
    leaks = []
    for channel, texts in by_channel.items():
        whole = "\x00".join(t for _, t in texts)
        for c in canaries:
            needle = normalize(c.text)
            if needle and needle in whole:
                source = next(s for s, t in texts if needle in t)
                leaks.append(Leak(channel, c.kind, c.tid, c.field, source))
    return leaks


@dataclass(frozen=True)
class SpanHit:
    """Private spans of a record found in text its device sent, as one channel showed them."""

    channel: str
    tid: str
    kind: str  # the matcher's kind of span (an n-gram, an entity)
    spans: int  # distinct spans found
    source: str  # the first source that showed one


@dataclass
class SpanSearch:
    """``find_spans``' inputs: who sent each session/request, and each record's private-span matcher
    (text -> matches with ``kind``, ``start`` and ``end``)."""

    owner: dict[str, str] = field(default_factory=dict)  # session / request id -> tid
    matchers: dict[str, Callable[[str], Sequence[Any]]] = field(default_factory=dict)  # tid -> matcher


def find_spans(docs: Sequence[Doc], search: SpanSearch) -> list[SpanHit]:
    """The sending record's private spans in every text a device sent that the channel attributes to a
    session, counted per channel, record and kind of span."""
    found: dict[tuple[str, str, str], tuple[str, set[str]]] = {}
    for d in docs:
        tid = search.owner.get(d.session or "")
        if not d.sent or tid is None or tid not in search.matchers:
            continue
        for m in search.matchers[tid](d.text):
            _, spans = found.setdefault((d.channel, tid, str(m.kind)), (d.source, set()))
            spans.add(normalize(d.text[m.start : m.end]))
    return [SpanHit(ch, tid, kind, len(spans), source) for (ch, tid, kind), (source, spans) in sorted(found.items())]
