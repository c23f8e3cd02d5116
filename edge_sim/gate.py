"""The edge's outbound gate: every byte that leaves a device passes ``OutboundGate.seal``.

The gate knows the client's private strings and refuses any outbound text that contains a
run of ``ngram`` consecutive words from them (word n-grams that also occur in the public
instruction are public by declaration: the user chose to send that instruction). Generated
token ids in logits steps pass: sending them is the protocol; what the small model copies
into its own output is measured separately (see tests/test_privacy.py). The n-grams are
``cogenesis.core.privacy``'s, shared with eval's exposure score.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from cogenesis.cluster.bus import Sealed
from cogenesis.core.errors import PrivacyViolation
from cogenesis.core.privacy import ngrams, private_ngrams
from cogenesis.core.protocol import CloseSession, OpenSession, SketchRequest, StatelessRequest, StepRequest, encode


class OutboundGate:
    def __init__(self, public_instruction: str, private_fields: Iterable[str], ngram: int = 5) -> None:
        self.n = ngram
        self._private = private_ngrams(public_instruction, private_fields, ngram)
        self.sealed = 0

    def check_text(self, text: str) -> None:
        leaked = ngrams(text, self.n) & self._private
        if leaked:
            raise PrivacyViolation(
                f"outbound message carries {len(leaked)} private {self.n}-word phrase(s); nothing was sent",
                hint="send only the general instruction (the text before the first ': ') to the cloud",
            )

    def seal(
        self, msg: OpenSession | StepRequest | CloseSession | StatelessRequest, prompt_text: str | None = None
    ) -> Sealed:
        """Check and encode a message (msgpack).

        A ``StatelessRequest`` re-sends the cloud prompt's token ids every step: ``prompt_text``
        must be that prompt decoded, and is checked like an instruction.
        """
        if isinstance(msg, OpenSession):
            self.check_text(msg.instruction)
        elif isinstance(msg, StatelessRequest):
            if prompt_text is None:
                raise TypeError("a StatelessRequest is sealed with the decoded text of the prompt it carries")
            self.check_text(prompt_text)
        elif not isinstance(msg, (StepRequest, CloseSession)):
            raise TypeError(f"the gate does not send {type(msg).__name__} on the bus")
        self.sealed += 1
        return Sealed(encode(msg), type(msg).__name__)

    def seal_json(self, msg: SketchRequest) -> Sealed:
        """Check and encode an HTTP body (JSON)."""
        if not isinstance(msg, SketchRequest):
            raise TypeError(f"the gate does not send {type(msg).__name__} over HTTP")
        self.check_text(msg.instruction)
        self.sealed += 1
        return Sealed(msgspec.json.encode(msg), type(msg).__name__)
