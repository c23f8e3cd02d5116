"""A deterministic ``CloudEngine`` for the replica's tests (step loop, Serve shim): every reply can be checked
exactly, and faults come on demand."""

import threading
import time

import numpy as np

from cogenesis.core.errors import Busy, SessionError, UnknownSession
from cogenesis.core.protocol import SketchReply
from cogenesis.deployments.engine import OutlineEvent, TopK


class FakeEngine:
    """A deterministic CloudEngine: after n context tokens the top-k are the ids n, n+1, ... (log-probs 0, -1,
    ...); an open's context is its instruction's word count plus its resume ids. Validates like the real one
    (top_k 1..50, token ids in 0..vocab-1, steps in order), refuses ``Busy`` beyond ``max_sessions``; an
    outline writes one word per ``step_many`` ("w1 w2 ...", ``min(max_tokens, len(instruction))`` of them) while
    ``outlines_run`` is set, and its reply is "outline of <instruction>"; an instruction starting with "stall" never
    ends; more than ``max_outlines`` at once: ``Busy``."""

    vocab = 1000

    def __init__(self, max_sessions: int = 100, session_idle_s: float = 300.0, max_outlines: int = 2) -> None:
        self.max_sessions = max_sessions
        self.session_idle_s = session_idle_s
        self.max_outlines = max_outlines
        self.sessions: dict[str, dict] = {}
        self.opened: list = []  # every OpenArgs the engine saw
        self.step_calls = 0
        self.explode = False  # step_many raises (a bug in the engine)
        self.hold = threading.Event()  # what a blocked open_many waits for
        self.block = False  # open_many blocks until ``hold`` is set (a hung pass) ...
        self.entered = threading.Event()  # ... and tells it began
        self.outlines: dict[str, list] = {}  # request id -> [request, tokens written]
        self.events: dict[str, OutlineEvent] = {}
        self.cancelled: list[str] = []
        self.outlines_run = threading.Event()
        self.outlines_run.set()
        self.passes = 0

    @staticmethod
    def top(context: int, top_k: int) -> TopK:
        ids = np.arange(context, context + top_k, dtype=np.int32)[None]
        return TopK(ids, -np.arange(top_k, dtype=np.float32)[None], np.zeros(0, np.int32), context, 1.0)

    def open_many(self, requests):
        if self.block:
            self.entered.set()
            self.hold.wait(30)
        out = []
        for r in requests:
            self.opened.append(r)
            if not r.instruction.strip():
                out.append(SessionError("empty instruction"))
            elif not 1 <= r.top_k <= 50:
                out.append(SessionError(f"top_k={r.top_k} is outside 1..50"))
            elif r.session_id in self.sessions and not r.is_resume:
                s = self.sessions[r.session_id]
                out.append(self.top(s["context"], s["top_k"]) if s["step"] == 0 else SessionError("already open"))
            elif r.session_id not in self.sessions and len(self.sessions) >= self.max_sessions:
                out.append(Busy(f"{self.max_sessions} sessions are open", retry_after_s=2.0))
            else:
                context = len(r.instruction.split()) + len(r.resume)
                self.sessions[r.session_id] = dict(
                    context=context, top_k=r.top_k, step=r.resume_step, used=time.monotonic()
                )
                out.append(self.top(context, r.top_k))
        return out

    def step_many(self, requests):
        self.step_calls += 1
        self.passes += 1
        if self.explode:
            raise RuntimeError("a bug in the engine")
        self._advance_outlines()
        out = []
        for r in requests:
            s = self.sessions.get(r.session_id)
            if s is None:
                out.append(UnknownSession(f"unknown session {r.session_id}"))
            elif r.step != s["step"] + 1:
                out.append(SessionError(f"session {r.session_id}: step {r.step} out of order"))
            elif not r.tokens or min(r.tokens) < 0 or max(r.tokens) >= self.vocab:
                out.append(SessionError(f"session {r.session_id}: step {r.step} carries invalid token ids"))
            else:
                s.update(context=s["context"] + len(r.tokens), step=r.step, used=time.monotonic())
                out.append(self.top(s["context"], s["top_k"]))
        return out

    def close(self, session_id):
        return self.sessions.pop(session_id, None) is not None

    def sweep_idle(self):
        now = time.monotonic()
        idle = [sid for sid, s in self.sessions.items() if now - s["used"] > self.session_idle_s]
        for sid in idle:
            del self.sessions[sid]
        return idle

    # outlines
    def submit_outlines(self, requests):
        out = []
        for r in requests:
            if not r.instruction.strip():
                out.append(SessionError("empty instruction", hint="send the general instruction to outline"))
            elif len(self.outlines) >= self.max_outlines:
                out.append(Busy("the outline queue is full", retry_after_s=2.5))
            else:
                self.outlines[r.request_id] = [r, 0]
                out.append(None)
        return out

    def _advance_outlines(self):
        if not self.outlines:
            return
        time.sleep(0.005)  # a pass takes time (and the loop does not spin)
        if not self.outlines_run.is_set():
            return
        for rid, entry in list(self.outlines.items()):
            req = entry[0]
            if req.instruction.startswith("stall"):
                continue
            n = entry[1] = entry[1] + 1
            if n >= min(req.max_tokens, len(req.instruction)):
                reply = SketchReply(request_id=rid, sketch=f"outline of {req.instruction}", tokens=n)
                self.events[rid] = OutlineEvent(rid, n, reply.sketch, reply=reply)
                del self.outlines[rid]
            else:
                self.events[rid] = OutlineEvent(rid, n, " ".join(f"w{i}" for i in range(1, n + 1)))

    def outline_events(self):
        events, self.events = list(self.events.values()), {}
        return events

    def outlines_pending(self):
        return len(self.outlines)

    def cancel_outline(self, request_id):
        if self.outlines.pop(request_id, None) is not None:
            self.cancelled.append(request_id)

    def sketch(self, requests):
        raise NotImplementedError("the replica writes outlines in its step loop")

    def stateless_top_k(self, token_ids, top_k):
        if not token_ids:
            raise SessionError("stateless request carries invalid token ids")
        return self.top(len(token_ids), top_k)

    def stats(self):
        return {"active_sessions": len(self.sessions), "outline_passes": self.passes}

    def shutdown(self):
        pass
