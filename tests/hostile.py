"""Hostile peers that speak the protocol correctly and aim at what a node trains on (test tools, not product code).

Each one joins a swarm as a normal mesh peer (tests.byzantine.ByzantinePeer's machinery) and publishes well-formed,
correctly signed batches whose groups would carry a training signal if the receiver trusted the wrong thing:

  hidden    arith groups where half the completions hide the gold answer where training never sees it: after our
            generation budget, after 8,000 chars of filler, or after an EOS; the other half are plainly wrong
  heldout   the receiver's own evaluation refs (heldout_refs), gold and wrong answers mixed
  foreign   refs the receiver never chose (other configs, other families), gold and wrong answers mixed
  sybils    40 identities minted up front, each publishing groups with gold and wrong answers, all relayed by us
"""
from __future__ import annotations

import random
import time
from typing import Sequence

from protocol.envelope import seal
from protocol.identity import Identity
from protocol.messages import Rollout, TaskRef
from tests.byzantine import ARITH_CONFIG, TRAIN_SEEDS, ByzantinePeer, _libp2p_message, arith_ref
from verifiers.tasks import build_task, heldout_refs

KINDS = ("hidden", "heldout", "foreign", "sybils")


def _mixed(ref: TaskRef, rng: random.Random, n: int = 8) -> Rollout:
    """Half gold, half wrong: a group with signal for any receiver that accepts the ref."""
    gold = build_task(ref).answer
    comps = tuple(f"<answer>{gold}</answer>" if i % 2 == 0 else f"<answer>{rng.randrange(0, 20)}</answer>"
                  for i in range(n))
    return Rollout(ref, comps, None)


def hidden_gold(ref: TaskRef, rng: random.Random) -> Rollout:
    gold = build_task(ref).answer
    hidden = [
        f"<answer>{rng.randrange(0, 20)}</answer>" + " " * 40 + f"<answer>{gold}</answer>",
        "x" * 8000 + f"<answer>{gold}</answer>",
        f"<answer>{rng.randrange(0, 20)}</answer></s><answer>{gold}</answer>",
        f"<answer>{rng.randrange(0, 20)}</answer><|endoftext|><answer>{gold}</answer>",
    ]
    wrong = [f"<answer>{rng.randrange(0, 20)}</answer>" for _ in range(4)]
    return Rollout(ref, tuple(hidden + wrong), (1.0,) * 4 + (0.0,) * 4)


class TrainingPoisoner(ByzantinePeer):
    def __init__(self, kind: str, swarm: str, bootstrap: Sequence[str] = (), *, n_sybils: int = 40, **kw) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        super().__init__("sybil", swarm, bootstrap, **kw)
        self.kind = kind
        self.sybil_identities = [Identity.generate() for _ in range(n_sybils if kind == "sybils" else 0)]
        self.sybils = [i.peer_id for i in self.sybil_identities]
        self._heldout = heldout_refs("arith", 100)  # exactly the receiver's evaluation set (eval_size 100)

    async def attack(self) -> None:
        while True:
            try:
                await getattr(self, f"_poison_{self.kind}")()
            except Exception as e:  # e.g. a peer that just dropped us: keep going
                self.errors[type(e).__name__] += 1
            await self._tick()

    async def _poison_hidden(self) -> None:
        await self._publish_groups("hidden", [hidden_gold(arith_ref(self.rng), self.rng) for _ in range(16)])

    async def _poison_heldout(self) -> None:
        await self._publish_groups("heldout", [_mixed(self.rng.choice(self._heldout), self.rng) for _ in range(16)])

    async def _poison_foreign(self) -> None:
        s = lambda: (self.rng.randrange(TRAIN_SEEDS), self.rng.randrange(2**31))  # noqa: E731
        refs = [TaskRef.make("arith", {**ARITH_CONFIG, "digits": 3}, *s()) for _ in range(8)]
        refs += [TaskRef.make("basic_arithmetic", {}, *s()) for _ in range(8)]
        await self._publish_groups("foreign", [_mixed(r, self.rng) for r in refs])

    async def _poison_sybils(self) -> None:
        for ident in self.sybil_identities:
            data = seal(self._batch([_mixed(arith_ref(self.rng), self.rng) for _ in range(8)], identity=ident), ident)
            self._send_direct(_libp2p_message(ident, self.topic, data, time.time_ns()))
            self.sent["sybils"] += 1
