"""GPU check: a Qwen2.5-0.5B-shaped node (random weights, no hub) for a few rounds in bf16, without and with LoRA.

Per mode, in a fresh process: builds the model directory (random weights saved with the tiny model's tokenizer), asks
node.memory_plan for the plan on this GPU, then runs the node's own runtime offline (generation, the SAPO mix, the GRPO
step, a checkpoint) and prints generation tokens/s, training step time and peak GPU memory (torch's reserved bytes: what
the caching allocator held) against the plan. Random weights never answer a task, so every group's rewards are set to
alternate 1/0 after scoring: each round then trains a full batch, as a learning node does.

    bash scripts/gpu_check.sh                     # both modes, 3 rounds each
    python scripts/gpu_check.py --modes lora --rounds 5 --max-new-tokens 512

Exit status 1 when a measured peak is off the plan by more than 25% or a round failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GiB = 1024**3
QWEN05 = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, hidden_act="silu")


SMOKE = dict(QWEN05, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)  # --smoke: the same code path on a small shape (any device, e.g. CPU)


def build_model_dir(out: Path, device: str, smoke: bool) -> None:
    """Random 0.5B-shaped weights in bf16, the tiny model's tokenizer and chat template (ids < 261 are all it can
    write; near-uniform logits make EOS rare, so completions run to max_new_tokens: the plan's worst case)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from node.policy import TINY_DIR

    tiny_conf = json.loads((TINY_DIR / "config.json").read_text())
    conf = Qwen2Config(**(SMOKE if smoke else QWEN05), bos_token_id=None, eos_token_id=tiny_conf["eos_token_id"],
                       pad_token_id=tiny_conf["pad_token_id"])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(conf).to(torch.bfloat16)
    model.save_pretrained(out)
    for f in TINY_DIR.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "generation_config.json"):
            shutil.copy(f, out / f.name)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def child(args: argparse.Namespace) -> None:
    import torch
    import trio

    from node.config import NodeConfig
    from node.memory_plan import resolve_micro_batches
    from node.policy import load_policy
    from node.run import NodeRuntime
    from protocol.identity import Identity

    work = Path(args.work)
    cuda = args.device.startswith("cuda")

    def peaks() -> tuple[int, int]:  # (reserved, allocated); on CPU both are the process's peak RSS
        if cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_reserved(), torch.cuda.max_memory_allocated()
        rss = next(int(x.split()[1]) * 1024 for x in Path("/proc/self/status").read_text().splitlines()
                   if x.startswith("VmHWM:"))
        return rss, rss

    cfg = NodeConfig(model=str(work / "model"), device=args.device, dtype="bfloat16", offline=True, rounds=args.rounds,
                     seed=0, lora_r=args.lora_r if args.mode == "lora" else 0,
                     micro_batch_size=args.micro_batch_size, gen_micro_batch=args.gen_micro_batch,
                     max_new_tokens=args.max_new_tokens, questions_per_round=args.questions, local=args.questions,
                     external=0, group_size=args.group_size, checkpoint_dir=str(work / f"ck-{args.mode}"),
                     checkpoint_every=args.rounds, memory_check=False)
    # before the model loads, as join does (mem_get_info sees an empty GPU); micro-batches not given are picked by the
    # plan, as join picks them
    resolved = resolve_micro_batches(cfg)
    cfg, plan = resolved.cfg, resolved.plan
    policy = load_policy(cfg.model, device=cfg.device, dtype=cfg.dtype)
    rows: list[dict] = []
    gen_tokens: list[int] = []

    def on_round(m: dict) -> None:
        reserved, allocated = peaks()
        rows.append({**m, "gen_tokens": gen_tokens[-1], "reserved": reserved, "allocated": allocated})

    node = NodeRuntime(cfg, Identity.generate(), policy, on_round=on_round)
    rollout = node.learner.rollout

    def rollout_with_signal(r: int, n: int | None = None):
        groups = rollout(r, n)
        gen_tokens.append(sum(len(ids) for g in groups for ids in g.completion_ids))
        return [dataclasses.replace(g, rewards=tuple(float(i % 2) for i in range(len(g.rewards)))) for g in groups]

    node.learner.rollout = rollout_with_signal
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trio.run(node.run)
    out = {"mode": args.mode, "wall_s": time.perf_counter() - t0, "plan_peak": plan.peak, "free": plan.available,
           "plan_train": plan.train_peak, "plan_gen": plan.gen_peak, "device": plan.device_name,
           "micro_batch_size": cfg.micro_batch_size, "gen_micro_batch": cfg.gen_micro_batch, "why": resolved.why,
           "rounds": [{k: r[k] for k in ("round", "gen_s", "train_s", "gen_tokens", "reserved", "allocated",
                                         "optimizer_steps", "tokens")} for r in rows],
           "trainable": sum(p.numel() for p in node.learner.trainer.params)}
    print("RESULT " + json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=None, help="default: picked by the memory plan, as join does")
    p.add_argument("--gen-micro-batch", type=int, default=None, help="default: picked by the memory plan")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N (or cpu, with --smoke, to check the script)")
    p.add_argument("--smoke", action="store_true", help="a small model shape instead of Qwen2.5-0.5B's")
    p.add_argument("--work", default="", help="directory for the model and checkpoints (default: a temporary one)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible to torch (torch " + torch.__version__ + ")")
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model" / "config.json").is_file():
        build_model_dir(work / "model", args.device, args.smoke)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    print(f"{name}, torch {torch.__version__}; {'smoke' if args.smoke else 'Qwen2.5-0.5B'} shape, bf16, {args.rounds} rounds "
          f"of {args.questions} x {args.group_size} completions, max {args.max_new_tokens} new tokens, micro-batch "
          f"{args.micro_batch_size or 'from the plan'} (training) / {args.gen_micro_batch or 'from the plan'} "
          f"(generation)")
    print("| mode | trainable | micro-batches train / gen | gen tokens/s | step s | peak reserved GiB | "
          "peak allocated GiB | plan GiB | reserved vs plan |")
    print("|---|---|---|---|---|---|---|---|---|")
    bad = False
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", "--mode", mode, "--work", str(work)] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
            ("rounds", "lora_r", "questions", "group_size", "max_new_tokens", "micro_batch_size", "gen_micro_batch",
             "device") if getattr(args, k) is not None] + (["--smoke"] if args.smoke else [])
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
        if res.returncode != 0 or line is None:
            print(f"| {mode} | failed: {(res.stderr.strip().splitlines() or ['?'])[-1][:200]} ||||||||")
            bad = True
            continue
        out = json.loads(line[len("RESULT "):])
        rounds = out["rounds"][1:] or out["rounds"]  # the first round warms kernels up
        tps = sum(r["gen_tokens"] for r in rounds) / sum(r["gen_s"] for r in rounds)
        step = sum(r["train_s"] for r in rounds) / len(rounds)
        reserved = max(r["reserved"] for r in out["rounds"])
        allocated = max(r["allocated"] for r in out["rounds"])
        err = (reserved - out["plan_peak"]) / out["plan_peak"]
        bad |= abs(err) > 0.25 or any(r["optimizer_steps"] < 1 for r in out["rounds"])
        for line in out["why"]:
            print(f"  ({mode}: {line})")
        print(f"| {mode} | {out['trainable']:,} | {out['micro_batch_size']} / {out['gen_micro_batch']} | {tps:,.0f} | "
              f"{step:.2f} | {reserved / GiB:.2f} | "
              f"{allocated / GiB:.2f} | {out['plan_peak'] / GiB:.2f} | {err:+.0%} |", flush=True)
    print(f"(model and checkpoints in {work}; 'plan' is node.memory_plan's peak for these settings on this GPU)")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
