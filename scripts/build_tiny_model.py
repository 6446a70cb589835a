"""Build the embedded tiny model (node/assets/tiny): a character tokenizer, a ~1M-param Qwen2, and a short
supervised warm-start on 2-digit addition that stops early on purpose, so GRPO still has room to improve it.

    python scripts/build_tiny_model.py            # ~1-2 min on 2 CPU cores, deterministic for a given thread count

Held-out problems (crc32(f"{a}{op}{b}") % 10 == 0) are never trained on; the stopping rule looks only at a
validation slice of the training split, and the held-out split is measured once, at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.generation import SamplingConfig, generate_groups, greedy_answers, left_pad  # noqa: E402
from node.policy import TINY_DIR, Policy  # noqa: E402

SPECIALS = ["<pad>", "<unk>", "</s>"]  # ids 0, 1, 2
TAGS = ["<answer>", "</answer>"]  # plain (non-special) added tokens: survive skip_special_tokens
# Renders only the last user message's content: no system prompt, no role markers, no generation prompt.
CHAT_TEMPLATE = ("{%- set ns = namespace(content='') -%}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
                 "{%- set ns.content = m['content'] -%}{%- endif -%}{%- endfor -%}{{ ns.content }}")
ANSWER_RE = re.compile(r"^<answer>(-?\d+)</answer>$")


def is_heldout(a: int, op: str, b: int) -> bool:
    return zlib.crc32(f"{a}{op}{b}".encode()) % 10 == 0


def byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> symbol map (as in ByteLevel): printable ASCII maps to itself, ' ' -> 'Ġ', '\\n' -> 'Ċ'."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def byte_chars() -> list[str]:
    """All 256 byte symbols, printable ASCII and newline first so they get the low ids."""
    sym = byte_symbols()
    first = list(range(32, 127)) + [10]
    return [sym[b] for b in first] + [sym[b] for b in range(256) if b not in first]


def build_tokenizer(out: Path, max_len: int, chat_template: str = CHAT_TEMPLATE) -> int:
    """Save a character-level fast tokenizer to `out`; returns its size.

    Byte-level BPE with no merges: every ASCII character is one token and any other text still round-trips (as
    UTF-8 bytes). Byte-level is also what transformers 5 forces on a model_type "qwen2" checkpoint (AutoTokenizer
    rebuilds Qwen2Tokenizer with a ByteLevel pre-tokenizer/decoder from our vocab), so both load paths agree.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + byte_chars())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  padding_side="left", model_max_length=max_len)
    tok.chat_template = chat_template
    tok.save_pretrained(out)
    compat_tokenizer_config(out, chat_template)
    return len(tok)


def compat_tokenizer_config(out: Path, chat_template: str = CHAT_TEMPLATE) -> None:
    """Make the files loadable by transformers 4.x too: it knows PreTrainedTokenizerFast (5.x aliases it) and reads
    the chat template from tokenizer_config.json."""
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = chat_template
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_tokenizer(out: Path):
    """Load it the way users will (AutoTokenizer, with config.json present) and check the character contract."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    sample = "a b\n{x}: 7*8 = 56 ~ é"
    assert tok.decode(tok(sample, add_special_tokens=False)["input_ids"]) == sample
    ids = tok("12+34=<answer>46</answer></s>", add_special_tokens=False)["input_ids"]
    assert len(ids) == 11 and ids[-1] == tok.eos_token_id, ids
    assert tok.apply_chat_template([{"role": "user", "content": "1+2="}], tokenize=False,
                                   add_generation_prompt=True) == "1+2="
    return tok


def build_model(vocab_size: int, args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                      max_position_embeddings=args.max_len, tie_word_embeddings=True, use_sliding_window=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      pad_token_id=0, eos_token_id=2, bos_token_id=None)
    torch.manual_seed(args.seed)
    return Qwen2ForCausalLM(cfg)


def pairs(lo: int, hi: int, op: str = "+") -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    train, heldout = [], []
    for a in range(lo, hi + 1):
        for b in range(lo, hi + 1):
            (heldout if is_heldout(a, op, b) else train).append((a, b))
    return train, heldout


def encode_example(tok, a: int, b: int) -> tuple[list[int], int]:
    """Token ids of prompt + completion, and the prompt length (loss starts after it)."""
    prompt = tok(f"{a}+{b}=", add_special_tokens=False)["input_ids"]
    completion = tok(f"<answer>{a + b}</answer>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt + completion, len(prompt)


def batch_tensors(tok, batch: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, plens = zip(*(encode_example(tok, a, b) for a, b in batch))
    ids, mask = left_pad(list(rows), tok.pad_token_id, torch.device("cpu"))
    labels = ids.clone()
    for i, (r, p) in enumerate(zip(rows, plens)):
        labels[i, : ids.shape[1] - len(r) + p] = -100  # pad and prompt: no loss
    return ids, mask, labels


def accuracy(policy: Policy, probs: list[tuple[int, int]]) -> tuple[float, float]:
    """(greedy exact-answer accuracy, fraction with exactly the <answer>N</answer> format)."""
    outs = greedy_answers(policy, [f"{a}+{b}=" for a, b in probs], max_new_tokens=8, micro_batch=512)
    fmt = [ANSWER_RE.match(o.strip()) for o in outs]
    acc = sum(m is not None and int(m.group(1)) == a + b for m, (a, b) in zip(fmt, probs)) / len(probs)
    return acc, sum(m is not None for m in fmt) / len(probs)


def sampled_stats(policy: Policy, probs: list[tuple[int, int]], k: int, seed: int) -> dict:
    groups = generate_groups(policy, [f"{a}+{b}=" for a, b in probs], k,
                             SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=8, micro_batch=512), seed=seed)
    correct, fmt, mixed = 0, 0, 0
    any_ok = 0
    for g, (a, b) in zip(groups, probs):
        oks = []
        for c in g:
            m = ANSWER_RE.match(c.text.strip())
            fmt += m is not None and not c.truncated
            oks.append(m is not None and int(m.group(1)) == a + b)
        correct += sum(oks)
        any_ok += any(oks)
        mixed += 0 < sum(oks) < len(oks)
    n = len(probs)
    return {"sampled_acc": correct / (n * k), f"pass@{k}": any_ok / n, "sampled_format": fmt / (n * k),
            "mixed_groups": mixed / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=TINY_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--lo", type=int, default=10, help="smallest operand (2 digits: 10..99)")
    ap.add_argument("--hi", type=int, default=99)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--stop-at", type=float, default=0.22, help="stop once greedy accuracy on the validation slice "
                                                                "of the TRAIN split reaches this")
    ap.add_argument("--val", type=int, default=400, help="train-split problems kept out of SFT for the stop rule")
    ap.add_argument("--threads", type=int, default=2, help="fixed so the float reduction order is reproducible")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    vocab_size = build_tokenizer(args.out, args.max_len)
    model = build_model(vocab_size, args)
    model.config.save_pretrained(args.out)  # AutoTokenizer picks its class from config.json: save it first
    tok = load_tokenizer(args.out)
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2) and len(tok) == vocab_size
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {len(tok)} tokens; model: Qwen2 hidden {args.hidden}, {args.layers} layers, "
          f"{args.heads} heads, {n_params:,} params")

    train, heldout = pairs(args.lo, args.hi)
    rng = random.Random(args.seed)
    rng.shuffle(train)
    val, train = train[: args.val], train[args.val:]
    print(f"problems: {len(train)} train, {len(val)} validation (train split), {len(heldout)} held-out (never trained)")

    policy = Policy(name="tiny", model=model, tokenizer=tok, device=torch.device("cpu"), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    step, val_acc, loss_v = 0, 0.0, float("nan")
    while step < args.max_steps:
        idx = torch.randint(len(train), (args.batch,), generator=gen).tolist()
        ids, mask, labels = batch_tensors(tok, [train[i] for i in idx])
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        loss_v = loss.item()
        if step % args.eval_every == 0:
            model.eval()
            val_acc, val_fmt = accuracy(policy, val)
            print(f"step {step:5d}  loss {loss_v:.4f}  val greedy acc {val_acc:.3f}  format {val_fmt:.3f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
            if val_acc >= args.stop_at and val_fmt >= 0.95:
                break
    sft_s = time.time() - t0
    model.eval()

    # Held-out split: measured once, after training stopped.
    ho_acc, ho_fmt = accuracy(policy, heldout)
    stats = sampled_stats(policy, heldout, 8, seed=args.seed)
    print(f"held-out ({len(heldout)}): greedy acc {ho_acc:.3f}, format {ho_fmt:.3f}, "
          + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))

    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(args.out)  # fp32 safetensors + config.json + generation_config.json
    meta = {
        "build_command": " ".join(["python scripts/build_tiny_model.py", *sys.argv[1:]]),
        "seed": args.seed, "threads": args.threads, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "architecture": "Qwen2ForCausalLM", "params": n_params, "vocab_size": len(tok), "hidden": args.hidden,
        "layers": args.layers, "heads": args.heads, "intermediate": 4 * args.hidden,
        "task": f"arith: a+b=, a,b in [{args.lo},{args.hi}], completion <answer>N</answer></s>",
        "sft": {"steps": step, "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "final_loss": loss_v,
                "seconds": round(sft_s, 1), "stop_rule": f"val greedy acc >= {args.stop_at}",
                "val_greedy_acc": val_acc},
        "heldout": {"n": len(heldout), "greedy_acc": ho_acc, "greedy_format": ho_fmt,
                    **{k: round(v, 4) for k, v in stats.items()}},
        "build_seconds": round(time.time() - t_start, 1),
    }
    (args.out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (args.out / "README.md").write_text(README.format(**meta, **meta["sft"], ho=meta["heldout"]))
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"saved {args.out} ({size / 1e6:.1f} MB) in {time.time() - t_start:.0f}s total; SFT {step} steps, "
          f"{sft_s:.0f}s")


README = """# tiny: the embedded demo policy

A {params:,}-parameter Qwen2ForCausalLM (hidden {hidden}, {layers} layers, {heads} heads, tied embeddings) with a
character-level tokenizer ({vocab_size} tokens): printable ASCII and newline are single tokens, the other byte values
are tokens too so any text round-trips, plus `<pad>` `<unk>` `</s>` and `<answer>` / `</answer>` as single tokens.
Its chat template renders only the last user message, so the prompt is just `12+34=` and a completion is
`<answer>46</answer></s>`.

Warm-started with {steps} supervised steps (batch {batch}, lr {lr}, {seconds} s wall-clock on CPU) on the training
split of 2-digit addition, stopped early on purpose ({stop_rule}): the format is learnt, the digits are left for RL.

Held-out split ({ho[n]} problems, never trained on): greedy accuracy {ho[greedy_acc]:.3f}, format
{ho[greedy_format]:.3f}, sampled (T=1) accuracy {ho[sampled_acc]:.3f}, pass@8 {ho[pass@8]:.3f}, groups of 8 with
mixed rewards {ho[mixed_groups]:.3f}.

Rebuild: `{build_command}` (seed {seed}, {threads} threads, torch {torch}, transformers {transformers}); the build is
bit-for-bit reproducible with the same versions and thread count. See metadata.json for the exact numbers.
"""

if __name__ == "__main__":
    main()
