"""Slow work of a gevent-patched process (a fleet's edge pool, a Locust process) in a native thread, leaving
no thread behind.

Why this exists: under ``gevent.monkey.patch_all`` every ``threading.Thread`` is a greenlet of the hub
of the native thread that started it, and it runs only while that hub runs. gevent's threadpool
(``hub.threadpool.apply``) runs a call in a native worker thread with a hub of its own, which runs
only while a call in that worker waits on something. transformers' weight loader
(``transformers.core_model_loading``, 5.x) starts a ``ThreadPoolExecutor`` and ends with
``shutdown(wait=False)``: its worker (``ThreadPoolExecutor-N_0``) stays parked in
``work_queue.get()`` on the pool thread's hub, which never runs again, so the ``None`` it was sent is
never read. At interpreter exit ``threading._shutdown`` joins every executor thread
(``concurrent.futures.thread._python_exit``) and waits on that greenlet forever: Locust printed
"Shutting down (exit code 0)" and its process never ended; an edge pool of ``cogenesis edge`` that loads its
model the same way would hang the same way after publishing its summary.

``offload`` therefore joins, before the call returns and on the hub they belong to, the executor
threads (and any non-daemon threads) the call started: they have been told to stop, and only need
their hub to run to do so. ``threads_blocking_exit`` names whatever interpreter exit would still wait
for (a diagnostic for the quit event; it stops nothing).

Import this only in a process gevent has patched (it does not patch anything itself). It lives with the edge
(``cogenesis.edge_sim``): both gevent processes, the fleet's pools and Locust's, use it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import thread as futures_thread
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

JOIN_TIMEOUT_S = 30.0  # a stopped executor's worker exits at once once its hub runs; this only bounds a bug


def _exit_waits_on(thread: threading.Thread) -> bool:
    """Would interpreter exit join this thread? (non-daemon threads, and every executor worker)"""
    return thread.is_alive() and (not thread.daemon or thread in futures_thread._threads_queues)


def join_started(before: set[threading.Thread], timeout_s: float = JOIN_TIMEOUT_S) -> list[threading.Thread]:
    """Join the threads started since ``before`` that interpreter exit would wait on; returns those still
    alive after ``timeout_s`` (each logged). Call it on the native thread whose hub they belong to."""
    left = []
    for t in [t for t in threading.enumerate() if t not in before and _exit_waits_on(t)]:
        t.join(timeout_s)
        if t.is_alive():
            log.warning("thread %r started by offloaded work did not end within %.0f s", t.name, timeout_s)
            left.append(t)
    return left


def offload(fn: Callable[[], T]) -> T:
    """Run ``fn`` in one of gevent's native threads (the event loop goes on meanwhile) and return its result;
    the threads it started and stopped are joined there before this returns (see the module docstring)."""
    import gevent

    def call() -> T:
        before = set(threading.enumerate())
        try:
            return fn()
        finally:
            join_started(before)

    return gevent.get_hub().threadpool.apply(call)


def threads_blocking_exit() -> list[str]:
    """The threads interpreter exit would join, other than the main thread: name and where each waits."""
    out = []
    for t in threading.enumerate():
        if t is threading.main_thread() or not _exit_waits_on(t):
            continue
        frame = _parked_frame(t)
        out.append(f"{t.name} ({frame})" if frame else t.name)
    return out


def _parked_frame(t: threading.Thread) -> str:
    """Where a greenlet thread waits: its innermost frame outside threading, queue and gevent ("" if unknown)."""
    import gc

    import greenlet

    for g in gc.get_objects():
        if not issubclass(type(g), greenlet.greenlet) or g.gr_frame is None:  # type(): no module's __getattr__ runs
            continue
        frames, frame = [], g.gr_frame
        while frame is not None:
            frames.append(frame)
            frame = frame.f_back
        if not any(f.f_code.co_name == "_bootstrap" and f.f_locals.get("self") is t for f in frames):
            continue
        for f in frames:  # innermost first
            name = f.f_code.co_filename
            if not name.endswith(("threading.py", "queue.py")) and "gevent" not in name:
                return f"{'/'.join(name.split('/')[-2:])}:{f.f_lineno} in {f.f_code.co_name}"
    return ""
