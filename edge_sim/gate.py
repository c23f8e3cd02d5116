"""The edge's outbound gate: every byte that leaves a device passes ``OutboundGate``.

The gate knows the record's private spans (``cogenesis.core.privacy.PrivateSpans``: private
entities such as names, emails and numbers, and word n-grams of the private fields, matched on
normalized text) and checks every outbound text against them:

- instructions (``OpenSession``, ``SketchRequest``) and a stateless request's prompt are refused
  whole when they carry a private span (``PrivacyViolation``, naming counts and kinds only);
- in logits mode every token the small model writes passes the session's ``TokenStream`` before
  it may leave (see there): a token that could begin a private span is held back until the span is
  decided, and a private span is never sent: the ``span_policy`` decides what the cloud gets instead;
- a *resume* open (the session re-opened on another replica by replay) may carry only ids its session's
  stream released, from the first on: the gate refuses any other.

What is public by declaration: the part of an instruction before its first ``": "``, when the user
split it so (``declared_public``); an instruction without that split is checked like any other text.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from cogenesis.cluster.bus import Sealed, claim_seal_key
from cogenesis.core.config import PrivacyConfig
from cogenesis.core.data import Record
from cogenesis.core.errors import PrivacyViolation
from cogenesis.core.privacy import Match, PrivateSpans
from cogenesis.core.protocol import (
    CloseSession,
    CompletionsRequest,
    OpenSession,
    SketchRequest,
    StatelessRequest,
    StepRequest,
    encode,
    unpack_ids,
)

_SEAL_KEY = claim_seal_key()  # only this module can make a Sealed (cogenesis.cluster.bus)

# Released tokens the stream gate decodes before the held ones, at least (at most twice as many): the
# context a private span that ends in the held tokens can start in. A private n-gram or entity is a few
# dozen tokens at most, and the start of one still undecided is never released.
CONTEXT_TOKENS = 64


def describe(matches: Sequence[Match], ngram: int) -> str:
    """Counts and kinds of private spans, never their text: '3 private spans (5-word phrase: 1, name: 2)'."""
    kinds = Counter(f"{ngram}-word phrase" if m.kind == "ngram" else m.kind for m in matches)
    what = ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items()))
    return f"{len(matches)} private span{'s' if len(matches) != 1 else ''} ({what})"


class OutboundGate:
    """Checks and seals what one client sends; makes each logits session's ``TokenStream``."""

    def __init__(
        self,
        public_instruction: str,
        private_fields: Iterable[str],
        *,
        declared_public: bool = False,
        privacy: PrivacyConfig | None = None,
    ) -> None:
        """``declared_public``: the user split the instruction into a public part (``public_instruction``)
        and private details; what the public part shares with the private fields may then leave."""
        self.privacy = privacy or PrivacyConfig()
        self.spans = PrivateSpans.of(
            public_instruction, tuple(private_fields), declared_public=declared_public, ngram=self.privacy.ngram
        )
        self.sealed = 0
        self._streams: weakref.WeakValueDictionary[str, TokenStream | PublicStream] = weakref.WeakValueDictionary()

    @classmethod
    def of_record(cls, record: Record, privacy: PrivacyConfig | None = None) -> OutboundGate:
        """The gate of a record (``Record.declared_public``): the public instruction is public by declaration
        when the user split it off the task (``"<general task>: <details>"``) or the dataset made it public (the
        paper-writing task's title); an instruction without such a split is checked like any other text."""
        return cls(
            record.public_instruction,
            record.private_fields(),
            declared_public=record.declared_public,
            privacy=privacy,
        )

    def check_text(self, text: str, what: str = "outbound message") -> None:
        """Raise ``PrivacyViolation`` (counts and kinds only) if ``text`` carries a private span."""
        found = self.spans.find(text)
        if found:
            raise PrivacyViolation(
                f"{what} carries {describe(found, self.privacy.ngram)}; nothing was sent",
                hint="send only the general instruction to the cloud: put the personal details after ': ' "
                "(e.g. 'Write a birthday message: for my colleague ...'), which stay on the device",
            )

    def stream(self, tokenizer, session_id: str | None = None) -> TokenStream:
        """A new logits session's outbound token stream (``tokenizer``: the edge engine's). With its
        ``session_id``, a resume of that session may carry what the stream released."""
        stream = TokenStream(self.spans, tokenizer, self.privacy)
        if session_id is not None:
            self._streams[session_id] = stream
        return stream

    def public_stream(self, session_id: str) -> PublicStream:
        """The stream of a simulated device's session: its tokens are drawn from the cloud's own top-k, with
        nothing of the record as input, so each one is released as written (and may be resumed)."""
        stream = PublicStream()
        self._streams[session_id] = stream
        return stream

    def _check_resume(self, msg: OpenSession) -> None:
        """A resume carries exactly a prefix of what its session's stream released: ids that passed the gate."""
        ids = unpack_ids(msg.resume).tolist()
        stream = self._streams.get(msg.session_id)
        released = stream.released if stream is not None else []
        if ids != released[: len(ids)]:
            raise PrivacyViolation(
                f"a resume of session {msg.session_id} carries {len(ids)} ids that are not what its stream "
                f"released ({len(released)} ids); nothing was sent",
                hint="a resume replays only the ids the session's TokenStream released (a bug in the session loop)",
            )

    def seal(
        self, msg: OpenSession | StepRequest | CloseSession | StatelessRequest, prompt_text: str | None = None
    ) -> Sealed:
        """Check and encode a message (msgpack).

        A ``StatelessRequest`` re-sends the cloud prompt's token ids every step: ``prompt_text``
        must be that prompt decoded, and is checked like an instruction. A ``StepRequest``'s ids
        are the ones its session's ``TokenStream`` released.
        """
        if isinstance(msg, OpenSession):
            self.check_text(msg.instruction, "the session's instruction")
            if msg.resume or msg.resume_step:
                self._check_resume(msg)
        elif isinstance(msg, StatelessRequest):
            if prompt_text is None:
                raise TypeError("a StatelessRequest is sealed with the decoded text of the prompt it carries")
            self.check_text(prompt_text, "the stateless request's prompt")
        elif not isinstance(msg, (StepRequest, CloseSession)):
            raise TypeError(f"the gate does not send {type(msg).__name__} on the bus")
        self.sealed += 1
        return Sealed(_SEAL_KEY, encode(msg), type(msg).__name__)

    def seal_json(self, msg: SketchRequest | CompletionsRequest, prompt_text: str | None = None) -> Sealed:
        """Check and encode an HTTP body (JSON), the exact bytes the transport posts.

        A ``CompletionsRequest`` (an OpenAI-compatible server driven per step) carries the whole public
        sequence, like a ``StatelessRequest``: ``prompt_text`` must be its prompt decoded, and is checked.
        """
        if isinstance(msg, SketchRequest):
            self.check_text(msg.instruction, "the sketch request's instruction")
        elif isinstance(msg, CompletionsRequest):
            if prompt_text is None:
                raise TypeError("a CompletionsRequest is sealed with the decoded text of the prompt it carries")
            self.check_text(prompt_text, "the completions request's prompt")
        else:
            raise TypeError(f"the gate does not send {type(msg).__name__} over HTTP")
        self.sealed += 1
        return Sealed(_SEAL_KEY, msgspec.json.encode(msg), type(msg).__name__)


# ---- the token stream of one logits session ----------------------------------------------------------


@dataclass
class StreamStats:
    """What the stream gate did in a session (numbers only: fine to report)."""

    held: int = 0  # tokens not sent as they were written (held back, then released or replaced)
    replaced: int = 0  # private spans the cloud received the placeholder for
    policy: str | None = None  # the span policy that acted (None: no private span was written)


class TokenStream:
    """One logits session's outbound tokens: each one the small model writes is checked before it leaves.

    ``push`` takes the token just written and returns the ids the cloud may receive now. The check runs
    on the device's own text (released and held tokens, decoded), so a private span is caught whether it
    starts in held or in already released text, and however the tokenizer cut it:

    - a complete private span that reaches into the held tokens: the held tokens through it are private
      from then on (they never leave), and the ``span_policy`` acts. ``placeholder``: once the span can
      grow no longer ("Martin" may still become "Martin Reynolds"; at most ``max_hold_tokens``), the
      cloud receives the placeholder's ids in their place, so its context stays coherent; ``local``:
      tokens stay held (no fusion, no round trips) until a token after the span begins nothing private,
      then the cloud receives one placeholder for all of it (a copied passage pauses collaboration once);
      ``refuse``: ``PrivacyViolation`` (counts and kinds), and the session ends;
    - else the tokens from where a private span could still begin are held (``holding``: the next token
      is written without fusion, since the cloud has not seen this one); more than ``max_hold_tokens``
      undecided tokens are decided private (the policy acts), so not even a long span's start leaves;
    - else every held token is released (one step may carry several).
    """

    def __init__(self, spans: PrivateSpans, tokenizer, cfg: PrivacyConfig) -> None:
        self.spans = spans
        self.cfg = cfg
        self._decode: Callable[[list[int]], str] = tokenizer.decode
        self._encode: Callable[[str], list[int]] = lambda text: tokenizer.encode(text, add_special_tokens=False)
        self._placeholders: dict[str, list[int]] = {}  # leading whitespace of a replaced span -> ids
        self.context: list[int] = []  # the device's last released (or replaced) tokens, for the check
        self._context_text = ""
        self.held: list[int] = []  # tokens written but not yet decided
        self.stats = StreamStats()
        self._private = 0  # the first held tokens found private (replaced once the span has ended)
        self._out: list[int] = []  # ids the cloud may receive, gathered during one push
        self._drained = False  # the last push's token went out as written
        self.released: list[int] = []  # every id this stream let out (what a resume may replay)

    @property
    def holding(self) -> bool:
        """Tokens are held: the cloud's view is behind, so the next token is written without fusion."""
        return bool(self.held)

    def push(self, token: int) -> list[int]:
        """Check the token just written; returns the ids the cloud may receive now (possibly none)."""
        self.held.append(token)
        self._out, self._drained = [], False
        self._settle()
        if not self._drained:
            self.stats.held += 1
        self.released += self._out
        return self._out

    def _settle(self) -> None:
        """Decide the held tokens: replace the private ones, release the public ones, keep the undecided.

        Tokens once found private stay private (``_private``), whatever later tokens do to the match
        ("...example.com" then "driver" is no longer an email at a word boundary)."""
        while self.held:
            text = self._decode(self.context + self.held)
            start = _shared_prefix(self._context_text, text)  # where the held tokens' text begins
            found = [m for m in self.spans.find(text) if m.end > start]
            opened = self.spans.open_prefix(text)
            if found:
                if self.cfg.span_policy == "refuse":
                    self._refuse(describe(found, self.cfg.ngram))
                self._private = max(self._private, self._covering(text, max(m.end for m in found)))
            if self._private:
                if self._goes_on(text, self._end_of(text, self._private), opened):
                    return  # decided private, but not yet where it ends: keep writing locally
                self._replace(self._private)
                continue
            if opened is None or opened >= len(text):
                self._release(len(self.held), text)
                return
            public = self._before(text, opened)  # held tokens wholly before what could begin a private span
            if public:
                self._release(public)
            elif len(self.held) > self.cfg.max_hold_tokens:
                if self.cfg.span_policy == "refuse":
                    self._refuse(f"{len(self.held)} tokens that could begin a private span")
                self._replace(len(self.held))
            return

    def _goes_on(self, text: str, end: int, opened: int | None) -> bool:
        """Whether a private span that ends at ``end`` is still being written, so its replacement waits.

        ``placeholder``: while the text could still make it longer ("Martin" -> "Martin Reynolds"), up to
        ``max_hold_tokens``; ``local``: until a token after it begins nothing private (a copied passage
        pauses collaboration once, however long it runs)."""
        if self.cfg.span_policy == "local":
            return opened is not None or len(text) <= end
        return opened is not None and opened < end and len(self.held) <= self.cfg.max_hold_tokens

    def _end_of(self, text: str, n: int) -> int:
        """Where the first ``n`` held tokens end in ``text`` (the decoded context and held tokens)."""
        return len(text) if n == len(self.held) else len(self._decode(self.context + self.held[:n]))

    def _covering(self, text: str, offset: int) -> int:
        """How many held tokens it takes to cover ``text`` up to ``offset`` (at least one)."""
        return next((n for n in range(1, len(self.held)) if self._end_of(text, n) >= offset), len(self.held))

    def _before(self, text: str, offset: int) -> int:
        """How many held tokens end at or before ``offset``."""
        return next((n for n in range(len(self.held)) if self._end_of(text, n + 1) > offset), len(self.held))

    def _release(self, n: int, text: str | None = None) -> None:
        """The first ``n`` held tokens go out as written (``text``: context and held tokens decoded)."""
        self._drained = n == len(self.held)
        self._out += self.held[:n]
        self._keep(self.held[:n], text if self._drained else None)

    def _replace(self, n: int) -> None:
        """The first ``n`` held tokens stay on the device; the cloud gets the placeholder in their place."""
        written = self._decode(self.held[:n])
        lead = written[: len(written) - len(written.lstrip())]  # keep the spacing: the cloud's text stays fluent
        if lead not in self._placeholders:
            self._placeholders[lead] = self._encode(lead + self.cfg.placeholder)
        self._out += self._placeholders[lead]
        self._keep(self.held[:n])
        self._private = 0
        self.stats.replaced += 1
        self.stats.policy = self.cfg.span_policy

    def _keep(self, decided: list[int], text: str | None = None) -> None:
        """``decided`` (the first held tokens) join the context; ``text``: the new context decoded, if known."""
        self.held = self.held[len(decided) :]
        self.context += decided
        if len(self.context) > 2 * CONTEXT_TOKENS:  # trimmed in chunks: most pushes decode only once
            self.context, text = self.context[-CONTEXT_TOKENS:], None
        self._context_text = self._decode(self.context) if text is None else text

    def _refuse(self, what: str) -> None:
        self.stats.policy = "refuse"
        raise PrivacyViolation(
            f"the small model wrote {what} (span policy 'refuse'); none of it was sent and the session ends",
            hint="use --span-policy placeholder (the cloud gets a placeholder in its place) or local",
        )


@dataclass
class PublicStream:
    """A simulated device's outbound stream (``OutboundGate.public_stream``): every token leaves as written."""

    released: list[int] = field(default_factory=list)
    stats: StreamStats = field(default_factory=StreamStats)
    holding: bool = False

    def push(self, token: int) -> list[int]:
        self.released.append(token)
        return [token]


def _shared_prefix(a: str, b: str) -> int:
    """Length of the common prefix of ``a`` and ``b`` (decoding more tokens may complete a character)."""
    if b.startswith(a):
        return len(a)
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
