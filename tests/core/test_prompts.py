"""Unit tests for cogenesis.core.prompts: public/private split, sketch prompts, sketch clean-up."""

from __future__ import annotations

import pytest

from cogenesis.core.prompts import (
    SKELETON_EXAMPLES,
    SKETCH_PREFIX,
    SKETCH_STYLES,
    SYSTEM_WITHOUT_CONTEXT,
    clean_sketch,
    cloud_messages,
    skeleton_prompt,
    sketch_messages,
    split_instruction,
)

# ---- split_instruction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "instruction,public,private",
    [
        ("Write a toast: mention my sister Ann's promotion", "Write a toast", "mention my sister Ann's promotion"),
        ("Plan a trip: budget: 500 dollars", "Plan a trip", "budget: 500 dollars"),  # first ': ' only
        ("  Draft a memo  :   keep it short  ", "Draft a memo", "keep it short"),
        ("No details here", "No details here", ""),
        ("Time 10:30 meeting", "Time 10:30 meeting", ""),  # ':' without a space is not a split
        ("Trailing colon: ", "Trailing colon", ""),
        (": only private", "", "only private"),
        ("", "", ""),
    ],
)
def test_split_instruction(instruction, public, private):
    assert split_instruction(instruction) == (public, private)


def test_split_public_is_prefix_of_instruction():
    text = "Compose a eulogy for 'Dan': he loved fishing at Lake Tahoe every July"
    public, private = split_instruction(text)
    assert text.startswith(public)
    assert private not in public
    assert "Tahoe" not in public and "Tahoe" in private


# ---- skeleton_prompt --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["context_aware", "paper"])
def test_paper_style_contains_few_shot_examples(kind):
    prompt = skeleton_prompt("Write a blog post", kind, style="paper")
    assert SKELETON_EXAMPLES[kind] in prompt
    assert "[Skeleton1]" in prompt
    assert "You can refer to the following examples" in prompt
    assert prompt.rstrip().endswith("Write a blog post")


@pytest.mark.parametrize("kind", ["context_aware", "paper"])
def test_zero_shot_has_instructions_but_no_examples(kind):
    prompt = skeleton_prompt("Write a blog post", kind, style="zero-shot")
    assert "[Task1]" not in prompt and "[Skeleton1]" not in prompt
    for examples in SKELETON_EXAMPLES.values():
        assert examples.strip() not in prompt
    assert "You can refer" not in prompt
    assert "8-15 points" in prompt and "3-5 words" in prompt
    assert "Now, please provide the skeleton for the following question.\nWrite a blog post\n" in prompt


def test_default_style_is_zero_shot():
    assert skeleton_prompt("X") == skeleton_prompt("X", "context_aware", "zero-shot")


def test_paper_style_examples_follow_kind():
    ca = skeleton_prompt("X", "context_aware", "paper")
    pa = skeleton_prompt("X", "paper", "paper")
    assert "Dinner Party" in ca and "Dinner Party" not in pa
    assert "Anchor Adapters" in pa and "Anchor Adapters" not in ca


@pytest.mark.parametrize("style", ["few-shot", "Paper", "", "zero_shot"])
def test_unknown_style_raises(style):
    with pytest.raises(ValueError, match="style"):
        skeleton_prompt("X", style=style)


def test_styles_are_the_documented_ones():
    assert set(SKETCH_STYLES) == {"zero-shot", "paper"}


def test_sketch_messages_wrap_prompt():
    msgs = sketch_messages("Outline a talk", "paper", "paper")
    assert msgs == [{"role": "user", "content": skeleton_prompt("Outline a talk", "paper", "paper")}]


def test_cloud_messages_carry_only_public_instruction():
    msgs = cloud_messages("Write a thank-you note")
    assert msgs == [
        {"role": "system", "content": SYSTEM_WITHOUT_CONTEXT},
        {"role": "user", "content": "Write a thank-you note"},
    ]


# ---- clean_sketch -------------------------------------------------------------------------------


def test_clean_sketch_keeps_numbered_points_and_renumbers():
    raw = "Sure! Here is the outline:\n1. Opening hook\n3) Main argument\n  7 .  Counterpoint  \nThanks!"
    assert clean_sketch(raw) == "1. Opening hook\n2. Main argument\n3. Counterpoint"


def test_clean_sketch_dedupes_case_insensitively_keeping_first():
    raw = "1. Intro\n2. Budget plan\n3. intro\n4. BUDGET PLAN\n5. Closing"
    assert clean_sketch(raw) == "1. Intro\n2. Budget plan\n3. Closing"


def test_clean_sketch_strips_markdown_bold():
    assert clean_sketch("1. **Intro**\n2. *Body*") == "1. Intro\n2. Body"


def test_clean_sketch_caps_at_fifteen_points():
    raw = "\n".join(f"{i}. point {i}" for i in range(1, 31))
    out = clean_sketch(raw).splitlines()
    assert len(out) == 15
    assert out[0] == "1. point 1" and out[-1] == "15. point 15"


def test_clean_sketch_custom_cap():
    raw = "\n".join(f"{i}. p{i}" for i in range(1, 6))
    assert clean_sketch(raw, max_points=2) == "1. p1\n2. p2"


def test_clean_sketch_dedupe_happens_before_cap():
    raw = "\n".join(["1. same"] * 20 + [f"{i}. p{i}" for i in range(2, 20)])
    out = clean_sketch(raw).splitlines()
    assert len(out) == 15
    assert out[:3] == ["1. same", "2. p2", "3. p3"]


@pytest.mark.parametrize("text", ["  A free-text outline with no numbers.  ", "Intro\n- bullet\n- bullet two", ""])
def test_clean_sketch_passes_through_text_without_points(text):
    assert clean_sketch(text) == text.strip()


def test_clean_sketch_with_primed_prefix():
    # the cloud primes the assistant turn with "1." and prepends it before cleaning
    raw = SKETCH_PREFIX + " Warm welcome\n2. Agenda\n2. Agenda\n3. Farewell"
    assert clean_sketch(raw) == "1. Warm welcome\n2. Agenda\n3. Farewell"


def test_clean_sketch_ignores_empty_points():
    assert clean_sketch("1.\n2. **\n3. Real point") == "1. Real point"
