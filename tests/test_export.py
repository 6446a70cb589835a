"""`swarm-node export`: a node's checkpoint as a Hugging Face model directory that plain transformers loads and that
answers the held-out questions token for token as the node's policy did; the card's figures are the checkpoint's; a
push to the Hub that cannot happen says so in one sentence and loses nothing."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trio
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from node.checkpoint import MODEL_FILE, CheckpointError
from node.config import NodeConfig
from node.export import EXPORT_INFO_FILE, ExportError, export_checkpoint, find_checkpoint, push_to_hub
from node.generation import SamplingConfig, generate_groups
from node.policy import TINY_DIR, load_policy
from node.run import NodeRuntime
from protocol.identity import Identity
from verifiers.prompts import build_messages, build_prompt
from verifiers.tasks import build_task, heldout_refs

ROOT = Path(__file__).resolve().parents[1]
N_QUESTIONS = 48


def train_node(tmp: Path, model: str, rounds: int = 2, **kw) -> NodeRuntime:
    """A lone node, in-process, that trains `rounds` rounds and checkpoints at its end (as `join` does)."""
    torch.set_num_threads(1)
    kw = {"learning_rate": 1e-3, **kw}
    cfg = NodeConfig(model=model, offline=True, rounds=rounds, questions_per_round=8, group_size=4, seed=1,
                     eval_every=1, eval_size=16, checkpoint_dir=str(tmp / "ck"), **kw)
    node = NodeRuntime(cfg, Identity.generate(), load_policy(model, device="cpu", dtype=cfg.dtype))
    trio.run(node.run)
    assert node.last_saved == rounds - 1
    return node


def node_greedy_ids(node: NodeRuntime, questions: list[str]) -> list[tuple[int, ...]]:
    """The node's own greedy completions (token ids up to and including the first EOS), as Learner.evaluate decodes."""
    policy = node.policy
    prompts = [build_prompt(q, policy.tokenizer) for q in questions]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=node.cfg.max_new_tokens, micro_batch=64)
    return [g[0].token_ids for g in generate_groups(policy, prompts, 1, cfg)]


def plain_transformers_greedy(path: Path, questions: list[str]) -> tuple[list[tuple[int, ...]], list[str]]:
    """What a user with nothing but transformers gets: chat template, one padded batch, generate(do_sample=False)
    with the exported generation config (budget, EOS, pad)."""
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    texts = [tok.apply_chat_template(build_messages(q), tokenize=False, add_generation_prompt=True) for q in questions]
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False)
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    ids = []
    for row in new:
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        ids.append(tuple(row if cut is None else row[:cut + 1]))
    return ids, [tok.decode(row, skip_special_tokens=True) for row in ids]


def heldout_questions(fam: str = "arith", n: int = N_QUESTIONS) -> list[str]:
    return [build_task(r).question for r in heldout_refs(fam, n)]


@pytest.fixture(scope="module")
def tiny_node(tmp_path_factory) -> NodeRuntime:
    return train_node(tmp_path_factory.mktemp("tiny"), "tiny")


def test_tiny_export_loads_with_transformers_and_answers_as_the_node_did(tiny_node, tmp_path):
    res = export_checkpoint(tiny_node.checkpoint_dir, tmp_path / "out")
    out = res.out
    assert res.round == 1
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md", EXPORT_INFO_FILE):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".tmp-export-*"))

    questions = heldout_questions()
    node_ids = node_greedy_ids(tiny_node, questions)
    user_ids, user_texts = plain_transformers_greedy(out, questions)
    assert user_ids == node_ids
    # the answers are the trained policy's, not the shipped model's: a test that exported the base would fail here
    base = load_policy("tiny", device="cpu")
    base_ids = [g[0].token_ids for g in generate_groups(
        base, [build_prompt(q, base.tokenizer) for q in questions], 1,
        SamplingConfig(temperature=0.0, max_new_tokens=tiny_node.cfg.max_new_tokens))]
    assert sum(a != b for a, b in zip(base_ids, node_ids)) > 0
    node_texts = [tiny_node.policy.tokenizer.decode(i[:-1] if i and i[-1] == 2 else i) for i in node_ids]
    assert user_texts == node_texts and all("<answer>" in t for t in user_texts[:5])
    # the weights are the node's, bit for bit
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, t in tiny_node.policy.model.state_dict().items():
        assert torch.equal(exported[name], t), name


def test_model_card_reports_the_checkpoints_history(tiny_node, tmp_path):
    out = export_checkpoint(tiny_node.checkpoint_dir, tmp_path / "out").out
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    hist = list(tiny_node.history)
    assert [h["round"] for h in hist] == [0, 1]
    assert "2 rounds (checkpoint of round 1)" in card and "swarm `default`" in card and "`arith`" in card
    r0, r1 = hist[0]["reward_mean"], hist[1]["reward_mean"]
    assert f"{r0:.3f} (first 1 rounds) -> {r1:.3f} (last 1)" in card
    h0, h1 = hist[0]["heldout_acc"], hist[1]["heldout_acc"]
    assert f"{h0:.3f} after round 0 -> {h1:.3f} after round 1" in card
    assert f"| 1 | {h1:.3f} |" in card
    info = json.loads((out / EXPORT_INFO_FILE).read_text())
    assert info["round"] == 1 and info["model_name"] == "tiny" and info["config"]["learning_rate"] == 1e-3
    assert [h["round"] for h in info["history"]] == [0, 1]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["max_new_tokens"] == tiny_node.cfg.max_new_tokens and gen["eos_token_id"] == 2


def random_llama_dir(path: Path) -> Path:
    """A model `join` accepts that is nothing like the embedded one: Llama, untied embeddings, random weights."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=261, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(TINY_DIR).save_pretrained(path)
    return path


def test_any_model_join_accepts_exports_and_answers_as_the_node_did(tmp_path):
    model_dir = random_llama_dir(tmp_path / "llama")
    node = train_node(tmp_path, str(model_dir), rounds=1, max_new_tokens=6)
    # a random model earns no reward, so GRPO gives it no gradient: move its weights as training would, and save them
    # through the node's own checkpoint()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in node.policy.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    trio.run(node.checkpoint, 1)
    out = export_checkpoint(node.checkpoint_dir, tmp_path / "out").out
    questions = heldout_questions(n=32)
    assert plain_transformers_greedy(out, questions)[0] == node_greedy_ids(node, questions)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # a random model's argmax barely moves in two rounds, so the weights say it: the node's, not the base's
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    trained = node.policy.model.state_dict()
    assert all(torch.equal(exported[k], t) for k, t in trained.items())
    assert any(not torch.equal(base[k], t) for k, t in trained.items())
    # moved away, the recorded base cannot be loaded: one sentence pointing at --base, which then works
    moved = tmp_path / "llama-moved"
    shutil.move(model_dir, moved)
    with pytest.raises(ExportError, match="--base"):
        export_checkpoint(node.checkpoint_dir, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()
    out2 = export_checkpoint(node.checkpoint_dir, tmp_path / "out2", base=str(moved)).out
    a, b = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (out, out2))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_checkpoint_exports_in_bf16_and_answers_the_same(tmp_path):
    node = train_node(tmp_path, "tiny", rounds=1, dtype="bfloat16")
    out = export_checkpoint(node.checkpoint_dir, tmp_path / "out").out
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    questions = heldout_questions(n=16)
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16 and tok.pad_token_id == 0
    assert plain_transformers_greedy(out, questions)[0] == node_greedy_ids(node, questions)


def test_bad_sources_are_one_sentence(tmp_path, tiny_node):
    with pytest.raises(ExportError, match="no checkpoint"):
        find_checkpoint(tmp_path / "nowhere")
    with pytest.raises(ExportError, match="model directory, not a node checkpoint"):
        find_checkpoint(TINY_DIR)
    ck = tmp_path / "ck"
    shutil.copytree(tiny_node.checkpoint_dir, ck)
    newest = find_checkpoint(ck)
    with open(newest / MODEL_FILE, "r+b") as f:  # flip one byte of the weights
        f.seek(200)
        b = f.read(1)
        f.seek(200)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="SHA-256"):
        export_checkpoint(newest, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-export-*"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        export_checkpoint(tiny_node.checkpoint_dir, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: a connection is refused at once
    return port


def test_push_to_hub_offline_fails_in_one_sentence_and_keeps_the_export(tiny_node, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_TOKEN": "hf_dummy",
           "SWARM_NODE_HOME": str(tmp_path / "home")}
    env.pop("HF_HUB_OFFLINE", None)
    res = subprocess.run([sys.executable, "-m", "node.cli", "export", str(tiny_node.checkpoint_dir), "--out", str(out),
                          "--push-to-hub", "someone/tiny-swarm"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "someone/tiny-swarm" in errors[0] and "intact" in errors[0], res.stderr
    assert errors[0].count(". ") == 0  # one sentence
    assert f"exported round 1 of {find_checkpoint(tiny_node.checkpoint_dir)} to {out}" in res.stdout
    # nothing local lost: the export is complete and loads
    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    # the card's snippet names the Hub repo it was meant for
    assert 'from_pretrained("someone/tiny-swarm")' in (out / "README.md").read_text()


def test_push_failure_inside_huggingface_hub_is_one_sentence(tiny_node, tmp_path, monkeypatch):
    """Past the quick reachability probe (e.g. behind a proxy), huggingface_hub's own failure is mapped too."""
    out = export_checkpoint(tiny_node.checkpoint_dir, tmp_path / "out").out
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setenv("HF_TOKEN", "hf_dummy")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("node.export._hub_reachable", lambda: True)
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(ExportError) as info:
        push_to_hub(out, "someone/tiny-swarm")
    msg = str(info.value)
    assert "\n" not in msg and "someone/tiny-swarm" in msg and "intact" in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="HF_HUB_OFFLINE"):
        push_to_hub(out, "someone/tiny-swarm")


def test_lora_checkpoint_exports_merged_and_answers_as_the_node_did(tmp_path):
    """A LoRA node's checkpoint holds adapters only: the export is the base with them merged, a plain model."""
    node = train_node(tmp_path, "tiny", lora_r=4, learning_rate=3e-3)
    res = export_checkpoint(node.checkpoint_dir, tmp_path / "out")
    exported = AutoModelForCausalLM.from_pretrained(res.out).state_dict()
    assert not any("lora" in k for k in exported)
    base = load_policy("tiny", device="cpu").model.state_dict()
    assert set(exported) == set(base) and any(not torch.equal(exported[k], base[k]) for k in base)
    questions = heldout_questions()
    node_ids = node_greedy_ids(node, questions)  # the node's policy: base + adapters, unmerged
    assert plain_transformers_greedy(res.out, questions)[0] == node_ids
    info = json.loads((res.out / EXPORT_INFO_FILE).read_text())
    assert info["lora_merged"]["r"] == 4
    assert "LoRA adapters (rank 4" in (res.out / "README.md").read_text()
    # and `eval` of the LoRA checkpoint (adapters unmerged, as the node ran them) gives the node's own figure
    from node.evaluate import evaluate, load_model, resolve_settings

    loaded = load_model(str(node.checkpoint_dir), device="cpu")
    got = evaluate(loaded.policy, resolve_settings(loaded, n=64, samples=0))
    assert got["overall"]["greedy_acc"] == node.learner.evaluate(64)
