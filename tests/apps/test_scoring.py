"""ROUGE-L, privacy exposure and the judge client."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from cogenesis.apps.scoring import (
    JUDGE_PROMPTS,
    Judge,
    exposure,
    judge_prompts,
    lcs_length,
    parse_rating,
    private_ngrams,
    rouge_l,
    rouge_tokens,
)
from cogenesis.core.data import Record
from cogenesis.core.errors import ClusterError


def test_rouge_l_known_values():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("dogs bark loudly", "the cat sat") == 0.0
    # LCS "the cat on the mat" = 5 of 6 tokens each side: P = R = F = 5/6
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # P = 3/3, R = 3/6: F = 2 * 1 * 0.5 / 1.5
    assert rouge_l("the cat mat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l("", "anything") == 0.0 and rouge_l("anything", "") == 0.0


def test_rouge_tokenization_and_lcs():
    assert rouge_tokens("Hello, World! It's 2024.") == ["hello", "world", "it", "s", "2024"]
    assert rouge_l("THE Cat.", "the cat") == pytest.approx(1.0)
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4 == lcs_length(list("bdcaba"), list("abcbdab"))


def _record() -> Record:
    return Record(
        tid="t1",
        kind="context_aware",
        public_instruction="Write a blog post about gardens",
        task="Write a blog post about gardens: mention my roses in Leeds",
        profile="Name: Ada Lovelace\nLocation: Leeds",
        history=(("Old post", "my roses grow in the rain"),),
        gold="gold",
        _private=(
            "mention my roses in Leeds",
            "Name: Ada Lovelace\nLocation: Leeds",
            "Old post",
            "my roses grow in the rain",
        ),
    )


def test_exposure_counts_private_4grams_in_what_the_cloud_received():
    r = _record()
    private = private_ngrams(r)
    assert ("my", "roses", "grow", "in") in private and ("name", "ada", "lovelace", "location") in private
    assert exposure(r, []) == 0.0
    assert exposure(r, [r.public_instruction]) == 0.0
    assert exposure(r, [" ".join(r.private_fields())]) == pytest.approx(1.0)
    partial = exposure(r, ["I said my roses grow in the garden"])
    assert partial == pytest.approx(2 / len(private))  # "my roses grow in", "roses grow in the"


def test_public_4grams_are_not_private():
    r = Record(
        tid="t",
        kind="context_aware",
        public_instruction="write about the big red barn",
        task="x",
        _private=("the big red barn is mine",),
    )
    assert private_ngrams(r) == {("big", "red", "barn", "is"), ("red", "barn", "is", "mine")}


def test_judge_prompts_follow_the_papers_templates():
    r = _record()
    filled = judge_prompts(r, "My answer")
    assert set(filled) == set(JUDGE_PROMPTS) == {"overall", "personalization", "overall_without_profile"}
    for name in ("overall", "personalization"):
        assert r.profile in filled[name] and "Task: Old post\nContent: my roses grow" in filled[name]
        assert "[User Profile and Writing History]" in filled[name]
    assert r.profile not in filled["overall_without_profile"]
    assert all(r.task in p and "My answer" in p and '"[[rating]]"' in p for p in filled.values())


@pytest.mark.parametrize(
    "text,rating", [("Rating: [[7]]", 7.0), ("[[ 8.5 ]] good", 8.5), ("no rating", None), ("[[11]]", None), ("", None)]
)
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


class _Judge(BaseHTTPRequestHandler):
    status = 200
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        _Judge.seen.append((self.path, self.headers.get("authorization"), body))
        if _Judge.status != 200:
            self.send_response(_Judge.status)
            self.end_headers()
            return
        prompt = body["messages"][0]["content"]
        answer = "Rating: [[9]]" if "personalization aspects" in prompt else "Fine. [[6]]"
        payload = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def judge_server():
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Judge.status, _Judge.seen = 200, []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_judge_scores_an_answer_with_three_prompts(judge_server):
    judge = Judge(judge_server, "judge-model", api_key="k123", timeout_s=5)
    try:
        scores = judge.score(_record(), "an answer")
    finally:
        judge.close()
    assert scores == {"overall": 6.0, "personalization": 9.0, "overall_without_profile": 6.0}
    assert len(_Judge.seen) == 3
    path, auth, body = _Judge.seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer k123"
    assert body["model"] == "judge-model" and body["temperature"] == 0


def test_judge_errors_are_clear(judge_server):
    _Judge.status = 401
    judge = Judge(judge_server, "m", timeout_s=5, retries=2)
    with pytest.raises(ClusterError, match="HTTP 401") as info:
        judge.ask("x")
    judge.close()
    assert len(_Judge.seen) == 1  # a client error is not retried
    assert "--judge-url" in info.value.hint
    _Judge.status, _Judge.seen = 503, []
    judge = Judge(judge_server, "m", timeout_s=5, retries=1)
    with pytest.raises(ClusterError, match="HTTP 503"):
        judge.ask("x")
    judge.close()
    assert len(_Judge.seen) == 2
