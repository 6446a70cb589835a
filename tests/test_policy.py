"""Policy loading: aliases, device/dtype choice, the shipped tiny model and its tokenizer, clear load failures."""

import json
import time
from pathlib import Path

import pytest
import torch

from node.policy import (ALIASES, TINY_DIR, ModelUnavailable, Policy, load_policy, pick_device, resolve_dtype,
                         resolve_name)


@pytest.fixture(scope="module")
def tiny() -> Policy:
    return load_policy("tiny", device="cpu")


def test_aliases_resolve():
    assert resolve_name("tiny") == str(TINY_DIR)
    assert resolve_name("TINY") == str(TINY_DIR)
    assert resolve_name("qwen-0.5b") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert resolve_name("qwen-1.5b") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert resolve_name("qwen3-0.6b") == "Qwen/Qwen3-0.6B"
    assert resolve_name("qwen3-1.7b") == "Qwen/Qwen3-1.7B"
    assert resolve_name("llama-1b") == "meta-llama/Llama-3.2-1B-Instruct"
    assert resolve_name("smollm2-360m") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert resolve_name("some/other-model") == "some/other-model"  # unknown names pass through
    assert resolve_name("tiny-sparse") == str(TINY_DIR.parent / "tiny-sparse")  # the sparse regime's model
    assert resolve_name("tiny-cold") == str(TINY_DIR.parent / "tiny-cold")  # its colder start
    embedded = {str(TINY_DIR), str(TINY_DIR.parent / "tiny-sparse"), str(TINY_DIR.parent / "tiny-cold")}
    assert all(Path(v, "config.json").is_file() for v in embedded)  # shipped in the package
    assert all(v in embedded or v.count("/") == 1 for v in ALIASES.values())


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    auto = pick_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else auto.type)
    with pytest.raises(ValueError, match="Unknown device|not supported"):
        pick_device("tpu9")
    if not torch.cuda.is_available():
        assert auto.type in ("cpu", "mps")
        with pytest.raises(ValueError, match="CUDA is not available"):
            pick_device("cuda")


def test_resolve_dtype():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32  # CPU: fp32, bf16 training is far slower without bf16 units
    assert resolve_dtype("float32", cpu) is torch.float32
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("float16", "cpu") is torch.float16
    with pytest.raises(ValueError, match="Unknown dtype"):
        resolve_dtype("int8", cpu)


def test_tiny_loads_fast_and_is_set_up(tiny):
    t0 = time.time()
    p = load_policy("tiny", device="cpu")  # second load: transformers already imported
    assert time.time() - t0 < 3.0
    assert p.device == torch.device("cpu") and p.dtype is torch.float32
    assert type(p.model).__name__ == "Qwen2ForCausalLM"
    assert next(p.model.parameters()).dtype is torch.float32
    assert not p.model.training
    n = sum(x.numel() for x in p.model.parameters())
    meta = json.loads((TINY_DIR / "metadata.json").read_text())
    assert n == meta["params"] and 500_000 < n < 5_000_000
    tok = p.tokenizer
    assert tok.padding_side == "left"
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>"
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)


def test_tiny_tokenizer_is_character_level_with_answer_tags(tiny):
    tok = tiny.tokenizer
    ids = tok("12+34=", add_special_tokens=False)["input_ids"]
    assert len(ids) == 6  # no BOS, one token per character
    comp = tok("<answer>46</answer></s>", add_special_tokens=False)["input_ids"]
    assert len(comp) == 5 and comp[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(comp) == ["<answer>", "4", "6", "</answer>", "</s>"]
    text = "a b\n{x}: 7*8 = 56 ~ é\t"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # round trip, no added spaces
    # skip_special_tokens drops pad/eos but keeps the answer tags
    assert tok.decode([0, 0] + comp, skip_special_tokens=True) == "<answer>46</answer>"


def test_tiny_chat_template_renders_only_last_user_message(tiny):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1="},
            {"role": "assistant", "content": "2"}, {"role": "user", "content": "12+34="}]
    out = tiny.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out == "12+34="
    from verifiers.prompts import build_prompt

    assert build_prompt("12+34=", tiny.tokenizer) == "12+34="


def test_missing_local_dir_is_model_unavailable(tmp_path):
    with pytest.raises(ModelUnavailable) as e:
        load_policy(str(tmp_path / "nope"), device="cpu")
    msg = str(e.value)
    assert "nope" in msg and "--model tiny" in msg and msg.count(". ") == 0 and msg.endswith(".")


def test_dir_without_config_is_model_unavailable(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelUnavailable, match="not a model directory"):
        load_policy(str(tmp_path), device="cpu")


def test_broken_model_dir_is_model_unavailable(tmp_path):
    (tmp_path / "config.json").write_text((TINY_DIR / "config.json").read_text())  # config but no weights/tokenizer
    with pytest.raises(ModelUnavailable, match="could not be loaded"):
        load_policy(str(tmp_path), device="cpu")


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(ModelUnavailable) as e:
        load_policy("swarm-node-tests/no-such-model", device="cpu")
    assert time.time() - t0 < 10.0  # no ~25 s of HTTP retries
    msg = str(e.value)
    assert "swarm-node-tests/no-such-model" in msg and "offline" in msg and "--model tiny" in msg


def test_hub_id_without_network_fails_fast(monkeypatch):
    import node.policy as policy_mod

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(policy_mod, "_hub_reachable", lambda timeout=3.0: False)
    t0 = time.time()
    with pytest.raises(ModelUnavailable, match="no network access"):
        load_policy("qwen-0.5b", device="cpu")
    assert time.time() - t0 < 10.0
