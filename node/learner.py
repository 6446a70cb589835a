"""Everything a node does with its own policy, and nothing about the network.

Blocking torch work lives here so the round loop can run it through `trio.to_thread.run_sync` while gossip keeps
flowing. Peers' groups arrive as plain text with a task reference; they are rebuilt, re-tokenized and rescored here
with the local verifier before they can be trained on: a peer's answer or reward is never used.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from node.config import MICRO_BATCH_FALLBACK, NodeConfig, parse_task_config
from node.generation import SamplingConfig, eos_token_ids, generate_groups, greedy_answers
from node.grpo import GRPOConfig, GRPOTrainer, TrainGroup
from node.lora import apply_lora, is_lora, settings_from_config
from node.oom import halving_on_oom
from node.policy import Policy
from protocol.messages import Rollout, TaskRef
from verifiers.prompts import build_prompt
from verifiers.rewards import RewardPolicy, reward
from verifiers.tasks import (
    Task,
    TaskError,
    build_task,
    foreign_ref_reason,
    heldout_refs,
    parse_task_weights,
    sample_refs,
    training_configs,
)

log = logging.getLogger("swarm_node.learner")

@dataclass(frozen=True)
class ScoredGroup:
    """One question's completions, tokenized for this node's policy and scored by this node's verifier."""

    ref: TaskRef
    prompt_ids: tuple[int, ...]
    completions: tuple[str, ...]
    completion_ids: tuple[tuple[int, ...], ...]
    truncated: tuple[bool, ...]
    rewards: tuple[float, ...]
    source: str = "local"  # "local", or the peer ID of the node that generated it
    advantages: tuple[float, ...] | None = None  # set by node.mix (receiver's baseline); None = group-relative

    @property
    def external(self) -> bool:
        return self.source != "local"

    @property
    def has_signal(self) -> bool:
        """False when every completion got the same reward: the group's GRPO advantages are all zero."""
        return max(self.rewards) > min(self.rewards)

    def to_train_group(self) -> TrainGroup:
        return TrainGroup(self.prompt_ids, self.completion_ids, self.rewards, self.truncated, external=self.external,
                          advantages=self.advantages)

    def to_rollout(self) -> Rollout:
        return Rollout(task=self.ref, completions=self.completions, rewards=self.rewards)


def choose_training_groups(
    local: Sequence[ScoredGroup], external: Sequence[ScoredGroup], n_local: int, n_external: int, rng: random.Random
) -> tuple[list[ScoredGroup], list[ScoredGroup]]:
    """The SAPO mix: own groups plus up to J peers' groups, peers' zero-advantage groups dropped first.

    Own groups fill the I + J slots the peers' groups leave. When they all fit (the paper's protocol: a node generates
    I questions) every own group is trained on, unfiltered, as in the paper (a zero-advantage group carries no
    gradient; the trainer skips its compute). When the node generated more than fit (questions_per_round > I, or a
    node with peers short of J), the groups with signal are preferred, so a lone node trains on up to I + J own
    groups (J = 0 is plain single-node RL).
    """
    ext = [g for g in external if g.has_signal]
    ext = rng.sample(ext, min(n_external, len(ext)))
    slots = n_local + n_external - len(ext)
    if len(local) <= slots:
        return list(local), ext
    own = [g for g in local if g.has_signal]
    own = rng.sample(own, min(slots, len(own)))
    return own, ext


def _or_fallback(micro_batch: int | None) -> int:
    """A micro-batch no plan chose (join resolves them with node.memory_plan before this): the fixed default."""
    return MICRO_BATCH_FALLBACK if micro_batch is None else micro_batch


class Learner:
    def __init__(self, policy: Policy, cfg: NodeConfig, rng: random.Random) -> None:
        self.policy = policy
        self.cfg = cfg
        self.rng = rng
        self.task_weights = parse_task_weights(cfg.tasks)
        self.task_configs = parse_task_config(cfg.task_config)  # per-family settings (--task-config)
        # what we sample; peers' refs must match it
        self.train_configs = training_configs(self.task_weights, self.task_configs)
        self.reward_policy = RewardPolicy(mode=cfg.reward_mode, format_reward=cfg.format_reward)
        self.sampling = SamplingConfig(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            micro_batch=_or_fallback(cfg.gen_micro_batch),
        )
        self.grpo = GRPOConfig(
            learning_rate=cfg.learning_rate,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            delta=cfg.delta,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            scale_rewards=cfg.scale_rewards,
            num_iterations=cfg.num_iterations,
            micro_batch_size=_or_fallback(cfg.micro_batch_size),
            max_grad_norm=cfg.max_grad_norm,
            weight_decay=cfg.weight_decay,
            max_completion_length=self.sampling.max_new_tokens,
            temperature=cfg.temperature,
            mask_truncated_completions=cfg.mask_truncated_completions,
            offpolicy_mask=cfg.offpolicy_mask,
            offpolicy_threshold=cfg.offpolicy_threshold,
        )
        lora = settings_from_config(cfg)
        if lora is not None and not is_lora(policy.model):  # only the adapters train from here on
            policy.model = apply_lora(policy.model, lora)
        ref_model = None
        if cfg.beta != 0 and lora is None:  # only then is a frozen copy worth its memory (LoRA: the adapters off)
            ref_model = copy.deepcopy(policy.model).eval().requires_grad_(False)
        self.trainer = GRPOTrainer(policy.model, self.grpo, pad_token_id=policy.tokenizer.pad_token_id, ref_model=ref_model)
        self.rejected: Counter[str] = Counter()  # peers' groups dropped while rescoring, by reason
        self._prompt_cache: dict[str, tuple[int, ...]] = {}
        self._eos_ids = set(eos_token_ids(policy))

    # -- own experience -------------------------------------------------------------------------------------------
    def rollout(self, round_: int, n: int | None = None) -> list[ScoredGroup]:
        """Samples this round's questions (n, default questions_per_round), generates a group of completions for
        each and scores them."""
        n = self.cfg.questions_per_round if n is None else n
        refs = sample_refs(self.task_weights, n, self.rng, configs=self.task_configs)
        tasks = [build_task(r) for r in refs]
        prompts = [self._prompt(t) for t in tasks]
        seed = self.rng.randrange(2**31)
        groups = halving_on_oom(
            lambda: generate_groups(self.policy, prompts, self.cfg.group_size, self.sampling, seed=seed),
            lambda: self.sampling.micro_batch, self._set_gen_micro_batch, "generation")
        out = []
        for task, prompt, comps in zip(tasks, prompts, groups):
            out.append(
                ScoredGroup(
                    ref=task.ref,
                    prompt_ids=self._prompt_ids(prompt),
                    completions=tuple(c.text for c in comps),
                    completion_ids=tuple(tuple(c.token_ids) for c in comps),
                    truncated=tuple(c.truncated for c in comps),
                    rewards=tuple(reward(task, c.text, self.reward_policy) for c in comps),
                )
            )
        return out

    # -- peers' experience ----------------------------------------------------------------------------------------
    def rescore(self, rollouts: Iterable[tuple[Rollout, str]]) -> list[ScoredGroup]:
        """Rebuilds each shared task from its reference, re-tokenizes the text and scores it with our own verifier.

        Only refs this node could have drawn itself are kept (its families and configs, training split), and what is
        scored is exactly what is trained: the text decoded from the kept tokens, cut at the first EOS and at our own
        generation budget. A completion that does not fit the budget is kept as truncated (no EOS), never as finished,
        so an answer hidden past the budget or after an EOS earns nothing.
        """
        out = []
        for rollout, sender in rollouts:
            why = self.foreign_reason(rollout.task)
            if why is not None:  # checked before anything is built: a foreign ref costs us nothing
                self.rejected[why] += 1
                continue
            try:
                task = build_task(rollout.task)
            except TaskError as e:  # a task we cannot rebuild is a task we cannot verify
                self.rejected["unknown_task"] += 1
                log.debug("dropping a group from %s: %s", sender, e)
                continue
            if len(rollout.completions) < 2:
                self.rejected["group_too_small"] += 1
                continue
            prompt = self._prompt(task)
            # a peer's group counts like one of ours: no more completions than our own group size
            texts, ids, truncated = [], [], []
            for text in rollout.completions[: self.cfg.group_size]:
                t, i, cut = self._fit_completion(text)
                texts.append(t)
                ids.append(i)
                truncated.append(cut)
            out.append(
                ScoredGroup(
                    ref=task.ref,
                    prompt_ids=self._prompt_ids(prompt),
                    completions=tuple(texts),
                    completion_ids=tuple(ids),
                    truncated=tuple(truncated),
                    rewards=tuple(reward(task, text, self.reward_policy) for text in texts),
                    source=sender,
                )
            )
        return out

    def foreign_reason(self, ref: TaskRef) -> str | None:
        """Why a peer's ref is outside what this node trains on (None: it is inside). Cheap, no task is built."""
        return foreign_ref_reason(ref, self.train_configs)

    def _fit_completion(self, text: str) -> tuple[str, tuple[int, ...], bool]:
        """(the text that is trained, its token ids, truncated) for a peer's completion, as if our policy wrote it.

        Mirrors generation: at most max_new_tokens tokens including the EOS; a completion whose body needs all of them
        is truncated (no EOS). The returned text is decoded from the kept tokens, as generation decodes its own.
        """
        tok = self.policy.tokenizer
        limit = self.sampling.max_new_tokens
        toks = tok(text, add_special_tokens=False)["input_ids"]
        cut = next((k for k, t in enumerate(toks) if t in self._eos_ids), None)
        body = toks if cut is None else toks[:cut]  # a peer's EOS ends the completion where our model would stop
        truncated = len(body) >= limit
        body = body[:limit]
        pad = tok.pad_token_id
        shown = tok.decode([t for t in body if t != pad], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        ids = tuple(body) if truncated else tuple(body) + (tok.eos_token_id,)
        return shown, ids, truncated

    # -- the update -----------------------------------------------------------------------------------------------
    def train(self, groups: Sequence[ScoredGroup]) -> dict[str, float]:
        if not groups:
            return {"skipped": 1.0, "n_local": 0.0, "n_external": 0.0}
        batch = [g.to_train_group() for g in groups]
        steps_before = _optimizer_steps(self.trainer.optimizer)
        return halving_on_oom(
            lambda: self.trainer.train_step(batch), lambda: self.trainer.config.micro_batch_size,
            self._set_train_micro_batch, "training",
            # a step already applied cannot be taken back: retry only while the optimizer is untouched
            safe_to_retry=lambda: _optimizer_steps(self.trainer.optimizer) == steps_before)

    def _set_gen_micro_batch(self, n: int) -> None:
        self.sampling = dataclasses.replace(self.sampling, micro_batch=n)

    def _set_train_micro_batch(self, n: int) -> None:
        self.trainer.optimizer.zero_grad(set_to_none=True)  # the failed step's partial gradients
        self.trainer.config = dataclasses.replace(self.trainer.config, micro_batch_size=n)
        self.grpo = self.trainer.config

    def evaluate(self, n: int) -> float:
        """Greedy accuracy on a fixed held-out set that no training sampler can draw."""
        k = max(1, n // len(self.task_weights))
        tasks = [build_task(r) for fam in self.task_weights for r in heldout_refs(fam, k, self.task_configs.get(fam))]
        # --gen-micro-batch bounds evaluation's memory too (node.memory_plan counts it so)
        texts = greedy_answers(self.policy, [self._prompt(t) for t in tasks], self.sampling.max_new_tokens,
                               self.sampling.micro_batch)
        strict = RewardPolicy(mode="binary")
        return sum(reward(t, x, strict) >= 1.0 for t, x in zip(tasks, texts)) / max(1, len(tasks))

    # -- helpers --------------------------------------------------------------------------------------------------
    def _prompt(self, task: Task) -> str:
        return build_prompt(task.question, self.policy.tokenizer)

    def _prompt_ids(self, prompt: str) -> tuple[int, ...]:
        ids = self._prompt_cache.get(prompt)
        if ids is None:
            ids = tuple(self.policy.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            if len(self._prompt_cache) > 10_000:
                self._prompt_cache.clear()
            self._prompt_cache[prompt] = ids
        return ids


def _optimizer_steps(optimizer: torch.optim.Optimizer) -> float:
    return sum(float(st.get("step", 0)) for st in optimizer.state.values())


def set_torch_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
