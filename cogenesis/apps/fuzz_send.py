"""Sending ``cogenesis fuzz``'s cases (``cogenesis.apps.fuzz_cases``) and classifying every answer.

One sender per surface, each used from one thread: ``WsSender`` (the gateway's WebSocket: device A's connection,
which holds A's victim session, device B's, and a fresh connection for cases that present a credential of their
own or may get the socket closed), ``HttpSender`` (the gateway's and the cloud's routes), ``BusSender`` (Redis as
the trusted ``edge`` user, and as ``gateway`` / no user / a wrong password for the ACL cases).

Every answer gets a verdict (``Verdict``): ``refused`` (a 4xx, an ``ErrorReply`` code, a close code, NOPERM /
NOAUTH / WRONGPASS: what a hostile input should get), ``accepted`` (served), ``sent`` (nothing was owed and nothing
came: a close, bus garbage), ``dropped`` (the connection went away without a close code), and the findings:
``server_error`` (a 5xx; on WebSocket and the bus an ``ErrorReply`` ``internal`` / ``unavailable`` /
``replica_lost``, a close 1011, a frame that does not decode), ``hung`` (an owed answer did not come within the
timeout), ``breach`` (a case that must be refused was served: another device's session stepped, a forged token
taken, a forbidden Redis command run, health details without an admin token). Every wait has a timeout.
Nothing is logged of a message but its kind and size; tokens and passwords never.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

import httpx
import redis
import websocket

from cogenesis.apps.fuzz_cases import (
    INSTRUCTION,
    BusCase,
    Case,
    HttpCase,
    Targets,
    Tokens,
    WsCase,
    surface_of,
)
from cogenesis.cluster.bus import FIELD
from cogenesis.core.errors import ClusterError, ProtocolError
from cogenesis.core.protocol import (
    ERROR_REPLY_CODES,
    CloseSession,
    ErrorReply,
    OpenSession,
    StepReply,
    StepRequest,
    decode_replies,
    encode,
    pack_ids,
)

Verdict = Literal["refused", "accepted", "sent", "dropped", "unsent", "server_error", "hung", "breach"]
VERDICTS: tuple[Verdict, ...] = get_args(Verdict)
FINDINGS: tuple[Verdict, ...] = ("server_error", "hung", "breach")
SERVER_CODES = frozenset({"internal", "unavailable", "replica_lost"})  # the WebSocket's and the bus's 5xx
REFUSING_CLOSES = frozenset({1000, 1005, 1002, 1003, 1007, 1008, 1009, 1013, 4401, 4403})  # a close that refuses
logging.getLogger("websocket").setLevel(logging.CRITICAL)  # it logs every close status as an error: ours are counted

REDIS_REFUSALS = ("NOPERM", "NOAUTH", "WRONGPASS", "NO PERMISSIONS", "AUTHENTICATION REQUIRED", "INVALID USERNAME")


@dataclass(frozen=True)
class Result:
    """One case's verdict. ``detail``: the answer in a few words (a status, codes, a close code); ``note``: what the
    case broke (from the generator). Neither holds a message's contents or a credential."""

    n: int
    surface: str
    kind: str
    verdict: Verdict
    detail: str
    note: str = ""
    size: int = 0
    seconds: float = 0.0


def result_of(case: Case, verdict: Verdict, detail: str, seconds: float = 0.0) -> Result:
    return Result(case.n, surface_of(case), case.kind, verdict, detail[:160], case.note, case.size, round(seconds, 3))


# ---- classification (pure) -------------------------------------------------------------------------------


def codes_of(replies: Sequence[StepReply | ErrorReply]) -> Counter[str]:
    """``reply`` for each StepReply, the code of each ErrorReply."""
    return Counter("reply" if isinstance(r, StepReply) else r.code for r in replies)


def classify_replies(
    must_refuse: bool,
    replies: Sequence[StepReply | ErrorReply],
    missing: int,
    close_code: int | None = None,
    dropped: bool = False,
    bad_frames: int = 0,
) -> tuple[Verdict, str]:
    """The verdict of a WebSocket or bus case from the answers it got: ``replies`` matched to it, ``missing``
    owed answers that did not come, the close code if the socket was closed, ``dropped`` if it went away without
    one, ``bad_frames`` frames from the gateway that did not decode."""
    codes = codes_of(replies)
    detail = ", ".join(f"{c}x{k}" if k > 1 else c for c, k in sorted(codes.items())) or "no answer"
    if close_code is not None:
        detail += f"; close {close_code}"
    if bad_frames:
        return "server_error", f"{bad_frames} undecodable frame(s) from the gateway; {detail}"
    bad = sorted(c for c in codes if c in SERVER_CODES or (c != "reply" and c not in ERROR_REPLY_CODES))
    if bad:
        return "server_error", f"ErrorReply {', '.join(bad)}: {detail}"
    if close_code is not None and close_code not in REFUSING_CLOSES and not 4000 <= close_code < 5000:
        return "server_error", detail
    if must_refuse and codes.get("reply"):
        return "breach", f"served though it must be refused: {detail}"
    if missing:
        if close_code is not None:
            return "refused", detail
        if dropped:
            return "dropped", f"{missing} answer(s) owed; connection dropped"
        return "hung", f"{missing} owed answer(s) never came; {detail}"
    if codes.get("reply"):
        return "accepted", detail
    if codes or close_code is not None:
        return "refused", detail
    return ("dropped", "connection dropped") if dropped else ("sent", detail)


def classify_http(case: HttpCase, status: int, body: bytes, events: Sequence[str] | None = None) -> tuple[Verdict, str]:
    """The verdict of an HTTP answer: a 5xx is a finding; a 2xx of a case that must be refused (or health details
    without an admin token) a breach; a streamed answer whose events hold an error is a refusal."""
    detail = f"HTTP {status}"
    if events is not None:
        detail += f" events {','.join(sorted(set(events)))[:60]}" if events else " (no events)"
    if status >= 500:
        return "server_error", detail
    if not 200 <= status < 300:
        return "refused", detail
    if events is not None and "error" in events:
        return "refused", detail
    if case.public_only:
        try:
            keys = set(json.loads(body or b"{}"))
        except (ValueError, TypeError):
            keys = {"<not JSON>"}
        if keys - {"ok"}:
            return "breach", f"{detail}: health details without an admin token ({', '.join(sorted(keys))})"[:160]
        return "accepted", detail
    if case.must_refuse:
        return "breach", f"{detail}: served though it must be refused"
    return "accepted", detail


def classify_redis(case: BusCase, error: BaseException | None) -> tuple[Verdict, str]:
    """The verdict of a Redis command: refused by the ACL (NOPERM, NOAUTH, WRONGPASS) as it must be, or run."""
    if error is None:
        return ("breach", "Redis ran it") if case.must_refuse else ("accepted", "OK")
    text = str(error).upper()
    if isinstance(error, (redis.AuthenticationError, redis.exceptions.NoPermissionError)) or any(
        k in text for k in REDIS_REFUSALS
    ):
        word = next((k for k in REDIS_REFUSALS if k in text), type(error).__name__)
        return "refused", word
    if isinstance(error, redis.ConnectionError | redis.TimeoutError):
        return "dropped", type(error).__name__
    if isinstance(error, redis.ResponseError):
        return "refused", f"ResponseError {text.split(' ', 1)[0]}"
    return "server_error", type(error).__name__


class Matcher:
    """Matches answers to what is owed: ``owed`` keys (a session id, or a (list, session, step) tuple) with
    counts; a wildcard key (``wild``) takes any answer nothing else is owed. Answers nobody owes are stale (the
    late answer of an earlier case) and only counted."""

    def __init__(self, owed: Sequence[Any], wild: Any = "") -> None:
        self.left: Counter[Any] = Counter(owed)
        self.wild = wild
        self.stale = 0
        self.unowed: list[Any] = []  # the answers nobody owed (with ``keep``)

    @property
    def missing(self) -> int:
        return sum(self.left.values())

    def take(self, *keys: Any) -> bool:
        """Whether an answer under any of ``keys`` (most precise first) was owed; it is then no longer owed."""
        for key in (*keys, self.wild):
            if self.left.get(key, 0) > 0:
                self.left[key] -= 1
                return True
        self.stale += 1
        return False

    def keep(self, answer: Any) -> None:
        self.unowed.append(answer)


# ---- WebSocket -------------------------------------------------------------------------------------------


def _sessions(case: WsCase) -> set[str]:
    """The sessions a case's frames name (an answer naming one of them, unowed, is still this case's)."""
    from cogenesis.core.protocol import StepBatch, decode_request

    out: set[str] = set()
    for _, data in case.frames:
        try:
            msg = decode_request(data)
        except ProtocolError:
            continue
        out.add(getattr(msg, "session_id", ""))
        if isinstance(msg, StepBatch):
            for item in msg.items:
                with contextlib.suppress(ProtocolError):
                    out.add(getattr(decode_request(item), "session_id", ""))
    return out


def _close_code(data: bytes) -> int:
    return struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005


class WsSender:
    """The WebSocket cases of one worker. ``setup`` opens device A's victim session (stepped once) so that the
    cases can replay, break and (as device B) steal it; ``close`` closes it and every connection."""

    def __init__(self, ws_url: str, tokens: Tokens, targets: Targets, timeout_s: float = 20.0) -> None:
        self.url, self.tokens, self.t, self.timeout_s = ws_url, tokens, targets, timeout_s
        self.conns: dict[str, websocket.WebSocket] = {}
        self.setups = 0
        self.last_drop = ""  # what the last dropped connection raised

    # ---- connections ---------------------------------------------------------------------------------

    def connect(self, cred: str) -> websocket.WebSocket:
        header = self.tokens.header(cred)  # type: ignore[arg-type]
        url = self.url + (f"?token={self.tokens.query_token}" if cred == "query" else "")
        return websocket.create_connection(
            url,
            timeout=self.timeout_s,
            header=[f"Authorization: {header}"] if header else [],
            skip_utf8_validation=True,
        )

    def conn(self, name: str) -> websocket.WebSocket:
        ws = self.conns.get(name)
        if ws is None or not ws.connected:
            if name == "A":
                self.setup()  # A's socket ended: the gateway closed its sessions, the victim with them
                return self.conns["A"]
            self.conns[name] = ws = self.connect("other" if name == "B" else "device")
        return ws

    def setup(self) -> None:
        """(Re)connect device A and open its victim session: open, step 1 with the top token; ClusterError if
        the gateway does not serve it (nothing can be fuzzed against a gateway that serves no one)."""
        with contextlib.suppress(Exception):
            if "A" in self.conns:
                self.conns.pop("A").close()
        ws = self.conns["A"] = self.connect("device")
        self.setups += 1
        sid = f"fz-{self.t.nonce}-victim{self.setups}"
        opening = encode(OpenSession(session_id=sid, instruction=INSTRUCTION, top_k=5, budget_ms=120_000))
        first = self._one(ws, opening, sid)
        token = int(first.top_k()[0][0][0])
        step = encode(StepRequest(session_id=sid, step=1, tokens=pack_ids([token]), budget_ms=120_000))
        self._one(ws, step, sid)
        self.t.victim, self.t.victim_step, self.t.victim_token = sid, 1, token
        self.t.victim_frames[:] = [opening, step]

    def _one(self, ws: websocket.WebSocket, frame: bytes, sid: str) -> StepReply:
        ws.send_binary(frame)
        got, missing, close, _, _ = self.await_answers(ws, Matcher([sid], wild=None), timeout_s=120.0)
        reply = got[0] if got else None
        if not isinstance(reply, StepReply):
            what = f"{reply.code}: {reply.message}" if isinstance(reply, ErrorReply) else f"no answer (close {close})"
            raise ClusterError(f"the gateway did not serve the fuzzer's own session: {what}")
        return reply

    # ---- a case --------------------------------------------------------------------------------------

    def send(self, case: WsCase) -> Result:
        t0 = time.monotonic()
        if case.conn == "fresh":
            verdict, detail = self._fresh(case)
        else:
            verdict, detail = self._on(case)
        return result_of(case, verdict, detail, time.monotonic() - t0)

    def _send_frames(self, ws: websocket.WebSocket, frames: Sequence[tuple[str, bytes]]) -> None:
        for kind, data in frames:
            if kind == "binary":
                ws.send_binary(data)
            elif kind == "text":
                ws.send(data.decode(), opcode=websocket.ABNF.OPCODE_TEXT)
            elif kind == "bad_utf8":
                ws.send_frame(websocket.ABNF.create_frame(data, websocket.ABNF.OPCODE_TEXT))
            else:  # raw bytes on the socket, no framing
                assert ws.sock is not None
                ws.sock.sendall(data)

    def _on(self, case: WsCase) -> tuple[Verdict, str]:
        """A case on A's or B's connection; a case that owes no answer is followed by a sentinel (a step of a
        session nobody opened, refused at once), so an answer it did get is not taken for the next case's."""
        try:
            ws = self.conn(case.conn)
        except websocket.WebSocketBadStatusException as exc:
            return ("server_error" if exc.status_code >= 500 else "refused"), f"handshake HTTP {exc.status_code}"
        except (OSError, websocket.WebSocketException) as exc:
            return "dropped", f"connect: {type(exc).__name__}"
        sentinel = None if case.expect else f"fz-{self.t.nonce}-sentinel{case.n}"
        try:
            self._send_frames(ws, case.frames)
            if sentinel is not None:
                ws.send_binary(encode(StepRequest(session_id=sentinel, step=1, tokens=pack_ids([1]), budget_ms=1000)))
        except (OSError, websocket.WebSocketException) as exc:
            self.conns.pop(case.conn, None)
            return "dropped", f"send: {type(exc).__name__}"
        owed = [*case.expect] + ([sentinel] if sentinel else [])
        matcher = Matcher(owed, wild="" if case.expect else None)
        got, missing, close, dropped, bad = self.await_answers(ws, matcher)
        got = [r for r in got if r.session_id != sentinel]
        if sentinel is not None:  # nothing was owed, but what came before the sentinel's answer is this case's
            got += [r for r in matcher.unowed if r.session_id in _sessions(case)]
        self._learn(got)
        if close is not None or dropped:
            self.conns.pop(case.conn, None)
        elif case.close_after:
            with contextlib.suppress(OSError, websocket.WebSocketException):
                for sid in case.close_after:
                    ws.send_binary(encode(CloseSession(session_id=sid)))
        verdict, detail = classify_replies(case.must_refuse, got, missing, close, dropped, bad)
        return verdict, f"{detail} ({self.last_drop} on {case.conn}'s connection)" if dropped else detail

    def _learn(self, got: Sequence[StepReply | ErrorReply]) -> None:
        """A StepReply to a next step of the victim (it should not come: the cases send only invalid next steps)
        moves the victim on, so replays stay replays."""
        for r in got:
            if isinstance(r, StepReply) and r.session_id == self.t.victim and r.step > self.t.victim_step:
                self.t.victim_step = r.step

    def _fresh(self, case: WsCase) -> tuple[Verdict, str]:
        """A connection of the case's own: a refused handshake (HTTP 401/403, or a close 4401/4403 right after it)
        is the answer of a bad credential; an accepted one that serves a frame is a breach for those."""
        try:
            ws = self.connect(case.cred)
        except websocket.WebSocketBadStatusException as exc:
            return ("server_error" if exc.status_code >= 500 else "refused"), f"handshake HTTP {exc.status_code}"
        except (OSError, websocket.WebSocketException) as exc:
            return "dropped", f"connect: {type(exc).__name__}"
        try:
            if case.must_refuse and case.kind == "ws.auth":
                got, _, close, dropped, bad = self.await_answers(ws, Matcher(["*"], wild="*"), timeout_s=2.0)
                if close is not None or dropped:
                    return classify_replies(True, got, 1, close, dropped, bad)
            try:
                self._send_frames(ws, case.frames)
            except (OSError, websocket.WebSocketException) as exc:
                return "dropped", f"send: {type(exc).__name__}"
            auth = case.kind == "ws.auth"
            owed = ["*"] if auth else list(case.expect)
            wait = self.timeout_s if case.expect else 3.0
            got, missing, close, dropped, bad = self.await_answers(ws, Matcher(owed, wild="*" if auth else ""), wait)
            if not case.expect and not auth:
                missing = 0  # nothing owed: a close or nothing are both fine
            if auth and got:
                return "breach", f"a connection with a {case.cred} credential was served: {codes_of(got)}"
            if auth and close is None and not dropped:
                return "breach", f"a connection with a {case.cred} credential stayed open, unanswered"
            return classify_replies(case.must_refuse, got, missing, close, dropped, bad)
        finally:
            with contextlib.suppress(Exception):
                ws.close(timeout=1)

    def await_answers(
        self, ws: websocket.WebSocket, matcher: Matcher, timeout_s: float | None = None
    ) -> tuple[list[StepReply | ErrorReply], int, int | None, bool, int]:
        """Read frames until nothing is owed, the socket closes, or the timeout; (matched answers, missing,
        close code, dropped, undecodable frames)."""
        got: list[StepReply | ErrorReply] = []
        bad = 0
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.timeout_s)
        while matcher.missing:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ws.settimeout(left)
            try:
                opcode, data = ws.recv_data(control_frame=True)
            except websocket.WebSocketTimeoutException:
                break
            except (OSError, websocket.WebSocketException) as exc:
                self.last_drop = type(exc).__name__
                return got, matcher.missing, None, True, bad
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return got, matcher.missing, _close_code(data), False, bad
            if opcode != websocket.ABNF.OPCODE_BINARY:
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    bad += 1
                continue
            try:
                replies = decode_replies(data)
            except ProtocolError:
                bad += 1
                continue
            for r in replies:
                if matcher.take(r.session_id):
                    got.append(r)
                else:
                    matcher.keep(r)
        return got, matcher.missing, None, False, bad

    def finish(self) -> tuple[Verdict, str]:
        """A's victim must still be A's: its step replayed is served (not ``unknown_session``: nobody else could
        close it). Then every connection is closed (the gateway closes their sessions)."""
        out: tuple[Verdict, str] = ("accepted", "no victim")
        ws = self.conns.get("A")
        if ws is not None and ws.connected and self.t.victim_frames:
            try:
                ws.send_binary(
                    encode(
                        StepRequest(
                            session_id=self.t.victim,
                            step=self.t.victim_step,
                            tokens=pack_ids([self.t.victim_token]),
                            budget_ms=60_000,
                        )
                    )
                )
                got, missing, close, dropped, bad = self.await_answers(ws, Matcher([self.t.victim], wild=None), 60.0)
                codes = codes_of(got)
                if codes.get("unknown_session") or codes.get("forbidden"):
                    out = ("breach", f"A's own session was lost or taken: {dict(codes)}")
                else:
                    out = classify_replies(False, got, missing, close, dropped, bad)
            except (OSError, websocket.WebSocketException) as exc:
                out = ("dropped", type(exc).__name__)
        for ws in self.conns.values():
            code = close_handshake(ws)
            if code is not None and code not in REFUSING_CLOSES and out[0] != "breach":
                out = ("server_error", f"the gateway answered a client's close with {code}")
        self.conns.clear()
        return out


def close_handshake(ws: websocket.WebSocket, timeout_s: float = 5.0) -> int | None:
    """Close ``ws`` as a device does (close 1000) and return the code of the gateway's closing frame (None: none
    came before the timeout or the socket broke)."""
    code = None
    try:
        ws.send_close()
        ws.settimeout(timeout_s)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            opcode, data = ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = _close_code(data)
                break
    except (OSError, websocket.WebSocketException):
        pass
    finally:
        with contextlib.suppress(Exception):
            ws.shutdown()
    return code


# ---- HTTP ------------------------------------------------------------------------------------------------

MAX_EVENTS_BYTES = 1 << 20


def sse_events(text: str) -> list[str]:
    """The event names of a server-sent events body (``event: x`` lines; ``data:`` without one is ``message``;
    an OpenAI chunk whose data holds an ``error`` object is ``error``)."""
    out: list[str] = []
    name = None
    for line in text.splitlines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
            if name is None and data.startswith("{") and '"error"' in data:
                out.append("error")
            elif name is None:
                out.append("done" if data == "[DONE]" else "message")
            else:
                out.append(name)
            name = None
    return out


class HttpSender:
    """The HTTP cases: ``gateway_url`` (the gateway app's base URL) and ``cloud_url`` (the cloud app's, with
    its route prefix)."""

    def __init__(self, gateway_url: str, cloud_url: str, tokens: Tokens, timeout_s: float = 60.0) -> None:
        self.base = {"gateway": gateway_url.rstrip("/"), "cloud": cloud_url.rstrip("/")}
        self.tokens = tokens
        self.timeout_s = timeout_s
        self.client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=10.0))

    def send(self, case: HttpCase) -> Result:
        t0 = time.monotonic()
        url = self.base[case.target] + case.path
        headers = dict(case.headers)
        auth = self.tokens.header(case.cred)
        if auth is not None and "authorization" not in headers:
            headers["authorization"] = auth
        params = {"token": self.tokens.query_token} if case.cred == "query" else None
        try:
            if case.stream:
                with self.client.stream(case.method, url, headers=headers, content=case.body, params=params) as resp:
                    text = b""
                    for chunk in resp.iter_bytes():
                        text += chunk
                        if len(text) > MAX_EVENTS_BYTES:
                            break
                    events = sse_events(text.decode(errors="replace")) if 200 <= resp.status_code < 300 else None
                    verdict, detail = classify_http(case, resp.status_code, text, events)
            else:
                resp = self.client.request(case.method, url, headers=headers, content=case.body, params=params)
                verdict, detail = classify_http(case, resp.status_code, resp.content)
        except httpx.TimeoutException:
            verdict, detail = "hung", f"no answer within {self.timeout_s:g} s"
        except (httpx.LocalProtocolError, httpx.InvalidURL, UnicodeEncodeError) as exc:
            verdict, detail = "unsent", f"the client would not send it: {type(exc).__name__}"
        except httpx.TransportError as exc:
            verdict, detail = "dropped", type(exc).__name__
        return result_of(case, verdict, detail, time.monotonic() - t0)

    def close(self) -> None:
        self.client.close()


# ---- the bus -----------------------------------------------------------------------------------------------


class BusSender:
    """The bus cases, a chunk at a time: the entries go in one pipeline as the ``edge`` user, the commands one by
    one as their role; then the owed answers are read off the fuzzer's two reply lists (``targets.reply_to`` and
    ``targets.stranger``) until every one came or the timeout."""

    def __init__(self, redis_url: str, secrets: str | Path | None, targets: Targets, timeout_s: float = 30.0) -> None:
        from cogenesis.cluster.bus import connect

        self.url, self.secrets, self.t, self.timeout_s = redis_url, secrets, targets, timeout_s
        self.clients: dict[str, redis.Redis] = {
            "edge": connect(redis_url, role="edge", secrets=secrets),
            "gateway": connect(redis_url, role="gateway", secrets=secrets),
        }
        self.opened: list[str] = []  # sessions opened by valid opens (closed at the end)

    @property
    def edge(self) -> redis.Redis:
        return self.clients["edge"]

    def setup(self) -> None:
        """Open the bus victim from ``reply_to`` and step it once; ClusterError if no replica serves it."""
        sid = f"fz-{self.t.nonce}-busvictim"
        opening = OpenSession(
            session_id=sid, instruction=INSTRUCTION, top_k=5, budget_ms=120_000, reply_to=self.t.reply_to
        )
        self.edge.xadd("cg:open", {FIELD: encode(opening)})
        first = self._reply(sid, 0)
        token = int(first.top_k()[0][0][0])
        step = StepRequest(
            session_id=sid, step=1, tokens=pack_ids([token]), budget_ms=120_000, reply_to=self.t.reply_to
        )
        self.edge.xadd(f"cg:in:{first.replica}", {FIELD: encode(step)})
        self._reply(sid, 1)
        self.t.bus_victim, self.t.bus_victim_replica, self.t.bus_victim_token = sid, first.replica, token
        self.opened.append(sid)

    def _reply(self, sid: str, step: int) -> StepReply:
        got = self.collect(Matcher([(self.t.reply_to, sid, step)], wild=None), 120.0)
        reply = got[0][1] if got else None
        if not isinstance(reply, StepReply):
            what = f"{reply.code}: {reply.message}" if isinstance(reply, ErrorReply) else "no answer"
            raise ClusterError(f"no replica served the fuzzer's bus session: {what}")
        return reply

    def collect(self, matcher: Matcher, timeout_s: float) -> list[tuple[tuple[str, str, int], StepReply | ErrorReply]]:
        """Owed answers off the two reply lists, each with the (list, session, step) it answered."""
        from cogenesis.cluster.bus import reply_key

        lists = [reply_key(self.t.reply_to), reply_key(self.t.stranger)]
        out: list[tuple[tuple[str, str, int], StepReply | ErrorReply]] = []
        deadline = time.monotonic() + timeout_s
        while matcher.missing and time.monotonic() < deadline:
            try:
                item = self.edge.brpop(lists, timeout=1)
            except (redis.ConnectionError, redis.TimeoutError):
                time.sleep(0.2)
                continue
            if item is None:
                continue
            key, payload = cast(tuple[bytes, bytes], item)
            name = key.decode().split(":", 2)[-1]
            try:
                replies = decode_replies(payload)
            except ProtocolError:
                out.append(
                    ((name, "<undecodable>", -1), ErrorReply(session_id="", step=0, code="<bad frame>", message=""))
                )
                continue
            for r in replies:
                key3 = (name, r.session_id, r.step)
                if matcher.take(key3, (name, r.session_id, -1)):
                    out.append((key3, r))
        return out

    def send_chunk(self, cases: Sequence[BusCase]) -> list[Result]:
        t0 = time.monotonic()
        errors: dict[int, BaseException | None] = {}
        entries = [c for c in cases if c.op == "xadd"]
        if entries:
            pipe = self.edge.pipeline(transaction=False)
            for c in entries:
                pipe.xadd(c.stream, dict(c.fields))
            try:
                done = pipe.execute(raise_on_error=False)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                done = [exc] * len(entries)
            for c, d in zip(entries, done):
                errors[c.n] = d if isinstance(d, BaseException) else None
        for c in cases:
            if c.op == "command":
                errors[c.n] = self._command(c)
        owed = [(lst, sid, -1) for c in cases if errors.get(c.n) is None for lst, sid in c.expect]
        got = self.collect(Matcher(owed, wild=None), self.timeout_s) if owed else []
        by_case = _assign(cases, got, errors)
        seconds = (time.monotonic() - t0) / max(1, len(cases))
        out = []
        for c in cases:
            if c.op == "command":
                verdict, detail = classify_redis(c, errors[c.n])
            elif errors.get(c.n) is not None:
                verdict, detail = classify_redis(c, errors[c.n])
                detail = f"XADD {detail}"
            else:
                replies, missing, bad = by_case[c.n]
                verdict, detail = classify_replies(c.must_refuse, replies, missing, bad_frames=bad)
            out.append(result_of(c, verdict, detail, seconds))
            self.opened += list(c.close_after)
        return out

    def _command(self, case: BusCase) -> BaseException | None:
        client: redis.Redis | None = None
        try:
            if case.role in ("none", "wrongpass"):
                kwargs: dict[str, Any] = dict(socket_timeout=10, socket_connect_timeout=5)
                if case.role == "wrongpass":
                    kwargs.update(username="edge", password="not-the-password")
                client = redis.Redis.from_url(self.url, **kwargs)
                client.execute_command(*case.command)
            else:
                self.clients[case.role].execute_command(*case.command)
        except (redis.RedisError, OSError) as exc:
            return exc
        finally:
            if client is not None:
                client.close()
        return None

    def finish(self) -> None:
        """Close the sessions the fuzzer opened on the bus (where they landed is unknown for the forged ones: a
        close goes to every replica; a replica that does not hold the session ignores it)."""
        if self.opened and self.t.replicas:
            pipe = self.edge.pipeline(transaction=False)
            for sid in self.opened:
                for replica in self.t.replicas:
                    pipe.xadd(f"cg:in:{replica}", {FIELD: encode(CloseSession(session_id=sid))})
            with contextlib.suppress(redis.RedisError):
                pipe.execute()
        from cogenesis.cluster.bus import reply_key

        with contextlib.suppress(redis.RedisError):
            self.edge.delete(reply_key(self.t.reply_to), reply_key(self.t.stranger))
        for client in self.clients.values():
            client.close()


def _wanted_step(case: BusCase) -> int | None:
    """The step a bus case's answer names (its request's), None when it does not decode."""
    from cogenesis.core.protocol import decode_request

    try:
        msg = decode_request(case.fields[0][1]) if case.fields else None
    except ProtocolError:
        return None
    if isinstance(msg, StepRequest):
        return msg.step
    if isinstance(msg, OpenSession):
        return msg.resume_step if msg.resume else 0
    return None


def _assign(
    cases: Sequence[BusCase],
    got: Sequence[tuple[tuple[str, str, int], StepReply | ErrorReply]],
    errors: dict[int, BaseException | None],
) -> dict[int, tuple[list[StepReply | ErrorReply], int, int]]:
    """The answers of a chunk, handed to its cases by (list, session), the one naming the case's step first, else
    in order of arrival: (replies, missing, bad frames)."""
    pool: dict[tuple[str, str], list[StepReply | ErrorReply]] = {}
    bad = sum(1 for key, _ in got if key[1] == "<undecodable>")
    for (lst, sid, _), r in got:
        pool.setdefault((lst, sid), []).append(r)
    out: dict[int, tuple[list[StepReply | ErrorReply], int, int]] = {}
    for i, c in enumerate(cases):
        replies: list[StepReply | ErrorReply] = []
        missing = 0
        step = _wanted_step(c)
        if errors.get(c.n) is None:
            for key in c.expect:
                found = pool.get(key)
                if not found:
                    missing += 1
                    continue
                at = next((j for j, r in enumerate(found) if r.step == step), 0)
                replies.append(found.pop(at))
        out[c.n] = (replies, missing, bad if i == 0 else 0)
    return out
