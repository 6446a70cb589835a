"""Reward policy: how a completion for a task turns into a scalar reward.

A reward depends only on the TaskRef (rebuilt locally into a Task) and the completion text; nothing a peer says about
the answer or its reward is used.

    completion longer than max_completion_chars  -> 0.0 (no format bonus)
    no complete <answer>...</answer> block       -> 0.0 (see verifiers.prompts.extract_answer for the rule)
    otherwise s = score_answer(task, answer) in [0, 1] (the family's verifier; answer stripped first)
        mode "binary":  1.0 if s >= 1.0 else 0.0
        mode "partial": s
    plus format_reward when the block's content is non-empty.
Range: [0, 1 + format_reward].

Why "binary" is the default: reasoning-gym scorers give partial credit that a policy can farm. The default scorer
gives len(gold) / len(answer) when the gold answer is a substring of a longer answer (" 13 " unstripped -> 0.5,
"x = 13" -> 1/3); fraction_simplification gives 0.01-0.1 for wrong fractions; calendar_arithmetic gives
exp(-5 * relative error) for near-miss counts; propositional_logic gives 0.25 for a trivially true conclusion and
0.05 for a wrong one. Binary mode pays only fully correct answers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from verifiers.prompts import extract_answer
from verifiers.tasks import Task, score_answer

REWARD_MODES = ("binary", "partial")


@dataclass(frozen=True)
class RewardPolicy:
    mode: str = "binary"  # "binary" | "partial"
    format_reward: float = 0.0  # bonus for a non-empty answer block, in [0, 1]
    max_completion_chars: int = 8192

    def __post_init__(self) -> None:
        if self.mode not in REWARD_MODES:
            raise ValueError(f"mode must be one of {list(REWARD_MODES)}, got {self.mode!r}")
        fr = self.format_reward
        if isinstance(fr, bool) or not isinstance(fr, (int, float)) or not math.isfinite(fr) or not 0 <= fr <= 1:
            raise ValueError(f"format_reward must be a number in [0, 1], got {fr!r}")
        mc = self.max_completion_chars
        if isinstance(mc, bool) or not isinstance(mc, int) or not 1 <= mc <= 1_000_000:
            raise ValueError(f"max_completion_chars must be an int in [1, 1000000], got {mc!r}")

    @property
    def max_reward(self) -> float:
        return 1.0 + float(self.format_reward)


def reward(task: Task, completion: str, policy: RewardPolicy = RewardPolicy()) -> float:
    """Reward for one completion under `policy` (see module doc). Never raises for any completion string."""
    if not isinstance(completion, str) or len(completion) > policy.max_completion_chars:
        return 0.0
    answer = extract_answer(completion)
    if answer is None:
        return 0.0
    s = score_answer(task, answer)
    r = (1.0 if s >= 1.0 else 0.0) if policy.mode == "binary" else s
    if answer:
        r += float(policy.format_reward)
    return r


__all__ = ["REWARD_MODES", "RewardPolicy", "reward"]
