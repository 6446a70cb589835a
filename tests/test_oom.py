"""Out-of-memory in generation or training halves that phase's micro-batch and retries the same step (issue 14.3).

The error is injected on CPU: the model's forward raises torch.OutOfMemoryError (as CUDA does) or the CPU allocator's
RuntimeError whenever it is handed more rows than a pretend memory limit allows.
"""
from __future__ import annotations

import logging
import random

import pytest
import torch

from node.config import NodeConfig
from node.learner import Learner
from node.oom import is_oom
from node.policy import load_policy


@pytest.fixture()
def policy():
    torch.set_num_threads(1)
    return load_policy("tiny")


def limit_rows(monkeypatch, module: torch.nn.Module, max_rows: int, exc=torch.OutOfMemoryError) -> list[int]:
    """Make module.forward fail like an allocator when a batch has more than max_rows rows; returns the sizes seen."""
    seen: list[int] = []
    original = module.forward

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows = ids.shape[0] if ids is not None else kwargs["inputs_embeds"].shape[0]
        seen.append(rows)
        if rows > max_rows:
            raise exc("CUDA out of memory. Tried to allocate 2.00 GiB" if exc is torch.OutOfMemoryError
                      else "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "forward", forward)
    return seen


def test_the_errors_that_mean_out_of_memory():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch"))


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError, RuntimeError])
def test_training_oom_halves_the_micro_batch_and_gives_the_same_step(policy, monkeypatch, caplog, exc):
    cfg = NodeConfig(offline=True, questions_per_round=4, group_size=8, micro_batch_size=32)
    reference = Learner(load_policy("tiny"), cfg, random.Random(0))
    groups = reference.rollout(0)
    assert any(g.has_signal for g in groups)
    want = reference.train(groups)

    learner = Learner(policy, cfg, random.Random(0))
    seen = limit_rows(monkeypatch, policy.model, 8, exc)
    with caplog.at_level(logging.WARNING, logger="swarm_node.oom"):
        got = learner.train(groups)
    assert learner.trainer.config.micro_batch_size == 8  # 32 -> 16 -> 8, and kept
    assert seen[0] > 8 and seen[-1] <= 8
    assert "micro-batch 32 -> 16" in caplog.text and "micro-batch 16 -> 8" in caplog.text
    # the same step, only accumulated in smaller pieces
    assert got["loss"] == pytest.approx(want["loss"], abs=1e-5)
    ref = dict(reference.policy.model.named_parameters())
    for name, p in policy.model.named_parameters():
        assert torch.allclose(p, ref[name], atol=1e-6), name
    learner.train(groups)  # the next step starts at the kept size: no failure
    assert learner.trainer.config.micro_batch_size == 8


def test_generation_oom_halves_the_micro_batch_and_keeps_it(policy, monkeypatch):
    cfg = NodeConfig(offline=True, questions_per_round=4, group_size=8, gen_micro_batch=32)
    learner = Learner(policy, cfg, random.Random(0))
    seen = limit_rows(monkeypatch, policy.model, 8)
    groups = learner.rollout(0)
    assert len(groups) == 4 and all(len(g.completions) == 8 for g in groups)
    assert learner.sampling.micro_batch == 8 and seen[0] > 8
    n = len(seen)
    learner.rollout(1)
    assert max(seen[n:]) <= 8


def test_oom_at_micro_batch_one_is_still_an_error(policy, monkeypatch):
    cfg = NodeConfig(offline=True, questions_per_round=2, group_size=4, micro_batch_size=2)
    learner = Learner(policy, cfg, random.Random(0))
    groups = learner.rollout(0)
    limit_rows(monkeypatch, policy.model, 0)
    with pytest.raises(torch.OutOfMemoryError):
        learner.train(groups)
    assert learner.trainer.config.micro_batch_size == 1
