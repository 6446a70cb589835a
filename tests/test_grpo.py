"""GRPO trainer: hand-computed losses for every aggregation, advantages, log-probs on a tiny Qwen2, accumulation,
off-policy masking, truncation masking and the skip-on-no-signal rule."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from node.grpo import (
    GRPOConfig,
    GRPOTrainer,
    TrainGroup,
    group_advantages,
    grpo_loss,
    offpolicy_sequence_mask,
    per_token_logps,
    per_token_logps_and_entropy,
)

LN2 = math.log(2.0)
PAD = 0


# -----------------------------------------------------------------------------
# a fixed tiny batch: 2 sequences x 3 completion tokens, ratios chosen so the clip binds on known tokens
#   seq 0: A = +1.0, ratios [1.0, 1.5, 0.7], mask [1, 1, 1]
#   seq 1: A = -0.5, ratios [1.0, 0.5, 3.0], mask [1, 1, 0]   (the ratio-3 token is padding)
# eps 0.2 / eps_high 0.28, per-token loss -min(r A, clip(r, 0.8, 1.28) A):
#   seq 0: [-1.0, -1.28 (high clip), -0.7]     sum -2.98
#   seq 1: [+0.5, +0.4 (low clip), (1.5 masked)] sum +0.9
#   active tokens 5; token sum -2.08

LOGPS = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]])
RATIOS = torch.tensor([[1.0, 1.5, 0.7], [1.0, 0.5, 3.0]])
OLD = LOGPS - RATIOS.log()
ADV = torch.tensor([1.0, -0.5])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def cfg(**kw) -> GRPOConfig:
    return GRPOConfig(**{"learning_rate": 1e-3, **kw})


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("dapo", -2.08 / 5),  # token sum / active tokens
        ("bnpo", -2.08 / 5),
        ("grpo", (-2.98 / 3 + 0.9 / 2) / 2),  # mean of per-sequence means = -0.2716667
        ("dr_grpo", -2.08 / (2 * 4)),  # token sum / (B x max_completion_length=4)
    ],
)
def test_loss_with_clipping_every_loss_type(loss_type, expected):
    loss, st = grpo_loss(LOGPS, OLD, None, ADV, MASK, cfg(loss_type=loss_type, max_completion_length=4))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert st["tokens"] == 5
    assert st["clip_low"] == pytest.approx(1 / 5)  # seq 1 token 1: r 0.5 < 0.8 with A < 0
    assert st["clip_high"] == pytest.approx(1 / 5)  # seq 0 token 1: r 1.5 > 1.28 with A > 0
    assert st["clip_region"] == pytest.approx(2 / 5)


@pytest.mark.parametrize(
    "loss_type, expected",
    [
        # ratio 1 everywhere: per-token loss is -A: seq 0 [-1,-1,-1], seq 1 [0.5, 0.5]
        ("dapo", (-3.0 + 1.0) / 5),
        ("bnpo", (-3.0 + 1.0) / 5),
        ("grpo", (-1.0 + 0.5) / 2),
        ("dr_grpo", (-3.0 + 1.0) / (2 * 4)),
    ],
)
def test_loss_without_clipping_every_loss_type(loss_type, expected):
    loss, st = grpo_loss(LOGPS, LOGPS.clone(), None, ADV, MASK, cfg(loss_type=loss_type, max_completion_length=4))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert st["clip_low"] == st["clip_high"] == st["clip_region"] == 0.0


def test_gradient_is_zero_on_clipped_tokens():
    lp = LOGPS.clone().requires_grad_(True)
    loss, _ = grpo_loss(lp, OLD, None, ADV, MASK, cfg())
    loss.backward()
    # d/dlogp of -r A / 5 = -r A / 5 where the unclipped branch is taken; 0 where the clip binds or masked
    expected = torch.tensor([[-1.0 / 5, 0.0, -0.7 / 5], [0.5 / 5, 0.0, 0.0]])
    assert torch.allclose(lp.grad, expected, atol=1e-6)


def test_epsilon_high_defaults_to_epsilon():
    c = cfg(epsilon_high=None)
    assert c.eps_high == 0.2
    loss, st = grpo_loss(LOGPS, OLD, None, ADV, MASK, c)
    # seq 0 token 1 now clips at 1.2: token sum -1 - 1.2 - 0.7 + 0.5 + 0.4 = -2.0
    assert loss.item() == pytest.approx(-2.0 / 5, abs=1e-6)


def test_delta_caps_the_unclipped_ratio():
    full = torch.ones_like(MASK)  # unmask seq 1's ratio-3 token, where A < 0 so the clip does not bind
    c_plain, c_delta = cfg(), cfg(delta=1.4)
    loss, st = grpo_loss(LOGPS, OLD, None, ADV, full, c_plain)
    # seq 1 token 2: -min(3 * -0.5, 1.28 * -0.5) = 1.5; token sum -2.98 + 0.5 + 0.4 + 1.5 = -0.58
    assert loss.item() == pytest.approx(-0.58 / 6, abs=1e-6)
    loss, st = grpo_loss(LOGPS, OLD, None, ADV, full, c_delta)
    # capped: -min(1.4 * -0.5, 1.28 * -0.5) = 0.7; token sum -2.98 + 0.5 + 0.4 + 0.7 = -1.38
    assert loss.item() == pytest.approx(-1.38 / 6, abs=1e-6)
    assert st["clip_region"] == pytest.approx(2 / 6)


def test_beta_adds_bias_corrected_k3_kl():
    # ref - logp = d; k3(d) = e^d - d - 1: k3(ln2) = 0.30685282, k3(-ln2) = 0.19314718, k3(0) = 0
    d = torch.tensor([[0.0, LN2, -LN2], [LN2, 0.0, 0.0]])
    ref = LOGPS + d
    # bias-corrected (x ratio): 0.30685282 * 1.5 + 0.19314718 * 0.7 + 0.30685282 * 1.0 = 0.90233508
    loss, st = grpo_loss(LOGPS, OLD, ref, ADV, MASK, cfg(beta=0.1))
    assert loss.item() == pytest.approx((-2.08 + 0.1 * 0.90233508) / 5, abs=1e-6)
    assert st["kl"] == pytest.approx(0.90233508 / 5, abs=1e-6)
    # without the correction: 0.30685282 + 0.19314718 + 0.30685282 = 0.80685282
    loss, st = grpo_loss(LOGPS, OLD, ref, ADV, MASK, cfg(beta=0.1, use_bias_correction_kl=False))
    assert loss.item() == pytest.approx((-2.08 + 0.1 * 0.80685282) / 5, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(LOGPS, OLD, None, ADV, MASK, cfg(beta=0.1))


def test_sequence_mask_zeroes_policy_term_but_keeps_normalizer():
    loss, _ = grpo_loss(LOGPS, OLD, None, ADV, MASK, cfg(), sequence_mask=torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(-2.98 / 5, abs=1e-6)


def test_explicit_normalizer_splits_a_batch_exactly():
    c = cfg(loss_type="grpo")
    whole, _ = grpo_loss(LOGPS, OLD, None, ADV, MASK, c)
    parts = sum(grpo_loss(LOGPS[i : i + 1], OLD[i : i + 1], None, ADV[i : i + 1], MASK[i : i + 1], c, normalizer=2.0)[0]
                for i in range(2))
    assert parts.item() == pytest.approx(whole.item(), abs=1e-7)


# -----------------------------------------------------------------------------
# advantages


REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])


def test_group_advantages_sample_std_plus_1e4():
    a = group_advantages(REWARDS, "group")
    # group 0: mean 0.5, sample std sqrt(1/3) = 0.57735027 -> 0.5 / 0.57745027 = 0.86587543
    assert torch.allclose(a[0], torch.tensor([0.86587543, -0.86587543, -0.86587543, 0.86587543]), atol=1e-6)
    # group 1: all equal -> exactly 0 (no 0/eps noise)
    assert torch.equal(a[1], torch.zeros(4))
    # group 2: mean 0.25, sample std 0.5 -> 0.75 / 0.5001, -0.25 / 0.5001
    assert torch.allclose(a[2], torch.tensor([-0.49990002, -0.49990002, -0.49990002, 1.49970006]), atol=1e-6)


def test_batch_and_none_scaling():
    a = group_advantages(REWARDS, "batch")
    # batch: 12 rewards, 7 ones: sample var 420/1584 -> std 0.51492864; centred on each GROUP's mean
    s = math.sqrt(420 / 1584) + 1e-4
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / s, atol=1e-6)
    assert torch.equal(a[1], torch.zeros(4))
    assert torch.allclose(a[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]) / s, atol=1e-6)
    a = group_advantages(REWARDS, "none")
    assert torch.equal(a, torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]]))


def test_config_validation():
    for bad in [dict(loss_type="ppo"), dict(scale_rewards="max"), dict(learning_rate=0.0), dict(num_iterations=0),
                dict(micro_batch_size=0), dict(temperature=0.0), dict(delta=1.1), dict(epsilon=1.5), dict(beta=-1.0)]:
        with pytest.raises(ValueError, match="GRPOConfig"):
            GRPOConfig(**bad)
    with pytest.raises(ValueError):
        TrainGroup(prompt_ids=(1,), completion_ids=((2,),), rewards=(1.0, 0.0), truncated=(False,))


# -----------------------------------------------------------------------------
# a random tiny Qwen2 (built here, no shipped assets)


def tiny_model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    conf = Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=True)
    return Qwen2ForCausalLM(conf).eval()


def test_per_token_logps_matches_manual_log_softmax():
    model = tiny_model()
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    att = torch.ones_like(ids)
    with torch.no_grad():
        lp, ent = per_token_logps_and_entropy(model, ids, att, 3, temperature=0.7)
        logits = model(input_ids=ids).logits[:, 2:5] / 0.7
        ref = F.log_softmax(logits, -1).gather(-1, ids[:, 3:].unsqueeze(-1)).squeeze(-1)
        ref_ent = -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1)
    assert lp.shape == (2, 3)
    assert torch.allclose(lp, ref, atol=1e-5)
    assert torch.allclose(ent, ref_ent, atol=1e-5)


def test_per_token_logps_left_padding_matches_unpadded():
    model = tiny_model()
    short = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[PAD, PAD, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8]])
    att = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = per_token_logps(model, short, torch.ones_like(short), 2)
        both = per_token_logps(model, padded, att, 2)
    assert torch.allclose(both[0:1], alone, atol=1e-5)


# -----------------------------------------------------------------------------
# the trainer


def groups_fixture(external: bool = False) -> list[TrainGroup]:
    return [
        TrainGroup(prompt_ids=(3, 4, 5), completion_ids=((6, 7, 1), (8, 1), (6, 9, 9, 1)),
                   rewards=(1.0, 0.0, 0.0), truncated=(False, False, True), external=external),
        TrainGroup(prompt_ids=(10, 11), completion_ids=((12, 1), (13, 14, 1), (12, 12, 1), (15,)),
                   rewards=(1.0, 1.0, 0.0, 0.0), truncated=(False, False, False, True), external=external),
        TrainGroup(prompt_ids=(4,), completion_ids=((5, 1), (6, 1)), rewards=(0.0, 0.0), truncated=(False, False)),
    ]


def capture_grads(trainer: GRPOTrainer) -> list[list[torch.Tensor]]:
    """Replace optimizer.step by a recorder of the accumulated gradients."""
    seen: list[list[torch.Tensor]] = []
    trainer.optimizer.step = lambda *a, **k: seen.append([p.grad.clone() for p in trainer.params])
    return seen


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_microbatch_accumulation_equals_one_big_batch(loss_type):
    grads = []
    for mbs in (64, 2):
        model = tiny_model()
        t = GRPOTrainer(model, cfg(loss_type=loss_type, micro_batch_size=mbs, max_grad_norm=0.0), pad_token_id=PAD)
        seen = capture_grads(t)
        t.train_step(groups_fixture())
        grads.append(seen[0])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_train_step_metrics_and_single_iteration_ratio_is_one():
    t = GRPOTrainer(tiny_model(), cfg(learning_rate=1e-2), pad_token_id=PAD)
    m = t.train_step(groups_fixture())
    assert m["clip_low"] == m["clip_high"] == m["clip_region"] == 0.0  # ratio exactly 1
    assert m["reward_mean"] == pytest.approx(3 / 9)
    assert m["frac_zero_std"] == pytest.approx(1 / 3)
    assert m["n_local"] == 3 and m["n_external"] == 0
    # the zero-advantage group is left out: tokens = 3+2+4 + 2+3+3+1 = 18
    assert m["tokens"] == 18
    assert m["optimizer_steps"] == 1 and m["skipped"] == 0.0
    assert m["grad_norm"] > 0 and m["entropy"] > 0 and "kl" not in m
    assert t.model.training is False


def test_step_raises_logprob_of_rewarded_completion():
    model = tiny_model()
    t = GRPOTrainer(model, cfg(learning_rate=3e-3, num_iterations=4), pad_token_id=PAD)
    ids, att = torch.tensor([[3, 4, 5, 6, 7, 1]]), torch.ones(1, 6, dtype=torch.long)
    with torch.no_grad():
        before = per_token_logps(model, ids, att, 3).sum()
    m = t.train_step(groups_fixture())
    with torch.no_grad():
        after = per_token_logps(model, ids, att, 3).sum()
    assert after > before + 0.05
    assert m["optimizer_steps"] == 4
    assert m["clip_region"] > 0  # later iterations move off the old policy


def test_beta_with_reference_model_reports_kl():
    model = tiny_model()
    with pytest.raises(ValueError, match="ref_model"):
        GRPOTrainer(model, cfg(beta=0.04), pad_token_id=PAD)
    t = GRPOTrainer(model, cfg(beta=0.04), pad_token_id=PAD, ref_model=copy.deepcopy(model))
    m = t.train_step(groups_fixture())
    assert m["kl"] == 0.0  # first step: the policy is the reference


def test_all_zero_advantage_step_does_not_move_weights():
    model = tiny_model()
    t = GRPOTrainer(model, cfg(weight_decay=0.1, num_iterations=2), pad_token_id=PAD)
    before = [p.detach().clone() for p in model.parameters()]
    flat = [TrainGroup(prompt_ids=(3,), completion_ids=((4, 1), (5, 1)), rewards=(1.0, 1.0), truncated=(False, False)),
            TrainGroup(prompt_ids=(6,), completion_ids=((7, 1), (8, 1)), rewards=(0.0, 0.0), truncated=(False, False))]
    m = t.train_step(flat)
    assert m["skipped"] == 1.0 and m["optimizer_steps"] == 0 and m["tokens"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_mask_truncated_completions():
    t = GRPOTrainer(tiny_model(), cfg(mask_truncated_completions=True), pad_token_id=PAD)
    m = t.train_step(groups_fixture())
    assert m["tokens"] == 18 - 4 - 1  # the two truncated completions add no tokens
    assert m["reward_mean"] == pytest.approx(3 / 9)  # but their rewards still count
    # every completion of the only mixed-reward group truncated -> nothing to learn -> no step
    g = TrainGroup(prompt_ids=(3,), completion_ids=((4, 4), (5, 5)), rewards=(1.0, 0.0), truncated=(True, True))
    model = tiny_model()
    t = GRPOTrainer(model, cfg(mask_truncated_completions=True), pad_token_id=PAD)
    before = [p.detach().clone() for p in model.parameters()]
    m = t.train_step([g])
    assert m["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_offpolicy_sequence_mask_rule():
    old = torch.tensor([[-3.0, -3.0], [-3.0, -3.0], [-0.5, -0.5], [-3.0, -9.0]])
    ent = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([-1.0, 1.0, -1.0, -1.0])
    # gaps (mean NLL - mean entropy): 2.0, 2.0, -0.5, 2.0 (the -9 is padding); threshold 1.5
    keep = offpolicy_sequence_mask(old, ent, mask, adv, 1.5)
    assert keep.tolist() == [0.0, 1.0, 1.0, 0.0]  # dropped: negative advantage AND far off-policy
    assert offpolicy_sequence_mask(old, ent, mask, adv, 2.5).tolist() == [1.0] * 4


def test_offpolicy_masking_in_trainer_masks_exactly_external_negative_far_sequences():
    model = tiny_model()
    groups = groups_fixture(external=True)
    # the gap of every sequence under the initial policy, computed independently
    gaps, advs = [], []
    for g in groups[:2]:
        a = group_advantages(torch.tensor([g.rewards]), "group")[0]
        for comp, adv in zip(g.completion_ids, a.tolist()):
            ids = torch.tensor([list(g.prompt_ids) + list(comp)])
            with torch.no_grad():
                lp, ent = per_token_logps_and_entropy(model, ids, torch.ones_like(ids), len(comp), 1.0)
            gaps.append(float(-lp.mean() - ent.mean()))
            advs.append(adv)
    neg = sorted(g for g, a in zip(gaps, advs) if a < 0)
    threshold = (neg[1] + neg[2]) / 2  # between the 2nd and 3rd smallest gap: exactly len(neg) - 2 masked
    expected = sum(1 for g, a in zip(gaps, advs) if a < 0 and g > threshold)
    assert expected == len(neg) - 2 >= 1
    for num_iterations in (1, 2):
        t = GRPOTrainer(copy.deepcopy(model), cfg(offpolicy_threshold=threshold, num_iterations=num_iterations),
                        pad_token_id=PAD)
        m = t.train_step(groups)
        assert m["n_offpolicy_masked"] == expected and m["n_external"] == 2
    # local groups, or the switch off: nothing masked
    t = GRPOTrainer(copy.deepcopy(model), cfg(offpolicy_threshold=threshold), pad_token_id=PAD)
    assert t.train_step(groups_fixture(external=False))["n_offpolicy_masked"] == 0
    t = GRPOTrainer(copy.deepcopy(model), cfg(offpolicy_threshold=threshold, offpolicy_mask=False), pad_token_id=PAD)
    assert t.train_step(groups)["n_offpolicy_masked"] == 0


def test_nonfinite_gradient_skips_the_step():
    model = tiny_model()
    t = GRPOTrainer(model, cfg(), pad_token_id=PAD)
    before = [p.detach().clone() for p in model.parameters()]
    model.model.norm.weight.register_hook(lambda g: g * float("nan"))
    m = t.train_step(groups_fixture())
    assert m["nonfinite_grad"] == 1.0 and m["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
