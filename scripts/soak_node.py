"""`swarm-node join`, unchanged except that every own group's rewards alternate 1/0 after scoring.

A model with random weights (e.g. a Qwen2.5-0.5B shape built from its config) never answers a task, so every group
would have zero advantage and no round would train; with this, each round trains a full batch as a learning node's
does, so a soak of the real-model path (scripts/soak.py --signal) exercises generation, the GRPO step and checkpoints.

    python scripts/soak_node.py join --model runs/models/qwen05-random --offline --rounds 5 ...
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.cli import main  # noqa: E402
from node.learner import Learner  # noqa: E402

_rollout = Learner.rollout


def _rollout_with_signal(self: Learner, round_: int, n: int | None = None):
    groups = _rollout(self, round_, n)
    return [dataclasses.replace(g, rewards=tuple(float(i % 2) for i in range(len(g.rewards)))) for g in groups]


Learner.rollout = _rollout_with_signal  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
