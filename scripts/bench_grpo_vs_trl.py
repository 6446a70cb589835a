"""Our GRPO optimizer step (node/grpo.py) against TRL's GRPOTrainer: same tiny model, same batch, same loss.

TRL is not a dependency of this project. Install it in a throw-away venv that sees the global packages, pinned so pip
cannot touch torch or transformers (pip resolves TRL's missing deps: accelerate, datasets, pyarrow, ...):

    python -m venv --system-site-packages /tmp/trlenv
    printf 'torch==2.13.0+cpu\\ntransformers==5.23.0\\nnumpy==2.4.6\\n' > /tmp/trl-constraints.txt
    /tmp/trlenv/bin/pip install trl==1.16.0 -c /tmp/trl-constraints.txt
    flock /tmp/swarm-cpu.lock /tmp/trlenv/bin/python scripts/bench_grpo_vs_trl.py          # from the repo root

What is fed to both trainers: the node's own rollouts. A `Learner` on the embedded tiny model with the tiny defaults
(arith tasks, group size 8, max_new_tokens 8, lr 1e-4) samples rounds until it has --groups groups with mixed rewards
(the node trains only on those), so both trainers see the same prompts, completions (EOS included, nothing after)
and rewards. Both models are loaded from the same files (identical weights), CPU, fp32, same torch thread count.
Settings on both sides: loss_type (dapo, grpo, dr_grpo), beta 0, epsilon 0.2, epsilon_high 0.28, lr 1e-4 constant,
AdamW (0.9, 0.999, 1e-8, no weight decay), max_grad_norm 1.0, num_iterations 1, micro-batches of --micro-batch
sequences with gradient accumulation over the whole batch (--groups x 8 sequences per optimizer step).

What is timed, per optimizer step (median of --steps after --warmup; the two trainers alternate step by step):
  ours  `GRPOTrainer.train_step(groups)`: everything, from TrainGroups (token-id tuples + rewards) to updated weights:
        advantages, padding and tensor building, forward + backward per micro-batch (log-probs, entropy, off-policy
        mask check, loss), gradient clipping, AdamW step, metrics.
  TRL   what `Trainer._inner_training_loop` runs for one optimizer step, once `GRPOTrainer._prepare_inputs` has
        produced the batch: `training_step` per micro-batch (TRL's `_compute_loss`: fused-LM-head log-probs and
        entropy, clipped surrogate, its metrics; `accelerator.backward`), then `_clip_grad_norm`, `optimizer.step()`,
        `lr_scheduler.step()`, `model.zero_grad()`. NOT timed for TRL: building the batch (advantages, padding:
        `_generate_and_score_completions`), dataloader, callbacks and logging. Ours is timed with its batch building.
  TRL's `_prepare_inputs` (which would generate) is replaced on the instance by the identity, and the prepared
  micro-batches (prompt_ids/prompt_mask left-padded, completion_ids/completion_mask right-padded over the whole batch,
  advantages, num_items_in_batch) are passed in directly, as TRL's generation step would produce them.
  TRL runs with bf16=False and gradient_checkpointing=False (TRL 1.16 defaults to True for both; neither fits a
  CPU fp32 comparison) and its default optimizer (adamw_torch_fused); a row with TRL's default gradient checkpointing
  is printed too.

Agreement check (before timing, fresh models): loss, pre-clip gradient norm and the clipped gradients of every
parameter for the first two optimizer steps; with num_iterations 1 the ratio is exactly 1 so the loss value only checks
the advantages and the normaliser, the gradients check the log-probs and everything else. A num_iterations 2 run
(old log-probs from the pre-update policy) checks a loss with ratio != 1.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import node.grpo as ngrpo  # noqa: E402
from node.config import NodeConfig  # noqa: E402
from node.learner import Learner  # noqa: E402
from node.policy import load_policy  # noqa: E402

GROUP = 8


# ----------------------------------------------------------------------------------------------------------------
# the batch


def node_batch(n_groups: int, seed: int) -> list[ngrpo.TrainGroup]:
    """n_groups rollout groups with mixed rewards, produced by the node's own Learner (tiny defaults)."""
    policy = load_policy("tiny", device="cpu", dtype="float32")
    learner = Learner(policy, NodeConfig(offline=True, seed=seed), random.Random(seed))
    out: list[ngrpo.TrainGroup] = []
    rnd = 0
    while len(out) < n_groups:
        out += [g.to_train_group() for g in learner.rollout(rnd) if g.has_signal]
        rnd += 1
    return out[:n_groups]


# ----------------------------------------------------------------------------------------------------------------
# ours


def make_ours(loss_type: str, micro: int, lr: float, num_iterations: int = 1) -> ngrpo.GRPOTrainer:
    policy = load_policy("tiny", device="cpu", dtype="float32")
    cfg = ngrpo.GRPOConfig(learning_rate=lr, loss_type=loss_type, beta=0.0, epsilon=0.2, epsilon_high=0.28,
                           num_iterations=num_iterations, micro_batch_size=micro, max_grad_norm=1.0,
                           max_completion_length=8, temperature=1.0)
    return ngrpo.GRPOTrainer(policy.model, cfg, pad_token_id=policy.tokenizer.pad_token_id)


# ----------------------------------------------------------------------------------------------------------------
# TRL


def make_trl(loss_type: str, micro: int, n_seqs: int, lr: float, out_dir: str, grad_ckpt: bool = False,
             num_iterations: int = 1):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    policy = load_policy("tiny", device="cpu", dtype="float32")
    accum = n_seqs // micro
    args = GRPOConfig(
        output_dir=out_dir, report_to=[], use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=grad_ckpt,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accum, num_generations=GROUP,
        max_completion_length=8, learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0,
        loss_type=loss_type, beta=0.0, epsilon=0.2, epsilon_high=0.28, num_iterations=num_iterations,
        max_grad_norm=1.0, temperature=1.0, save_strategy="no", logging_strategy="no", seed=0,
        dataloader_num_workers=0,
    )
    ds = Dataset.from_dict({"prompt": ["1+1="] * n_seqs})
    tr = GRPOTrainer(model=policy.model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                     args=args, train_dataset=ds, processing_class=policy.tokenizer)
    if grad_ckpt:  # Trainer.train() turns it on (not __init__); the same call, as transformers 5.23 makes it
        kw = dict(args.activation_checkpointing_kwargs or {})
        every, offload = kw.pop("every_n_layers", 1), kw.pop("offload", False)
        tr.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw or None, every_n_layers=every,
                                                 offload=offload)
        assert tr.model.is_activation_checkpointing
    tr.create_optimizer_and_scheduler(num_training_steps=10_000)
    tr._prepare_inputs = lambda batch: batch  # the batch is prepared here, no generation
    tr.current_gradient_accumulation_steps = accum
    return tr


def trl_inputs(tr, groups: list[ngrpo.TrainGroup], micro: int, with_old: bool = False) -> list[dict]:
    """The micro-batches `_generate_and_score_completions` would hand to `_compute_loss` (in order, unshuffled)."""
    pad = tr.processing_class.pad_token_id
    prompts = [g.prompt_ids for g in groups for _ in g.completion_ids]
    comps = [c for g in groups for c in g.completion_ids]
    P, C = max(map(len, prompts)), max(map(len, comps))
    prompt_ids = torch.tensor([[pad] * (P - len(p)) + list(p) for p in prompts])
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([list(c) + [pad] * (C - len(c)) for c in comps])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (C - len(c)) for c in comps])
    # TRL's advantages (grpo_trainer.py, scale_rewards="group"): (r - group mean) / (group sample std + 1e-4)
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float32)
    grouped = rewards.view(-1, GROUP)
    advantages = (rewards - grouped.mean(1).repeat_interleave(GROUP)) / (grouped.std(1).repeat_interleave(GROUP) + 1e-4)
    num_items = completion_mask.sum()
    old = None
    if with_old:  # as TRL does when num_iterations > 1: the pre-update policy, chunked by per_device batch size
        with torch.no_grad():
            old, _, _ = tr._get_per_token_logps_and_entropies(
                tr.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1),
                C, batch_size=micro)
    out = []
    for s in range(0, len(comps), micro):
        d = {"prompt_ids": prompt_ids[s:s + micro], "prompt_mask": prompt_mask[s:s + micro],
             "completion_ids": completion_ids[s:s + micro], "completion_mask": completion_mask[s:s + micro],
             "advantages": advantages[s:s + micro], "num_items_in_batch": num_items}
        if old is not None:
            d["old_per_token_logps"] = old[s:s + micro]
        out.append(d)
    return out


def trl_step(tr, inputs: list[dict]) -> tuple[float, float]:
    """One optimizer step the way Trainer._inner_training_loop does it. Returns (loss, pre-clip grad norm)."""
    model, n = tr.model, len(inputs)
    tr.current_gradient_accumulation_steps = n
    loss = 0.0
    for i, inp in enumerate(inputs):
        tr.accelerator.gradient_state._set_sync_gradients(i == n - 1)
        loss += float(tr.training_step(model, inp, None))
    norm = float(tr._clip_grad_norm(model))
    tr.optimizer.step()
    tr.lr_scheduler.step()
    model.zero_grad()
    return loss, norm


# ----------------------------------------------------------------------------------------------------------------
# agreement


def grab_grads(opt, model, store: list) -> None:
    """Record every parameter's (clipped) gradient right before each optimizer step, by parameter name."""
    def hook(_opt, _args, _kwargs):
        store.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    opt.register_step_pre_hook(hook)


def max_grad_diff(a: dict, b: dict) -> tuple[float, float]:
    assert a.keys() == b.keys(), (sorted(a)[:3], sorted(b)[:3])
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    scale = max(float(a[k].abs().max()) for k in a)
    return diff, scale


def agreement(groups, micro: int, lr: float, loss_type: str, tmp: str) -> list[str]:
    rows = []
    ours = make_ours(loss_type, micro, lr)
    tr = make_trl(loss_type, micro, len(groups) * GROUP, lr, tmp)
    g_ours, g_trl = [], []
    grab_grads(ours.optimizer, ours.model, g_ours)
    grab_grads(tr.optimizer, tr.model, g_trl)
    inputs = trl_inputs(tr, groups, micro)
    for step in range(2):
        m = ours.train_step(groups)
        loss_t, norm_t = trl_step(tr, inputs)
        d, s = max_grad_diff(g_ours[-1], g_trl[-1])
        rows.append(f"| {loss_type} | 1 | {step + 1} | {m['loss']:+.8f} | {loss_t:+.8f} | {abs(m['loss'] - loss_t):.1e} "
                    f"| {m['grad_norm']:.6f} | {norm_t:.6f} | {d:.1e} | {s:.1e} |")
    # num_iterations 2: the second optimizer step has ratio != 1 (old log-probs from the pre-update policy)
    ours = make_ours(loss_type, micro, lr, num_iterations=2)
    tr = make_trl(loss_type, micro, len(groups) * GROUP, lr, tmp, num_iterations=2)
    recorded = []
    orig = ngrpo.grpo_loss

    def spy(*a, **k):
        loss, st = orig(*a, **k)
        recorded.append(float(loss.detach()))
        return loss, st
    ngrpo.grpo_loss = spy
    try:
        ours.train_step(groups)
    finally:
        ngrpo.grpo_loss = orig
    n_mb = len(recorded) // 2
    ours_losses = [sum(recorded[:n_mb]), sum(recorded[n_mb:])]
    inputs = trl_inputs(tr, groups, micro, with_old=True)
    trl_losses = [trl_step(tr, inputs)[0] for _ in range(2)]
    for it in range(2):
        rows.append(f"| {loss_type} | 2 | {it + 1} | {ours_losses[it]:+.8f} | {trl_losses[it]:+.8f} "
                    f"| {abs(ours_losses[it] - trl_losses[it]):.1e} | | | | |")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# timing


def timing(groups, micro: int, lr: float, loss_type: str, tmp: str, warmup: int, steps: int,
           grad_ckpt: bool = False) -> tuple[float, float]:
    ours = make_ours(loss_type, micro, lr)
    tr = make_trl(loss_type, micro, len(groups) * GROUP, lr, tmp, grad_ckpt=grad_ckpt)
    inputs = trl_inputs(tr, groups, micro)
    t_ours, t_trl = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        ours.train_step(groups)
        t1 = time.perf_counter()
        trl_step(tr, inputs)
        t2 = time.perf_counter()
        if i >= warmup:
            t_ours.append(t1 - t0)
            t_trl.append(t2 - t1)
    return statistics.median(t_ours), statistics.median(t_trl)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--groups", type=int, default=32, help="groups per optimizer step (tiny default: 16 + 16)")
    ap.add_argument("--micro-batch", type=int, default=64, help="sequences per forward/backward (node default 64)")
    ap.add_argument("--lr", type=float, default=1e-4, help="tiny default")
    ap.add_argument("--loss-types", default="dapo,grpo,dr_grpo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-gc-row", action="store_true", help="skip the row with TRL's gradient checkpointing on")
    args = ap.parse_args()
    if (args.groups * GROUP) % args.micro_batch:
        ap.error("groups x 8 must be a multiple of --micro-batch (TRL splits the batch into equal micro-batches)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import transformers
    import trl
    groups = node_batch(args.groups, args.seed)
    n_seq = sum(len(g.completion_ids) for g in groups)
    n_tok = sum(len(c) for g in groups for c in g.completion_ids)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"batch: {len(groups)} groups x {GROUP} = {n_seq} sequences, {n_tok} completion tokens, "
          f"prompt length {max(len(g.prompt_ids) for g in groups)}, micro-batch {args.micro_batch} "
          f"({n_seq // args.micro_batch} accumulation steps)\n")
    loss_types = [x.strip() for x in args.loss_types.split(",") if x.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        print("| loss_type | num_iterations | step | loss ours | loss TRL | abs diff | grad norm ours | grad norm TRL "
              "| max grad diff | max grad |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for lt in loss_types:
            for row in agreement(groups, args.micro_batch, args.lr, lt, tmp):
                print(row, flush=True)
        print("\n| loss_type | ours ms/step | TRL ms/step | ours / TRL |")
        print("|---|---|---|---|")
        for lt in loss_types:
            a, b = timing(groups, args.micro_batch, args.lr, lt, tmp, args.warmup, args.steps)
            print(f"| {lt} | {a * 1e3:.1f} | {b * 1e3:.1f} | {a / b:.2f}x |", flush=True)
        if not args.no_gc_row:
            a, b = timing(groups, args.micro_batch, args.lr, loss_types[0], tmp, args.warmup, args.steps,
                          grad_ckpt=True)
            print(f"| {loss_types[0]}, TRL with gradient checkpointing (its default) | {a * 1e3:.1f} | {b * 1e3:.1f} "
                  f"| {a / b:.2f}x |", flush=True)
    print(f"\n(median of {args.steps} optimizer steps after {args.warmup} warm-up steps, alternating ours/TRL)")


if __name__ == "__main__":
    main()
