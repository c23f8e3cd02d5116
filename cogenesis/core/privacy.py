"""Private word n-grams: what the edge's outbound gate refuses to send, and what eval's exposure counts.

A record's private phrases are the word n-grams of its private fields, less those that also occur in
its public instruction (public by declaration: the user chose to send that instruction).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lowercased word tokens (unicode ``\\w+`` runs); punctuation and spacing are dropped."""
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Every run of ``n`` consecutive words of ``text``."""
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def private_ngrams(public_instruction: str, private_fields: Iterable[str], n: int) -> set[tuple[str, ...]]:
    """Word n-grams of the private fields, less those of the public instruction (public by the user's choice)."""
    if not n:
        return set()
    return set().union(*(ngrams(f, n) for f in private_fields)) - ngrams(public_instruction, n)
