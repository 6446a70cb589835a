"""Tune GRPO on the tiny model: single node, arith 2-digit addition, one train_step per round.

Each run starts from the shipped warm-started tiny policy, plays `--rounds` rounds of 8 questions x 8 completions,
and reports the mean sampled reward of the first and last 20 rounds, held-out greedy accuracy before and after, and
seconds per round. Comma-separated values sweep a grid (cartesian product), e.g.

    python scripts/tune_tiny_grpo.py --lr 1e-4,3e-4 --num-iterations 1,4 --rounds 60

Results go to stdout as a markdown table (and, with --jsonl, one JSON line per run with the per-round rewards).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.generation import SamplingConfig, generate_groups, greedy_answers, prompt_token_ids  # noqa: E402
from node.grpo import GRPOConfig, GRPOTrainer, TrainGroup  # noqa: E402
from node.policy import load_policy  # noqa: E402
from verifiers.prompts import build_prompt  # noqa: E402
from verifiers.rewards import RewardPolicy, reward  # noqa: E402
from verifiers.tasks import build_task, heldout_refs, sample_refs  # noqa: E402


@dataclass(frozen=True)
class Run:
    lr: float
    num_iterations: int
    loss_type: str
    temperature: float
    beta: float
    scale_rewards: str
    seed: int


def greedy_accuracy(policy, tasks, prompts, max_new_tokens: int) -> float:
    texts = greedy_answers(policy, prompts, max_new_tokens)
    return sum(reward(t, x) >= 1.0 for t, x in zip(tasks, texts)) / len(tasks)


def run_one(run: Run, args: argparse.Namespace, eval_tasks, eval_prompts_cache: dict) -> dict:
    torch.manual_seed(run.seed)
    policy = load_policy("tiny", device="cpu")
    tok = policy.tokenizer
    eval_prompts = eval_prompts_cache.setdefault("p", [build_prompt(t.question, tok) for t in eval_tasks])
    sampling = SamplingConfig(temperature=run.temperature, max_new_tokens=args.max_new_tokens)
    ref_model = copy.deepcopy(policy.model) if run.beta else None
    cfg = GRPOConfig(
        learning_rate=run.lr, num_iterations=run.num_iterations, loss_type=run.loss_type,
        temperature=run.temperature, beta=run.beta, scale_rewards=run.scale_rewards,
        max_completion_length=args.max_new_tokens,
    )
    trainer = GRPOTrainer(policy.model, cfg, pad_token_id=tok.pad_token_id, ref_model=ref_model)
    acc_before = greedy_accuracy(policy, eval_tasks, eval_prompts, args.max_new_tokens)

    rng = random.Random(run.seed)
    rewards, t0 = [], time.perf_counter()
    for rnd in range(args.rounds):
        tasks = [build_task(r) for r in sample_refs({"arith": 1.0}, args.questions, rng)]
        prompts = [build_prompt(t.question, tok) for t in tasks]
        groups = generate_groups(policy, prompts, args.group_size, sampling, seed=rng.randrange(2**31))
        batch = []
        for task, prompt, comps in zip(tasks, prompts, groups):
            rs = tuple(reward(task, c.text, RewardPolicy()) for c in comps)
            batch.append(TrainGroup(tuple(prompt_token_ids(tok, prompt)), tuple(c.token_ids for c in comps), rs,
                                    tuple(c.truncated for c in comps)))
        m = trainer.train_step(batch)
        rewards.append(m["reward_mean"])
        if args.verbose:
            print(f"  round {rnd:3d} reward {m['reward_mean']:.3f} loss {m['loss']:+.4f} "
                  f"clip {m['clip_region']:.3f} ent {m['entropy']:.3f} gn {m['grad_norm']:.3f}", flush=True)
    s_per_round = (time.perf_counter() - t0) / args.rounds
    acc_after = greedy_accuracy(policy, eval_tasks, eval_prompts, args.max_new_tokens)
    w = min(20, args.rounds // 2)
    return dict(
        **asdict(run),
        first=statistics.mean(rewards[:w]),
        last=statistics.mean(rewards[-w:]),
        acc_before=acc_before,
        acc_after=acc_after,
        s_per_round=s_per_round,
        rewards=rewards,
    )


def floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lr", type=floats, default=[3e-4])
    p.add_argument("--num-iterations", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    p.add_argument("--loss-type", type=lambda s: s.split(","), default=["dapo"])
    p.add_argument("--temperature", type=floats, default=[1.0])
    p.add_argument("--beta", type=floats, default=[0.0])
    p.add_argument("--scale-rewards", type=lambda s: s.split(","), default=["group"])
    p.add_argument("--seed", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--eval-n", type=int, default=300, help="held-out problems for greedy accuracy")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--jsonl", default="")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    eval_tasks = [build_task(r) for r in heldout_refs("arith", args.eval_n)]
    cache: dict = {}
    print("| lr | iters | loss | T | beta | scale | seed | first20 | last20 | greedy before -> after | s/round |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    grid = itertools.product(args.lr, args.num_iterations, args.loss_type, args.temperature, args.beta,
                             args.scale_rewards, args.seed)
    for values in grid:
        res = run_one(Run(*values), args, eval_tasks, cache)
        print(f"| {res['lr']:g} | {res['num_iterations']} | {res['loss_type']} | {res['temperature']:g} | "
              f"{res['beta']:g} | {res['scale_rewards']} | {res['seed']} | {res['first']:.3f} | {res['last']:.3f} | "
              f"{res['acc_before']:.3f} -> {res['acc_after']:.3f} | {res['s_per_round']:.2f} |", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
