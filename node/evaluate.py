"""`swarm-node eval`: held-out accuracy of models and node checkpoints, side by side, on the node's own held-out split.

The questions are exactly Learner.evaluate's (verifiers.tasks.heldout_refs: seed HELDOUT_SEED_BASE, which no training
sampler draws, n split evenly over the families), prompted and scored the same way (chat template, binary verifier), and
greedy answers are decoded in the same batches, so greedy accuracy here equals the node's `heldout_acc` on the same
weights. Sampled accuracy and pass@k (the unbiased estimator of Chen et al. 2021) come from `samples` completions per
question at the node's temperature, seeded per batch: the same command prints the same numbers.
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from node.config import ConfigError, NodeConfig, model_defaults, parse_task_config
from node.checkpoint import STATE_FILE, _read_verified_state
from node.export import EXPORT_INFO_FILE, ExportError, find_checkpoint, is_checkpoint, is_checkpoint_root, load_trained
from node.policy import ALIASES, Policy, _looks_local, load_policy

SCHEMA = "swarm-node eval/1"
GREEDY_BATCH = 64  # greedy_answers' micro-batch, as Learner.evaluate calls it: same batches, same numbers
SAMPLED_BATCH = 64  # sequences (prompts x samples) per sampled generate call


class EvalError(Exception):
    """An evaluation that cannot be run as asked; str() is one sentence."""


@dataclass(frozen=True)
class EvalSettings:
    tasks: str  # "family[:weight],..." as --tasks; every listed family is evaluated (as Learner.evaluate does)
    task_config: str  # JSON, as --task-config
    n: int  # held-out questions in all, split evenly over the families (the node's --eval-size)
    samples: int  # sampled completions per question (0 = greedy only)
    ks: tuple[int, ...]  # pass@k for each k <= samples
    seed: int
    max_new_tokens: int
    temperature: float
    top_p: float


@dataclass
class Loaded:
    spec: str  # what the user typed
    kind: str  # "checkpoint", "directory" or "model" (an alias or a hub id)
    policy: Policy
    model_name: str  # the base model (a checkpoint's recorded name)
    checkpoint: Path | None = None
    round: int | None = None
    config: dict[str, Any] | None = None  # the node's settings, for a checkpoint


def check_spec(spec: str) -> str:
    """What `spec` names ("checkpoint", "directory", "model"), checked without loading a model: every --model is
    checked before the first is evaluated, so a typo in the second does not wait for the first's evaluation."""
    p = Path(spec).expanduser()
    if p.exists():
        if is_checkpoint(p) or is_checkpoint_root(p) or (p.is_file() and p.name == STATE_FILE):
            _read_verified_state(find_checkpoint(p))  # damage is reported now, by name
            return "checkpoint"
        if p.is_dir() and (p / "config.json").is_file():
            return "directory"
        raise EvalError(f"{p} is neither a model directory (config.json), a node checkpoint ({STATE_FILE}) "
                        "nor a directory of checkpoints (round-*)")
    first = Path(spec).parts[0] if Path(spec).parts else spec
    if spec.strip().lower() not in ALIASES and (_looks_local(spec) or (os.sep in spec and Path(first).is_dir())):
        raise EvalError(f"no model directory or checkpoint at {p}")
    return "model"


def load_model(spec: str, *, device: str = "auto", dtype: str = "auto", base: str | None = None) -> Loaded:
    """A node checkpoint (or directory of them), a model directory, an alias or a hub id."""
    kind = check_spec(spec)
    p = Path(spec).expanduser()
    if kind == "checkpoint":
        t = load_trained(p, base=base, device=device, dtype=dtype)
        return Loaded(spec, "checkpoint", t.policy, t.state["model_name"], t.checkpoint, t.round, t.config)
    if kind == "directory":
        # an export keeps its node's settings (swarm_node.json): evaluated by default as its checkpoint would be
        info = _export_info(p)
        return Loaded(spec, "directory", load_policy(str(p), device=device, dtype=dtype), str(p),
                      round=info.get("round"), config=info.get("config"))
    return Loaded(spec, "model", load_policy(spec, device=device, dtype=dtype), spec)


def _export_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads((path / EXPORT_INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}  # not an export (or a damaged note): the model's own defaults apply
    ok = isinstance(info, dict) and isinstance(info.get("config"), dict)
    return {"round": info.get("round") if isinstance(info.get("round"), int) else None,
            "config": info["config"]} if ok else {}


def resolve_settings(first: Loaded, *, tasks: str | None = None, task_config: str | None = None, n: int = 500,
                     samples: int = 8, ks: tuple[int, ...] | None = None, seed: int = 0,
                     max_new_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None) -> EvalSettings:
    """Unset settings come from the first model: a checkpoint's node settings, else the model's defaults (as `join`)."""
    from verifiers.tasks import parse_task_weights

    node = first.config or {}
    defaults = {**_sampling_defaults(), **model_defaults(first.model_name)}

    def pick(value: Any, key: str) -> Any:
        return value if value is not None else node.get(key, defaults[key])

    s = EvalSettings(
        tasks=pick(tasks, "tasks"), task_config=pick(task_config, "task_config") or "", n=n, samples=samples,
        ks=tuple(sorted(set(ks))) if ks else tuple(sorted({1, samples})) if samples else (), seed=seed,
        max_new_tokens=int(pick(max_new_tokens, "max_new_tokens")), temperature=float(pick(temperature, "temperature")),
        top_p=float(pick(top_p, "top_p")),
    )
    parse_task_weights(s.tasks)  # TaskError: one sentence
    parse_task_config(s.task_config)  # ConfigError: one sentence
    if n < 1 or samples < 0 or s.max_new_tokens < 1:
        raise EvalError("--n and --max-new-tokens must be >= 1 and --samples >= 0")
    if not s.temperature > 0 or not 0 < s.top_p <= 1:
        raise EvalError("--temperature must be > 0 and --top-p in (0, 1]")
    bad = [k for k in s.ks if k < 1 or k > samples]
    if bad:
        raise EvalError(f"pass@k needs 1 <= k <= --samples ({samples}); got k = {bad[0]}")
    return s


def _sampling_defaults() -> dict[str, Any]:
    d = NodeConfig()
    return {"temperature": d.temperature, "top_p": d.top_p}


def heldout_tasks(s: EvalSettings) -> list[tuple[str, Any]]:
    """(family, Task) in Learner.evaluate's order: each family's first n // families held-out refs."""
    from verifiers.tasks import build_task, heldout_refs, parse_task_weights

    weights = parse_task_weights(s.tasks)
    configs = parse_task_config(s.task_config)
    k = max(1, s.n // len(weights))
    return [(fam, build_task(r)) for fam in weights for r in heldout_refs(fam, k, configs.get(fam))]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(policy: Policy, s: EvalSettings, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Per family and overall: greedy accuracy, and (samples > 0) sampled accuracy and pass@k."""
    from node.generation import SamplingConfig, generate_groups, greedy_answers
    from verifiers.prompts import build_prompt
    from verifiers.rewards import RewardPolicy, reward

    strict = RewardPolicy(mode="binary")
    items = heldout_tasks(s)
    prompts = [build_prompt(t.question, policy.tokenizer) for _, t in items]
    greedy: list[bool] = []
    for i in range(0, len(prompts), GREEDY_BATCH):
        texts = greedy_answers(policy, prompts[i:i + GREEDY_BATCH], s.max_new_tokens, micro_batch=GREEDY_BATCH)
        greedy += [reward(t, x, strict) >= 1.0 for (_, t), x in zip(items[i:i + GREEDY_BATCH], texts)]
        if progress:
            progress(len(texts))
    correct: list[int] = []
    if s.samples:
        cfg = SamplingConfig(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                             micro_batch=SAMPLED_BATCH)
        per = max(1, SAMPLED_BATCH // s.samples)
        for b, i in enumerate(range(0, len(prompts), per)):
            # one seed per batch, fixed by (seed, batch): the numbers do not depend on what else is evaluated
            groups = generate_groups(policy, prompts[i:i + per], s.samples, cfg, seed=(s.seed * 1_000_003 + b) % 2**31)
            correct += [sum(reward(t, c.text, strict) >= 1.0 for c in g) for (_, t), g in zip(items[i:i + per], groups)]
            if progress:
                progress(len(groups))
    families: dict[str, dict[str, Any]] = {}
    for fam in dict.fromkeys(f for f, _ in items):
        idx = [j for j, (f, _) in enumerate(items) if f == fam]
        families[fam] = _summary(idx, greedy, correct, s)
    # per question, to see which answers changed between two models: [family, held-out index, greedy 0/1, samples
    # correct (absent without samples)]
    questions = [[f, t.ref.index, int(g)] + ([correct[j]] if s.samples else [])
                 for j, ((f, t), g) in enumerate(zip(items, greedy))]
    return {"families": families, "overall": _summary(list(range(len(items))), greedy, correct, s),
            "questions": questions}


def _summary(idx: list[int], greedy: list[bool], correct: list[int], s: EvalSettings) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(idx), "greedy_acc": sum(greedy[j] for j in idx) / len(idx)}
    if s.samples:
        out["sampled_acc"] = sum(correct[j] for j in idx) / (len(idx) * s.samples)
        out["pass_at_k"] = {str(k): sum(pass_at_k(s.samples, correct[j], k) for j in idx) / len(idx) for k in s.ks}
    return out


def work_units(s: EvalSettings) -> int:
    n = len(heldout_tasks(s))
    return n * (2 if s.samples else 1)


# -- the command --------------------------------------------------------------------------------------------------


def run_eval(*, models: tuple[str, ...], tasks: str | None, task_config: str | None, n: int, samples: int,
             ks: str | None, seed: int, max_new_tokens: int | None, temperature: float | None, top_p: float | None,
             device: str, dtype: str, base: str | None, threads: int, out: str | None) -> int:
    """The CLI's body: load, evaluate, print a table, write JSON; a user's mistake is one `error:` line and exit 2."""
    from node.app import user_error

    path = Path(out).expanduser() if out else None
    try:
        if path is not None:  # before the evaluation, not after it
            path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        report = _run(models, tasks=tasks, task_config=task_config, n=n, samples=samples, ks=_parse_ks(ks),
                      seed=seed, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, device=device,
                      dtype=dtype, base=base, threads=threads)
    except KeyboardInterrupt:
        return 130
    except (EvalError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - sorted into user mistakes and bugs right here
        msg = user_error(e)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(format_report(report))
    if path is not None:
        try:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(to_json(report), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            print(f"error: cannot write {path}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
    return 0


def to_json(report: dict[str, Any]) -> str:
    """Indented JSON with each per-question row on one line (500 rows stay 500 lines)."""
    rows: list[str] = []
    models = []
    for m in report["models"]:
        m = dict(m)
        marks = []
        for q in m.get("questions", []):
            marks.append(f"@@row{len(rows)}@@")
            rows.append(json.dumps(q))
        m["questions"] = marks
        models.append(m)
    text = json.dumps({**report, "models": models}, indent=1)
    return re.sub(r'"@@row(\d+)@@"', lambda m: rows[int(m.group(1))], text) + "\n"


def _parse_ks(spec: str | None) -> tuple[int, ...] | None:
    if not spec:
        return None
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise EvalError(f"--k must be comma-separated whole numbers, e.g. 1,4,8; got {spec!r}") from None


def _run(specs: tuple[str, ...], *, device: str, dtype: str, base: str | None, threads: int,
         **settings: Any) -> dict[str, Any]:
    import torch
    from transformers.utils import logging as hf_logging

    if not specs:
        raise EvalError("name at least one --model")
    if threads > 0:
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # our own bar (on a terminal) says more
    for spec in specs:
        check_spec(spec)
    results: list[dict[str, Any]] = []
    s: EvalSettings | None = None
    for spec in specs:
        t0 = time.monotonic()
        loaded = load_model(spec, device=device, dtype=dtype, base=base)
        if s is None:  # every model answers the same questions under the same settings
            s = resolve_settings(loaded, **settings)
        bar = _progress(work_units(s), spec)
        try:
            figures = evaluate(loaded.policy, s, progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
        results.append({
            "model": spec, "kind": loaded.kind, "model_name": loaded.model_name,
            "checkpoint": str(loaded.checkpoint) if loaded.checkpoint else None, "round": loaded.round,
            "device": str(loaded.policy.device), "dtype": str(loaded.policy.dtype).replace("torch.", ""),
            **figures, "seconds": round(time.monotonic() - t0, 2),
        })
        del loaded  # one model in memory at a time
    assert s is not None
    return {"schema": SCHEMA, "split": "heldout", "settings": {**asdict(s), "ks": list(s.ks)}, "models": results}


def _progress(total: int, label: str):
    if not sys.stderr.isatty():  # a bar is for a person watching; logs and pipes get the result only
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=label[-40:], unit="q", file=sys.stderr, leave=False, dynamic_ncols=True)


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    models = report["models"]
    cols = ["greedy"] + (["sampled"] + [f"pass@{k}" for k in s["ks"]] if s["samples"] else [])
    per = models[0]["overall"]["n"] // max(1, len(models[0]["families"]))
    lines = [f"held-out split: {models[0]['overall']['n']} questions ({per} per family), seed {s['seed']}, "
             f"{s['max_new_tokens']} new tokens"
             + (f", {s['samples']} samples each at temperature {s['temperature']:g}, top-p {s['top_p']:g}"
                if s["samples"] else "")]
    width = max(len(c) for c in cols) + 2
    names = [_label(m) for m in models]
    block = max(len(cols) * width, max(len(n) for n in names) + 2)
    fam_w = max(10, *(len(f) + 2 for f in models[0]["families"]))
    lines.append(" " * fam_w + "".join(n.ljust(block) for n in names).rstrip())
    lines.append("family".ljust(fam_w) + "".join("".join(c.rjust(width) for c in cols).ljust(block)
                                                  for _ in models).rstrip())
    rows = list(models[0]["families"]) + ["all"]
    for fam in rows:
        cells = []
        for m in models:
            f = m["overall"] if fam == "all" else m["families"][fam]
            vals = [f["greedy_acc"]] + ([f["sampled_acc"]] + [f["pass_at_k"][str(k)] for k in s["ks"]]
                                        if s["samples"] else [])
            cells.append("".join(f"{v:.3f}".rjust(width) for v in vals).ljust(block))
        lines.append(fam.ljust(fam_w) + "".join(cells).rstrip())
    if len(models) >= 2:
        a, b = models[0]["overall"], models[-1]["overall"]
        diff = [("greedy", b["greedy_acc"] - a["greedy_acc"])]
        if s["samples"]:
            diff += [("sampled", b["sampled_acc"] - a["sampled_acc"])]
            diff += [(f"pass@{k}", b["pass_at_k"][str(k)] - a["pass_at_k"][str(k)]) for k in s["ks"]]
        lines.append(f"{names[-1]} vs {names[0]}: " + ", ".join(f"{k} {v:+.3f}" for k, v in diff))
    return "\n".join(lines)


def _label(m: dict[str, Any]) -> str:
    return m["model"] + (f" (round {m['round']})" if m.get("round") is not None else "")
