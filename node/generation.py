"""Batched group sampling for GRPO rollouts, and greedy decoding for evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from node.policy import Policy


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0  # <= 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 32
    micro_batch: int = 64  # most sequences (prompts x samples) in one generate call: bounds peak memory


@dataclass(frozen=True)
class Completion:
    text: str  # decoded without pad/eos; keeps plain-text tags such as <answer>
    token_ids: tuple[int, ...]  # completion tokens up to and including the first EOS, nothing after
    truncated: bool  # True when no EOS came within max_new_tokens


def eos_token_ids(policy: Policy) -> list[int]:
    """All ids that end a completion: the model's generation config (often several) plus the tokenizer's eos."""
    ids: list[int] = []
    gen_eos = getattr(policy.model.generation_config, "eos_token_id", None)
    for x in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [policy.tokenizer.eos_token_id]:
        if x is not None and x not in ids:
            ids.append(int(x))
    if not ids:
        raise ValueError(f"Model '{policy.name}' has no EOS token; completions could never end.")
    return ids


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """Tokenize a (chat-templated) prompt; no second BOS when the template already wrote one."""
    bos = getattr(tokenizer, "bos_token", None)
    add = not (bos and prompt.startswith(bos))
    return tokenizer(prompt, add_special_tokens=add)["input_ids"]


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows to one width; returns (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def _generate_kwargs(policy: Policy, cfg: SamplingConfig, n_return: int, eos: list[int]) -> dict:
    # Every sampling knob is explicit: transformers fills unset (None) values from the model's own
    # generation_config (e.g. Qwen's top_k=20, repetition_penalty=1.05), which would make the sampling
    # distribution differ from the plain softmax(logits / T) the GRPO trainer recomputes.
    sample = cfg.temperature > 0
    kw = dict(max_new_tokens=cfg.max_new_tokens, num_return_sequences=n_return, do_sample=sample,
              pad_token_id=policy.tokenizer.pad_token_id, eos_token_id=eos, repetition_penalty=1.0,
              no_repeat_ngram_size=0, min_new_tokens=0, num_beams=1, use_cache=True)
    if sample:
        kw.update(temperature=float(cfg.temperature), top_p=float(cfg.top_p), top_k=0, typical_p=1.0)
    return kw


def _split(policy: Policy, row: torch.Tensor, eos: set[int]) -> Completion:
    ids = row.tolist()
    cut = next((i for i, t in enumerate(ids) if t in eos), None)
    kept = ids if cut is None else ids[: cut + 1]
    # Text keeps every sampled token (special or not) except EOS and pad, so it reflects what the model wrote.
    pad = policy.tokenizer.pad_token_id
    text_ids = [t for t in (kept[:-1] if cut is not None else kept) if t != pad]
    text = policy.tokenizer.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return Completion(text=text, token_ids=tuple(kept), truncated=cut is None)


@torch.inference_mode()
def _sample_chunk(policy: Policy, prompts: list[list[int]], n_return: int, cfg: SamplingConfig,
                  eos: list[int]) -> list[list[Completion]]:
    ids, mask = left_pad(prompts, policy.tokenizer.pad_token_id, policy.device)
    out = policy.model.generate(input_ids=ids, attention_mask=mask, **_generate_kwargs(policy, cfg, n_return, eos))
    new = out[:, ids.shape[1]:].cpu()
    eos_set = set(eos)
    comps = [_split(policy, new[i], eos_set) for i in range(new.shape[0])]
    return [comps[p * n_return:(p + 1) * n_return] for p in range(len(prompts))]


def generate_groups(policy: Policy, prompts: list[str], group_size: int, cfg: SamplingConfig,
                    seed: int | None = None) -> list[list[Completion]]:
    """group_size completions per prompt; result[i] is prompt i's group. Same seed -> same outputs."""
    if group_size < 1 or cfg.micro_batch < 1:
        raise ValueError("group_size and micro_batch must be >= 1")
    if not prompts:
        return []
    tok_rows = [prompt_token_ids(policy.tokenizer, p) for p in prompts]
    if any(not r for r in tok_rows):
        raise ValueError("generate_groups got an empty prompt; every prompt needs at least one token")
    eos = eos_token_ids(policy)
    greedy = cfg.temperature <= 0  # every member of a greedy group is the same: decode once, copy
    per_call = 1 if greedy else min(group_size, cfg.micro_batch)  # samples of one prompt per generate call
    prompts_per_call = cfg.micro_batch if greedy else max(1, cfg.micro_batch // group_size)
    devices = [policy.device.index or 0] if policy.device.type == "cuda" else []
    groups: list[list[Completion]] = [[] for _ in prompts]
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):  # leave the caller's RNG stream alone
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(prompts), prompts_per_call):
            chunk = tok_rows[start:start + prompts_per_call]
            if greedy:
                for j, g in enumerate(_sample_chunk(policy, chunk, 1, cfg, eos)):
                    groups[start + j] = g * group_size
                continue
            done = 0
            while done < group_size:  # only loops when group_size > micro_batch
                n = min(per_call, group_size - done)
                for j, g in enumerate(_sample_chunk(policy, chunk, n, cfg, eos)):
                    groups[start + j].extend(g)
                done += n
    return groups


def greedy_answers(policy: Policy, prompts: list[str], max_new_tokens: int = 32, micro_batch: int = 64) -> list[str]:
    """Greedy completion text for each prompt (for evaluation)."""
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens, micro_batch=micro_batch)
    return [g[0].text for g in generate_groups(policy, prompts, 1, cfg)]
