"""node.memory_plan: the shape arithmetic matches real models, and `join` refuses a run that will not fit, in one
sentence naming settings that would, before any weight is read (`join --dry-run` prints the plan)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen2ForCausalLM, Qwen3Config

from node.memory_plan import GiB, ModelShape, Settings, plan

ROOT = Path(__file__).resolve().parents[1]
QWEN05 = dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
              intermediate_size=4864, tie_word_embeddings=True)
QWEN15 = dict(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
              intermediate_size=8960, tie_word_embeddings=True)


def meta_params(config) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("config", [
    Qwen2Config(**QWEN05), Qwen2Config(**QWEN15),
    LlamaConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4,
                intermediate_size=700, tie_word_embeddings=False),
    Qwen3Config(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=96, intermediate_size=512, tie_word_embeddings=True),
], ids=["qwen2.5-0.5b", "qwen2.5-1.5b", "llama-untied", "qwen3-head-dim"])
def test_parameter_count_matches_the_model(config):
    shape = ModelShape.from_config(config)
    assert shape.params == meta_params(config)
    # and from a config.json dict, as the plan reads it before anything loads
    assert ModelShape.from_config(json.loads(config.to_json_string())).params == shape.params


def test_lora_parameter_count_matches_peft():
    from node.lora import LoraSettings, apply_lora

    conf = Qwen2Config(vocab_size=500, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    shape = ModelShape.from_config(conf)
    for targets, spec in (("all-linear", "all-linear"), (["q_proj", "v_proj"], "q_proj,v_proj")):
        model = apply_lora(Qwen2ForCausalLM(conf), LoraSettings(r=8, alpha=16, target_modules=spec))
        assert shape.lora_params(8, targets) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_the_plan_moves_the_way_the_settings_do():
    shape = ModelShape.from_config(Qwen2Config(**QWEN05))
    s = Settings(micro_batch_size=4, train_sequences=64, gen_micro_batch=16, max_new_tokens=256)
    full, lora = plan(shape, s), plan(shape, replace(s, lora_r=16))
    # LoRA: no gradients or AdamW state for the 494M base weights (fp32: 3 x 1.84 GiB), no full snapshot
    assert full.items["optimizer"] == 2 * shape.params * 4 and lora.items["optimizer"] < 0.02 * full.items["optimizer"]
    assert lora.peak < full.peak - 5 * GiB
    assert plan(shape, replace(s, micro_batch_size=2)).train_peak < full.train_peak
    assert plan(shape, replace(s, gen_micro_batch=8)).items["kv cache"] * 2 == full.items["kv cache"]
    assert plan(shape, replace(s, beta=0.04)).items["reference"] == shape.params * 4  # a full copy...
    assert plan(shape, replace(s, beta=0.04, lora_r=16)).items["reference"] == 0  # ...but not with LoRA
    bf16 = plan(shape, replace(s, dtype_bytes=2, device_type="cuda"))
    assert bf16.items["weights"] * 2 == full.items["weights"] and bf16.host_extra > 0


def _join(args: list[str], tmp: Path, gib: float | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SWARM_NODE_HOME": str(tmp / "home")}
    env.pop("SWARM_NODE_MEMORY_GIB", None)
    if gib is not None:
        env["SWARM_NODE_MEMORY_GIB"] = str(gib)
    return subprocess.run([sys.executable, "-m", "node.cli", "join", "--offline", "--rounds", "1", "--device", "cpu",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def qwen05_config_only(tmp_path_factory) -> Path:
    """A Qwen2.5-0.5B-shaped model directory with a config.json and NO weights: anything that loads them fails."""
    d = tmp_path_factory.mktemp("q05")
    Qwen2Config(**QWEN05).save_pretrained(d)
    assert sorted(p.name for p in d.iterdir()) == ["config.json"]
    return d


def test_join_refuses_in_one_sentence_naming_settings_that_fit(tmp_path, qwen05_config_only):
    res = _join(["--model", str(qwen05_config_only)], tmp_path, gib=8)
    assert res.returncode == 2, res.stderr[-2000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].count(". ") == 0, res.stderr  # one sentence
    msg = errors[0]
    assert "of cpu memory at its peak, but 8.0 GiB is free" in msg and "would need about" in msg
    assert "Traceback" not in res.stderr and "could not be loaded" not in res.stderr  # refused before any load
    # full fp32 training of 494M weights needs ~5.5 GiB for weights + AdamW alone: the fix is LoRA, and it fits
    flags = msg.split("GiB is free; ")[1].split(" would need")[0].split()
    assert "--lora-r" in flags, msg
    dry = _join(["--model", str(qwen05_config_only), "--dry-run", *flags], tmp_path, gib=8)
    assert dry.returncode == 0 and dry.stdout.rstrip().endswith("fits"), dry.stdout + dry.stderr


def test_dry_run_prints_the_plan_and_loads_nothing(tmp_path, qwen05_config_only):
    res = _join(["--model", str(qwen05_config_only), "--dry-run", "--lora-r", "16", "--micro-batch-size", "2",
                 "--gen-micro-batch", "16"], tmp_path, gib=64)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "memory plan: 0.49B params, float32, LoRA r=16, on cpu" in out and "64.00 GiB free" in out
    for term in ("weights", "adapters", "optimizer", "activations", "logits", "kv cache", "peak training"):
        assert term in out
    assert not (tmp_path / "home" / "checkpoints").exists()  # nothing started
    over = _join(["--model", str(qwen05_config_only), "--dry-run"], tmp_path, gib=6)
    assert over.returncode == 1 and "does NOT fit" in over.stdout and "would need about" in over.stdout
    assert "even at micro-batch 1, this run needs" in over.stdout  # no micro-batch given: 1 was tried
    # no micro-batch given: the plan picks them and says why, before the plan (whose last line is the verdict)
    auto = _join(["--model", str(qwen05_config_only), "--dry-run"], tmp_path, gib=64)
    assert auto.returncode == 0 and auto.stdout.rstrip().endswith("fits"), auto.stdout + auto.stderr
    lines = auto.stdout.splitlines()
    assert lines[0] == ("training micro-batch 8, from the memory plan: 16 would need about 74.6 GiB at peak, over 80% "
                        "of the 64.0 GiB free")
    assert lines[1].startswith("generation micro-batch 64, from the memory plan: it needs about 43.8 GiB at peak")
    assert "training micro-batch 8 x 192+512 tokens; generation 64 sequences at once" in auto.stdout
    # --no-memory-check: the refusal is skipped and the (missing) weights are what fails
    forced = _join(["--model", str(qwen05_config_only), "--no-memory-check"], tmp_path, gib=4)
    assert forced.returncode == 2 and "memory" not in forced.stderr and "could not be loaded" in forced.stderr


def test_evaluation_generates_at_most_gen_micro_batch_sequences_at_once():
    """The plan bounds generation (evaluation included) by --gen-micro-batch: so must the learner."""
    import random

    from node.config import NodeConfig
    from node.learner import Learner
    from node.policy import load_policy

    policy = load_policy("tiny")
    learner = Learner(policy, NodeConfig(offline=True, gen_micro_batch=8), random.Random(0))
    sizes: list[int] = []
    generate = policy.model.generate

    def recording(*a, **kw):
        sizes.append(kw["input_ids"].shape[0] * kw.get("num_return_sequences", 1))
        return generate(*a, **kw)

    policy.model.generate = recording
    learner.evaluate(40)
    assert sizes and max(sizes) == 8 and sum(sizes) == 40


# -- micro-batches the user did not set: chosen from the plan -----------------------------------------------------------


def _resolve(monkeypatch, gib: float, config, **kw):
    from node.config import NodeConfig
    from node.memory_plan import resolve_micro_batches

    monkeypatch.setenv("SWARM_NODE_MEMORY_GIB", str(gib))
    cfg = NodeConfig(model="qwen-0.5b", device="cpu", offline=True, **kw)
    return resolve_micro_batches(cfg, config=json.loads(config.to_json_string()))


@pytest.mark.parametrize("shape,kw,gib,expect", [
    (QWEN05, {}, 64, (8, 64)),  # fp32 full, the real-model defaults (8 questions x 8, 512 new tokens)
    (QWEN05, {}, 20, (1, 64)),
    (QWEN05, {"lora_r": 16}, 12, (1, 64)),
    (QWEN05, {"lora_r": 16, "max_new_tokens": 128}, 12, (2, 64)),
    (QWEN15, {"lora_r": 16}, 40, (2, 64)),
    (QWEN05, {"questions_per_round": 2, "group_size": 4, "local": 2, "external": 0, "max_new_tokens": 16}, 64, (8, 8)),
], ids=["0.5b-64g", "0.5b-20g", "0.5b-lora-12g", "0.5b-lora-128tok", "1.5b-lora-40g", "0.5b-small-round"])
def test_unset_micro_batches_are_the_largest_that_fit_with_margin(monkeypatch, shape, kw, gib, expect):
    from node.memory_plan import AUTO_HEADROOM, _replan

    r = _resolve(monkeypatch, gib, Qwen2Config(**shape), **kw)
    assert (r.cfg.micro_batch_size, r.cfg.gen_micro_batch) == expect
    assert r.chosen == {"micro_batch_size": expect[0], "gen_micro_batch": expect[1]} and len(r.why) == 2
    assert r.plan.settings.micro_batch_size == expect[0] and r.plan.fits_at(AUTO_HEADROOM)
    assert r.plan.available == gib * GiB
    s = r.plan.settings
    # the largest: twice the training micro-batch would not fit with the margin (or a round has no more sequences)
    if 2 * expect[0] <= s.train_sequences:
        assert not _replan(r.plan, replace(s, micro_batch_size=2 * expect[0])).fits_at(AUTO_HEADROOM)
        assert f"{2 * expect[0]} would need about" in r.why[0]
    else:
        assert f"a round trains {s.train_sequences} sequences" in r.why[0]


def test_given_micro_batches_are_kept_and_refused_in_one_sentence_when_they_cannot_fit(monkeypatch):
    from node.config import ConfigError, NodeConfig
    from node.memory_plan import check_before_load

    r = _resolve(monkeypatch, 64, Qwen2Config(**QWEN05), micro_batch_size=2)
    assert r.cfg.micro_batch_size == 2 and r.chosen == {"gen_micro_batch": 64} and r.plan.fits
    both = _resolve(monkeypatch, 64, Qwen2Config(**QWEN05), micro_batch_size=32, gen_micro_batch=16)
    assert (both.cfg.micro_batch_size, both.cfg.gen_micro_batch) == (32, 16) and both.chosen == {} and not both.why
    assert not both.plan.fits  # given values are not lowered behind the user's back: join refuses them
    import node.memory_plan as mp

    monkeypatch.setattr(mp, "model_config", lambda name: json.loads(Qwen2Config(**QWEN05).to_json_string()))
    with pytest.raises(ConfigError) as e:
        check_before_load(NodeConfig(model="qwen-0.5b", device="cpu", micro_batch_size=32, gen_micro_batch=16))
    msg = str(e.value)
    assert msg.startswith("this run needs about") and msg.count(". ") == 0 and "--micro-batch-size 8" in msg
    # --no-memory-check: no refusal, the given values stand
    kept = check_before_load(NodeConfig(model="qwen-0.5b", device="cpu", micro_batch_size=32, gen_micro_batch=16,
                                        memory_check=False))
    assert (kept.cfg.micro_batch_size, kept.cfg.gen_micro_batch) == (32, 16)


def test_when_micro_batch_1_does_not_fit_the_refusal_names_what_would(monkeypatch):
    from node.memory_plan import AUTO_FIELDS, _replan, refusal, suggestions

    r = _resolve(monkeypatch, 8, Qwen2Config(**QWEN05))  # fp32 full: ~15 GiB even at micro-batch 1
    assert not r.fits() and r.chosen == {} and (r.cfg.micro_batch_size, r.cfg.gen_micro_batch) == (1, 1)
    msg = refusal(r.plan, frozenset(AUTO_FIELDS))
    assert msg.startswith("even at micro-batch 1, this run needs about 15.2 GiB of cpu memory") and msg.count(". ") == 0
    options = suggestions(r.plan, frozenset(AUTO_FIELDS))
    assert options and all("--lora-r 16" in flags and "micro-batch" not in flags for flags, _ in options)
    assert {"--max-new-tokens 256", "--dtype bfloat16"} <= {f for flags, _ in options for f in
                                                            ("--max-new-tokens 256", "--dtype bfloat16") if f in flags}
    for flags, q in options:  # each named option fits by the plan, and its figure is in the sentence
        assert q.fits and f"{q.peak / GiB:.1f} GiB" in msg and flags in msg
    # a bigger budget: LoRA alone fits, named first; bf16 alone and fewer tokens alone are the others
    r12 = _resolve(monkeypatch, 12, Qwen2Config(**QWEN05))
    names = [flags for flags, _ in suggestions(r12.plan, frozenset(AUTO_FIELDS))]
    assert names[0] == "--lora-r 16" and len(names) <= 3


def test_the_node_uses_the_chosen_micro_batches_and_tiny_keeps_64(monkeypatch):
    """A real-model-style config (a local model directory: no per-model micro-batches) resolves to the plan's values,
    and the learner a node builds from the resolved config generates and trains with exactly those."""
    import random

    from node.config import NodeConfig
    from node.learner import Learner
    from node.memory_plan import plan_for_config, resolve_micro_batches
    from node.policy import TINY_DIR, load_policy

    assert (NodeConfig().micro_batch_size, NodeConfig().gen_micro_batch) == (64, 64)  # --model tiny: unchanged
    assert NodeConfig(model="tiny-sparse").micro_batch_size == 64
    tiny = resolve_micro_batches(NodeConfig(device="cpu"))
    assert tiny.chosen == {} and tiny.cfg.micro_batch_size == 64 and not tiny.why
    cfg = NodeConfig(model=str(TINY_DIR), device="cpu", offline=True, max_new_tokens=512)
    assert cfg.micro_batch_size is None and cfg.gen_micro_batch is None
    # a budget between the plan at training micro-batch 8 and at 16 (with the margin): 8 is what fits
    monkeypatch.setenv("SWARM_NODE_MEMORY_GIB", "1000")
    at = {m: plan_for_config(cfg.replace(micro_batch_size=m, gen_micro_batch=1)).peak for m in (8, 16)}
    monkeypatch.setenv("SWARM_NODE_MEMORY_GIB", str((at[8] + at[16]) / 2 / 0.8 / GiB))
    r = resolve_micro_batches(cfg)
    assert r.cfg.micro_batch_size == 8 and r.chosen["micro_batch_size"] == 8
    learner = Learner(load_policy(str(TINY_DIR), device="cpu"), r.cfg, random.Random(0))
    assert learner.trainer.config.micro_batch_size == 8
    assert learner.sampling.micro_batch == r.cfg.gen_micro_batch == r.chosen["gen_micro_batch"]
