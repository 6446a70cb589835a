"""A memory plan before anything loads: peak bytes of a node's run from the model's config alone, against the device.

Pure arithmetic over the model's shape (from its config.json: no weights are read), the dtype, LoRA settings,
micro-batch sizes, group size and the token budget. The terms follow what this node's code allocates:

  weights        params x dtype bytes (tied embeddings once); LoRA adapters in fp32 (peft keeps them so)
  reference      a full copy of the weights when beta != 0 without LoRA (with LoRA: the adapters switched off)
  gradients      trainable params x their bytes, after backward (set to None after each step)
  optimizer      AdamW: exp_avg + exp_avg_sq, 2 x trainable params, kept for the whole run
  optimizer step the step's temporaries: all trainable params once with CUDA's foreach AdamW, the largest tensor twice
                 on CPU and MPS (per-tensor loop)
  activations    what backward keeps of one training micro-batch: per layer and token, in dtype elements,
                 a x intermediate + b x hidden + 2 x kv width (a, b measured with torch's saved-tensor hooks on
                 Qwen2 blocks: fp32 full 4/8, fp32 LoRA 4/6.2, bf16 full 4/10, bf16 LoRA 5/20)
  logits         the completion's logits (logits_to_keep) in fp32: the division by temperature, logsumexp's saved
                 input and backward's buffers, ~5 copies of micro-batch x completion x vocab
  kv cache       generation: sequences per generate call x (prompt + max new tokens) x layers x 2 x kv width
  snapshot       a checkpoint copies weights (LoRA: adapters) and optimizer state to host memory and writes them while
                 the next round generates
  runtime        the process itself on CPU (python, torch, transformers, libp2p; measured)
  allocator      on CPU, glibc keeps freed activation blocks in its heap: activations cost 1.35-2.2x their bytes
                 (see _heap_factor); the caching allocators of CUDA and MPS: 1.1x

Completions are counted at max_new_tokens (a random or rambling policy reaches it) and prompts at PROMPT_TOKENS.
scripts/bench_memory.py checks the plan against measured peak RSS on CPU.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

GiB = 1024**3
PROMPT_TOKENS = 192  # a chat-templated task prompt: system line + instructions + question (Qwen: 120-180 tokens)
RUNTIME_CPU = int(0.45 * GiB)  # RSS of a node process beside its model (python, torch, transformers, peft, libp2p)
MMAP_THRESHOLD_MAX = 32 * 1024**2  # glibc's largest dynamic mmap threshold (64-bit)
CPU_HEAP_FACTOR, CPU_MMAP_FACTOR = 2.2, 1.35
HEADROOM = 0.9  # start only when the plan needs at most this share of what the device has free
_ACT = {  # (per intermediate, per hidden) activation elements per layer and token, by (dtype bytes, LoRA)
    (4, False): (4.0, 8.0), (4, True): (4.0, 6.2), (2, False): (4.0, 10.0), (2, True): (5.0, 20.0),
}
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tied: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False

    @classmethod
    def from_config(cls, c: Any) -> "ModelShape":
        """From a transformers config object or a config.json dict (Qwen2/Qwen3/Llama-style decoders)."""
        g = (lambda k, d=None: c.get(k, d)) if isinstance(c, dict) else (lambda k, d=None: getattr(c, k, d))
        if isinstance(c, dict) and "text_config" in c:
            return cls.from_config(c["text_config"])
        heads = int(g("num_attention_heads"))
        hidden = int(g("hidden_size"))
        model_type = g("model_type", "")
        return cls(vocab=int(g("vocab_size")), hidden=hidden, layers=int(g("num_hidden_layers")), heads=heads,
                   kv_heads=int(g("num_key_value_heads") or heads), head_dim=int(g("head_dim") or hidden // heads),
                   intermediate=int(g("intermediate_size")), tied=bool(g("tie_word_embeddings", False)),
                   qkv_bias=model_type == "qwen2" or bool(g("attention_bias", False)), qk_norm=model_type == "qwen3")

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one block."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def params(self) -> int:
        per_layer = sum(a * b for a, b in self.linears().values()) + 2 * self.hidden
        if self.qkv_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * per_layer + self.hidden

    def lora_params(self, r: int, targets: str | list[str]) -> int:
        names = _LINEARS if targets == "all-linear" else [t.split(".")[-1] for t in targets]
        return self.layers * sum(r * (a + b) for n, (a, b) in self.linears().items() if n in names)

    def largest_adapter(self, r: int, targets: str | list[str]) -> int:
        """The largest adapter matrix (the optimizer step works tensor by tensor off CUDA)."""
        names = _LINEARS if targets == "all-linear" else [t.split(".")[-1] for t in targets]
        return max((r * max(a, b) for k, (a, b) in self.linears().items() if k in names), default=0)

    @property
    def largest_tensor(self) -> int:
        return max(self.vocab * self.hidden, max(a * b for a, b in self.linears().values()))


@dataclass(frozen=True)
class Settings:
    """What the plan needs of a run besides the model's shape (a NodeConfig's memory-relevant part)."""

    dtype_bytes: int = 4
    device_type: str = "cpu"  # "cpu" | "cuda" | "mps"
    lora_r: int = 0
    lora_targets: str | list[str] = "all-linear"
    micro_batch_size: int = 64  # training sequences per forward/backward
    train_sequences: int = 64  # sequences trained per round: (I + J) x group size
    gen_micro_batch: int = 64
    group_size: int = 8
    questions_per_round: int = 8
    max_new_tokens: int = 512
    prompt_tokens: int = PROMPT_TOKENS
    beta: float = 0.0
    eval_prompts: int = 0  # held-out questions per evaluation (greedy, up to gen_micro_batch at once); 0 = none
    checkpoints: bool = True

    @property
    def gen_batch(self) -> int:
        """Sequences in one generate call (node.generation.generate_groups)."""
        per_call = min(self.group_size, self.gen_micro_batch)
        prompts = max(1, self.gen_micro_batch // self.group_size)
        return min(prompts, self.questions_per_round) * per_call

    @property
    def train_batch(self) -> int:
        return max(1, min(self.micro_batch_size, self.train_sequences))


@dataclass
class MemoryPlan:
    shape: ModelShape
    settings: Settings
    items: dict[str, int]  # bytes of each term
    train_peak: int  # device bytes while training (without runtime)
    gen_peak: int  # device bytes while generating, with a checkpoint being written if it shares the memory
    host_extra: int  # host bytes beyond the device's (CUDA: snapshot, loading); 0 where host is the device
    peak: int  # what the device needs at most, runtime included
    available: int | None = None  # free bytes on the device (None: unknown)
    host_available: int | None = None
    device_name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.fits_at(HEADROOM)

    def fits_at(self, headroom: float) -> bool:
        """The plan needs at most this share of the free memory (device and, on CUDA, host)."""
        dev_ok = self.available is None or self.peak <= headroom * self.available
        host_ok = self.host_available is None or self.host_extra <= headroom * self.host_available
        return dev_ok and host_ok

    def format(self) -> str:
        s = self.settings
        lines = [f"memory plan: {self.shape.params / 1e9:.2f}B params, {_dtype_name(s.dtype_bytes)}, "
                 f"{'LoRA r=' + str(s.lora_r) if s.lora_r else 'all weights train'}, on {self.device_name or s.device_type}",
                 f"  training micro-batch {s.train_batch} x {s.prompt_tokens}+{s.max_new_tokens} tokens; generation "
                 f"{s.gen_batch} sequences at once"]
        for k, v in self.items.items():
            if v:
                lines.append(f"  {k:<16} {v / GiB:8.2f} GiB")
        lines.append(f"  {'peak training':<16} {self.train_peak / GiB:8.2f} GiB")
        lines.append(f"  {'peak generation':<16} {self.gen_peak / GiB:8.2f} GiB")
        have = "unknown" if self.available is None else f"{self.available / GiB:.2f} GiB free"
        lines.append(f"  {'device needs':<16} {self.peak / GiB:8.2f} GiB   ({have})")
        if self.host_extra and s.device_type == "cuda":
            host = "unknown" if self.host_available is None else f"{self.host_available / GiB:.2f} GiB available"
            lines.append(f"  {'host needs':<16} {self.host_extra / GiB:8.2f} GiB   ({host})")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  fits" if self.fits else "  does NOT fit")
        return "\n".join(lines)


def _heap_factor(cpu: bool, tensor_bytes: int) -> float:
    """What a transient costs at peak per byte. CPU (glibc malloc): freed blocks under its 32 MiB mmap threshold stay
    in the heap and are not reused exactly, so activations held in such blocks cost ~2.2x their bytes, larger (mmapped)
    ones ~1.35x (measured, scripts/bench_memory.py). CUDA's and MPS's caching allocators reuse blocks: 1.1x."""
    if not cpu:
        return 1.1
    return CPU_HEAP_FACTOR if tensor_bytes <= MMAP_THRESHOLD_MAX else CPU_MMAP_FACTOR


def _dtype_name(n: int) -> str:
    return {4: "float32", 2: "16-bit"}.get(n, f"{n}-byte")


def plan(shape: ModelShape, s: Settings) -> MemoryPlan:
    """The peak of each phase from shape and settings; no device is asked (see `against_device`)."""
    b = s.dtype_bytes
    lora = s.lora_r > 0
    n = shape.params
    trainable = shape.lora_params(s.lora_r, s.lora_targets) if lora else n
    tb = 4 if lora else b  # peft keeps adapters in fp32 even on a 16-bit base
    weights = n * b
    adapters = trainable * 4 if lora else 0
    reference = n * b if s.beta != 0 and not lora else 0
    grads = trainable * tb
    optimizer = 2 * trainable * tb
    if s.device_type == "cuda":  # foreach AdamW: one temporary per parameter, all at once
        step = trainable * tb
    else:  # per-tensor AdamW: the largest tensor's temporaries
        step = 2 * (shape.largest_adapter(s.lora_r, s.lora_targets) if lora else shape.largest_tensor) * tb

    m, L, C = s.train_batch, s.prompt_tokens + s.max_new_tokens, s.max_new_tokens
    ci, ch = _ACT[(4 if b >= 4 else 2, lora)]
    cpu = s.device_type == "cpu"
    # per layer and token: the intermediate-wide tensors, then the hidden-wide ones (+ embeddings and final norm)
    act_i = shape.layers * m * L * ci * shape.intermediate * b
    act_h = shape.layers * m * L * (ch * shape.hidden + 2 * shape.kv_dim) * b + 4 * m * L * shape.hidden * b
    activations = int(act_i * _heap_factor(cpu, m * L * shape.intermediate * b)
                      + act_h * _heap_factor(cpu, m * L * shape.hidden * b))
    logits_one = m * (C + 1) * shape.vocab * 4
    logits = int(logits_one * (5 + (b / 4 if b < 4 else 0)) * _heap_factor(cpu, logits_one))
    # full training of a tied embedding: the head's gradient lands first in backward, the embedding's dense one later
    head_grad = 0 if lora else shape.vocab * shape.hidden * tb * (1 if shape.tied else 0)

    gen = max(s.gen_batch, min(s.gen_micro_batch, s.eval_prompts))  # sampling groups, or greedy evaluation
    kv = gen * L * shape.layers * 2 * shape.kv_dim * b
    gen_work = gen * shape.vocab * 4 * 4 + gen * s.prompt_tokens * (2 * shape.intermediate + 4 * shape.hidden) * b
    snapshot = (weights + optimizer if not lora else adapters + optimizer) if s.checkpoints else 0

    base = weights + adapters + reference + optimizer
    train_peak = base + max(activations + logits + head_grad, grads + step)
    shared_host = s.device_type != "cuda"
    # on CPU the heap keeps what training freed (not returned to the OS), so generation runs on top of it
    gen_peak = base + max(kv + gen_work, activations if cpu else 0) + (snapshot if shared_host else 0)
    runtime = RUNTIME_CPU if shared_host else 0
    peak = max(train_peak, gen_peak) + runtime
    host_extra = 0 if shared_host else RUNTIME_CPU + max(weights, snapshot)
    items = {"weights": weights, "adapters": adapters, "reference": reference, "gradients": grads,
             "optimizer": optimizer, "optimizer step": step, "activations": activations, "logits": logits,
             "head gradient": head_grad, "kv cache": kv, "generation": gen_work, "snapshot": snapshot,
             "runtime": runtime}
    return MemoryPlan(shape=shape, settings=s, items=items, train_peak=train_peak, gen_peak=gen_peak,
                      host_extra=host_extra, peak=peak)


# -- from a NodeConfig, against the device ---------------------------------------------------------------------------


class PlanUnavailable(Exception):
    """The model's config cannot be read here (the model itself would fail to load with a clearer reason)."""


def model_config(name: str) -> dict[str, Any]:
    """The model's config.json as a dict: a local directory's, or the Hub's (cache first; only config.json is
    fetched, never weights)."""
    from node.policy import _hub_reachable, _looks_local, _offline_env, resolve_name

    target = resolve_name(name)
    if _looks_local(target):
        path = Path(target).expanduser() / "config.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise PlanUnavailable(f"cannot read {path}: {e}") from e
    try:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(target, "config.json", local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached: one small download (the model load would need it anyway)
            if _offline_env() or not _hub_reachable():  # no network: fail fast, load_policy says why in one sentence
                raise PlanUnavailable(f"{target} is not cached and the Hub is not reachable") from None
            path = hf_hub_download(target, "config.json")
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except PlanUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - gated, offline, missing: load_policy reports it properly
        raise PlanUnavailable(f"cannot read the config of {target}: {type(e).__name__}") from e


def settings_for(cfg: Any, device_type: str, dtype_bytes: int) -> Settings:
    from node.lora import parse_targets

    return Settings(
        dtype_bytes=dtype_bytes, device_type=device_type, lora_r=cfg.lora_r,
        lora_targets=parse_targets(cfg.lora_target_modules) if cfg.lora_r else "all-linear",
        micro_batch_size=cfg.micro_batch_size, train_sequences=cfg.train_groups * cfg.group_size,
        gen_micro_batch=cfg.gen_micro_batch, group_size=cfg.group_size, questions_per_round=cfg.questions_per_round,
        max_new_tokens=cfg.max_new_tokens, beta=cfg.beta, eval_prompts=cfg.eval_size if cfg.eval_every > 0 else 0)


def device_memory(device: Any) -> tuple[int | None, str]:
    """(free bytes, a name) of a torch.device: CUDA's mem_get_info, MPS's recommended maximum less what it holds,
    the CPU's available RAM."""
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), f"{torch.cuda.get_device_name(device)} ({total / GiB:.0f} GiB)"
    if device.type == "mps":
        rec = int(torch.mps.recommended_max_memory())
        return rec - int(torch.mps.driver_allocated_memory()), "Apple MPS"
    return host_available(), "cpu"


def proc_kib(path: str, key: str) -> int | None:
    """A "Key:  N kB" line of a Linux /proc file (/proc/meminfo, /proc/self/status) in bytes; None where there is none."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def host_available() -> int | None:
    """Available RAM (MemAvailable on Linux; psutil elsewhere), less nothing: what a new allocation can get."""
    available = proc_kib("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def _own_rss() -> int:
    return proc_kib("/proc/self/status", "VmRSS") or 0


def plan_for_config(cfg: Any, config: dict[str, Any] | None = None) -> MemoryPlan:
    """The plan of a NodeConfig on the device it would use, with what that device has free."""
    from node.policy import pick_device, resolve_dtype

    dev = pick_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, dev)
    shape = ModelShape.from_config(config if config is not None else model_config(cfg.model))
    s = settings_for(cfg, dev.type, 4 if dtype.itemsize >= 4 else 2)
    return _with_device(plan(shape, s), dev)


def _with_device(p: MemoryPlan, dev: Any) -> MemoryPlan:
    free, name = device_memory(dev)
    if dev.type == "cpu" and free is not None:
        free += min(_own_rss(), RUNTIME_CPU)  # this process's RSS is in the plan's runtime already
    override = budget_override()
    p.available, p.device_name = (free if override is None else override), name
    if dev.type == "cuda":
        p.host_available = host_available() if override is None else override
    return p


def _replan(p: MemoryPlan, s: Settings) -> MemoryPlan:
    """The plan of other settings on the same device (its free memory as p saw it)."""
    q = plan(p.shape, s)
    q.available, q.host_available, q.device_name = p.available, p.host_available, p.device_name
    return q


def _halvings(v: int) -> list[int]:
    out = [max(1, v)]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _smaller_batches(p: MemoryPlan, s: Settings) -> Settings | None:
    """s with the largest micro-batches (halving from s's) under which the plan fits, or None."""
    # the training and generation peaks are separate maxima: fit each on its own, largest size first
    for mb in _halvings(s.micro_batch_size):
        if _replan(p, replace(s, micro_batch_size=mb, gen_micro_batch=1)).fits:
            break
    else:
        return None
    for gm in _halvings(s.gen_micro_batch):
        if _replan(p, replace(s, micro_batch_size=mb, gen_micro_batch=gm)).fits:
            return replace(s, micro_batch_size=mb, gen_micro_batch=gm)
    return None


def suggestions(p: MemoryPlan, auto: frozenset[str] = frozenset(), limit: int = 3) -> list[tuple[str, MemoryPlan]]:
    """Flags that would make the plan fit on the same device, with their plans: smaller micro-batches alone when that
    is enough (only given ones are named: those in `auto` the node picks itself), else up to `limit` of a LoRA rank,
    16-bit weights and fewer new tokens, each alone, or combined when none alone fits."""
    s0 = p.settings

    def option(s: Settings) -> tuple[str, MemoryPlan] | None:
        found = _smaller_batches(p, s)
        return None if found is None else (_flags(s0, found, auto), _replan(p, found))

    same = option(s0)
    if same is not None:
        return [same]
    lora = replace(s0, lora_r=16, lora_targets="all-linear") if s0.lora_r == 0 else None
    bf16 = replace(s0, dtype_bytes=2) if s0.dtype_bytes == 4 else None

    def fewer_tokens(s: Settings) -> tuple[str, MemoryPlan] | None:  # the most tokens that fit, at least 64
        for t in _halvings(s0.max_new_tokens)[1:]:
            if t < 64:
                return None
            found = option(replace(s, max_new_tokens=t))
            if found is not None:
                return found
        return None

    singles = [option(lora) if lora else None, option(bf16) if bf16 else None, fewer_tokens(s0)]
    both = replace(lora, dtype_bytes=2) if lora and bf16 else None
    combos = [option(both) if both else None, fewer_tokens(lora) if lora else None,
              fewer_tokens(both) if both else None, fewer_tokens(bf16) if bf16 else None]
    if s0.device_type == "cpu":  # 16-bit training on a CPU without bf16 units is ~30x slower: named last there
        singles = [singles[0], singles[2], singles[1]]
        combos = [combos[1], combos[0], combos[2], combos[3]]
    out = [o for o in singles if o is not None] or [o for o in combos if o is not None]
    return out[:limit]


def suggestion(p: MemoryPlan, auto: frozenset[str] = frozenset()) -> tuple[str, MemoryPlan] | None:
    """The first of `suggestions` (the smallest change), or None."""
    found = suggestions(p, auto, limit=1)
    return found[0] if found else None


def _flags(a: Settings, b: Settings, auto: frozenset[str] = frozenset()) -> str:
    out = []
    if b.lora_r != a.lora_r:
        out.append(f"--lora-r {b.lora_r}")
    if b.dtype_bytes != a.dtype_bytes:
        out.append("--dtype bfloat16")
    if b.micro_batch_size != a.micro_batch_size and "micro_batch_size" not in auto:
        out.append(f"--micro-batch-size {b.micro_batch_size}")
    if b.gen_micro_batch != a.gen_micro_batch and "gen_micro_batch" not in auto:
        out.append(f"--gen-micro-batch {b.gen_micro_batch}")
    if b.max_new_tokens != a.max_new_tokens:
        out.append(f"--max-new-tokens {b.max_new_tokens}")
    return " ".join(out)


def refusal(p: MemoryPlan, auto: frozenset[str] = frozenset()) -> str:
    """The one sentence `join` ends with when the plan does not fit (`auto`: the micro-batches the node picks itself,
    at 1 in p: none fitted)."""
    where = p.device_name or p.settings.device_type
    even = "even at micro-batch 1, " if auto else ""
    if p.available is not None and p.peak > HEADROOM * p.available:
        need = f"about {p.peak / GiB:.1f} GiB of {where} memory at its peak, but {p.available / GiB:.1f} GiB is free"
    else:
        need = (f"about {p.host_extra / GiB:.1f} GiB of host memory (checkpoints, loading), but "
                f"{(p.host_available or 0) / GiB:.1f} GiB is available")
    found = suggestions(p, auto)
    if not found:
        fix = "even LoRA in 16-bit with micro-batches of 1 and 64 new tokens would not fit: use a smaller model"
    else:
        parts = [f"{flags} {'would need ' if i == 0 else ''}about {max(q.peak, q.host_extra) / GiB:.1f} GiB"
                 for i, (flags, q) in enumerate(found)]
        fix = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + ", or " + parts[-1]
    return (f"{even}this run needs {need}; {fix} (`join --dry-run` prints the plan; --no-memory-check starts anyway)")


# -- micro-batches the user did not set: the largest that fit ---------------------------------------------------------

AUTO_FIELDS = ("micro_batch_size", "gen_micro_batch")
AUTO_HEADROOM = 0.8  # a micro-batch the node picks leaves a fifth of the free memory (other processes, the plan's error)
AUTO_MAX = 64  # the largest it picks: the fixed default before (a round's 8 x 8 sequences at once)


@dataclass
class Resolved:
    """A NodeConfig with both micro-batches set, and why."""

    cfg: Any
    plan: MemoryPlan | None  # with the values in cfg; None when the model's config cannot be read here
    chosen: dict[str, int]  # the micro-batches picked from the plan, by field (empty: all given, or no plan)
    why: list[str]  # one line per micro-batch picked
    no_plan: str = ""  # why there is no plan

    def fits(self) -> bool:
        return self.plan is None or self.plan.fits


def _pick(p: MemoryPlan, s: Settings, name: str, cap: int, cap_why: str) -> tuple[int, str] | None:
    """The largest of cap, cap/2, ..., 1 for field `name` under which the plan fits with AUTO_HEADROOM (micro-batch 1
    with the usual HEADROOM when nothing does), and why (cap_why: why no more than cap); None when even 1 does not
    fit."""
    free = "unknown" if p.available is None else f"{p.available / GiB:.1f} GiB"
    tried: tuple[int, MemoryPlan] | None = None  # the last, larger value that did not fit
    for v in _halvings(cap):
        q = _replan(p, replace(s, **{name: v}))
        if q.fits_at(AUTO_HEADROOM):
            if tried is None:
                return v, f"it needs about {q.peak / GiB:.1f} GiB at peak of {free} free; {cap_why}"
            return v, (f"{tried[0]} would need about {tried[1].peak / GiB:.1f} GiB at peak, over "
                       f"{AUTO_HEADROOM:.0%} of the {free} free")
        tried = (v, q)
    q = _replan(p, replace(s, **{name: 1}))
    if q.fits:
        return 1, (f"the smallest; about {q.peak / GiB:.1f} GiB at peak, within {HEADROOM:.0%} of the {free} free "
                   f"but without the usual margin")
    return None


def resolve_micro_batches(cfg: Any, config: dict[str, Any] | None = None) -> Resolved:
    """cfg with --micro-batch-size and --gen-micro-batch set: given values as they are, unset ones (None) the largest
    that fit the device's free memory by the plan, with margin. When even micro-batch 1 does not fit, the returned
    plan (at 1) does not fit either: `check_before_load` refuses it. No plan (the model's config unreadable here):
    MICRO_BATCH_FALLBACK."""
    from node.config import MICRO_BATCH_FALLBACK

    auto = [f for f in AUTO_FIELDS if getattr(cfg, f) is None]
    probe = cfg.replace(**{f: 1 for f in auto})
    try:
        p = plan_for_config(probe, config)
    except PlanUnavailable as e:
        why = [f"micro-batches {MICRO_BATCH_FALLBACK} (no memory plan: {e})"] if auto else []
        return Resolved(cfg.replace(**{f: MICRO_BATCH_FALLBACK for f in auto}), None, {}, why, no_plan=str(e))
    if not auto:
        return Resolved(cfg, p, {}, [])
    s = p.settings
    need = {"micro_batch_size": max(1, s.train_sequences),  # more than a round asks for is never used
            "gen_micro_batch": max(s.questions_per_round * s.group_size, s.eval_prompts)}
    caps = {k: min(AUTO_MAX, v) for k, v in need.items()}
    asked = {"micro_batch_size": f"a round trains {need['micro_batch_size']} sequences",
             "gen_micro_batch": f"a round generates {need['gen_micro_batch']} at most"}
    cap_why = {k: asked[k] if need[k] <= AUTO_MAX else f"{AUTO_MAX} is the most it picks" for k in caps}
    words = {"micro_batch_size": "training micro-batch", "gen_micro_batch": "generation micro-batch"}
    chosen: dict[str, int] = {}
    why: list[str] = []
    for name in AUTO_FIELDS:  # training first: on CPU generation runs on top of the heap training leaves
        if name not in auto:
            continue
        picked = _pick(p, s, name, caps[name], cap_why[name])
        if picked is None:
            return Resolved(probe.replace(**chosen), _replan(p, s), chosen, why)
        s = replace(s, **{name: picked[0]})
        chosen[name] = picked[0]
        why.append(f"{words[name]} {picked[0]}, from the memory plan: {picked[1]}")
    return Resolved(cfg.replace(**chosen), _replan(p, s), chosen, why)


def check_before_load(cfg: Any) -> Resolved:
    """cfg with its micro-batches resolved (`resolve_micro_batches`); refuses (ConfigError, one sentence) a run the
    plan says will not fit unless --no-memory-check."""
    from node.config import ConfigError

    r = resolve_micro_batches(cfg)
    if cfg.memory_check and not r.fits():
        raise ConfigError(refusal(r.plan, frozenset(f for f in AUTO_FIELDS if getattr(cfg, f) is None)))  # type: ignore[arg-type]
    return r


def budget_override() -> int | None:
    """SWARM_NODE_MEMORY_GIB: plan against this much free memory instead of what the device reports (a fair share
    of a machine others use too; tests)."""
    v = os.environ.get("SWARM_NODE_MEMORY_GIB")
    return int(float(v) * GiB) if v else None


def run_dry_run(cfg: Any) -> int:
    """`join --dry-run`: print the plan (only the model's config is read), the micro-batches it picks where none were
    given, and whether it fits; 0 fits, 1 does not."""
    import sys

    auto = frozenset(f for f in AUTO_FIELDS if getattr(cfg, f) is None)
    try:
        r = resolve_micro_batches(cfg)
    except ValueError as e:  # an unusable --device
        print(f"error: {e}", file=sys.stderr)
        return 2
    if r.plan is None:
        print(f"error: {r.no_plan}", file=sys.stderr)
        return 2
    for line in r.why:  # before the plan, whose last line says whether it fits
        print(line)
    print(r.plan.format())
    if not r.plan.fits:
        print(refusal(r.plan, auto).replace(" (`join --dry-run` prints the plan; --no-memory-check starts anyway)", ""))
    return 0 if r.plan.fits else 1
