"""Private word n-grams (``cogenesis.core.privacy``): shared by the outbound gate and eval's exposure."""

from cogenesis.core.privacy import ngrams, private_ngrams, words


def test_words_lowercases_and_drops_punctuation():
    assert words("Hello, World! It's 42.") == ["hello", "world", "it", "s", "42"]


def test_ngrams():
    assert ngrams("a b c d", 2) == {("a", "b"), ("b", "c"), ("c", "d")}
    assert ngrams("a b", 3) == set()


def test_private_ngrams_leave_out_the_public_instruction():
    private = private_ngrams("Write to my colleague", ["Write to my colleague Dana today", "Dana lives in Leeds"], 3)
    assert private == {("my", "colleague", "dana"), ("colleague", "dana", "today"), ("dana", "lives", "in"),
                       ("lives", "in", "leeds")}  # fmt: skip
    assert ("write", "to", "my") not in private  # public by the user's choice


def test_private_ngrams_of_nothing():
    assert private_ngrams("anything", ["some private words here"], 0) == set()
    assert private_ngrams("anything", [], 3) == set()
