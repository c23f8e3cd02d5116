"""The replica's model lock: first come, first served, with yield points for long holders.

Outline generation holds the model for a whole ``generate`` call (tens of forward passes), while
logits steps need it for one pass each. With a plain lock a step waits for the whole outline.
Here a long holder calls ``yield_()`` between its passes: if anyone is waiting, the waiters go
first (in arrival order) and the holder continues after them, so steps interleave with outlines
token by token.
"""

from __future__ import annotations

import threading


class FairLock:
    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._next = 0  # next ticket to hand out
        self._serving = 0  # ticket that holds the lock
        self.yields = 0  # times a holder stepped aside for waiters

    def acquire(self) -> None:
        with self._cv:
            ticket = self._next
            self._next += 1
            while ticket != self._serving:
                self._cv.wait()

    def release(self) -> None:
        with self._cv:
            self._serving += 1
            self._cv.notify_all()

    def waiting(self) -> int:
        with self._cv:
            return max(0, self._next - self._serving - 1)

    def yield_(self) -> None:
        """Let everyone already waiting go first; returns holding the lock again."""
        if self.waiting() > 0:
            self.yields += 1
            self.release()
            self.acquire()

    def __enter__(self) -> FairLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
