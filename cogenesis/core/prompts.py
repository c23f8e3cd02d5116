"""Prompts from the CoGenesis paper's released code, and the public/private split of instructions.

Cloud-side prompts take only public text (the general instruction). Edge-side prompts add the
private context. Nothing in this module decides what may leave the device: that is the edge's
outbound gate (``cogenesis.edge_sim.gate``).
"""

from __future__ import annotations

import re

SYSTEM_WITHOUT_CONTEXT = (
    "You are now a helpful personal AI assistant. "
    "Aim for insightful and high-quality solutions that make users satisfied."
)
SYSTEM_WITH_CONTEXT = {
    "context_aware": (
        "You are now a helpful personal AI assistant. You should emulate the author's style and tone "
        "based on provided history content. Your responses should be detailed and informative, using the "
        "personal information reasonably in the user's profile. Aim for insightful and high-quality "
        "solutions that make users satisfied."
    ),
    "paper": (
        "You are now a helpful personal AI assistant. You should emulate the author's style and tone "
        "based on provided history content. Your responses should be detailed and informative, matching "
        "the author's unique writing approach. Aim for insightful and high-quality solutions that make "
        "users satisfied."
    ),
}

_SKELETON_HEAD = (
    "You\u2019re an organizer responsible for only giving the skeleton (not the full content) for answering "
    "the question. Provide the skeleton in a list of points (numbered 1., 2., 3., etc.) to answer the "
    "question. Instead of writing a full sentence, each skeleton point should be very short with only "
    "3-5 words. Generally, the skeleton should have 8-15 points. You can refer to the following examples:\n\n"
)
SKELETON_EXAMPLES = {
    "context_aware": (
        "[Task1]: Develop a Marketing Script for Your Monthly Dinner Party\n"
        "[Skeleton1]: 1. Warmly lit dining room\n2. Fine china and gourmet dishes\n3. Soft music background\n"
        "4. Invitation opening\n5. Guests arriving and networking\n6. Host's welcoming toast\n"
        "7. Expertly paired courses and wine\n8. Animated guest discussions\n9. Guest speaker's address\n"
        "10. Post-dinner networking lounge\n11. Online community continuation\n12. Next event date highlighted\n"
        "13. Closing with logo and contact info\n\n"
        "[Task1]: Compose a reflective essay on the evolution of bridge design\n"
        "[Skeleton1]: 1. Introduction to bridges\n2. Early bridges: materials, principles\n"
        "3. Roman arches, concrete use\n4. Industrial Revolution: iron, steel\n5. Brooklyn Bridge: design icon\n"
        "6. 20th-century advances: materials, techniques\n7. Modern challenges: sustainability, climate\n"
        "8. Future technologies: smart materials, sensors\n9. Ethical considerations, safety\n"
        "10. Conclusion: adaptation, advancement\n\n"
    ),
    "paper": (
        "[Task1]: Compose an abstract for the title 'Ensemble of Anchor Adapters for Transfer Learning'\n"
        "[Skeleton1]: 1. Transfer learning importance\n2. Traditional approaches limitations\n"
        "3. Ensemble of Anchor Adapters introduction\n4. Anchor adapters concept\n"
        "5. Ensemble strategy for robustness\n6. Hybrid loss function formulation\n"
        "7. Experiments on heterogeneous domains\n8. EAA outperforms state-of-the-art\n"
        "9. Novel transferability metric introduction\n10. Contribution: ensemble and domain adaptation integration\n\n"
    ),
}
OUTLINE_HINT = "\nYou can refer to the following outlines: "


def split_instruction(instruction: str) -> tuple[str, str]:
    """Split "<general task>: <personal details>" into (public, private), as the paper's code does."""
    public, sep, private = instruction.partition(": ")
    return public.strip(), private.strip() if sep else ""


SKETCH_PREFIX = "1."  # the assistant turn is primed with the first point's number
SKETCH_STYLES = ("zero-shot", "paper")
_POINT = re.compile(r"^\s*\d+\s*[.)]\s*(.+?)\s*$")


def skeleton_prompt(public_instruction: str, kind: str = "context_aware", style: str = "zero-shot") -> str:
    """The paper's sketch prompt: 8-15 numbered points of 3-5 words, for the public instruction.

    ``paper`` keeps the paper's two few-shot examples; ``zero-shot`` keeps its instructions only
    (135M-class models copy the examples verbatim instead of following them).
    """
    if style not in SKETCH_STYLES:
        raise ValueError(f"sketch style {style!r} is not one of {SKETCH_STYLES}")
    head = _SKELETON_HEAD if style == "paper" else _SKELETON_HEAD.split(" You can refer")[0] + "\n\n"
    examples = SKELETON_EXAMPLES[kind] if style == "paper" else ""
    return (
        head + examples + "Now, please provide the skeleton for the following question.\n" + public_instruction + "\n"
    )


def clean_sketch(text: str, max_points: int = 15, max_words: int = 10) -> str:
    """Keep the outline's numbered points: unique, renumbered, at most ``max_points`` of ``max_words``."""
    points: list[str] = []
    for line in text.splitlines():
        match = _POINT.match(line)
        point = " ".join((match.group(1) if match else "").strip(" *").split()[:max_words])
        if point and point.lower() not in {p.lower() for p in points}:
            points.append(point)
    if not points:
        return text.strip()
    return "\n".join(f"{i}. {p}" for i, p in enumerate(points[:max_points], 1))


def cloud_messages(public_instruction: str) -> list[dict]:
    """The context-free conversation the cloud model conditions on in logits mode."""
    return [{"role": "system", "content": SYSTEM_WITHOUT_CONTEXT}, {"role": "user", "content": public_instruction}]


def cloud_prompt_ids(tokenizer, public_instruction: str) -> list[int]:
    """The cloud's logits-mode prompt as token ids (also the device's context-free pass in contrast fusion)."""
    return render(tokenizer, cloud_messages(public_instruction))


def sketch_messages(public_instruction: str, kind: str = "context_aware", style: str = "zero-shot") -> list[dict]:
    return [{"role": "user", "content": skeleton_prompt(public_instruction, kind, style)}]


def render(tokenizer, messages: list[dict]) -> list[int]:
    """Chat-template ``messages`` into token ids ending with the assistant's turn."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):  # transformers >= 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)
