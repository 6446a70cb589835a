"""Prompt construction and answer extraction.

Answer rule (`extract_answer`): the answer is the content of the LAST complete `<answer>...</answer>` block, i.e. the
text between the last `</answer>` and the nearest `<answer>` before it, stripped of surrounding whitespace. Tags are
case-sensitive. No complete block (no tags, only an opening tag, a closing tag without an opening one before it)
or a nested one (a second `<answer>` opened inside the block: "<answer>1 <answer>2</answer>") gives None; `<answer></answer>` gives "". Text after the last closing tag (e.g. an unclosed `<answer>`) is ignored.
"""
from __future__ import annotations

from typing import Any

ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"

SYSTEM_PROMPT = (
    "Solve the problem. Think briefly if needed, then give only your final answer inside "
    "<answer>...</answer>, for example <answer>42</answer>."
)


def build_messages(question: str) -> list[dict[str, str]]:
    """Chat messages: the system prompt, then the question as the user's turn."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def build_prompt(question: str, tokenizer: Any = None) -> str:
    """The text to generate from: the tokenizer's chat template when it has one, else a plain-text prompt."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if template:
        return tokenizer.apply_chat_template(build_messages(question), tokenize=False, add_generation_prompt=True)
    return f"{SYSTEM_PROMPT}\n\n{question}\n"


def extract_answer(text: str) -> str | None:
    """Content of the last complete <answer>...</answer> block, stripped; None if there is none (see module doc)."""
    if not isinstance(text, str):
        return None
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None
    prev_close = text.rfind(ANSWER_CLOSE, 0, start)
    if text.find(ANSWER_OPEN, prev_close + 1 if prev_close >= 0 else 0, start) >= 0:
        return None  # nested: "<answer>x <answer>y</answer>" is not one exact answer
    return text[start + len(ANSWER_OPEN) : end].strip()


__all__ = ["ANSWER_CLOSE", "ANSWER_OPEN", "SYSTEM_PROMPT", "build_messages", "build_prompt", "extract_answer"]
