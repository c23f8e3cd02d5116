"""The edge SDK: what an app on a device embeds to write with the cloud, privately.

    from cogenesis.edge_sim.sdk import Client

    with Client("https://gateway.example", token) as client:
        for piece in client.generate(
            "Write a birthday message: for my colleague Ana, who loves climbing",
            {"profile": "I work at a bakery in Porto", "history": [("Last card", "Dear Rui, ...")]},
            mode="logits",
        ):
            print(piece, end="", flush=True)

An instruction is split as the paper's data is: the text before its first ``": "`` is the general instruction, the
only text the cloud may see; what follows, and the private context (a profile and past writings, or a ``Record``),
stay on the device. Inside: the outbound gate (every byte that leaves is checked and sealed), the small model,
fusion and sampling, session handling (resume after a lost replica or connection, retry when the cloud is busy).
Logits mode steps through the gateway's WebSocket (``GatewayLink``); sketch mode asks the gateway for an outline
(``POST {url}/v1/sketch`` with the token) and writes the answer locally. Either way ``generate`` yields the text
as the tokens are written (``"".join(...)`` is the answer, up to surrounding whitespace); a failed session raises
its error (``cogenesis.core.errors``: ``AuthError`` for a refused token, ``PrivacyViolation`` when the general
instruction carries private details, ``Busy``, ``ClusterError``, ...). One ``generate`` at a time per client.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from cogenesis.core.config import EdgeConfig
from cogenesis.core.data import Record
from cogenesis.core.errors import (
    AuthError,
    BusTimeout,
    Busy,
    ClusterError,
    CoGenesisError,
    ConfigError,
    Forbidden,
    PrivacyViolation,
    RateLimited,
    SessionError,
)
from cogenesis.core.prompts import split_instruction
from cogenesis.edge_sim.client import EdgeClient, SessionResult
from cogenesis.edge_sim.device import Device
from cogenesis.edge_sim.engine import EdgeEngine
from cogenesis.edge_sim.gateway_link import GatewayLink

log = logging.getLogger(__name__)

Mode = Literal["logits", "sketch"]
SAMPLING_OPTIONS = ("temperature", "top_p", "seed")  # ``generate`` options that go to ``EdgeConfig.sampling``
JOIN_MARGIN_S = 30.0


@dataclass(frozen=True, repr=False)
class PrivateContext:
    """What the device knows of its user: a profile and past writings (title, text). It never leaves the device."""

    profile: str = ""
    history: tuple[tuple[str, str], ...] = field(default=())

    def __repr__(self) -> str:  # never the text
        return f"PrivateContext({len(self.profile)} chars of profile, {len(self.history)} writing(s))"

    @classmethod
    def of(cls, context: PrivateContext | Mapping[str, Any] | str | None) -> PrivateContext:
        """From a mapping ``{"profile": str, "history": [(title, text) or {"title", "text"}, ...]}``, a profile
        string, or None (no context)."""
        if context is None:
            return cls()
        if isinstance(context, PrivateContext):
            return context
        if isinstance(context, str):
            return cls(profile=context)
        if not isinstance(context, Mapping):
            raise ConfigError(
                f"private_context is a {type(context).__name__}",
                hint="pass {'profile': str, 'history': [(title, text), ...]}, a profile string, or a Record",
            )
        unknown = set(context) - {"profile", "history"}
        if unknown:
            raise ConfigError(f"unknown private_context key(s) {sorted(unknown)}", hint="use 'profile' and 'history'")
        history = []
        for i, item in enumerate(context.get("history") or ()):
            if isinstance(item, Mapping):
                item = (item.get("title", ""), item.get("text", ""))
            if not (isinstance(item, Sequence) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                raise ConfigError(f"private_context history[{i}] is not (title, text)")
            history.append((item[0], item[1]))
        profile = context.get("profile") or ""
        if not isinstance(profile, str):
            raise ConfigError("private_context 'profile' must be a string")
        return cls(profile=profile, history=tuple(history))


def record_of(
    instruction: str,
    private_context: PrivateContext | Mapping[str, Any] | str | Record | None = None,
    kind: Literal["context_aware", "paper"] = "context_aware",
) -> Record:
    """The record a session runs on: ``instruction`` split at its first ``": "`` (the public general instruction
    before it, private details after), with the private context. A ``Record`` is taken as it is."""
    if isinstance(private_context, Record):
        return private_context
    context = PrivateContext.of(private_context)
    public, details = split_instruction(instruction)
    if not public:
        raise ConfigError("the instruction is empty", hint="e.g. 'Write a birthday message: for my colleague ...'")
    private = tuple(s for s in (details, context.profile, *(t for pair in context.history for t in pair)) if s.strip())
    return Record(
        tid=f"sdk-{uuid.uuid4().hex[:8]}",
        kind=kind,
        public_instruction=public,
        task=instruction.strip(),
        profile=context.profile,
        history=context.history,
        declared_public=": " in instruction,
        _private=private,
    )


class Client:
    """A device's CoGenesis client (see the module doc).

    ``url``: the gateway's base URL; ``token``: this device's bearer token. ``small_model``: the device's model
    (``embedded:small``, an HF directory or hub id; default: ``config.small_model``), loaded once; or pass a loaded
    ``engine`` (``EdgeEngine``). ``config``: the edge's settings (``EdgeConfig``); ``generate`` options override
    its fields for one call. The gateway connection opens with the first logits session and is reused.

    Simulators (``cogenesis edge``, Locust: ``cogenesis.edge_sim.session.run_session``) run many such devices in
    one process: they pass the ``engine`` and a shared ``device`` (one batched small-model pass for all their
    sessions) and an ``http`` client, and call ``session`` with each device's ``EdgeClient``."""

    def __init__(
        self,
        url: str,
        token: str,
        small_model: str | None = None,
        config: EdgeConfig | None = None,
        *,
        engine: EdgeEngine | None = None,
        device: Device | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._token = token
        cfg = config or EdgeConfig()
        self.config = cfg.model_copy(update={"small_model": small_model}) if small_model else cfg
        self.engine = engine or _load_engine(self.config)
        self._device = device  # None: this client's own passes (a packed batch of its one session)
        self._link: GatewayLink | None = None
        self._http: httpx.Client | None = http
        self._own_http = http is None
        self._busy = threading.Lock()
        self.last_result: SessionResult | None = None  # the last session's numbers (and text): stays here

    def __repr__(self) -> str:  # never the token
        return f"Client({self.url}, small_model={self.config.small_model!r})"

    def generate(
        self,
        instruction: str,
        private_context: PrivateContext | Mapping[str, Any] | str | Record | None = None,
        mode: Mode = "logits",
        **options: Any,
    ) -> Iterator[str]:
        """Write the answer to ``instruction`` with the cloud's help; yields text pieces as tokens are written.

        ``options``: ``EdgeConfig`` fields for this call (``max_new_tokens``, ``top_k``, ``lookahead``,
        ``step_timeout_s``, ...), ``temperature``/``top_p``/``seed`` (sampling), ``kind`` (``context_aware`` or
        ``paper``). Closing the iterator early stops the session."""
        if mode not in ("logits", "sketch"):
            raise ConfigError(f"unknown mode {mode!r}", hint="use 'logits' or 'sketch'")
        kind = options.pop("kind", "context_aware")
        cfg = self._config(options)
        record = record_of(instruction, private_context, kind)
        return self._stream(EdgeClient(0, record, self.engine, cfg), mode, cfg)

    def _config(self, options: dict[str, Any]) -> EdgeConfig:
        sampling = {k: options.pop(k) for k in SAMPLING_OPTIONS if k in options}
        unknown = set(options) - set(EdgeConfig.model_fields)
        if unknown:
            raise ConfigError(f"unknown generate option(s) {sorted(unknown)}", hint="use EdgeConfig's field names")
        raw = self.config.model_dump()
        raw.update(options)
        raw["sampling"] = {**raw["sampling"], **sampling}
        try:
            return EdgeConfig(**raw)
        except ValueError as exc:
            raise ConfigError(f"invalid generate options: {exc}") from None

    def _stream(self, client: EdgeClient, mode: Mode, cfg: EdgeConfig) -> Iterator[str]:
        if not self._busy.acquire(blocking=False):
            raise ConfigError("this client is already generating", hint="one generate at a time per Client")
        tokens: queue.Queue[int | None] = queue.Queue()
        stop = threading.Event()
        outcome: list[SessionResult | BaseException] = []

        def on_token(*args: int) -> bool:
            tokens.put(args[-1])
            return not stop.is_set()

        def run() -> None:
            try:
                outcome.append(self.session(client, mode, cfg, on_token))
            except BaseException as exc:  # handed to the caller
                outcome.append(exc)
            finally:
                tokens.put(None)

        worker = threading.Thread(target=run, name="cogenesis-sdk-session", daemon=True)
        try:
            worker.start()
            ids: list[int] = []
            emitted = ""
            while (token := tokens.get()) is not None:
                ids.append(token)
                text = self.engine.tok.decode(ids, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # a character cut in the middle: wait for its next byte
                    continue
                if len(text) > len(emitted) and text.startswith(emitted):
                    yield text[len(emitted) :]
                emitted = text
            worker.join()
            (result,) = outcome
            if isinstance(result, BaseException):
                raise result
            self.last_result = result
            if result.error is not None:
                raise _error_of(result)
        finally:
            stop.set()
            worker.join(timeout=cfg.step_timeout_s + JOIN_MARGIN_S)
            self._busy.release()

    def session(
        self,
        client: EdgeClient,
        mode: Mode,
        cfg: EdgeConfig | None = None,
        on_token: Callable[..., bool] | None = None,
        stop_at: float | None = None,
    ) -> SessionResult:
        """One ``mode`` session of ``client`` (a device's record, gate and session state) through the gateway: the
        path every device session takes, ``generate``'s and the simulators'. Failures come back in the result
        (``error``, ``error_code``) or raise; ``stop_at`` (``time.perf_counter()``) ends a logits session early."""
        from cogenesis.edge_sim.device import PackedDevice
        from cogenesis.edge_sim.logits import run_logits_sessions
        from cogenesis.edge_sim.sketch import HttpOutlines, write_sketch

        cfg = cfg or self.config
        if mode == "logits":
            (result,) = run_logits_sessions(
                [client], self.engine, self._gateway(cfg), cfg, stop_at=stop_at, device=self._device, on_token=on_token
            )
            return result
        if mode != "sketch":
            raise ConfigError(f"unknown mode {mode!r}", hint="use 'logits' or 'sketch'")
        if self._http is None:
            self._http = httpx.Client()
        outlines = HttpOutlines(self._http, self.url, cfg.step_timeout_s, cfg.admission_timeout_s, token=self._token)
        device = self._device or PackedDevice(self.engine.model, self.engine.pad_id, cfg.prefill_threads)
        return write_sketch(client, outlines, self.engine, device, cfg, on_token=on_token)

    def _gateway(self, cfg: EdgeConfig) -> GatewayLink:
        if self._link is None:
            self._link = GatewayLink(self.url, self._token, reconnect_s=cfg.redis_retry_s)
        return self._link

    def close(self) -> None:
        """Close the gateway connection and the HTTP client (the gateway frees what this device still held)."""
        if self._link is not None:
            self._link.shutdown()
            self._link = None
        if self._http is not None and self._own_http:
            self._http.close()
            self._http = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load_engine(cfg: EdgeConfig) -> EdgeEngine:
    from cogenesis.core.models import load_causal_lm, resolve_model

    model, tok = load_causal_lm(resolve_model(cfg.small_model))
    return EdgeEngine(model, tok, cfg.max_prompt_tokens)


_ERRORS: dict[str, type[CoGenesisError]] = {
    "unauthorized": AuthError,
    "forbidden": Forbidden,
    "privacy": PrivacyViolation,
    "rate_limited": RateLimited,
    "busy": Busy,
    "unreachable": ClusterError,
    "timeout": BusTimeout,
}


def _error_of(result: SessionResult) -> CoGenesisError:
    """A failed session's error, as the exception its code names (its message stays on this device)."""
    kind = _ERRORS.get(result.error_code or "", SessionError)
    return kind(result.error or "the session failed")
