"""One exception hierarchy. Every error says what was wrong and what to do about it."""

from __future__ import annotations


class CoGenesisError(Exception):
    """Base error. ``hint`` tells the user what to do; the CLI prints both, never a traceback."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(CoGenesisError):
    """A configuration value or command-line flag is invalid."""


class DataError(CoGenesisError):
    """A data file is missing or not in the CoGenesis record format."""


class ModelError(CoGenesisError):
    """A model cannot be found, converted or loaded."""


class ProtocolError(CoGenesisError):
    """A message on the bus or over HTTP is malformed or of an unsupported version."""


class SessionError(CoGenesisError):
    """A logits session is unknown, closed, out of order or failed on the cloud side."""


class UnknownSession(SessionError):
    """The cloud has no such session (never opened, closed, or idle too long)."""


class Busy(SessionError):
    """The cloud refused a request it could not serve in time (sessions, KV budget, queue age);
    ``retry_after_s``: when it suggests trying again. The edge retries opens with jittered backoff,
    within ``EdgeConfig.admission_timeout_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0, hint: str | None = None) -> None:
        super().__init__(message, hint or "the cloud is at capacity: retry later, or add replicas")
        self.retry_after_s = retry_after_s


class ReplicaLost(SessionError):
    """The replica holding a session stopped (no heartbeat) or lost it; the edge re-opens the session
    elsewhere and replays its tokens (``EdgeConfig.max_resumes`` times at most)."""


class BusTimeout(CoGenesisError):
    """A reply did not arrive before its deadline."""


class PrivacyViolation(CoGenesisError):
    """The edge's outbound gate refused a message that carries private context."""


class ClusterError(CoGenesisError):
    """Redis, Ray or Serve could not be started, reached or stopped."""


class AuthError(CoGenesisError):
    """A request carried no credential, or one that is malformed, forged or expired (HTTP 401)."""


class Forbidden(CoGenesisError):
    """The credential is valid but does not allow this: another device's session, a route for another role
    (HTTP 403, ``ErrorReply.code`` ``forbidden``)."""


class RateLimited(Busy):
    """A device sent more than its rate allows; ``retry_after_s``: when its next request is allowed
    (HTTP 429 with Retry-After, ``ErrorReply.code`` ``rate_limited``)."""

    def __init__(self, message: str, retry_after_s: float = 1.0, hint: str | None = None) -> None:
        super().__init__(message, retry_after_s, hint or "slow down: the gateway limits requests per device")


class TooLarge(ProtocolError):
    """A message exceeds a limit of the cloud (``CloudConfig.limits``): instruction length, tokens per step,
    session length, items per batch, body size, budget (``ErrorReply.code`` ``too_large``, HTTP 413)."""
