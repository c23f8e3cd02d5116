"""Audit log of everything the large model is asked to condition on (one JSON line per request).

It exists so privacy can be checked from the outside: if private context ever reached the
cloud model, it would be in this file. Each replica appends with O_APPEND, one line per write.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time


class AuditLog:
    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()

    def write(self, kind: str, request_id: str, text: str, **extra) -> None:
        self.append({"kind": kind, "id": request_id, **extra, "text": text})

    def append(self, entry: dict) -> None:
        """One JSON line: ``entry`` after the time it was written."""
        line = json.dumps({"ts": round(time.time(), 3), **entry}, ensure_ascii=False) + "\n"
        with self._lock:
            os.write(self._fd, line.encode("utf-8"))

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class RequestCapture(AuditLog):
    """Every HTTP request body a replica receives, as it arrived (``CloudConfig.capture_http``): one JSON
    line per request with its route and its body in base64, for privacy audits of the HTTP channel."""

    def capture(self, route: str, body: bytes) -> None:
        self.append({"route": route, "body": base64.b64encode(body).decode("ascii")})
