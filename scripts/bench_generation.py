"""Generation throughput of the node (node/generation.py generate_groups) against the memory-bandwidth bound.

    flock /tmp/swarm-cpu.lock python scripts/bench_generation.py                 # CPU: tiny model + 0.5B shapes
    python scripts/bench_generation.py --device cuda                             # on a GPU (dtype auto = bf16)

Models:
  tiny   the embedded model (node/assets/tiny), with the node's tiny defaults: 32 arith prompts x group size 8
         (256 sequences), max_new_tokens 8, temperature 1; the batch (sequences per `generate` call, the node's
         --gen-micro-batch, default 64) is varied with --tiny-batches.
  0.5b   a Qwen2.5-0.5B-shaped Qwen2 (24 layers, hidden 896, 14/2 heads, intermediate 4864, vocab 151936, tied
         embeddings) with random weights (no hub access here), the tiny tokenizer for the prompts (its ids are valid
         in the larger vocabulary); one prompt x group size = batch, --big-new-tokens new tokens (random weights
         all but never sample EOS, so every row decodes every step).

Columns:
  params       parameter count (tied embeddings counted once)
  batch        sequences decoded together in one `generate` call
  tokens/s     generated tokens (completion tokens up to and including EOS, what the node keeps) per second of
               wall time of the whole generate_groups call (tokenizing, prefill, decoding, splitting)
  ms/step      wall time / decoding steps, where a call's steps = its longest completion (generate stops when every
               row has finished); the prefill is counted in the first step
  bound tok/s  batch / (bytes of weights / memory bandwidth): every decoding step reads all weights once (the
               LM head reads the whole tied embedding), and that one read serves every sequence of the batch;
               KV-cache and activation traffic are ignored, so the true bound is a little lower
  of bound     (batch x steps / wall time) / bound tok/s: how close the decoding rate gets to the bound
The memory bandwidth is measured here: the median of a few reads (sum) of a --bw-mib MiB tensor on the device,
with the same torch thread count (copy bandwidth, read + write, is printed too).
Timings: the median of --repeats runs after one warm-up run, on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from node.generation import SamplingConfig, generate_groups  # noqa: E402
from node.policy import Policy, load_policy, resolve_dtype  # noqa: E402

GROUP = 8  # the node's --group-size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth(device: torch.device, mib: int, reps: int = 7) -> tuple[float, float]:
    """(read GB/s, copy GB/s counting read + write) of a `mib` MiB fp32 tensor on `device`."""
    n = mib * 2**20 // 4
    a = torch.ones(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    reads, copies = [], []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        s = a.sum()
        float(s)  # forces the reduction (and a cuda sync)
        t1 = time.perf_counter()
        b.copy_(a)
        sync(device)
        t2 = time.perf_counter()
        reads.append(t1 - t0)
        copies.append(t2 - t1)
    nbytes = n * 4
    return nbytes / statistics.median(reads) / 1e9, 2 * nbytes / statistics.median(copies) / 1e9


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(parameter count, bytes) with shared (tied) tensors counted once."""
    seen, n, nbytes = set(), 0, 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        n += p.numel()
        nbytes += p.numel() * p.element_size()
    return n, nbytes


def arith_prompts(policy: Policy, n: int, seed: int) -> list[str]:
    import random

    from verifiers.prompts import build_prompt
    from verifiers.tasks import build_task, parse_task_weights, sample_refs

    refs = sample_refs(parse_task_weights("arith"), n, random.Random(seed))
    return [build_prompt(build_task(r).question, policy.tokenizer) for r in refs]


def measure(policy: Policy, prompts: list[str], group: int, cfg: SamplingConfig, repeats: int) -> tuple[float, int, int]:
    """(median wall seconds, generated tokens, decoding steps) of generate_groups(prompts, group, cfg)."""
    generate_groups(policy, prompts, group, cfg, seed=0)  # warm-up
    times, tokens, steps = [], 0, 0
    for r in range(repeats):
        sync(policy.device)
        t0 = time.perf_counter()
        groups = generate_groups(policy, prompts, group, cfg, seed=1 + r)
        sync(policy.device)
        times.append(time.perf_counter() - t0)
        if r == 0:  # the same seed gives the same completions; count them once
            tokens = sum(len(c.token_ids) for g in groups for c in g)
            per_call = max(1, cfg.micro_batch // group)  # prompts per generate call (group <= micro_batch)
            steps = sum(max(len(c.token_ids) for g in groups[i:i + per_call] for c in g)
                        for i in range(0, len(groups), per_call))
    return statistics.median(times), tokens, steps


def row(name: str, n_params: int, nbytes: int, batch: int, seconds: float, tokens: int, steps: int, bw: float) -> str:
    bound_step = nbytes / (bw * 1e9)  # seconds to read every weight once
    bound_tps = batch / bound_step
    decode_tps = batch * steps / seconds  # every call decodes `batch` rows; `steps` sums the calls' steps
    return (f"| {name} | {n_params / 1e6:.2f}M | {batch} | {tokens / seconds:,.0f} | {seconds / steps * 1e3:.2f} "
            f"| {bound_tps:,.0f} | {decode_tps / bound_tps:.2%} |")


def qwen05b_shaped(device: torch.device, dtype: torch.dtype, tiny: Policy) -> Policy:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, hidden_act="silu",
        bos_token_id=None, eos_token_id=None, pad_token_id=tiny.tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    # near-uniform random logits emit the tiny tokenizer's EOS with p ~ 1/151936 a token: every row runs to the end
    return Policy(name="qwen2.5-0.5b-shaped", model=model, tokenizer=tiny.tokenizer, device=device, dtype=dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on a bf16 GPU), float32, bfloat16")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on CPU (0 = torch's default)")
    ap.add_argument("--prompts", type=int, default=32, help="tiny: prompts per round (tiny default 32)")
    ap.add_argument("--tiny-batches", default="8,16,64,256", help="tiny: sequences per generate call")
    ap.add_argument("--tiny-new-tokens", type=int, default=8, help="tiny default max_new_tokens")
    ap.add_argument("--big-batches", default="1,4,16", help="0.5B shapes: sequences per call ('' to skip)")
    ap.add_argument("--big-new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bw-mib", type=int, default=1024, help="size of the bandwidth test tensor")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    tiny = load_policy("tiny", device=args.device, dtype=args.dtype)
    device, dtype = tiny.device, tiny.dtype
    read_bw, copy_bw = memory_bandwidth(device, args.bw_mib)
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device {device} ({what}), dtype {dtype}, torch {torch.__version__}")
    print(f"memory bandwidth: read {read_bw:.1f} GB/s, copy (read + write) {copy_bw:.1f} GB/s "
          f"({args.bw_mib} MiB fp32 tensor); the bound uses the read figure\n")
    print("| model | params | batch | tokens/s | ms/step | bound tok/s | of bound |")
    print("|---|---|---|---|---|---|---|")

    prompts = arith_prompts(tiny, args.prompts, seed=0)
    n_params, nbytes = weight_bytes(tiny.model)
    for b in [int(x) for x in args.tiny_batches.split(",") if x.strip()]:
        cfg = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.tiny_new_tokens, micro_batch=b)
        secs, tokens, steps = measure(tiny, prompts, GROUP, cfg, args.repeats)
        print(row("tiny", n_params, nbytes, b, secs, tokens, steps, read_bw), flush=True)

    big_batches = [int(x) for x in args.big_batches.split(",") if x.strip()]
    if big_batches:
        big = qwen05b_shaped(device, dtype, tiny)
        n_params, nbytes = weight_bytes(big.model)
        for b in big_batches:
            cfg = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.big_new_tokens, micro_batch=b)
            secs, tokens, steps = measure(big, prompts[:1], b, cfg, max(1, args.repeats - 1))
            print(row("0.5B-shaped", n_params, nbytes, b, secs, tokens, steps, read_bw), flush=True)
    print(f"\n(tiny: {args.prompts} prompts x {GROUP}, max_new_tokens {args.tiny_new_tokens}; 0.5B-shaped: 1 prompt x "
          f"batch, {args.big_new_tokens} new tokens; weights {dtype}; median of the timed runs after a warm-up)")


if __name__ == "__main__":
    main()
