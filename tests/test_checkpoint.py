"""Checkpoints: bit-identical resume, atomicity, damage detection, pruning, model mismatch."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from node.checkpoint import (
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

VOCAB = 64


def tiny_qwen(seed: int, hidden: int = 32) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=64)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def make_opt(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, rng: random.Random) -> None:
    # Batch shape from the python RNG, tokens from the torch RNG: both must be restored for an identical resume.
    batch, length = rng.randint(2, 4), rng.randint(6, 12)
    ids = torch.randint(0, VOCAB, (batch, length))
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def save(tmp: Path, rnd: int, model: torch.nn.Module, opt: torch.optim.Optimizer, keep: int = 3, **kw) -> Path:
    return save_checkpoint(tmp, round=rnd, model=model, optimizer=opt, config={"lr": 3e-3, "group": 8},
                           model_name="tiny-qwen", rng=random.Random(rnd), keep=keep, **kw)


def test_resume_is_bit_identical(tmp_path: Path) -> None:
    n = 6
    # Straight run.
    model = tiny_qwen(0)
    opt = make_opt(model)
    rng = random.Random(123)
    torch.manual_seed(1)
    for _ in range(n):
        train_step(model, opt, rng)
    straight = {k: v.clone() for k, v in model.state_dict().items()}

    # Half, save, then a fresh process-like start: different init, different RNG positions.
    model = tiny_qwen(0)
    opt = make_opt(model)
    rng = random.Random(123)
    torch.manual_seed(1)
    for _ in range(n // 2):
        train_step(model, opt, rng)
    path = save_checkpoint(tmp_path, round=n // 2, model=model, optimizer=opt, config={"n": n},
                           model_name="tiny-qwen", rng=rng, extra={"seq": 17, "rewards": [0.5, 1.0]})
    assert path == tmp_path / "round-000003"
    del model, opt

    model2 = tiny_qwen(99)
    opt2 = make_opt(model2)
    rng2 = random.Random(999)
    torch.manual_seed(999)
    assert latest_checkpoint(tmp_path) == path
    state = load_checkpoint(path, model=model2, optimizer=opt2, rng=rng2, expected_model_name="tiny-qwen")
    assert state["round"] == 3 and state["config"] == {"n": n} and state["extra"] == {"seq": 17, "rewards": [0.5, 1.0]}
    assert model2.lm_head.weight is model2.model.embed_tokens.weight  # tying survives loading
    assert opt2.param_groups[0]["betas"] == (0.9, 0.95)
    for _ in range(n - n // 2):
        train_step(model2, opt2, rng2)
    resumed = model2.state_dict()
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k

    # Control: without restoring the RNGs the continuation differs, so the test above really exercises them.
    model3 = tiny_qwen(5)
    opt3 = make_opt(model3)
    load_checkpoint(path, model=model3, optimizer=opt3, rng=None)
    torch.manual_seed(4)
    rng3 = random.Random(4)
    for _ in range(n - n // 2):
        train_step(model3, opt3, rng3)
    assert not all(torch.equal(straight[k], v) for k, v in model3.state_dict().items())


def test_state_json_contents(tmp_path: Path) -> None:
    model = tiny_qwen(0)
    opt = make_opt(model)
    train_step(model, opt, random.Random(0))
    path = save(tmp_path, 12, model, opt, extra={"publish_seq": 5})
    assert sorted(p.name for p in path.iterdir()) == sorted([MODEL_FILE, OPTIMIZER_FILE, STATE_FILE])
    state = json.loads((path / STATE_FILE).read_text())
    assert state["format_version"] == 1 and state["round"] == 12 and state["model_name"] == "tiny-qwen"
    assert state["extra"] == {"publish_seq": 5} and state["config"] == {"lr": 3e-3, "group": 8}
    assert set(state["files"]) == {MODEL_FILE, OPTIMIZER_FILE} and all(len(h) == 64 for h in state["files"].values())
    assert state["model"]["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert len(state["rng"]["python"][1]) == 625 and "torch_cpu" in state["rng"]


def test_keep_k_pruning(tmp_path: Path) -> None:
    model = tiny_qwen(0)
    opt = make_opt(model)
    for r in range(1, 6):
        save(tmp_path, r, model, opt, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000004", "round-000005"]
    # Re-saving the same round replaces it in place.
    save(tmp_path, 5, model, opt, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-000004", "round-000005"]
    with pytest.raises(ValueError):
        save(tmp_path, 6, model, opt, keep=0)


def test_damaged_newest_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_qwen(0)
    opt = make_opt(model)
    train_step(model, opt, random.Random(0))
    p1 = save(tmp_path, 1, model, opt)
    p2 = save(tmp_path, 2, model, opt)
    p3 = save(tmp_path, 3, model, opt)
    # A crashed save leaves a temp dir behind: ignored.
    leftover = tmp_path / ".tmp-round-000004-deadbeef"
    leftover.mkdir()
    (leftover / STATE_FILE).write_text("{")
    assert latest_checkpoint(tmp_path) == p3

    data = (p3 / MODEL_FILE).read_bytes()
    (p3 / MODEL_FILE).write_bytes(data[: len(data) // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="node.checkpoint"):
        assert latest_checkpoint(tmp_path) == p2
    assert "round-000003" in caplog.text
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(p3, model=model, optimizer=opt, rng=None)

    opt_bytes = bytearray((p2 / OPTIMIZER_FILE).read_bytes())
    opt_bytes[-1] ^= 0xFF  # one flipped bit
    (p2 / OPTIMIZER_FILE).write_bytes(bytes(opt_bytes))
    assert latest_checkpoint(tmp_path) == p1
    (p1 / STATE_FILE).write_text('{"format_version": 1, "round"')
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(p1, model=model, optimizer=opt, rng=None)
    assert latest_checkpoint(tmp_path / "nowhere") is None


def test_missing_file_is_incomplete(tmp_path: Path) -> None:
    model = tiny_qwen(0)
    opt = make_opt(model)
    p1 = save(tmp_path, 1, model, opt)
    p2 = save(tmp_path, 2, model, opt)
    (p2 / OPTIMIZER_FILE).unlink()
    assert latest_checkpoint(tmp_path) == p1
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(p2, model=model, optimizer=opt, rng=None)


def test_failed_save_deletes_nothing(tmp_path: Path) -> None:
    model = tiny_qwen(0)
    opt = make_opt(model)
    p1 = save(tmp_path, 1, model, opt, keep=1)
    before = {p.name: p.read_bytes() for p in p1.iterdir()}
    with pytest.raises(CheckpointError, match="JSON"):
        save(tmp_path, 2, model, opt, keep=1, extra={"bad": object()})
    assert [p.name for p in tmp_path.iterdir()] == ["round-000001"]  # no temp dir left, nothing pruned
    assert {p.name: p.read_bytes() for p in p1.iterdir()} == before
    assert latest_checkpoint(tmp_path) == p1


def test_mismatched_model_is_rejected_untouched(tmp_path: Path) -> None:
    model = tiny_qwen(0)
    opt = make_opt(model)
    train_step(model, opt, random.Random(0))
    path = save(tmp_path, 1, model, opt)

    with pytest.raises(CheckpointError, match="made for model 'tiny-qwen'"):
        load_checkpoint(path, model=model, optimizer=opt, rng=None, expected_model_name="other-model")

    other = tiny_qwen(1, hidden=48)
    other_opt = make_opt(other)
    snapshot = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(path, model=other, optimizer=other_opt, rng=None)
    assert all(torch.equal(snapshot[k], v) for k, v in other.state_dict().items())

    # Same shapes, but an optimizer over a different parameter set.
    same = tiny_qwen(2)
    partial_opt = torch.optim.AdamW(list(same.parameters())[:3], lr=1e-3)
    with pytest.raises(CheckpointError, match="parameter groups"):
        load_checkpoint(path, model=same, optimizer=partial_opt, rng=None)


def test_untied_target_is_rejected(tmp_path: Path) -> None:
    model = tiny_qwen(0)
    path = save(tmp_path, 1, model, make_opt(model))
    untied = tiny_qwen(0)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    with pytest.raises(CheckpointError, match="ties"):
        load_checkpoint(path, model=untied, optimizer=None, rng=None)


def test_a_snapshot_written_after_more_training_resumes_bit_identically(tmp_path: Path) -> None:
    """Background checkpoints: the state is copied at the end of a round and written while training goes on."""
    from node.checkpoint import snapshot

    model, rng = tiny_qwen(0), random.Random(5)
    opt = make_opt(model)
    torch.manual_seed(2)
    for _ in range(2):
        train_step(model, opt, rng)
    snap = snapshot(model, opt, rng)
    expected = [train_step(model, opt, rng) or {k: v.clone() for k, v in model.state_dict().items()} for _ in range(2)]
    train_step(model, opt, rng)  # training went on while the write was pending: it must not leak into the checkpoint
    save_checkpoint(tmp_path, round=1, model=snap.model, optimizer=snap.optimizer, config={}, model_name="tiny-qwen",
                    rng=None, rng_state=snap.rng_state)
    model2 = tiny_qwen(9)
    opt2, rng2 = make_opt(model2), random.Random(0)
    load_checkpoint(latest_checkpoint(tmp_path), model=model2, optimizer=opt2, rng=rng2, expected_model_name="tiny-qwen")
    assert model2.lm_head.weight.data_ptr() == model2.model.embed_tokens.weight.data_ptr()  # still tied
    for want in expected:  # the resumed run repeats the same two steps, bit for bit
        train_step(model2, opt2, rng2)
        got = model2.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items())
