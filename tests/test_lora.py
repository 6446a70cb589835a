"""LoRA (node.lora): only the adapters train and hold optimizer state, checkpoints hold the adapters and resume bit for
bit, the KL reference is the base with the adapters off, and merged_model folds the adapters into a plain model."""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from node.checkpoint import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CheckpointError, load_checkpoint, save_checkpoint, \
    snapshot
from node.config import ConfigError, NodeConfig
from node.grpo import GRPOConfig, GRPOTrainer, TrainGroup, per_token_logps
from node.lora import LoraSettings, adapter_state_dict, apply_lora, is_lora, merged_model

VOCAB = 64
PAD = 0


def base_model(seed: int = 0) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=64)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).eval()


def lora_model(base_seed: int = 0, lora_seed: int = 0, dropout: float = 0.1, r: int = 4) -> torch.nn.Module:
    base = base_model(base_seed)
    torch.manual_seed(lora_seed)  # the adapters' A matrices come from torch's RNG
    return apply_lora(base, LoraSettings(r=r, alpha=8, dropout=dropout))


def groups(rng: random.Random) -> list[TrainGroup]:
    """Two groups of random token sequences with mixed rewards; shapes from the python RNG."""
    out = []
    for _ in range(2):
        n = rng.randint(3, 5)
        comps = tuple(tuple(rng.randrange(1, VOCAB) for _ in range(rng.randint(2, 6))) for _ in range(n))
        rewards = tuple(float(rng.random() < 0.5) for _ in range(n - 1)) + (0.5,)
        out.append(TrainGroup(tuple(rng.randrange(1, VOCAB) for _ in range(4)), comps, rewards, (False,) * n))
    return out


def trainer(model: torch.nn.Module, **kw) -> GRPOTrainer:
    conf = dict(learning_rate=1e-2, micro_batch_size=4, max_grad_norm=1.0, weight_decay=0.1)
    return GRPOTrainer(model, GRPOConfig(**{**conf, **kw}), pad_token_id=PAD)


def test_only_adapters_train_and_hold_optimizer_state():
    model = lora_model()
    t = trainer(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert t.params and all("lora_" in names[id(p)] for p in t.params)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    m = t.train_step(groups(random.Random(0)))
    assert m["optimizer_steps"] == 1
    # AdamW state exists for the adapters only: 2 matrices (A, B) for each of the 7 linear layers of 2 blocks
    assert len(t.optimizer.state) == len(t.params) == 2 * 7 * 2
    assert all(id(p) in {id(q) for q in t.params} for p in t.optimizer.state)
    after = dict(model.named_parameters())
    assert all(torch.equal(v, after[n]) for n, v in base_before.items())  # the base never moves
    assert any(not torch.equal(v, after[n]) for n, v in lora_before.items())
    trainable = sum(p.numel() for p in t.params)
    assert trainable < 0.25 * sum(p.numel() for p in model.parameters())


def test_lora_resume_is_bit_identical(tmp_path: Path):
    n = 6
    # Straight run (dropout 0.1: the torch RNG drives training too, so it must be restored).
    model = lora_model()
    t = trainer(model)
    rng = random.Random(123)
    torch.manual_seed(1)
    for _ in range(n):
        t.train_step(groups(rng))
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    # Half, checkpoint from a snapshot (as the node does), then a fresh start with other adapters and RNG positions.
    model = lora_model()
    t = trainer(model)
    rng = random.Random(123)
    torch.manual_seed(1)
    for _ in range(n // 2):
        t.train_step(groups(rng))
    snap = snapshot(model, t.optimizer, rng)
    path = save_checkpoint(tmp_path, round=n // 2, model=snap.model, optimizer=snap.optimizer, config={},
                           model_name="tiny-qwen", rng=None, rng_state=snap.rng_state)
    saved = load_file(str(path / MODEL_FILE))
    assert saved and all("lora_" in k for k in saved)  # adapters only: the base comes from the model source
    assert set(saved) == set(adapter_state_dict(model))
    assert len(load_file(str(path / OPTIMIZER_FILE))) == 3 * len(t.params)  # step, exp_avg, exp_avg_sq per adapter
    info = json.loads((path / STATE_FILE).read_text())["model"]["lora"]
    assert info["r"] == 4 and info["alpha"] == 8 and info["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    del model, t

    model2 = lora_model(lora_seed=7)
    t2 = trainer(model2)
    rng2 = random.Random(999)
    torch.manual_seed(999)
    load_checkpoint(path, model=model2, optimizer=t2.optimizer, rng=rng2)
    for _ in range(n - n // 2):
        t2.train_step(groups(rng2))
    resumed = model2.state_dict()
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k

    # Control: the same checkpoint without the RNG states restored gives another continuation.
    model3 = lora_model(lora_seed=7)
    t3 = trainer(model3)
    load_checkpoint(path, model=model3, optimizer=t3.optimizer, rng=None)
    torch.manual_seed(5)
    rng3 = random.Random(5)
    for _ in range(n - n // 2):
        t3.train_step(groups(rng3))
    assert not all(torch.equal(straight[k], v) for k, v in model3.state_dict().items())


def test_lora_checkpoint_refuses_another_base_or_other_settings(tmp_path: Path):
    model = lora_model()
    t = trainer(model)
    t.train_step(groups(random.Random(0)))
    path = save_checkpoint(tmp_path, round=0, model=model, optimizer=t.optimizer, config={}, model_name="m", rng=None)

    other_base = lora_model(base_seed=1)
    before = {k: v.clone() for k, v in other_base.state_dict().items()}
    with pytest.raises(CheckpointError, match="another base model"):
        load_checkpoint(path, model=other_base, optimizer=None, rng=None)
    assert all(torch.equal(before[k], v) for k, v in other_base.state_dict().items())  # untouched
    with pytest.raises(CheckpointError, match="--lora-r 4"):
        load_checkpoint(path, model=base_model(0), optimizer=None, rng=None)
    with pytest.raises(CheckpointError, match="--lora-r 4, this node has 8"):
        load_checkpoint(path, model=lora_model(r=8), optimizer=None, rng=None)
    full = tmp_path / "full"
    plain = base_model(0)
    save_checkpoint(full, round=0, model=plain, optimizer=None, config={}, model_name="m", rng=None)
    with pytest.raises(CheckpointError, match="--lora-r 0"):
        load_checkpoint(full / "round-000000", model=lora_model(), optimizer=None, rng=None)
    # same base loaded in another dtype: still the same base (the fingerprint rounds to bf16)
    again = lora_model(lora_seed=3)
    again.to(torch.bfloat16).to(torch.float32)
    load_checkpoint(path, model=again, optimizer=None, rng=None)
    assert all(torch.equal(v, adapter_state_dict(again)[k]) for k, v in adapter_state_dict(model).items())


def test_kl_reference_is_the_base_with_adapters_off():
    model = lora_model(dropout=0.0)
    frozen_base = copy.deepcopy(base_model(0))
    t = trainer(model, beta=0.1, learning_rate=3e-2)
    assert t.ref_model is None and t.ref_is_base  # no copy of the weights
    m0 = t.train_step(groups(random.Random(0)))
    assert m0["kl"] == 0.0  # B = 0 at the start: adapters on or off compute the same
    for s in range(1, 4):
        m = t.train_step(groups(random.Random(s)))
    assert m["kl"] > 0
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    att = torch.ones_like(ids)
    with torch.no_grad(), model.disable_adapter():
        off = per_token_logps(model, ids, att, 3)
    with torch.no_grad():
        on = per_token_logps(model, ids, att, 3)
        ref = per_token_logps(frozen_base, ids, att, 3)
    assert torch.equal(off, ref) and not torch.allclose(on, ref)


def test_merged_model_is_a_plain_model_computing_the_same():
    model = lora_model(dropout=0.0)
    t = trainer(model, learning_rate=3e-2)
    for s in range(3):
        t.train_step(groups(random.Random(s)))
    merged = merged_model(model)
    assert isinstance(merged, Qwen2ForCausalLM) and not is_lora(merged)
    assert not any("lora_" in k for k in merged.state_dict())
    assert is_lora(model) and any("lora_" in k for k in model.state_dict())  # the training model keeps its adapters
    ids = torch.tensor([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        a, b, base = model(input_ids=ids).logits, merged(input_ids=ids).logits, base_model(0)(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, base, atol=1e-3)


def test_node_config_lora_settings():
    assert NodeConfig().lora_r == 0
    assert NodeConfig(lora_r=8).learning_rate == 3e-4  # the tiny model's LoRA default (scripts/bench_lora.py)
    assert NodeConfig(model="qwen-0.5b", lora_r=8).learning_rate == 1e-5
    assert NodeConfig(model="qwen-0.5b").learning_rate == 1e-6
    assert NodeConfig(lora_r=8, learning_rate=5e-4).learning_rate == 5e-4
    for bad in ({"lora_r": -1}, {"lora_dropout": 1.0}, {"lora_r": 4, "lora_target_modules": " , "}):
        with pytest.raises(ConfigError):
            NodeConfig(**bad)


def test_learner_wraps_the_policy_and_unknown_targets_are_one_sentence():
    from node.learner import Learner
    from node.policy import load_policy

    policy = load_policy("tiny")
    learner = Learner(policy, NodeConfig(offline=True, lora_r=4, beta=0.04), random.Random(0))
    assert is_lora(policy.model) and learner.trainer.model is policy.model and learner.trainer.ref_is_base
    groups_ = learner.rollout(0, n=2)
    assert len(groups_) == 2 and all(len(g.completions) == 8 for g in groups_)
    with pytest.raises(ConfigError, match="does not fit this model"):
        Learner(load_policy("tiny"), NodeConfig(offline=True, lora_r=4, lora_target_modules="no_such_proj"),
                random.Random(0))


def test_node_runtime_lora_resume_matches_a_straight_run(tmp_path: Path):
    """The node's own path: a LoRA run of 6 rounds, and one of 3 rounds + resume for 3 more, end bit-identical."""
    import trio

    from node.checkpoint import latest_checkpoint
    from node.policy import load_policy
    from node.run import NodeRuntime
    from protocol.identity import Identity

    def run(cfg: NodeConfig) -> NodeRuntime:
        node = NodeRuntime(cfg, ident, load_policy("tiny"))
        if cfg.resume:
            node.resume()
        trio.run(node.run)
        return node

    torch.set_num_threads(1)
    ident = Identity.generate()
    base = dict(offline=True, questions_per_round=4, group_size=4, checkpoint_every=1, seed=3, lora_r=4,
                lora_dropout=0.05, beta=0.02)
    straight = run(NodeConfig(rounds=6, checkpoint_dir=str(tmp_path / "a"), **base))
    run(NodeConfig(rounds=3, checkpoint_dir=str(tmp_path / "b"), **base))
    resumed = run(NodeConfig(rounds=6, checkpoint_dir=str(tmp_path / "b"), resume=True, **base))
    assert resumed.round == 6 and resumed.last_saved == 5
    a = dict(straight.policy.model.named_parameters())
    moved = 0
    for name, p in resumed.policy.model.named_parameters():
        assert torch.equal(p, a[name]), name
        moved += "lora_B" in name and bool(p.abs().sum() > 0)
    assert moved > 0  # the adapters trained (B starts at zero)
    ckpt = latest_checkpoint(tmp_path / "b")
    assert all("lora_" in k for k in load_file(str(ckpt / MODEL_FILE)))
    # a LoRA checkpoint is a small fraction of the model
    assert (ckpt / MODEL_FILE).stat().st_size < 0.2 * sum(p.numel() * 4 for p in a.values())
