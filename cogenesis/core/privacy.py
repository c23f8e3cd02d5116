"""What a record keeps private, and where it shows up in text: the edge's outbound gate and eval's exposure.

Two views of a record's private fields (profile, past writings, the personal part of the instruction):

- word n-grams (:func:`private_ngrams`): eval's exposure score counts them in what the cloud received;
- :class:`PrivateSpans`: every private span of one record, normalized, for the gate. Short private facts
  (entities: names, emails, phone numbers, numbers, ages, dates, addresses, URLs) and word n-grams, found in
  any text after :func:`normalize` (NFKC, casefold, invisible characters removed, look-alike characters
  mapped, whitespace collapsed), at word boundaries, with offsets in the original text. ``open_prefix``
  tells the gate which tail of a token stream could still become a private span, so it can hold it back.

Text that the user declared public (an instruction split as ``"<general task>: <personal details>"``,
the general task being public) exempts the spans it contains; an instruction without that split exempts
nothing. Nothing here logs, and no exception carries private text.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

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


# ---- normalization ------------------------------------------------------------------------------

# Look-alikes NFKC leaves alone, mapped to the Latin letter (or ASCII punctuation) they imitate. Capitals
# are mapped before casefolding (Greek capital eta looks like H, its small letter like n).
_CONFUSABLES = str.maketrans(
    {
        # Cyrillic
        "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
        "Х": "X", "У": "Y", "Ѕ": "S", "І": "I", "Ј": "J", "Ԛ": "Q", "Ԝ": "W", "Ӏ": "I",
        "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "х": "x", "у": "y", "і": "i", "ѕ": "s", "ј": "j",
        "ԁ": "d", "һ": "h", "ԛ": "q", "ԝ": "w", "ӏ": "l", "ɡ": "g", "ѵ": "v", "ү": "y", "ո": "n", "ս": "u",
        "օ": "o", "ց": "g", "հ": "h",
        # Greek
        "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
        "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
        "α": "a", "ο": "o", "ν": "v", "ι": "i", "κ": "k", "ρ": "p", "υ": "u", "χ": "x", "η": "n", "ϲ": "c",
        "ϳ": "j", "ε": "e", "τ": "t", "ω": "w",
        # Latin look-alikes
        "ı": "i", "ȷ": "j", "ɑ": "a", "ǀ": "l", "ʟ": "l",
        # punctuation
        "‘": "'", "’": "'", "‚": "'", "‛": "'", "′": "'", "“": '"', "”": '"', "„": '"', "‟": '"', "″": '"',
        "‐": "-", "‑": "-", "‒": "-", "–": "-", "—": "-", "―": "-", "−": "-",
    }
)  # fmt: skip
# Invisible characters outside Unicode's Cf category: combining grapheme joiner, Hangul fillers, Khmer
# inherent vowels, Mongolian variation selectors (variation selectors are tested by range).
_INVISIBLE = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u180e\u180f\u3164\uffa0")
# Characters of combining class 0 that still compose with the character before them (canonical
# composition pairs), besides Hangul vowel and final jamo (checked by range).
_COMPOSES = frozenset(
    "\u09be\u09d7\u0b3e\u0b56\u0b57\u0bbe\u0bd7\u0cc2\u0cd5\u0cd6\u0d3e\u0d57\u0dcf\u0ddf\u0fb5\u0fb7\u102e"
    "\u1b35\U00011127\U0001133e\U00011357\U000114b0\U000114ba\U000114bd\U000115af\U00011930"
)
_WS_FIX = re.compile(r"\s{2,}|[^\S ]")  # runs of whitespace that are not one plain space
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_MAX_FOLD_ROUNDS = 4


@lru_cache(maxsize=8192)
def _invisible(c: str) -> bool:
    return (
        unicodedata.category(c) == "Cf"
        or c in _INVISIBLE
        or "\ufe00" <= c <= "\ufe0f"
        or "\U000e0100" <= c <= "\U000e01ef"
    )


@lru_cache(maxsize=8192)
def _continues(c: str) -> bool:
    """Whether ``c`` can combine with the character before it (so both are normalized together)."""
    return bool(unicodedata.combining(c)) or c in _COMPOSES or "\u1161" <= c <= "\u1175" or "\u11a8" <= c <= "\u11c2"


@lru_cache(maxsize=16384)
def _fold(segment: str) -> str:
    """One base character and the marks on it: NFKC, look-alikes mapped, casefolded, to a fixed point."""
    for _ in range(_MAX_FOLD_ROUNDS):
        folded = unicodedata.normalize("NFKC", segment).translate(_CONFUSABLES).casefold().translate(_CONFUSABLES)
        folded = "".join(c for c in folded if c < "\x80" or not _invisible(c))
        if folded == segment:
            break
        segment = folded
    return segment


def _fold_region(text: str, start: int, stop: int, out: list[str], idx: list[int]) -> None:
    """Fold ``text[start:stop]`` segment by segment (a base character with what combines with it)."""
    seg, seg_at = "", start
    for i in range(start, stop):
        c = text[i]
        if c >= "\x80":
            if _invisible(c):
                continue
            if seg and _continues(c):
                seg += c
                continue
        if seg:
            folded = _fold(seg)
            out.append(folded)
            idx.extend([seg_at] * len(folded))
        seg, seg_at = c, i
    if seg:
        folded = _fold(seg)
        out.append(folded)
        idx.extend([seg_at] * len(folded))


def _collapse(text: str, idx: list[int]) -> tuple[str, list[int]]:
    """Every run of whitespace becomes one space (at the run's first character)."""
    if not _WS_FIX.search(text):
        return text, idx
    parts: list[str] = []
    kept: list[int] = []
    pos = 0
    for m in _WS_FIX.finditer(text):
        a, b = m.span()
        parts += (text[pos:a], " ")
        kept += idx[pos:a]
        kept.append(idx[a])
        pos = b
    parts.append(text[pos:])
    kept += idx[pos:]
    return "".join(parts), kept


def _normalize_once(text: str) -> tuple[str, list[int]]:
    if text.isascii():
        return _collapse(text.lower(), list(range(len(text))))
    out: list[str] = []
    idx: list[int] = []
    pos = 0
    for m in _NON_ASCII.finditer(text):
        a = max(m.start() - 1, pos)  # the ASCII character before may be the base of a combining mark
        out.append(text[pos:a].lower())
        idx += range(pos, a)
        _fold_region(text, a, m.end(), out, idx)
        pos = m.end()
    out.append(text[pos:].lower())
    idx += range(pos, len(text))
    return _collapse("".join(out), idx)


def normalize(text: str) -> tuple[str, list[int]]:
    """``text`` as every match sees it, and for each of its characters the index of the original one.

    NFKC (full-width and other compatibility forms), look-alike letters of other scripts mapped to the
    Latin letters they imitate (Cyrillic ``а``, Greek ``ο`` ...), casefolded, invisible characters (Unicode
    Cf: zero-width spaces and joiners, soft hyphen, BOM, bidi controls; variation selectors) removed,
    typographic quotes and dashes made ASCII, every whitespace run collapsed to one space. Idempotent.
    """
    folded, idx = _normalize_once(text)
    for _ in range(_MAX_FOLD_ROUNDS):  # a fold can make a new pair that composes: fold again to the fixed point
        if folded.isascii():
            break
        again, idx2 = _normalize_once(folded)
        if again == folded:
            break
        folded, idx = again, [idx[j] for j in idx2]
    return folded, idx


# ---- entities -----------------------------------------------------------------------------------

_MONTH = (
    r"(?:January|February|March|April|May|June|July|August|September|October|November|December"
    r"|Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept|Sep|Oct|Nov|Dec)\.?"
)
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_DATE = re.compile(
    rf"\b\d{{4}}-\d{{1,2}}-\d{{1,2}}\b|\b\d{{1,2}}[/.-]\d{{1,2}}[/.-]\d{{2,4}}\b"
    rf"|\b{_MONTH}\s+{_DAY}(?:,?\s+\d{{4}})?\b|\b{_DAY}\s+(?:of\s+)?{_MONTH}(?:,?\s+\d{{4}})?(?!\w)"
    rf"|\b{_MONTH},?\s+(?:of\s+)?\d{{4}}\b"
)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_URL = re.compile(r"(?:https?://|www\.)[^\s<>\"')\]]+", re.IGNORECASE)
_HANDLE = re.compile(r"(?<![\w@.])@(\w{2,})")
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])(?:\d{2,4}[\s.-]){0,3}\d{3,4}(?!\w)"
)
_STREET = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Drive|Dr|Lane|Ln|Boulevard|Blvd|Court|Ct|Way|Place|Pl|Terrace|Circle|"
    r"Parkway|Pkwy|Highway|Hwy|Square|Sq|Trail|Crescent|Close|Row)"
)
_ADDRESS = re.compile(
    rf"(\b\d{{1,6}}[A-Za-z]?\s+(?:[A-Z][\w'.-]*\s+){{1,4}}?{_STREET}\b\.?)"
    r"(?:,?\s+(?:Apt|Apartment|Suite|Ste|Unit)\.?\s*#?\w+|,?\s+#\w+)?"
)
_AGE = re.compile(
    r"(?<!\w)(\d{1,3})(?:[\s-]+years?[\s-]+old|[\s-]+year-old|-years?-old)\b|\bage[ds]?\s*:?\s+(\d{1,3})\b",
    re.IGNORECASE,
)
_CODE = re.compile(r"(?<![\w-])(?=[\w-]*\d)(?=[\w-]*[^\W\d_])\w+(?:-\w+)+(?![\w-])")  # vorkelin-4471-quastrobe
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_LABEL = re.compile(r"^[ \t]*([A-Za-z][A-Za-z _-]{0,30}?)[ \t]*:[ \t]*(.+?)[ \t]*$", re.MULTILINE)
_TOKEN = re.compile(r"\w+(?:['’-]\w+)*")
_POSSESSIVE = re.compile(r"['’]s$", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\[[^\]\n]{1,40}\]")
_EDGES = re.compile(r"^\W+|\W+$")
_DIGITS = re.compile(r"\d+")
_PHONE_GAP = re.compile(r"[\s().+-]{1,3}")

# Profile lines "Label: value" whose values are private facts whatever their capitalization.
_LABELS = {
    "name": "name", "full name": "name", "first name": "name", "last name": "name", "spouse": "name",
    "partner": "name", "employer": "name", "company": "name", "school": "name", "university": "name",
    "location": "place", "city": "place", "hometown": "place", "address": "address", "home address": "address",
    "age": "age",
}  # fmt: skip
# Capitalized words that are not names on their own, and lowercase words that may join a name's parts.
_STOP = frozenset(
    {
        "a", "an", "the", "i", "i'm", "i've", "i'd", "i'll", "me", "my", "mine", "we", "our", "us", "you", "your",
        "yours", "he", "him", "his", "she", "her", "hers", "it", "its", "they", "them", "their", "this", "that",
        "these", "those", "there", "here", "what", "which", "who", "whom", "whose", "when", "where", "why", "how",
        "and", "or", "but", "nor", "so", "yet", "if", "then", "than", "as", "at", "by", "for", "from", "in", "into",
        "of", "off", "on", "onto", "out", "over", "to", "up", "with", "without", "about", "after", "before", "during",
        "under", "again", "all", "any", "both", "each", "few", "more", "most", "other", "some", "such", "no", "not",
        "only", "own", "same", "too", "very", "can", "will", "just", "do", "does", "did", "is", "are", "was", "were",
        "be", "been", "being", "have", "has", "had", "dear", "hi", "hello", "hey", "yes", "ok", "okay", "thanks",
        "thank", "please", "mr", "mrs", "ms", "miss", "dr", "prof", "sir", "madam", "monday", "tuesday", "wednesday",
        "thursday", "friday", "saturday", "sunday", "january", "february", "march", "april", "may", "june", "july",
        "august", "september", "october", "november", "december", "today", "tomorrow", "yesterday", "mondays",
        "tuesdays", "wednesdays", "thursdays", "fridays", "saturdays", "sundays", "mon", "tue", "wed", "thu", "fri",
        "sat", "sun", "am", "pm", "ai", "tv", "also", "however", "therefore", "moreover", "furthermore", "meanwhile",
        "finally", "first", "second", "third", "next", "last", "new", "best", "regards", "sincerely", "cheers", "warm",
        "kind", "ps"
    }
)  # fmt: skip
_CONNECTORS = frozenset(
    {
        "of", "for", "and", "the", "from", "de", "del", "della", "da", "di", "du", "la", "le", "van", "von", "der",
        "den", "y", "at", "on", "upon", "in"
    }
)  # fmt: skip
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "mt", "jr", "sr", "no", "vs"})
_OPENERS = "\"'“‘([«"
_ENDS_SENTENCE = ".!?:;…•*#>|-–—"
_KIND_ORDER = ("email", "url", "phone", "date", "address", "code", "age", "number", "place", "name")


def _isword(c: str) -> bool:
    return c.isalnum() or c == "_"


def _key(span: str) -> str:
    """An entity as it is matched: normalized, without leading or trailing punctuation."""
    return _EDGES.sub("", normalize(span)[0])


def _sentence_initial(text: str, at: int) -> bool:
    """Whether the word at ``at`` starts a sentence, a line or a list item (capitalized for that alone)."""
    j = at - 1
    while j >= 0 and (text[j] in " \t" or text[j] in _OPENERS):
        j -= 1
    if j < 0 or text[j] == "\n" or text[j] in _ENDS_SENTENCE and text[j] != ".":
        return True
    if text[j] == ".":
        before = _TOKEN.findall(text[max(0, j - 6) : j])
        return not (before and before[-1].lower() in _ABBREVIATIONS)  # "Dr. Harold" is not a new sentence
    before = _TOKEN.findall(text[max(0, j - 12) : j + 1])
    # after "The", "Dear", "My": capitalized as part of a title or a greeting
    return bool(before) and text[j] == before[-1][-1] and before[-1][0].isupper() and before[-1].lower() in _STOP


def _capitalized(token: str) -> bool:
    return token[0].isupper() and token.lower() not in _STOP


def _names(text: str) -> Iterator[str]:
    """Capitalized spans of ``text`` that look like names: runs of capitalized words (lowercase connectors
    such as "of" may join them), and single capitalized words not at the start of a sentence; common
    words ("The", "I", weekdays) never count."""
    text = _PLACEHOLDER.sub(lambda m: "," + " " * (len(m.group()) - 1), text)  # "Dear [Client Name]," is a template
    tokens = [(m.start(), m.end(), _POSSESSIVE.sub("", m.group())) for m in _TOKEN.finditer(text)]
    i = 0
    while i < len(tokens):
        if not _capitalized(tokens[i][2]):
            i += 1
            continue
        last = k = i
        while k + 1 < len(tokens) and text[tokens[k][1] : tokens[k + 1][0]] in (" ", "  ", "\t"):
            if tokens[k][2] != text[tokens[k][0] : tokens[k][1]]:
                break  # a possessive ends the run
            nxt = tokens[k + 1][2]
            if _capitalized(nxt):
                last = k + 1
            elif nxt.lower() not in _CONNECTORS:
                break
            k += 1
        initial = _sentence_initial(text, tokens[i][0])
        if last > i or not initial and len(tokens[i][2]) > 1:
            yield text[tokens[i][0] : tokens[last][0]] + tokens[last][2]
        capitals = [j for j in range(i + 1, last + 1) if _capitalized(tokens[j][2])]
        # "Contact Anna Smith", "at Harbor View Anna Smith": a name may end a longer capitalized run, so every
        # tail of two or more capitalized words is a span of its own
        for j in capitals[:-1]:
            yield text[tokens[j][0] : tokens[last][0]] + tokens[last][2]
        i = last + 1


def _labelled(text: str) -> Iterator[tuple[str, str]]:
    """(kind, value) of profile lines such as "Name: Martin Reynolds" or "Location: Charlotte, North Carolina"."""
    for m in _LABEL.finditer(text):
        kind = _LABELS.get(m.group(1).strip().lower().replace("_", " "))
        if kind is None:
            continue
        for part in re.split(r"[;,]", m.group(2)):
            part = part.strip()
            if not part or len(part.split()) > 6:
                continue
            if kind == "age":
                yield from (("age", d) for d in _DIGITS.findall(part)[:1])
                continue
            yield kind, part
            if kind == "name":  # first and last names on their own
                yield from (("name", w) for w in _TOKEN.findall(part) if len(w) > 1 and w.lower() not in _STOP)


def _entities(text: str) -> Iterator[tuple[str, str]]:
    """(kind, original substring) of every private fact in one private field."""
    taken: list[tuple[int, int]] = []

    def fresh(m: re.Match[str]) -> bool:
        if any(a < m.end() and m.start() < b for a, b in taken):
            return False
        taken.append(m.span())
        return True

    for m in _EMAIL.finditer(text):
        if fresh(m):
            yield "email", m.group()
    for m in _URL.finditer(text):
        if fresh(m):
            yield "url", re.sub(r"^(?:https?://)?(?:www\.)?", "", m.group(), flags=re.IGNORECASE)
    for m in _HANDLE.finditer(text):
        if fresh(m):
            yield "url", m.group(1)
    for m in _DATE.finditer(text):
        if fresh(m):
            yield "date", m.group()
    for m in _PHONE.finditer(text):
        groups = _DIGITS.findall(m.group())
        digits = "".join(groups)
        plain = len(groups) < 3 and not re.search(r"[+(]", m.group())
        if not 7 <= len(digits) <= 15 or plain and not re.fullmatch(r"\d{3}[\s.-]\d{4}", m.group()):
            continue  # two groups ("1990-2000") are a phone number only as 555-1234
        if fresh(m):
            yield "phone", digits
    for m in _ADDRESS.finditer(text):
        if fresh(m):
            yield "address", m.group()
            if m.group(1) != m.group():
                yield "address", m.group(1)  # without the apartment
    for m in _AGE.finditer(text):
        if fresh(m):
            yield "age", m.group(1) or m.group(2)
    for m in _CODE.finditer(text):
        if fresh(m):
            yield "code", m.group()
    for m in _NUMBER.finditer(text):
        if sum(c.isdigit() for c in m.group(1)) >= 2 and fresh(m):
            yield "number", m.group(1)
    yield from _labelled(text)
    yield from (("name", s) for s in _names(text))


# ---- matching -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """One private span found in a text: its kind and its offsets in that (original, unnormalized) text."""

    kind: str  # "name", "email", "phone", "number", "age", "date", "address", "place", "url", "code" or "ngram"
    start: int
    end: int


def _proper_prefix(sorted_keys: list[str], s: str) -> bool:
    """Whether ``s`` is a proper prefix of some string of ``sorted_keys``."""
    j = bisect_left(sorted_keys, s)
    return any(len(k) > len(s) and k.startswith(s) for k in sorted_keys[j : j + 2])


def _ends_at_boundary(text: str, end: int, key: str) -> bool:
    """A match ends at a word boundary (a number may be followed by letters: "30" in "30th")."""
    return end == len(text) or not _isword(text[end]) or key[-1].isdecimal() and not text[end].isdecimal()


def _first_word(text: str) -> str:
    m = _WORD.match(text)
    return m.group() if m else ""


def _leading_digits(word: str) -> str:
    """The digits a word starts with ("30" of "30th"): a number entity matches there too."""
    m = _DIGITS.match(word)
    return m.group() if m else ""


def _occurs(text: str, key: str) -> bool:
    """Whether ``key`` occurs in ``text`` (both normalized) at word boundaries."""
    at = text.find(key)
    while at >= 0:
        if (not at or not _isword(text[at - 1])) and _ends_at_boundary(text, at + len(key), key):
            return True
        at = text.find(key, at + 1)
    return False


def _phone_chains(text: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, digits) of every run of digit groups joined by phone punctuation ("(555) 123-4567")."""
    groups = [m for m in _DIGITS.finditer(text) if not m.start() or not _isword(text[m.start() - 1])]
    for i, first in enumerate(groups):
        digits, start, end = first.group(), first.start(), first.end()
        if start and text[start - 1] in "(+":
            start -= 1
        yield start, end, digits
        for g in groups[i + 1 :]:
            if len(digits) > 15 or not _PHONE_GAP.fullmatch(text[end : g.start()]):
                break
            digits, end = digits + g.group(), g.end()
            yield start, end, digits


def _phone_variants(digits: str) -> set[str]:
    """A phone number as it may be written: whole, without its country code, its subscriber part."""
    return {digits, digits[-10:], digits[-7:]} if len(digits) >= 10 else {digits}


class PrivateSpans:
    """Every private span of one record, normalized: entities and word n-grams.

    Build it with :meth:`of`; ``find`` reports the complete private spans in a text, ``open_prefix``
    where a text's tail could still become one. Its ``repr`` and :meth:`kinds` carry counts only.
    """

    def __init__(
        self, entities: dict[str, str], phones: set[str], grams: set[tuple[str, ...]], n: int, counts: dict[str, int]
    ) -> None:
        self._kind = entities  # normalized key -> kind
        self._phones = frozenset(phones)  # phone numbers as digits, with their shorter variants
        self._grams = frozenset(grams)
        self._n = n
        self._counts = counts
        by_first: dict[str, list[str]] = {}
        for key in entities:
            by_first.setdefault(_first_word(key), []).append(key)
        self._by_first = {w: sorted(keys, key=len, reverse=True) for w, keys in by_first.items()}
        self._sorted = sorted(entities)
        self._longest = max(map(len, entities), default=0)
        self._phone_sorted = sorted(phones)
        self._gram_first = frozenset(g[0] for g in grams)
        last: dict[tuple[str, ...], set[str]] = {}
        for g in grams:
            last.setdefault(g[:-1], set()).add(g[-1])
        self._last_words = {head: sorted(tails) for head, tails in last.items()}

    @classmethod
    def of(
        cls, public_instruction: str, private_fields: Iterable[str], *, declared_public: bool, ngram: int = 5
    ) -> PrivateSpans:
        """The private spans of one record.

        ``declared_public``: the user split the instruction as ``"<general task>: <personal details>"`` and
        ``public_instruction`` is the general task; spans it contains are public. Otherwise (an instruction
        without that split) nothing is exempt and the instruction is checked like any other text.
        ``ngram``: the length of the private word n-grams (0: entities only).
        """
        if ngram < 0:
            raise ValueError(f"ngram must be 0 (no n-grams) or a positive word count, got {ngram}")
        fields = [f for f in private_fields if f.strip()]
        found: dict[str, str] = {}
        numbers: set[str] = set()  # phone numbers, as digits
        for field in fields:
            for kind, span in _entities(field):
                if kind == "phone":
                    numbers.add(span)
                    continue
                key = _key(span)
                if _first_word(key) and (key not in found or _rank(kind) < _rank(found[key])):
                    found[key] = kind
        grams: set[tuple[str, ...]] = set()
        for field in fields if ngram else ():
            w = _WORD.findall(normalize(field)[0])
            grams.update(tuple(w[i : i + ngram]) for i in range(len(w) - ngram + 1))
        if declared_public and public_instruction.strip():
            text, _ = normalize(public_instruction)
            found = {k: v for k, v in found.items() if not _occurs(text, k)}
            shown = {d for _, _, d in _phone_chains(text)}
            numbers = {d for d in numbers if not shown & _phone_variants(d)}
            w = _WORD.findall(text)
            grams -= {tuple(w[i : i + ngram]) for i in range(len(w) - ngram + 1)}
        counts: dict[str, int] = {}
        for kind in found.values():
            counts[kind] = counts.get(kind, 0) + 1
        if numbers:
            counts["phone"] = len(numbers)
        if grams:
            counts["ngram"] = len(grams)
        return cls(found, {v for d in numbers for v in _phone_variants(d)}, grams, ngram, counts)

    def find(self, text: str) -> list[Match]:
        """Every complete private span in ``text`` (entities and n-grams), sorted by offset.

        Matching is on normalized text at word boundaries ("Ann" is not found in "Annual"); a span that
        ends the text counts as complete. Offsets are in ``text`` as given.
        """
        if not self:
            return []
        norm, idx = normalize(text)
        found: set[Match] = set()
        tokens = list(_WORD.finditer(norm))
        for m in tokens if self._by_first else ():
            word, at = m.group(), m.start()
            for head in {word, _leading_digits(word)}:
                for key in self._by_first.get(head, ()):
                    end = at + len(key)
                    if norm.startswith(key, at) and _ends_at_boundary(norm, end, key):
                        found.add(Match(self._kind[key], idx[at], idx[end - 1] + 1))
        n = self._n
        if self._grams and len(tokens) >= n:
            ws = [m.group() for m in tokens]
            for i in range(len(ws) - n + 1):
                if ws[i] in self._gram_first and tuple(ws[i : i + n]) in self._grams:
                    found.add(Match("ngram", idx[tokens[i].start()], idx[tokens[i + n - 1].end() - 1] + 1))
        if self._phones:
            for a, b, digits in _phone_chains(norm):
                if digits in self._phones:
                    found.add(Match("phone", idx[a], idx[b - 1] + 1))
        return sorted(found, key=lambda m: (m.start, m.end, m.kind))

    def open_prefix(self, text: str) -> int | None:
        """Where the tail of ``text`` could still become a private span, or None.

        The smallest offset ``i`` such that ``text[i:]``, normalized, starts at a word boundary and is a
        proper prefix of a private entity (partial words count: "Mar" could begin "Martin Reynolds"), or
        of the last word of a private n-gram whose other words end the text just before it. A gate holds
        ``text[i:]`` back until the next tokens decide it. Looks at the text's tail only.
        """
        if not self or not text:
            return None
        norm, idx, cut = self._tail(text)
        if not norm:
            return None
        best: int | None = None
        if self._sorted:  # a tail that was cut starts with a space: its first word starts after a boundary
            for m in _WORD.finditer(norm, max(0, len(norm) - self._longest)):
                at = m.start()
                if (not at or not _isword(norm[at - 1])) and _proper_prefix(self._sorted, norm[at:]):
                    best = at
                    break
        if self._last_words and _isword(norm[-1]):
            tokens = list(_WORD.finditer(norm))[-self._n :]
            tails = self._last_words.get(tuple(m.group() for m in tokens[:-1])) if len(tokens) == self._n else None
            if tails and _proper_prefix(tails, tokens[-1].group()) and (best is None or tokens[-1].start() < best):
                best = tokens[-1].start()
        if self._phones:
            for a, b, digits in _phone_chains(norm):
                if (b == len(norm) or _PHONE_GAP.fullmatch(norm[b:])) and _proper_prefix(self._phone_sorted, digits):
                    best = a if best is None else min(best, a)
                    break
        return None if best is None else cut + idx[best]

    def _tail(self, text: str) -> tuple[str, list[int], int]:
        """The normalized tail of ``text`` that ``open_prefix`` needs, its index map, and where it was cut.

        Cut at whitespace, long enough for the longest entity and an n-gram's words after normalization.
        """
        need = max(self._longest, 24) + 1
        width = 2 * need + 64
        while True:
            cut = max(0, len(text) - width)
            if cut:
                cut = max(text.rfind(c, 0, cut + 1) for c in " \n\t")
                cut = max(cut, 0)
            norm, idx = normalize(text[cut:])
            if not cut or len(norm) > need and len(_WORD.findall(norm)) > self._n:
                return norm, idx, cut
            width *= 2

    def kinds(self) -> dict[str, int]:
        """How many private spans of each kind (counts only: safe to log)."""
        return dict(self._counts)

    def __bool__(self) -> bool:
        return bool(self._kind or self._phones or self._grams)

    def __repr__(self) -> str:
        return f"PrivateSpans({self._counts})"


def _rank(kind: str) -> int:
    return _KIND_ORDER.index(kind) if kind in _KIND_ORDER else len(_KIND_ORDER)
