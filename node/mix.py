"""The receiver decides what teaches it: which peers' groups a node trains on, their advantages, and how much it
generates itself.

`Mixer` is consulted by node.round once a round: `pick_external` (before generating), `questions`, `own`, then
`observe` (after training). Every choice is local; nothing a peer says about rewards is used (peers' groups were
rescored by node.learner first). Settings (NodeConfig; the defaults reproduce plain SAPO):

- external_baseline "sender" (default): a peer's completions get GRPO advantages within the peer's group.
  "receiver": against THIS node's expected reward on the task family (an EMA of its own groups' mean reward), so a
  peer's right answer on a family where this node mostly fails gets a large positive advantage, and one where it
  mostly succeeds a small one; groups with no completion above that baseline are skipped (nothing we lack).
- external_positive_only: peers' completions with a negative advantage are not trained on (a peer's wrong answer
  is off our policy: pushing it down spends the step on text we would not write).
- external_select "uniform" (default): J of the useful peers' groups, uniformly. "lacking": drawn with weight = the
  share of this node's own recent groups on that family that had no signal, so J goes where its own exploration
  finds nothing.
- adaptive_j: the number of peers' groups taken, J_eff <= J, moves each round by an online estimate of whether a
  peer's group helps more than an own question would (below), and the node generates I + J - (groups taken) questions
  itself. Alone it generates I + J: exactly what it would do without peers.
- external_prefilter (default on): the J candidates drawn from the pool are groups whose SENDER-claimed rewards show
  something to learn (mixed; with the receiver's baseline, a success above it), as the paper samples J "after
  dropping zero-advantage groups". The claim only chooses candidates; each is rescored before it counts, so a lying
  sender costs candidate slots (bounded per sender), never a training signal. Without it, the per-peer cap is spent
  on whatever the pool holds, mostly zero-advantage groups when the swarm is weak.
- ablation_self_feedback K > 0 (an experiment, docs/sapo_experiment.md): the peers' groups are replaced by this node's
  OWN groups from K rounds earlier, marked external as if a peer had sent them. Separates "a peer's group is
  stale/off-policy" from "a peer's group comes from another node".

The estimate (a first-order test, no extra forward passes): the trainer records the gradient of the own part and of
the peers' part of each step. A part helped if it points where the next round's own on-policy gradient points: per
group, u_own = <g_own(t-1) / n_own(t-1), g_own(t)> and u_ext = <g_ext(t-1) / n_ext(t-1), g_own(t)>, both scaled by
|g_own(t)| |g_own(t-1) / n_own(t-1)|. The next own gradient is an unbiased sample of where our reward improves, so an
EMA of u_ext - u_own > 0 says a peer's group was worth more than one of our own questions: J_eff goes up one step,
otherwise down one step (never below a small floor, so the estimate keeps being measured).
"""
from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import Sequence

import torch

from node.config import NodeConfig
from node.learner import ScoredGroup, choose_training_groups

EMA = 0.2  # weight of the newest round in the per-family statistics


def max_group_advantage(g: int) -> float:
    """The largest advantage GRPO gives inside a binary-reward group of g (one success among g), sample std."""
    a = 1.0 / g
    return (1 - a) / math.sqrt(g / (g - 1) * a * (1 - a))


class FamilyStats:
    """Per task family, from this node's own groups: mean reward (the baseline) and share without signal (lack)."""

    def __init__(self) -> None:
        self.baseline: dict[str, float] = {}
        self.lack: dict[str, float] = {}

    def update(self, local: Sequence[ScoredGroup]) -> None:
        by_fam: dict[str, list[ScoredGroup]] = {}
        for g in local:
            by_fam.setdefault(g.ref.generator, []).append(g)
        for fam, gs in by_fam.items():
            mean = sum(sum(g.rewards) / len(g.rewards) for g in gs) / len(gs)
            no_signal = sum(not g.has_signal for g in gs) / len(gs)
            for table, value in ((self.baseline, mean), (self.lack, no_signal)):
                table[fam] = value if fam not in table else (1 - EMA) * table[fam] + EMA * value


class Mixer:
    def __init__(self, cfg: NodeConfig, rng: random.Random) -> None:
        self.cfg = cfg
        self.rng = rng
        self.stats = FamilyStats()
        self.j_eff = float(cfg.external) if not cfg.adaptive_j else float(cfg.external) / 2
        self.step = max(1.0, cfg.external / 8)
        self.j_min = min(float(cfg.external), self.step)
        self.value_ema: float | None = None  # EMA of u_ext - u_own (scaled), see module doc
        self._prev: dict[str, object] | None = None  # last step's probe
        self._last_value: float | None = None
        self._own_past: list[list[ScoredGroup]] = []  # ablation_self_feedback: our own groups of recent rounds

    # -- before generating ----------------------------------------------------------------------------------------
    def wants(self, pooled: object) -> bool:
        """Pool prefilter on the sender's claimed rewards (see the module doc); True = worth rescoring."""
        rollout = getattr(pooled, "rollout", None)
        claimed = getattr(rollout, "rewards", None)
        if not claimed:
            return True  # no claim: only rescoring can tell
        claimed = claimed[: self.cfg.group_size]
        base = self.stats.baseline.get(rollout.task.generator) if self.cfg.external_baseline == "receiver" else None
        if base is not None:
            return max(claimed) > base + 1e-6
        return max(claimed) > min(claimed)

    def candidate_filter(self):
        """The predicate for the pool draw, or None (draw from everything)."""
        return self.wants if self.cfg.external_prefilter and self.cfg.ablation_self_feedback == 0 else None

    def pick_external(self, external: Sequence[ScoredGroup]) -> list[ScoredGroup]:
        """The peers' groups to train on this round (at most J_eff), with the advantages they will be trained with."""
        cfg = self.cfg
        n = min(cfg.external, int(round(self.j_eff)))
        if cfg.ablation_self_feedback > 0:
            past = self._own_past[0] if len(self._own_past) >= cfg.ablation_self_feedback else []
            external = [replace(g, source="self-stale") for g in past]
        if n <= 0:
            return []
        useful = [self._with_advantages(g) for g in external]
        useful = [g for g in useful if g is not None]
        if cfg.external_select == "lacking" and len(useful) > n:
            # weighted draw without replacement (Efraimidis-Spirakis): key u^(1/w), largest keys win
            keyed = [(self.rng.random() ** (1.0 / self._lack_weight(g)), i) for i, g in enumerate(useful)]
            return [useful[i] for _, i in sorted(keyed, reverse=True)[:n]]
        return self.rng.sample(useful, min(n, len(useful)))

    def questions(self, n_external: int) -> int:
        """How many questions to generate this round: the configured count, or with adaptive J the I + J slots the
        peers' groups did not fill (a node without peers generates I + J, as alone)."""
        cfg = self.cfg
        if not cfg.adaptive_j:
            return cfg.questions_per_round
        return max(1, cfg.local + cfg.external - n_external)

    def own(self, local: Sequence[ScoredGroup], n_external: int) -> list[ScoredGroup]:
        own, _ = choose_training_groups(local, [], self.cfg.local + self.cfg.external - n_external, 0, self.rng)
        return own

    # -- after training -------------------------------------------------------------------------------------------
    def observe(self, local: Sequence[ScoredGroup], n_external: int, probe: dict | None) -> dict[str, float]:
        """Updates the family statistics and, with adaptive J, the value estimate and J_eff; returns metrics."""
        self.stats.update(local)
        if self.cfg.ablation_self_feedback > 0:
            self._own_past = (self._own_past + [list(local)])[-self.cfg.ablation_self_feedback:]
        out: dict[str, float] = {"j_eff": self.j_eff}
        if not self.cfg.adaptive_j or probe is None:
            return out
        g_own = probe["own"]
        cur = {"own": g_own / max(1, len(local)), "ext": probe["ext"] / max(1, n_external), "n_ext": n_external}
        prev, self._prev = self._prev, cur
        norm_now = float(g_own.norm())
        if prev is None or prev["n_ext"] == 0 or norm_now == 0.0:
            return out  # nothing to compare: no peers' part last round, or no own signal now
        scale = norm_now * float(prev["own"].norm()) + 1e-12
        value = (float(torch.dot(prev["ext"], g_own)) - float(torch.dot(prev["own"], g_own))) / scale
        self.value_ema = value if self.value_ema is None else 0.8 * self.value_ema + 0.2 * value
        self.j_eff += self.step if self.value_ema > 0 else -self.step
        self.j_eff = min(float(self.cfg.external), max(self.j_min, self.j_eff))
        out.update(j_eff=self.j_eff, peer_value=value, peer_value_ema=self.value_ema)
        return out

    # -- helpers --------------------------------------------------------------------------------------------------
    def _with_advantages(self, g: ScoredGroup) -> ScoredGroup | None:
        """g with the advantages it is trained with, or None when it teaches nothing under this node's rule."""
        cfg = self.cfg
        base = self.stats.baseline.get(g.ref.generator)
        if cfg.external_baseline == "receiver" and base is not None:
            r = g.rewards
            if max(r) <= base + 1e-6:
                return None  # nothing better than what we already do
            n = len(r)
            mean = sum(r) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in r) / (n - 1)) if n > 1 else 0.0
            scale = max(std, math.sqrt(max(base * (1 - base), 0.0)), 0.05)
            cap = max_group_advantage(max(2, n))
            adv = [max(-cap, min(cap, (x - base) / scale)) for x in r]
        else:
            if not g.has_signal:
                return None
            if not cfg.external_positive_only:
                return g  # the trainer's group-relative advantages
            n = len(g.rewards)
            mean = sum(g.rewards) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in g.rewards) / (n - 1))
            adv = [(x - mean) / (std + 1e-4) for x in g.rewards]
        if cfg.external_positive_only:
            adv = [max(0.0, a) for a in adv]
        if not any(a != 0 for a in adv):
            return None
        return replace(g, advantages=tuple(adv))

    def _lack_weight(self, g: ScoredGroup) -> float:
        return max(0.05, self.stats.lack.get(g.ref.generator, 1.0))
