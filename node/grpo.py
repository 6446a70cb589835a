"""GRPO, small enough to read in one sitting, with TRL's semantics (TRL 1.16 conventions, option names alike).

One `train_step` takes a list of rollout groups (a prompt, its completions, their rewards), computes group-relative
advantages, and runs `num_iterations` optimizer steps on them, each with gradient accumulation over micro-batches.

The pieces are pure functions so each can be tested by hand:
  group_advantages   rewards (groups x n) -> advantages
  per_token_logps    model + padded batch -> log p(completion token) at the sampling temperature (+ entropy)
  grpo_loss          clipped surrogate + optional k3 KL, aggregated by loss_type

Loss (per completion token t of sequence i, ratio r = exp(logp - old_logp)):
  l = -min(min(r, delta) * A_i, clip(r, 1 - epsilon, 1 + epsilon_high) * A_i) + beta * r * k3(ref, logp)
Aggregation (B = sequences in the whole optimizer step, over all micro-batches):
  grpo     mean over sequences of each sequence's token mean
  bnpo     token sum / active tokens       (same as dapo here: one process, accumulation = one big batch)
  dapo     token sum / active tokens
  dr_grpo  token sum / (B * max_completion_length)
Every aggregation is normalised by whole-step quantities, so micro-batch accumulation gives the gradient of one big
batch (TRL divides grpo/bnpo/dr_grpo per micro-batch by the accumulation count, which only agrees for equal chunks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL adds this to the std (not to the variance)


# -----------------------------------------------------------------------------
# config and data


@dataclass(frozen=True)
class GRPOConfig:
    learning_rate: float = 1e-6  # TRL's default; the tiny model wants far more (see scripts/tune_tiny_grpo.py)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # <= 0 disables clipping (the norm is still reported)
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = 0.28  # upper clip (SAPO paper); None = epsilon, as in TRL
    delta: float | None = None  # cap on the unclipped ratio (two-sided clipping, INTELLECT-2); > 1 + epsilon_high
    beta: float = 0.0  # k3 KL vs a frozen reference model; 0 = no reference needed
    use_bias_correction_kl: bool = True  # multiply the per-token KL by the ratio (DeepSeek-V3.2)
    loss_type: str = "dapo"
    scale_rewards: str = "group"
    num_iterations: int = 1  # optimizer steps per train_step on the same rollouts
    micro_batch_size: int = 64  # sequences per forward/backward
    max_completion_length: int = 256  # only dr_grpo reads it
    temperature: float = 1.0  # sampling temperature: training log-probs are log_softmax(logits / temperature)
    mask_truncated_completions: bool = False
    offpolicy_mask: bool = True  # mask far-off-policy, negative-advantage sequences of external groups
    offpolicy_threshold: float = 1.0  # nats of (mean NLL - mean entropy); see offpolicy_sequence_mask

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"GRPOConfig: {msg}")

        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            bad(f"learning_rate must be a positive number, got {self.learning_rate}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.adam_epsilon <= 0:
            bad(f"adam_epsilon must be > 0, got {self.adam_epsilon}")
        if self.weight_decay < 0:
            bad(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not math.isfinite(self.max_grad_norm):
            bad(f"max_grad_norm must be finite, got {self.max_grad_norm}")
        if not 0.0 <= self.epsilon < 1.0:
            bad(f"epsilon must be in [0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and self.epsilon_high < 0:
            bad(f"epsilon_high must be >= 0, got {self.epsilon_high}")
        if self.delta is not None and not self.delta > 1.0 + self.eps_high:
            bad(f"delta must be > 1 + epsilon_high = {1.0 + self.eps_high}, got {self.delta}")
        if self.beta < 0 or not math.isfinite(self.beta):
            bad(f"beta must be >= 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            bad(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in SCALE_REWARDS:
            bad(f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        if self.num_iterations < 1:
            bad(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.micro_batch_size < 1:
            bad(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.max_completion_length < 1:
            bad(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if not self.temperature > 0:
            bad(f"temperature must be > 0, got {self.temperature}")
        if not self.offpolicy_threshold >= 0:
            bad(f"offpolicy_threshold must be >= 0, got {self.offpolicy_threshold}")

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclass(frozen=True)
class TrainGroup:
    """One prompt and its sampled completions, already tokenized with the LOCAL tokenizer and scored locally."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[tuple[int, ...], ...]
    rewards: tuple[float, ...]
    truncated: tuple[bool, ...]
    external: bool = False  # sampled by a peer's policy (off-policy for us)
    # per-completion advantages chosen by the caller (e.g. against the receiver's own baseline, node.mix);
    # None = the usual group-relative advantages from the rewards
    advantages: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.completion_ids)
        if self.advantages is not None and (len(self.advantages) != n or not all(math.isfinite(a) for a in self.advantages)):
            raise ValueError(f"TrainGroup: {n} completions need {n} finite advantages")
        if n == 0:
            raise ValueError("TrainGroup: needs at least one completion")
        if len(self.rewards) != n or len(self.truncated) != n:
            raise ValueError(
                f"TrainGroup: {n} completions but {len(self.rewards)} rewards and {len(self.truncated)} truncated flags"
            )
        if len(self.prompt_ids) == 0:
            raise ValueError("TrainGroup: empty prompt")
        if not all(math.isfinite(r) for r in self.rewards):
            raise ValueError("TrainGroup: rewards must be finite")


# -----------------------------------------------------------------------------
# pure pieces


def _group_stats(rewards: list[Tensor], scale_rewards: str) -> tuple[list[Tensor], list[Tensor]]:
    """Per-group advantages and per-group sample std for ragged groups (1-D tensors)."""
    stds = [r.std() if r.numel() > 1 else r.new_zeros(()) for r in rewards]  # sample std (N - 1), as TRL
    if scale_rewards == "batch":
        flat = torch.cat(rewards)
        batch_std = flat.std() if flat.numel() > 1 else flat.new_zeros(())
    advs = []
    for r, std in zip(rewards, stds):
        a = r - r.mean()  # an all-equal group gives exactly 0 here, whatever the scaling below
        if scale_rewards == "group":
            a = a / (std + STD_EPS)
        elif scale_rewards == "batch":
            a = a / (batch_std + STD_EPS)
        advs.append(a)
    return advs, stds


def group_advantages(rewards: Tensor, scale_rewards: str = "group") -> Tensor:
    """Advantages for a (groups x n) reward tensor: (r - group mean) / (std + 1e-4), std = sample std (N - 1)
    of the group ("group"), of the whole batch ("batch"), or no division ("none")."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (groups x n), got shape {tuple(rewards.shape)}")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    advs, _ = _group_stats(list(rewards.to(torch.float32)), scale_rewards)
    return torch.stack(advs)


def _entropy(logits: Tensor) -> Tensor:
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def per_token_logps_and_entropy(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, n_completion_tokens: int, temperature: float
) -> tuple[Tensor, Tensor]:
    """Log-prob of each of the last `n_completion_tokens` tokens of input_ids, and the entropy of the predicting
    distribution, both at the sampling temperature. Shapes (B, n_completion_tokens); entropy carries no gradient.

    Position ids count only real tokens, so a left-padded row gives the same numbers as the unpadded row."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    # +1: the logit at position t predicts token t+1; only the completion's logits are materialised
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=n_completion_tokens + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :].float() / temperature
    targets = input_ids[:, -n_completion_tokens:]
    # gather - logsumexp: no second (B, T, V) tensor (a full log_softmax) kept for backward
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    with torch.no_grad():  # row by row: bounds the extra memory to one (T, V) slice for large vocabularies
        entropy = torch.stack([_entropy(row) for row in logits])
    return logps, entropy


def per_token_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, n_completion_tokens: int, temperature: float = 1.0
) -> Tensor:
    """Like per_token_logps_and_entropy, without the entropy."""
    return per_token_logps_and_entropy(model, input_ids, attention_mask, n_completion_tokens, temperature)[0]


def offpolicy_sequence_mask(
    old_logps: Tensor, entropy: Tensor, completion_mask: Tensor, advantages: Tensor, threshold: float
) -> Tensor:
    """Sequences to KEEP (1.0) or drop (0.0) from the policy loss, for completions a PEER sampled.

    We do not know the peer's sampling log-probs, so the sampling-vs-local KL of DeepSeek-V3.2's off-policy
    sequence masking is replaced by a proxy: a sequence drawn from our own policy has mean per-token NLL close to
    the policy's mean per-token entropy on those positions (E[-log p] = H). A sequence is dropped when
      advantage < 0  and  mean_t(-old_logp_t) - mean_t(H_t) > threshold   (nats, over its completion tokens),
    i.e. when it pushes probability down on text our policy would rarely produce (large, noisy, unhelpful updates).
    Positive-advantage sequences are always kept: they are what sharing is for."""
    n = completion_mask.sum(-1).clamp(min=1.0)
    nll = -(old_logps * completion_mask).sum(-1) / n
    ent = (entropy * completion_mask).sum(-1) / n
    drop = (advantages < 0) & (nll - ent > threshold)
    return (~drop).float()


def loss_normalizer(n_sequences: int, n_tokens: float, cfg: GRPOConfig) -> float:
    """The denominator of the step's loss, from ALL sequences of the step (every micro-batch) and their active
    completion tokens (after mask_truncated_completions; off-policy-masked sequences still count, as in TRL)."""
    if cfg.loss_type in ("dapo", "bnpo"):
        return max(float(n_tokens), 1.0)
    if cfg.loss_type == "grpo":
        return float(max(n_sequences, 1))
    return float(max(n_sequences, 1) * cfg.max_completion_length)  # dr_grpo


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    ref_logps: Tensor | None,
    advantages: Tensor,
    completion_mask: Tensor,
    cfg: GRPOConfig,
    *,
    normalizer: float | None = None,
    sequence_mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss of one (micro-)batch. logps/old_logps/ref_logps/completion_mask: (B, T); advantages,
    sequence_mask: (B,). `normalizer` comes from loss_normalizer over the whole step (None: this batch alone).
    Summing the returned losses over micro-batches gives the loss of the whole batch.

    sequence_mask zeroes a sequence's policy term (off-policy masking) but, as in TRL, neither its KL term nor its
    tokens in the normaliser. Stats are over this batch's active tokens: fractions clip_low/clip_high/clip_region
    (TRL's definition: ratio outside the trust region on the side where the clip binds), kl (mean k3 term) and
    tokens (active-token count, to weight fractions when combining micro-batches)."""
    mask = completion_mask.to(logps.dtype)
    if normalizer is None:
        normalizer = loss_normalizer(mask.shape[0], float(mask.sum()), cfg)
    adv = advantages.unsqueeze(1)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1.0 - cfg.epsilon, 1.0 + cfg.eps_high)
    unclipped = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
    per_token = -torch.min(unclipped * adv, clipped * adv)
    if sequence_mask is not None:
        per_token = per_token * sequence_mask.unsqueeze(1)
    kl = None
    if cfg.beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss: beta != 0 needs ref_logps")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1.0  # k3 estimator of KL(pi || ref)
        if cfg.use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + cfg.beta * kl

    if cfg.loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / normalizer
    else:  # dapo, bnpo, dr_grpo differ only in the normaliser
        loss = (per_token * mask).sum() / normalizer

    with torch.no_grad():
        tokens = float(mask.sum())
        denom = max(tokens, 1.0)
        low = (ratio < 1.0 - cfg.epsilon) & (adv < 0)
        high = (ratio > 1.0 + cfg.eps_high) & (adv > 0)
        stats = {
            "clip_low": float((low * mask).sum()) / denom,
            "clip_high": float((high * mask).sum()) / denom,
            "clip_region": float(((low | high) * mask).sum()) / denom,
            "tokens": tokens,
        }
        if kl is not None:
            stats["kl"] = float((kl * mask).sum()) / denom
    return loss, stats


# -----------------------------------------------------------------------------
# the trainer


@dataclass(frozen=True)
class _Seq:
    prompt: tuple[int, ...]
    completion: tuple[int, ...]
    advantage: float
    truncated: bool
    external: bool


@dataclass
class _MicroBatch:
    input_ids: Tensor  # (b, P + C): prompt left-padded to P, completion right-padded to C
    attention_mask: Tensor
    completion_mask: Tensor  # (b, C), truncated completions zeroed when mask_truncated_completions
    advantages: Tensor  # (b,)
    external: Tensor  # (b,) bool
    n_completion: int  # C
    old_logps: Tensor | None = None
    ref_logps: Tensor | None = None
    entropy: Tensor | None = None
    sequence_mask: Tensor | None = None


class GRPOTrainer:
    """Owns the optimizer; `train_step(groups)` = num_iterations AdamW steps on one batch of rollout groups."""

    def __init__(
        self, model: nn.Module, config: GRPOConfig, *, pad_token_id: int, ref_model: nn.Module | None = None
    ) -> None:
        # a LoRA model (node.lora) is its own reference: the same weights with the adapters switched off, no copy
        self.ref_is_base = config.beta != 0.0 and ref_model is None and hasattr(model, "disable_adapter")
        if config.beta != 0.0 and ref_model is None and not self.ref_is_base:
            raise ValueError("GRPOTrainer: beta != 0 needs a ref_model (a frozen copy of the initial policy)")
        self.model = model
        self.config = config
        self.pad_token_id = pad_token_id
        self.ref_model = ref_model if config.beta != 0.0 else None
        if self.ref_model is not None:
            self.ref_model.eval().requires_grad_(False)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("GRPOTrainer: the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
        self.steps = 0  # optimizer steps taken so far
        # gradient probe (node.mix's adaptive J): when on, own and peers' sequences go in separate micro-batches and
        # the first iteration records a fixed subsample of each part's gradient in `last_probe`
        self.probe = False
        self.last_probe: dict[str, Tensor | float] | None = None
        self._probe_idx: list[Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def _micro_batches(self, seqs: list[_Seq]) -> list[_MicroBatch]:
        """Pad each micro-batch to its own widths: prompts on the left, completions on the right (TRL's layout)."""
        cfg, pad, out = self.config, self.pad_token_id, []
        for i in range(0, len(seqs), cfg.micro_batch_size):
            chunk = seqs[i : i + cfg.micro_batch_size]
            P = max(len(s.prompt) for s in chunk)
            C = max(max(len(s.completion) for s in chunk), 1)
            ids, att, cmask = [], [], []
            for s in chunk:
                lp, lc = len(s.prompt), len(s.completion)
                keep = 0.0 if (s.truncated and cfg.mask_truncated_completions) else 1.0
                ids.append([pad] * (P - lp) + list(s.prompt) + list(s.completion) + [pad] * (C - lc))
                att.append([0] * (P - lp) + [1] * (lp + lc) + [0] * (C - lc))
                cmask.append([keep] * lc + [0.0] * (C - lc))
            dev = self.device
            out.append(
                _MicroBatch(
                    input_ids=torch.tensor(ids, dtype=torch.long, device=dev),
                    attention_mask=torch.tensor(att, dtype=torch.long, device=dev),
                    completion_mask=torch.tensor(cmask, dtype=torch.float32, device=dev),
                    advantages=torch.tensor([s.advantage for s in chunk], dtype=torch.float32, device=dev),
                    external=torch.tensor([s.external for s in chunk], dtype=torch.bool, device=dev),
                    n_completion=C,
                )
            )
        return out

    def _set_old(self, mb: _MicroBatch, old_logps: Tensor, entropy: Tensor) -> None:
        """Record the pre-update policy's log-probs and entropy, and decide the off-policy mask from them."""
        cfg = self.config
        mb.old_logps, mb.entropy = old_logps, entropy
        if cfg.offpolicy_mask and bool(mb.external.any()):
            keep = offpolicy_sequence_mask(
                old_logps, entropy, mb.completion_mask, mb.advantages, cfg.offpolicy_threshold
            )
            mb.sequence_mask = torch.where(mb.external, keep, torch.ones_like(keep))

    def train_step(self, groups: list[TrainGroup]) -> dict[str, float]:
        cfg = self.config
        if not groups:
            raise ValueError("train_step: no groups")
        rewards = [torch.tensor(g.rewards, dtype=torch.float32) for g in groups]
        advs, stds = _group_stats(rewards, cfg.scale_rewards)
        advs = [a if g.advantages is None else torch.tensor(g.advantages, dtype=torch.float32) for g, a in zip(groups, advs)]
        flat_rewards = torch.cat(rewards)
        metrics: dict[str, float] = {
            "reward_mean": float(flat_rewards.mean()),
            "reward_std": float(torch.stack(stds).mean()),  # mean within-group std, as TRL logs it
            "frac_zero_std": sum(bool(torch.all(r == r[0])) for r in rewards) / len(groups),
            "n_local": float(sum(not g.external for g in groups)),
            "n_external": float(sum(g.external for g in groups)),
            "lr": float(self.optimizer.param_groups[0]["lr"]),
        }

        # zero-advantage groups add nothing to the policy loss: leave them out of the batch (and the normaliser),
        # as SAPO drops them from the pool; this also saves their forward/backward
        seqs = []
        for g, a in zip(groups, advs):
            if bool(torch.any(a != 0)):
                for comp, adv, trunc in zip(g.completion_ids, a.tolist(), g.truncated):
                    seqs.append(_Seq(g.prompt_ids, comp, adv, trunc, g.external))
        if self.probe:  # own sequences first, never sharing a micro-batch with peers'
            own_seqs = [q for q in seqs if not q.external]
            ext_seqs = [q for q in seqs if q.external]
            batches = (self._micro_batches(own_seqs) if own_seqs else []) + (
                self._micro_batches(ext_seqs) if ext_seqs else [])
            n_own_batches = (len(own_seqs) + cfg.micro_batch_size - 1) // cfg.micro_batch_size
        else:
            batches = self._micro_batches(seqs) if seqs else []
            n_own_batches = 0
        self.last_probe = None
        n_tokens = sum(float(mb.completion_mask.sum()) for mb in batches)
        normalizer = loss_normalizer(len(seqs), n_tokens, cfg)

        self.model.train()
        try:
            with torch.no_grad():
                for mb in batches:
                    # old log-probs are only a separate pass when several steps reuse them; with one step the
                    # training forward's detached log-probs ARE the old ones (ratio exactly 1, as in TRL)
                    if cfg.num_iterations > 1:
                        self._set_old(mb, *per_token_logps_and_entropy(
                            self.model, mb.input_ids, mb.attention_mask, mb.n_completion, cfg.temperature))
                    if self.ref_model is not None:
                        mb.ref_logps = per_token_logps(
                            self.ref_model, mb.input_ids, mb.attention_mask, mb.n_completion, cfg.temperature)
                    elif self.ref_is_base:
                        with self.model.disable_adapter():
                            mb.ref_logps = per_token_logps(
                                self.model, mb.input_ids, mb.attention_mask, mb.n_completion, cfg.temperature)

            losses, grad_norms = [], []
            sums = {"clip_low": 0.0, "clip_high": 0.0, "clip_region": 0.0, "kl": 0.0}  # token-weighted
            stat_tokens = 0.0
            stepped, nonfinite = 0, False
            for it in range(cfg.num_iterations):
                if not batches:
                    break
                self.optimizer.zero_grad(set_to_none=True)
                total = 0.0
                probe_own = None
                for j, mb in enumerate(batches):
                    if self.probe and it == 0 and j == n_own_batches:
                        probe_own = self._grad_sample()  # the own part of the gradient, before peers' is added
                    logps, entropy = per_token_logps_and_entropy(
                        self.model, mb.input_ids, mb.attention_mask, mb.n_completion, cfg.temperature)
                    if mb.old_logps is None:
                        self._set_old(mb, logps.detach(), entropy)
                    loss, st = grpo_loss(
                        logps, mb.old_logps, mb.ref_logps, mb.advantages, mb.completion_mask, cfg,
                        normalizer=normalizer, sequence_mask=mb.sequence_mask)
                    loss.backward()
                    total += float(loss.detach())
                    for k in sums:
                        sums[k] += st.get(k, 0.0) * st["tokens"]
                    stat_tokens += st["tokens"]
                if self.probe and it == 0:
                    full = self._grad_sample()
                    own_part = full if probe_own is None else probe_own
                    self.last_probe = {"own": own_part, "ext": full - own_part}
                if it == 0 and not self._anything_to_learn(batches):
                    break  # every sequence is masked or has zero advantage: a step would move weights on no signal
                max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                norm = float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
                if not math.isfinite(norm):
                    nonfinite = True  # a NaN/inf step would ruin the weights for good: drop it
                    break
                grad_norms.append(norm)
                self.optimizer.step()
                losses.append(total)
                stepped += 1
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            self.model.eval()  # generation runs in eval mode; dropout is 0 in our models anyway
        self.steps += stepped

        n_masked = sum(int((mb.sequence_mask == 0).sum()) for mb in batches if mb.sequence_mask is not None)
        ent_tokens = sum(float(mb.completion_mask.sum()) for mb in batches if mb.entropy is not None)
        ent_sum = sum(float((mb.entropy * mb.completion_mask).sum()) for mb in batches if mb.entropy is not None)
        denom = max(stat_tokens, 1.0)
        metrics.update(
            loss=sum(losses) / len(losses) if losses else 0.0,
            clip_low=sums["clip_low"] / denom,
            clip_high=sums["clip_high"] / denom,
            clip_region=sums["clip_region"] / denom,
            entropy=ent_sum / max(ent_tokens, 1.0),
            tokens=n_tokens,
            n_offpolicy_masked=float(n_masked),
            grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
            optimizer_steps=float(stepped),
            skipped=float(stepped == 0),
            nonfinite_grad=float(nonfinite),
        )
        if cfg.beta != 0.0:
            metrics["kl"] = sums["kl"] / denom
        return metrics

    def _grad_sample(self, max_coords: int = 1 << 20) -> Tensor:
        """The current gradient on a fixed random subset of coordinates (all of them for small models); inner products
        on it are proportional to the full ones in expectation, which is all the probe's comparisons need."""
        if self._probe_idx is None:
            total = sum(p.numel() for p in self.params)
            frac = min(1.0, max_coords / total)
            gen = torch.Generator().manual_seed(0)
            self._probe_idx = [
                torch.arange(p.numel()) if frac >= 1.0
                else torch.randperm(p.numel(), generator=gen)[: max(1, int(p.numel() * frac))].sort().values
                for p in self.params
            ]
        parts = []
        for p, idx in zip(self.params, self._probe_idx):
            g = p.grad
            flat = torch.zeros(len(idx)) if g is None else g.detach().reshape(-1)[idx.to(g.device)].float().cpu()
            parts.append(flat)
        return torch.cat(parts)

    @staticmethod
    def _anything_to_learn(batches: list[_MicroBatch]) -> bool:
        for mb in batches:
            live = (mb.advantages != 0) & (mb.completion_mask.sum(-1) > 0)
            if mb.sequence_mask is not None:
                live &= mb.sequence_mask > 0
            if bool(live.any()):
                return True
        return False
