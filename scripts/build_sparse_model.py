"""Build an embedded model of the sparse regime: the SAPO paper's regime on a CPU.

    python scripts/build_sparse_model.py                                            # node/assets/tiny-sparse
    python scripts/build_sparse_model.py --out node/assets/tiny-cold --tagged 0.03  # the colder start

The paper's nodes (Qwen2.5-0.5B on ReasoningGYM) start with low reward: most of their own groups are all wrong, so a
node alone gets little signal, and a skill one node stumbles on (the paper: the answer format) spreads through the
swarm. This model is built to start there, over four task families (the specialties of `SPARSE_TASKS`):

- the tiny architecture and tokenizer (scripts/build_tiny_model.py), freshly initialised;
- a short supervised warm-start on the four families in which only `--tagged` (default 15%) of the targets carry the
  `<answer>...</answer>` block the verifier requires; the rest are the bare answer. So the model can often compute
  an answer but rarely writes it in the rewarded format: a lone node's groups are mostly zero-advantage until RL
  discovers the format (measured at the end and written to metadata.json).

    python scripts/build_sparse_model.py       # ~5-10 min on 2 CPU cores, deterministic for a given thread count

Held-out questions (the fixed `heldout_refs` sets every node evaluates on, first 1,000 per family) are never in the
warm-start data: training items come from training seeds, and any whose question text equals a held-out question is
dropped. The stop rule reads only a validation slice of the training data.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from build_tiny_model import build_model, build_tokenizer, load_tokenizer  # noqa: E402

from node.config import SPARSE_TASK_CONFIG, SPARSE_TASKS  # noqa: E402
from node.generation import SamplingConfig, generate_groups, greedy_answers, left_pad  # noqa: E402
from node.policy import Policy  # noqa: E402
from verifiers.prompts import build_prompt  # noqa: E402
from verifiers.rewards import RewardPolicy, reward  # noqa: E402
from verifiers.tasks import build_task, heldout_refs, parse_task_weights, sample_refs, score_answer  # noqa: E402

OUT = ROOT / "node" / "assets" / "tiny-sparse"
MAX_NEW = 10
# The prompt: the last user message with the families' constant instruction text dropped ("Calculate 3 + 4.",
# "Please solve ... final value.\n6.2/8.9 = ?", "Simplify the fraction $12/14$ to its lowest terms. ..." become
# "3 + 4.", "6.2/8.9 = ?", "simplify $12/14$"). A 1M-parameter model has no use for the instructions, and at one token
# per character they would make every round ~10x as long. Questions, answers and verifiers are unchanged.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(content='') -%}{%- for m in messages -%}{%- if m['role'] == 'user' -%}"
    "{%- set ns.content = m['content'] -%}{%- endif -%}{%- endfor -%}"
    "{{ ns.content"
    " | replace('Please solve this problem to a maximum of 3 significant digits, rounding up from the half. "
    "Only reply with the final value.\n', '')"
    " | replace('Simplify the fraction ', 'simplify ')"
    " | replace(' to its lowest terms. Give only the simplified fraction as your final answer.', '')"
    " | replace('Calculate ', '') }}"
)


def families() -> list[str]:
    return list(parse_task_weights(SPARSE_TASKS))


def canonical_answer(task) -> str:
    """The shortest text the verifier accepts: fractions as n/d (all styles score 1.0 that way), else the gold."""
    if task.ref.generator == "fraction_simplification":
        m = task.metadata
        return f"{m['simplified_numerator']}/{m['simplified_denominator']}"
    return str(task.answer)


def make_items(fam: str, n: int, rng: random.Random, banned: set[str]) -> list[tuple[str, str, object]]:
    items = []
    while len(items) < n:
        (ref,) = sample_refs({fam: 1.0}, 1, rng, configs=SPARSE_TASK_CONFIG)
        task = build_task(ref)
        if task.question in banned:
            continue
        ans = canonical_answer(task)
        assert score_answer(task, ans) == 1.0, (task, ans)
        items.append((task.question, ans, task))
    return items


def encode(tok, question: str, answer: str, tagged: bool) -> tuple[list[int], int]:
    prompt = tok(build_prompt(question, tok), add_special_tokens=False)["input_ids"]
    body = f"<answer>{answer}</answer>" if tagged else answer
    completion = tok(body, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt + completion, len(prompt)


def batch_tensors(rows: list[tuple[list[int], int]], pad: int):
    ids, mask = left_pad([r for r, _ in rows], pad, torch.device("cpu"))
    labels = ids.clone()
    for i, (r, p) in enumerate(rows):
        labels[i, : ids.shape[1] - len(r) + p] = -100  # pad and prompt: no loss
    return ids, mask, labels


def content_accuracy(policy: Policy, items) -> float:
    """Greedy accuracy on the answer itself, tags or not (the warm-start's progress; the format is measured apart)."""
    outs = greedy_answers(policy, [build_prompt(q, policy.tokenizer) for q, _, _ in items], MAX_NEW, micro_batch=256)
    ok = 0
    for o, (_, _, task) in zip(outs, items):
        text = o.strip()
        if text.startswith("<answer>") and text.endswith("</answer>"):
            text = text[len("<answer>"): -len("</answer>")]
        ok += score_answer(task, text) >= 1.0
    return ok / len(items)


def sampled_stats(policy: Policy, tasks, k: int, seed: int) -> dict:
    """What a node sees at round 0: reward of sampled completions and the share of zero-advantage groups."""
    rp = RewardPolicy()
    groups = generate_groups(policy, [build_prompt(t.question, policy.tokenizer) for t in tasks], k,
                             SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=MAX_NEW, micro_batch=256),
                             seed=seed)
    rewards = [[reward(t, c.text, rp) for c in g] for t, g in zip(tasks, groups)]
    tagged = sum(c.text.strip().startswith("<answer>") for g in groups for c in g)
    n = len(tasks)
    return {"sampled_reward": sum(map(sum, rewards)) / (n * k), "sampled_format": tagged / (n * k),
            "zero_advantage_groups": sum(max(r) == min(r) for r in rewards) / n,
            "all_wrong_groups": sum(max(r) == 0 for r in rewards) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--train-per-family", type=int, default=20_000)
    ap.add_argument("--val-per-family", type=int, default=100)
    ap.add_argument("--tagged", type=float, default=0.15, help="share of warm-start targets in the rewarded format")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--max-steps", type=int, default=2500)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--stop-at", type=float, default=0.20,
                    help="stop once mean greedy answer accuracy (tags or not) on the validation slice reaches this")
    ap.add_argument("--threads", type=int, default=2, help="fixed so the float reduction order is reproducible")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    vocab_size = build_tokenizer(args.out, args.max_len, CHAT_TEMPLATE)
    model = build_model(vocab_size, args)
    model.config.save_pretrained(args.out)
    tok = load_tokenizer(args.out)
    for f in families():  # every family's prompt is its short form
        (ref,) = sample_refs({f: 1.0}, 1, random.Random(0), configs=SPARSE_TASK_CONFIG)
        shown = build_prompt(build_task(ref).question, tok)
        assert len(shown) < 32 and "Please" not in shown and "Simplify the" not in shown, shown
        print(f"prompt of {f}: {shown!r}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tokenizer: {len(tok)} tokens; model: Qwen2 hidden {args.hidden}, {args.layers} layers, {n_params:,} params")

    fams = families()
    rng = random.Random(args.seed)
    heldout = {f: [build_task(r) for r in heldout_refs(f, 1000, SPARSE_TASK_CONFIG.get(f))] for f in fams}
    data, val = {}, {}
    for f in fams:
        banned = {t.question for t in heldout[f]}
        items = make_items(f, args.train_per_family + args.val_per_family, rng, banned)
        val[f], data[f] = items[: args.val_per_family], items[args.val_per_family:]
        print(f"{f}: {len(data[f])} train items ({len({q for q, _, _ in data[f]})} distinct), {len(val[f])} validation")

    policy = Policy(name=args.out.name, model=model, tokenizer=tok, device=torch.device("cpu"), dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    flat = [(q, a) for f in fams for q, a, _ in data[f]]
    t0 = time.time()
    step, loss_v, accs = 0, float("nan"), {}
    while step < args.max_steps:
        idx = torch.randint(len(flat), (args.batch,), generator=gen).tolist()
        tags = (torch.rand(args.batch, generator=gen) < args.tagged).tolist()
        rows = [encode(tok, *flat[i], tagged) for i, tagged in zip(idx, tags)]
        ids, mask, labels = batch_tensors(rows, tok.pad_token_id)
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
            accs = {f: content_accuracy(policy, val[f]) for f in fams}
            mean = sum(accs.values()) / len(accs)
            print(f"step {step:5d} loss {loss_v:.4f} val answer acc {mean:.3f} "
                  + " ".join(f"{f[:8]} {a:.2f}" for f, a in accs.items()) + f" ({time.time() - t0:.0f}s)", flush=True)
            if mean >= args.stop_at:
                break
    sft_s = time.time() - t0
    model.eval()

    # measured once, after training stopped: what a node sees on held-out questions at round 0
    ho = {}
    for f in fams:
        tasks = heldout[f][:200]
        ho[f] = {"greedy_answer_acc": content_accuracy(policy, [(t.question, "", t) for t in tasks]),
                 **{k: round(v, 4) for k, v in sampled_stats(policy, tasks, 8, seed=args.seed).items()}}
        print(f"held-out {f}: " + ", ".join(f"{k} {v:.3f}" for k, v in ho[f].items()))
    overall = {k: round(sum(h[k] for h in ho.values()) / len(ho), 4) for k in next(iter(ho.values()))}
    print("held-out, mean over families: " + ", ".join(f"{k} {v:.3f}" for k, v in overall.items()))

    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(args.out)
    meta = {
        "build_command": " ".join(["python scripts/build_sparse_model.py", *sys.argv[1:]]),
        "seed": args.seed, "threads": args.threads, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "architecture": "Qwen2ForCausalLM", "params": n_params, "vocab_size": len(tok), "hidden": args.hidden,
        "layers": args.layers, "heads": args.heads, "intermediate": 4 * args.hidden,
        "tasks": SPARSE_TASKS, "task_config": SPARSE_TASK_CONFIG,
        "sft": {"steps": step, "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "final_loss": loss_v,
                "tagged_share": args.tagged, "train_per_family": args.train_per_family,
                "seconds": round(sft_s, 1), "stop_rule": f"mean val greedy answer acc >= {args.stop_at}",
                "val_answer_acc": accs},
        "heldout_200_per_family": ho, "heldout_mean": overall,
        "build_seconds": round(time.time() - t_start, 1),
    }
    (args.out / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (args.out / "README.md").write_text(README.format(name=args.out.name, **meta, **meta["sft"], ho=overall))
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"saved {args.out} ({size / 1e6:.1f} MB) in {time.time() - t_start:.0f}s; SFT {step} steps, {sft_s:.0f}s")


README = """# {name}: an embedded model of the sparse regime

The tiny architecture ({params:,} parameters, Qwen2, hidden {hidden}, {layers} layers; the tiny character
tokenizer) warm-started for {steps} supervised steps on four task families (`--tasks {tasks}` with the configs in
node/config.py `SPARSE_TASK_CONFIG`), where only {tagged_share:.0%} of the targets were written in the rewarded
`<answer>...</answer>` format. It can often compute an answer but rarely writes it so that the verifier pays:
on held-out questions at the start (mean over the four families, 200 each) sampled reward {ho[sampled_reward]:.3f},
share of completions in the format {ho[sampled_format]:.3f}, zero-advantage groups of 8 {ho[zero_advantage_groups]:.3f},
greedy answer accuracy ignoring the format {ho[greedy_answer_acc]:.3f}. The SAPO paper's nodes start in this regime
(many all-wrong groups; the format is discovered during RL and spreads through the swarm).

Rebuild: `{build_command}` (seed {seed}, {threads} threads, torch {torch}, transformers {transformers}); the build is
deterministic for the same versions and thread count. See metadata.json for the per-family numbers.
"""

if __name__ == "__main__":
    main()
