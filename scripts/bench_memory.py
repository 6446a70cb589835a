"""node.memory_plan against measured peak RSS on CPU, for Qwen2.5-0.5B- and 1.5B-shaped models (random weights).

Each configuration runs in a fresh process, one at a time: it imports what a node imports, builds the model from a
Qwen2Config (no hub, no weights file), optionally wraps it in LoRA, then plays two rounds as a node does: generation
(round 2 with a checkpoint snapshot held, as a background checkpoint write is) and a GRPO step. The kernel's peak RSS
(VmHWM, reset per phase through /proc/self/clear_refs) is read after each phase and compared with the plan.

    python scripts/bench_memory.py                       # 0.5B full + LoRA, 1.5B LoRA; 1.5B full is estimated only
    python scripts/bench_memory.py --shapes 0.5b --modes lora --train-batch 4 --new-tokens 64

A full fp32 AdamW run of the 1.5B shape needs ~24 GiB: it is only planned unless --allow-big is given and the machine
has the memory free. Linux only (VmHWM, clear_refs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {  # the real Qwen2.5 shapes (config.json of Qwen/Qwen2.5-0.5B-Instruct and -1.5B-Instruct)
    "0.5b": dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864, tie_word_embeddings=True),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, intermediate_size=8960, tie_word_embeddings=True),
}
GiB = 1024**3


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def settings(args: argparse.Namespace, lora: bool):
    from node.memory_plan import Settings

    return Settings(dtype_bytes=4, device_type="cpu", lora_r=args.lora_r if lora else 0,
                    micro_batch_size=args.train_batch, train_sequences=args.train_batch,
                    gen_micro_batch=args.gen_batch, group_size=args.gen_batch, questions_per_round=1,
                    max_new_tokens=args.new_tokens, prompt_tokens=args.prompt_tokens)


def child(args: argparse.Namespace) -> None:
    """One configuration, measured in this process."""
    import random

    import torch

    import node.learner  # noqa: F401 - what a node imports (verifiers, reasoning_gym)
    import node.run  # noqa: F401
    import swarm.mesh  # noqa: F401 - libp2p
    from node.checkpoint import snapshot
    from node.grpo import GRPOConfig, GRPOTrainer, TrainGroup
    from node.lora import LoraSettings, apply_lora

    torch.set_num_threads(args.threads)
    out: dict = {"runtime": _status("VmRSS")}
    from transformers import Qwen2Config, Qwen2ForCausalLM

    conf = Qwen2Config(**SHAPES[args.shape], max_position_embeddings=4096)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = Qwen2ForCausalLM(conf).eval()
    if args.mode == "lora":
        import peft  # noqa: F401 - imported before the baseline below, as a LoRA node has

        model = apply_lora(model, LoraSettings(r=args.lora_r, alpha=2 * args.lora_r))
    out["build_s"] = time.perf_counter() - t0
    out["after_build"] = _status("VmRSS")
    trainer = GRPOTrainer(model, GRPOConfig(learning_rate=1e-5, micro_batch_size=args.train_batch,
                                            max_completion_length=args.new_tokens), pad_token_id=0)
    rng = random.Random(0)
    V, P, C, G = conf.vocab_size, args.prompt_tokens, args.new_tokens, args.gen_batch
    gen_peaks, train_peaks, gen_s, train_s = [], [], [], []
    for rnd in range(2):
        snap = snapshot(model, trainer.optimizer, rng) if rnd == 1 else None  # a checkpoint being written
        _reset_peak()
        ids = torch.randint(1, V, (1, P)).repeat(1, 1)
        t0 = time.perf_counter()
        with torch.inference_mode():  # as node.generation: a random policy never says EOS, so all C tokens come
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=C, min_new_tokens=C,
                           num_return_sequences=G, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                           pad_token_id=0, eos_token_id=None, use_cache=True)
        gen_s.append(time.perf_counter() - t0)
        gen_peaks.append(_status("VmHWM"))
        del snap
        groups = []
        for g in range(max(1, args.train_batch // 4)):
            n = min(4, args.train_batch)
            comps = tuple(tuple(rng.randrange(1, V) for _ in range(C)) for _ in range(n))
            groups.append(TrainGroup(tuple(rng.randrange(1, V) for _ in range(P)), comps,
                                     tuple(float(i % 2) for i in range(n)), (True,) * n))
        _reset_peak()
        t0 = time.perf_counter()
        m = trainer.train_step(groups)
        assert m["optimizer_steps"] == 1
        train_s.append(time.perf_counter() - t0)
        train_peaks.append(_status("VmHWM"))
    out.update(gen_peak=max(gen_peaks), train_peak=max(train_peaks), gen_s=gen_s, train_s=train_s,
               trainable=sum(p.numel() for p in trainer.params), params=sum(p.numel() for p in model.parameters()))
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="0.5b,1.5b")
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--train-batch", type=int, default=4, help="training sequences (one micro-batch)")
    p.add_argument("--gen-batch", type=int, default=4, help="sequences generated at once")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allow-big", action="store_true", help="also measure configurations planned above 12 GiB")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    from transformers import Qwen2Config

    from node.memory_plan import ModelShape, host_available, plan

    print(f"train {args.train_batch} x ({args.prompt_tokens}+{args.new_tokens}) tokens, generate {args.gen_batch} x "
          f"({args.prompt_tokens}+{args.new_tokens}), fp32, {args.threads} threads, LoRA r={args.lora_r} all-linear; "
          f"load average {os.getloadavg()[0]:.1f}, {host_available() / GiB:.1f} GiB available")
    print("| shape | mode | plan train | measured train | plan generation | measured generation | plan peak | "
          "measured peak | error | step s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        ms = ModelShape.from_config(Qwen2Config(**SHAPES[shape]))
        for mode in args.modes.split(","):
            pl = plan(ms, settings(args, mode == "lora"))
            rt = pl.items["runtime"]
            row = (f"| {shape} | {mode} | {(pl.train_peak + rt) / GiB:.2f} | {{t}} | {(pl.gen_peak + rt) / GiB:.2f} | "
                   f"{{g}} | {pl.peak / GiB:.2f} | {{m}} | {{e}} | {{s}} |")
            free = host_available() or 0
            if (pl.peak > 12 * GiB and not args.allow_big) or pl.peak > 0.8 * free:
                why = "not run: plan only" + ("" if pl.peak <= 0.8 * free else f" ({free / GiB:.1f} GiB free)")
                print(row.format(t="-", g="-", m="-", e=why, s="-"), flush=True)
                continue
            cmd = [sys.executable, __file__, "--child", "--shape", shape, "--mode", mode] + [
                f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                ("lora_r", "train_batch", "gen_batch", "prompt_tokens", "new_tokens", "threads")]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if res.returncode != 0:
                print(row.format(t="-", g="-", m="-", e="failed: " + res.stderr.strip().splitlines()[-1], s="-"))
                continue
            out = json.loads(res.stdout.strip().splitlines()[-1])
            measured = max(out["train_peak"], out["gen_peak"])
            err = (pl.peak - measured) / measured
            print(row.format(t=f"{out['train_peak'] / GiB:.2f}", g=f"{out['gen_peak'] / GiB:.2f}",
                             m=f"{measured / GiB:.2f}", e=f"{err:+.0%}",
                             s=f"{out['train_s'][-1]:.0f}"), flush=True)
            print(f"  ({shape} {mode}: runtime RSS {out['runtime'] / GiB:.2f} GiB, after build "
                  f"{out['after_build'] / GiB:.2f} GiB, trainable {out['trainable']:,} of {out['params']:,}; "
                  f"train phase {(pl.train_peak + rt) / GiB - out['train_peak'] / GiB:+.2f} GiB off, generation "
                  f"{(pl.gen_peak + rt) / GiB - out['gen_peak'] / GiB:+.2f} GiB off)", flush=True)


if __name__ == "__main__":
    main()
