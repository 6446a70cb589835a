"""A lone tiny node trained with LoRA (the node's own Learner: rollout, SAPO mix, GRPO step), fixed seed.

Prints the mean sampled reward over the first and last windows of rounds, held-out greedy accuracy before and after,
the trainable-parameter count and seconds per round; `--lora-r 0` runs the same with every weight trained, for
comparison. Sweeps: comma-separated --lora-r / --learning-rate values run one after another.

    python scripts/bench_lora.py --lora-r 8 --rounds 60
    python scripts/bench_lora.py --lora-r 0,8 --learning-rate 1e-4,1e-3 --rounds 60
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.config import NodeConfig  # noqa: E402
from node.learner import Learner, choose_training_groups  # noqa: E402
from node.policy import load_policy  # noqa: E402


def run_one(r: int, lr: float | None, args: argparse.Namespace) -> dict:
    cfg = NodeConfig(model=args.model, offline=True, seed=args.seed, lora_r=r, learning_rate=lr, beta=args.beta,
                     eval_size=args.eval_size)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    learner = Learner(load_policy(args.model, device="cpu"), cfg, rng)
    model = learner.policy.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    acc0 = learner.evaluate(cfg.eval_size)
    rewards, t0 = [], time.perf_counter()
    for rnd in range(args.rounds):
        groups = learner.rollout(rnd)
        rewards.append(statistics.mean(x for g in groups for x in g.rewards))
        own, _ = choose_training_groups(groups, [], cfg.local, cfg.external, rng)
        learner.train(own)
    s_round = (time.perf_counter() - t0) / args.rounds
    acc1 = learner.evaluate(cfg.eval_size)
    w = args.window
    return {"lora_r": r, "lr": cfg.learning_rate, "trainable": trainable, "total": total,
            "first": statistics.mean(rewards[:w]), "last": statistics.mean(rewards[-w:]),
            "acc0": acc0, "acc1": acc1, "s_round": s_round}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--lora-r", default="8", help="comma-separated ranks (0 = full training)")
    p.add_argument("--learning-rate", default="", help="comma-separated rates ('' = the node's default for the rank)")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--window", type=int, default=20, help="rounds averaged at the start and at the end")
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-size", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    lrs = [float(x) for x in args.learning_rate.split(",")] if args.learning_rate else [None]
    print(f"model {args.model}, {args.rounds} rounds, seed {args.seed}, beta {args.beta}, window {args.window}")
    print("| lora_r | lr | trainable params | reward first | reward last | held-out before | held-out after | s/round |")
    print("|---|---|---|---|---|---|---|---|")
    for r in (int(x) for x in args.lora_r.split(",")):
        for lr in lrs:
            res = run_one(r, lr, args)
            print(f"| {res['lora_r']} | {res['lr']:g} | {res['trainable']:,} of {res['total']:,} | {res['first']:.3f} | "
                  f"{res['last']:.3f} | {res['acc0']:.3f} | {res['acc1']:.3f} | {res['s_round']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
