"""Scores of ``cogenesis eval``: ROUGE-L, privacy exposure, and the paper's LLM-judge prompts.

Pure functions, except ``Judge`` (an HTTP client for any OpenAI-compatible chat endpoint).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from cogenesis.core import privacy
from cogenesis.core.data import Record
from cogenesis.core.errors import ClusterError

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """ROUGE's tokenization (as Google's rouge-score, without stemming): lowercase alphanumeric runs."""
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) of ``prediction`` against ``reference``; 0 when either is empty."""
    p, r = rouge_tokens(prediction), rouge_tokens(reference)
    if not p or not r:
        return 0.0
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def private_ngrams(record: Record, n: int = 4) -> set[tuple[str, ...]]:
    """Word n-grams of the record's private fields, less those in its public instruction: what the
    device's outbound gate guards, at length ``n`` (both use ``cogenesis.core.privacy``)."""
    return privacy.private_ngrams(record.public_instruction, record.private_fields(), n)


def exposure(record: Record, received: Iterable[str], n: int = 4) -> float:
    """Share of the record's private n-grams that appear in the texts the cloud model received."""
    private = private_ngrams(record, n)
    if not private:
        return 0.0
    seen = set().union(*(privacy.ngrams(t, n) for t in received)) if received else set()
    return len(private & seen) / len(private)


# ---- the paper's judge (src/evaluate/llm_evaluator_parallel.py of the released code) ----------------

_RATE = (
    "Begin your evaluation by providing a short explanation. Be as objective as possible. After providing your "
    "explanation, you must rate the response on a scale of 1 to 10 by strictly following this format: "
    '"[[rating]]", for example: "Rating: [[5]]".'
)
_WITH_PROFILE = (
    "\n\n[User Profile and Writing History]\n{profile_info}\n{writing_history}\n\n[Question]\n{question}\n\n"
    "[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
JUDGE_PROMPTS = {
    "overall": (
        "[Instruction]\nPlease act as an impartial evaluator and assess the quality of the AI assistant's response to "
        "the user question shown below. Your assessment should focus on how well the response aligns with the user's "
        "personalized profile and writing history. Evaluate factors such as the response's adherence to the user's "
        "personal style, consistency with their profile, helpfulness, relevance, accuracy, depth, creativity, and "
        "level of detail. " + _RATE + _WITH_PROFILE
    ),
    "personalization": (
        "[Instruction]\nPlease act as an impartial judge an evaluate the AI assistant's response based on its alignment "
        "with the user's personal profile and writing history. Focus your assessment on the personalization aspects of "
        "the response, including its adherence to the user's unique style, preferences, and consistency with their "
        "profile. Consider how well the response addresses the user's individual needs and interests. "
        + _RATE
        + _WITH_PROFILE
    ),
    "overall_without_profile": (
        "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
        "assistant to the user question displayed below. Your evaluation should consider factors such as the "
        "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. "
        + _RATE
        + "\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
    ),
}
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")


def judge_prompts(record: Record, answer: str) -> dict[str, str]:
    """The three judge prompts for one answer, filled as the released code fills them."""
    profile_info = record.profile + "\n" if record.kind == "context_aware" else ""
    history = "\n".join(f"Task: {t}\nContent: {x}" for t, x in record.history)
    fields = {"profile_info": profile_info, "writing_history": history, "question": record.task, "answer": answer}
    return {name: template.format(**fields) for name, template in JUDGE_PROMPTS.items()}


def parse_rating(text: str) -> float | None:
    """The judge's "[[N]]" rating (1-10), or None when it gave none."""
    match = _RATING.search(text or "")
    if not match:
        return None
    value = float(match.group(1))
    return value if 1.0 <= value <= 10.0 else None


@dataclass
class Judge:
    """Scores answers with an OpenAI-compatible ``/chat/completions`` endpoint (temperature 0)."""

    url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 120.0
    retries: int = 2

    def __post_init__(self) -> None:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self._http = httpx.Client(timeout=self.timeout_s, headers=headers)

    def close(self) -> None:
        self._http.close()

    def ask(self, prompt: str) -> str:
        url = self.url.rstrip("/") + "/chat/completions"
        body = {"model": self.model, "temperature": 0, "messages": [{"role": "user", "content": prompt}]}
        last = ""
        for attempt in range(self.retries + 1):
            try:
                resp = self._http.post(url, json=body)
                if resp.status_code == 200:
                    return resp.json()["choices"][0]["message"]["content"] or ""
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                if resp.status_code < 500 and resp.status_code != 429:
                    break  # a client error will not change on retry
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            log.warning("judge request %d failed: %s", attempt + 1, last)
        raise ClusterError(
            f"the judge at {url} did not answer ({last})",
            hint="check --judge-url (the base URL ending in /v1), --judge-model and the API key",
        )

    def score(self, record: Record, answer: str) -> dict[str, float | None]:
        """The three ratings for one answer (None where the judge gave no [[N]])."""
        return {name: parse_rating(self.ask(prompt)) for name, prompt in judge_prompts(record, answer).items()}
