"""Verifiable tasks, prompts and rewards. Pure: no torch, transformers, networking or global mutable state."""
from verifiers.prompts import SYSTEM_PROMPT, build_messages, build_prompt, extract_answer
from verifiers.rewards import REWARD_MODES, RewardPolicy, reward
from verifiers.tasks import (
    FAMILIES,
    HELDOUT_SEED_BASE,
    RG_FAMILIES,
    Task,
    TaskError,
    arith_is_heldout,
    build_task,
    default_config,
    heldout_refs,
    make_ref,
    parse_task_weights,
    sample_refs,
    score_answer,
)

__all__ = [
    "FAMILIES",
    "HELDOUT_SEED_BASE",
    "REWARD_MODES",
    "RG_FAMILIES",
    "SYSTEM_PROMPT",
    "RewardPolicy",
    "Task",
    "TaskError",
    "arith_is_heldout",
    "build_messages",
    "build_prompt",
    "build_task",
    "default_config",
    "extract_answer",
    "heldout_refs",
    "make_ref",
    "parse_task_weights",
    "reward",
    "sample_refs",
    "score_answer",
]
