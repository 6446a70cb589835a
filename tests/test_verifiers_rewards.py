"""verifiers.prompts and verifiers.rewards."""
from __future__ import annotations

import pytest

from verifiers import (
    FAMILIES,
    SYSTEM_PROMPT,
    RewardPolicy,
    build_messages,
    build_prompt,
    build_task,
    extract_answer,
    make_ref,
    reward,
    score_answer,
)


def gold(task) -> str:
    if task.answer is not None:
        return task.answer
    ex = task.metadata["example_answer"]
    return ex if score_answer(task, ex) == 1.0 else " ∧ ".join(f"({p})" for p in task.metadata["premises"])


# ------------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>46</answer>", "46"),
        ("think... <answer> 46 \n</answer>", "46"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),  # last block wins
        ("<answer>1</answer> then <answer>2", "1"),  # trailing unclosed tag ignored
        ("<answer><answer>5</answer>", None),  # nested: not one exact answer
        ("<answer>1 <answer>5</answer>", None),
        ("<answer>1</answer> <answer>5</answer>", "5"),
        ("<answer>a\nb</answer>", "a\nb"),
        ("<answer></answer>", ""),
        ("<answer>46", None),  # unclosed
        ("46</answer>", None),  # no opening tag
        ("</answer><answer>46", None),
        ("46", None),
        ("", None),
        ("<ANSWER>46</ANSWER>", None),  # case-sensitive
        ("<answer>4</answer>6</answer>", "4</answer>6"),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_non_str() -> None:
    assert extract_answer(None) is None  # type: ignore[arg-type]


class _Tok:
    def __init__(self, template):
        self.chat_template = template
        self.calls = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        self.calls.append((messages, tokenize, add_generation_prompt))
        return messages[-1]["content"]  # like the embedded tiny model's template: only the question


def test_prompts() -> None:
    assert "<answer>" in SYSTEM_PROMPT and "</answer>" in SYSTEM_PROMPT
    msgs = build_messages("12+34=")
    assert msgs == [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "12+34="}]
    assert build_prompt("12+34=") == f"{SYSTEM_PROMPT}\n\n12+34=\n"
    tok = _Tok("{{ messages[-1].content }}")
    assert build_prompt("12+34=", tok) == "12+34="
    assert tok.calls == [(msgs, False, True)]
    for empty in (_Tok(None), _Tok(""), object()):
        assert build_prompt("q", empty) == f"{SYSTEM_PROMPT}\n\nq\n"


# ------------------------------------------------------------------------------------------------ rewards


def test_reward_policy_validation() -> None:
    assert RewardPolicy() == RewardPolicy("binary", 0.0, 8192)
    for bad in (dict(mode="soft"), dict(format_reward=-0.1), dict(format_reward=1.5), dict(format_reward=float("nan")),
                dict(max_completion_chars=0), dict(max_completion_chars=True), dict(format_reward="0.1")):
        with pytest.raises(ValueError):
            RewardPolicy(**bad)
    assert RewardPolicy(format_reward=0.2).max_reward == pytest.approx(1.2)


@pytest.mark.parametrize("family", FAMILIES)
def test_rewards_every_family(family: str) -> None:
    binary, partial = RewardPolicy(), RewardPolicy(mode="partial", format_reward=0.1)
    short = RewardPolicy(max_completion_chars=64)
    for i in range(8):
        task = build_task(make_ref(family, 40 + i, i))
        good = f"Let me think.\n<answer>{gold(task)}</answer>"
        assert reward(task, good) == 1.0
        assert reward(task, good, partial) == pytest.approx(1.1)
        assert reward(task, "<answer>zzz</answer>") == 0.0
        assert reward(task, "<answer>zzz</answer>", partial) <= 0.1 + 0.05
        assert reward(task, "") == 0.0 and reward(task, "", partial) == 0.0
        assert reward(task, "<answer></answer>", partial) == 0.0  # empty block: no format bonus
        assert reward(task, f"<answer>{gold(task)}", partial) == 0.0  # unclosed
        assert reward(task, gold(task), partial) == 0.0  # no tag
        padded = "x" * 8192 + good
        assert reward(task, padded) == 0.0 and reward(task, padded, partial) == 0.0  # over-long
        if len(good) > 64:
            assert reward(task, good, short) == 0.0


def test_partial_vs_binary_substring_credit() -> None:
    task = build_task(make_ref("basic_arithmetic", 3, 0))
    text = f"<answer>x = {task.answer}</answer>"
    want = len(task.answer) / len(f"x = {task.answer}")
    assert reward(task, text, RewardPolicy(mode="partial")) == pytest.approx(want)
    assert reward(task, text) == 0.0
    assert reward(task, text, RewardPolicy(format_reward=0.25)) == 0.25


def test_arith_rewards() -> None:
    task = build_task(make_ref("arith", 0, 0))  # 43+75=
    assert reward(task, "<answer>118</answer>") == 1.0
    assert reward(task, "118") == 0.0
    for bad in ("0118", "+118", "118.0", "1 18", "117"):
        assert reward(task, f"<answer>{bad}</answer>", RewardPolicy(mode="partial")) == 0.0
    assert reward(task, "<answer>117</answer><answer>118</answer>") == 1.0
    assert reward(task, "<answer>118</answer><answer>117</answer>") == 0.0


def test_reward_never_raises() -> None:
    task = build_task(make_ref("binary_matrix", 1, 1))
    for text in (None, 5, "<answer>" + "[" * 3000 + "</answer>", "<answer>\x00</answer>"):
        assert reward(task, text) == 0.0  # type: ignore[arg-type]
