"""A node's checkpoint as a standard Hugging Face model directory (what a user takes home), and back as a Policy.

A checkpoint holds weights only (node.checkpoint); the architecture and tokenizer come from the base model the node
was started with, whose name the checkpoint records. So: load the base through node.policy's loader (any model `join`
accepts), load the checkpoint's weights into it, and `save_pretrained` both, with a model card built from the
checkpoint's round history. The directory is written beside its destination and renamed into place, so an export is
either complete or absent, and a failed push to the Hub never touches it.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from node.checkpoint import (MODEL_FILE, STATE_FILE, CheckpointError, _read_verified_state, install_replacing,
                             latest_checkpoint, load_checkpoint)
from node.config import model_defaults
from node.policy import (ALIASES, ModelUnavailable, Policy, _hub_reachable, _looks_local, _offline_env, load_policy,
                         resolve_name)

EXPORT_INFO_FILE = "swarm_node.json"  # machine-readable provenance next to the card


class ExportError(Exception):
    """An export or a push that cannot be done; str() is one sentence a user can act on."""


@dataclass
class Trained:
    """A checkpoint loaded into its base model."""

    policy: Policy
    checkpoint: Path
    state: dict[str, Any]  # the checkpoint's state.json

    @property
    def round(self) -> int:
        return int(self.state["round"])

    @property
    def config(self) -> dict[str, Any]:
        return self.state.get("config") or {}

    @property
    def lora(self) -> dict[str, Any] | None:
        """The LoRA settings the node trained with (None: every weight trained)."""
        return (self.state.get("model") or {}).get("lora")

    @property
    def history(self) -> list[dict[str, Any]]:
        return list((self.state.get("extra") or {}).get("history") or [])


def is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / STATE_FILE).is_file()


def is_checkpoint_root(path: Path) -> bool:
    return path.is_dir() and any(p.is_dir() for p in path.glob("round-*"))


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A checkpoint (round-NNNNNN/) as is, or the newest intact one of a checkpoint directory."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == STATE_FILE:
        p = p.parent
    if not p.exists():
        raise ExportError(f"no checkpoint or checkpoint directory at {p}")
    if is_checkpoint(p):
        return p
    if is_checkpoint_root(p):
        found = latest_checkpoint(p)
        if found is None:
            raise ExportError(f"{p} holds no intact checkpoint (every round-* directory is damaged or incomplete)")
        return found
    if (p / "config.json").is_file():
        raise ExportError(f"{p} is a model directory, not a node checkpoint (round-NNNNNN/ with {STATE_FILE})")
    raise ExportError(f"{p} is neither a node checkpoint (round-NNNNNN/ with {STATE_FILE}) nor a directory of them")


def _weights_dtype(path: Path) -> str:
    """The floating dtype most of the checkpoint's weights are stored in, as load_policy names it."""
    from safetensors import SafetensorError, safe_open

    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    counts: Counter[str] = Counter()
    try:
        with safe_open(str(path / MODEL_FILE), framework="pt") as f:
            for key in f.keys():
                d = f.get_slice(key).get_dtype()
                if d in names:
                    counts[names[d]] += 1
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: cannot read {MODEL_FILE} ({e})") from e
    return counts.most_common(1)[0][0] if counts else "float32"


def load_trained(path: str | os.PathLike[str], *, base: str | None = None, device: str = "cpu",
                 dtype: str = "auto") -> Trained:
    """Load a checkpoint (or a checkpoint directory's newest) into its base model.

    base: where to load the base model from, when the name the checkpoint records does not resolve here (a node
    started with a relative path, or on another machine). dtype "auto" keeps the dtype the node trained in, so the
    loaded policy answers exactly as the node's did.
    """
    ckpt = find_checkpoint(path)
    state = _read_verified_state(ckpt)  # hashes first: a damaged file is reported as damage, whatever it breaks
    name = base or state["model_name"]
    lora = (state.get("model") or {}).get("lora")  # a LoRA node's checkpoint holds only its adapters
    if dtype != "auto":
        want = dtype
    elif lora:
        want = str(lora.get("base_dtype", "float32")).replace("torch.", "")
    else:
        want = _weights_dtype(ckpt)
    try:
        policy = load_policy(name, device=device, dtype=want)
    except ModelUnavailable as e:
        hint = "" if base else "; pass --base NAME_OR_DIR to load the base model from elsewhere"
        raise ExportError(f"checkpoint {ckpt} needs its base model {name!r}, which cannot be loaded here: "
                          f"{e.reason}{hint}") from e
    # load_checkpoint restores the node's RNG streams too; an export or an eval must not inherit them
    devices = [policy.device.index or 0] if policy.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if lora:  # the same adapters on the same base (load_checkpoint checks both), then the saved values
            from node.lora import LoraSettings, apply_lora

            targets = lora["target_modules"]
            policy.model = apply_lora(policy.model, LoraSettings(
                r=int(lora["r"]), alpha=float(lora["alpha"]), dropout=float(lora["dropout"]),
                target_modules=targets if isinstance(targets, str) else ",".join(targets)))
        state = load_checkpoint(ckpt, model=policy.model, optimizer=None, rng=None)
    policy.model.eval()
    return Trained(policy=policy, checkpoint=ckpt, state=state)


# -- writing ------------------------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    out: Path
    checkpoint: Path
    round: int
    files: list[str]
    pushed_to: str | None = None


def export_checkpoint(path: str | os.PathLike[str], out: str | os.PathLike[str], *, base: str | None = None,
                      dtype: str = "auto", force: bool = False, repo: str | None = None) -> ExportResult:
    """Write the checkpoint as a Hugging Face model directory at `out` (complete, or not at all); `repo`: the Hub
    repo it will be pushed to (the card's snippet loads it from there)."""
    dest = Path(out).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())) and not force:
        raise ExportError(f"{dest} already exists and is not empty; pass --force to replace it, or choose another --out")
    trained = load_trained(path, base=base, device="cpu", dtype=dtype)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-export-{dest.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        _write_model_dir(trained, tmp, base=base, where=repo or str(dest.resolve()))
        files = sorted(p.name for p in tmp.iterdir())
        install_replacing(tmp, dest, dest.parent / f".old-export-{dest.name}-{secrets.token_hex(4)}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out=dest, checkpoint=trained.checkpoint, round=trained.round, files=files)


def _write_model_dir(trained: Trained, out: Path, *, base: str | None, where: str) -> None:
    from node.generation import eos_token_ids

    from node.lora import merged_model

    policy, cfg = trained.policy, trained.config
    # a LoRA policy's adapters folded into the base weights: a plain model any transformers user loads
    policy.model = model = merged_model(policy.model, in_place=True)
    gen = model.generation_config
    # the node stops a completion at any of these and pads with pad_token_id; a user's generate() should too
    eos = eos_token_ids(policy)
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    gen.pad_token_id = policy.tokenizer.pad_token_id
    if cfg.get("max_new_tokens"):
        gen.max_new_tokens = int(cfg["max_new_tokens"])  # the budget the policy learned to answer within
    model.config.pad_token_id = policy.tokenizer.pad_token_id
    model.save_pretrained(out)
    policy.tokenizer.save_pretrained(out)
    info = {
        "format": "swarm-node export/1",
        "exported_at": time.time(),
        "checkpoint": str(trained.checkpoint.resolve()),
        "round": trained.round,
        "rounds_trained": trained.round + 1,
        "model_name": trained.state["model_name"],
        "base": base or trained.state["model_name"],
        "lora_merged": trained.lora,
        "config": cfg,
        "history": trained.history,
    }
    (out / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=1, allow_nan=False, default=str) + "\n",
                                        encoding="utf-8")
    (out / "README.md").write_text(model_card(trained, base=base, where=where), encoding="utf-8")


# -- the model card -----------------------------------------------------------------------------------------------


def _hub_id(name: str) -> str | None:
    target = resolve_name(name)
    return None if _looks_local(target) else target


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def training_summary(trained: Trained) -> dict[str, Any]:
    """The figures the card reports, from the checkpoint's recorded rounds (the newest 100)."""
    hist = [h for h in trained.history if isinstance(h, dict) and isinstance(h.get("round"), int)]
    rewards = [(h["round"], float(h["reward_mean"])) for h in hist if isinstance(h.get("reward_mean"), (int, float))]
    heldout = [(h["round"], float(h["heldout_acc"])) for h in hist if isinstance(h.get("heldout_acc"), (int, float))]
    w = max(1, min(10, len(rewards) // 2))  # first/last window of rounds, averaged: one round's reward is noisy
    return {
        "rounds_trained": trained.round + 1,
        "recorded_rounds": [hist[0]["round"], hist[-1]["round"]] if hist else None,
        "reward_window": w,
        "reward_first": _mean([r for _, r in rewards[:w]]),
        "reward_last": _mean([r for _, r in rewards[-w:]]),
        "heldout": heldout,
        "max_peers": max((int(h.get("peers") or 0) for h in hist), default=0),
        "external_groups": sum(int(h.get("n_external") or 0) for h in hist),
        "local_groups": sum(int(h.get("n_local") or 0) for h in hist),
        "completions": sum(int(h.get("generated") or 0) for h in hist),
    }


def _example_question(tasks: str, task_config: str) -> str:
    """The first held-out question of the first family: what the card's snippet asks (never a training question)."""
    from node.config import parse_task_config
    from verifiers.tasks import build_task, heldout_refs, parse_task_weights

    try:
        fam = next(iter(parse_task_weights(tasks)))
        return build_task(heldout_refs(fam, 1, parse_task_config(task_config).get(fam))[0]).question
    except Exception:  # noqa: BLE001 - a card is still worth writing without its example
        return "What is 12 + 34?"


def model_card(trained: Trained, *, base: str | None = None, where: str = "PATH") -> str:
    cfg = trained.config
    name = trained.state["model_name"]
    hub = _hub_id(base or name)
    s = training_summary(trained)
    tasks = cfg.get("tasks") or model_defaults(name)["tasks"]
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags:", "- swarm-node", "- grpo", "- sapo", "- reinforcement-learning"]
    if hub:
        front += [f"base_model: {hub}"]
    front += ["---", ""]
    shown = name if hub or name.strip().lower() in ALIASES else Path(name).name  # a local path: its last part
    lines = [f"# {shown} trained by a swarm-node node", ""]
    base_txt = f"[{hub}](https://huggingface.co/{hub})" if hub else f"`{shown}`"
    lines += [
        f"Post-trained from {base_txt} with GRPO by a swarm-node node in swarm "
        f"`{cfg.get('swarm', '?')}`{' (offline: no peers)' if cfg.get('offline') else ''}: "
        f"{s['rounds_trained']} rounds (checkpoint of round {trained.round}), task families `{tasks}`"
        + (f" with settings `{cfg['task_config']}`" if cfg.get("task_config") else "") + ".",
        "Each round the node trains on its own rollout groups (I) plus groups shared by peers (J), rescored by its own "
        "verifier (SAPO)."
        + (f" It trained LoRA adapters (rank {trained.lora['r']}, alpha {trained.lora['alpha']:g}, "
           f"modules {_targets(trained.lora)}), merged here into the base weights." if trained.lora else ""),
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
    ]
    for key, label in (("local", "I (own groups per round)"), ("external", "J (peers' groups per round)"),
                       ("questions_per_round", "questions per round"), ("group_size", "completions per question"),
                       ("learning_rate", "learning rate"), ("loss_type", "loss"), ("beta", "KL beta"),
                       ("temperature", "sampling temperature"), ("top_p", "top-p"),
                       ("max_new_tokens", "completion budget (tokens)"), ("reward_mode", "reward"),
                       ("seed", "seed")):
        if key in cfg:
            lines.append(f"| {label} | {cfg[key]} |")
    lines += ["", "## Results", ""]
    if s["recorded_rounds"] is None:
        lines.append("The checkpoint holds no round history.")
    else:
        a, b = s["recorded_rounds"]
        lines += [
            f"From the checkpoint's recorded rounds {a}-{b}:",
            "",
            f"- mean reward of its own rollouts: {_fmt(s['reward_first'])} (first {s['reward_window']} rounds) -> "
            f"{_fmt(s['reward_last'])} (last {s['reward_window']})",
            f"- groups trained on: {s['local_groups']} own, {s['external_groups']} from peers "
            f"(at most {s['max_peers']} peers connected); {s['completions']} completions generated",
        ]
        if s["heldout"]:
            (r0, h0), (r1, h1) = s["heldout"][0], s["heldout"][-1]
            lines.append(f"- held-out greedy accuracy ({cfg.get('eval_size', '?')} questions never trained on): "
                         f"{h0:.3f} after round {r0} -> {h1:.3f} after round {r1}")
            lines += ["", "| round | held-out greedy accuracy |", "|---|---|"]
            shown = s["heldout"] if len(s["heldout"]) <= 12 else s["heldout"][:: max(1, len(s["heldout"]) // 12)]
            if shown[-1] != s["heldout"][-1]:
                shown = shown + [s["heldout"][-1]]
            lines += [f"| {r} | {h:.3f} |" for r, h in shown]
        else:
            lines.append("- no held-out evaluation during training (`--eval-every 0`); run `swarm-node eval`.")
    lines += [
        "",
        "## Use",
        "",
        "The node prompted it with its tokenizer's chat template: a system prompt, then the question; the answer is "
        "the last `<answer>...</answer>` block.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"tok = AutoTokenizer.from_pretrained({json.dumps(where)})",
        f"model = AutoModelForCausalLM.from_pretrained({json.dumps(where)})",
        "messages = [",
        '    {"role": "system", "content": ' + json.dumps(_system_prompt()) + "},",
        '    {"role": "user", "content": ' + json.dumps(_example_question(tasks, cfg.get("task_config") or "")) + "},",
        "]",
        "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
        "return_dict=True)",
        "out = model.generate(**inputs, do_sample=False)",
        'print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
        f"Measure it on the node's held-out split: `swarm-node eval --model {where} --tasks "
        f"{tasks}" + (f" --task-config '{cfg['task_config']}'" if cfg.get("task_config") else "") + "`.",
        f"Provenance (configuration, round history): `{EXPORT_INFO_FILE}`.",
        "",
    ]
    return "\n".join(front + lines)


def _targets(lora: dict[str, Any]) -> str:
    t = lora.get("target_modules")
    return t if isinstance(t, str) else ", ".join(t or [])


def _system_prompt() -> str:
    from verifiers.prompts import SYSTEM_PROMPT

    return SYSTEM_PROMPT


# -- the Hub ------------------------------------------------------------------------------------------------------


def push_to_hub(out: Path, repo: str, *, private: bool = False, round_: int | None = None) -> str:
    """Upload an export; returns the repo's URL. Raises ExportError with one sentence; `out` is never modified."""
    later = f"the local export in {out} is intact (push it later with `hf upload {repo} {out}`)"
    if _offline_env():
        raise ExportError(f"cannot push to the Hugging Face Hub as {repo}: offline mode (HF_HUB_OFFLINE) is set; "
                          f"{later}")
    if not _hub_reachable():  # fail in seconds, not after huggingface_hub's retries
        raise ExportError(f"cannot push to the Hugging Face Hub as {repo}: no network access to the Hub; {later}")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo, folder_path=str(out), repo_type="model",
                          commit_message=f"swarm-node export{'' if round_ is None else f' of round {round_}'}")
    except Exception as e:  # huggingface_hub raises many types (HTTP, validation, token, connection errors)
        raise ExportError(f"cannot push to the Hugging Face Hub as {repo}: {_hub_reason(e)}; {later}") from e
    return str(url)


def _hub_reason(err: BaseException) -> str:
    names = " ".join(type(x).__name__ for x in _chain(err))
    text = " ".join(str(x) for x in _chain(err)).lower()
    if "LocalTokenNotFound" in names or "401" in text or ("token" in text and "not" in text):
        return "not logged in, or the token may not write there (run `hf auth login` or set HF_TOKEN)"
    if "403" in text:
        return "the token may not write to that repository"
    if "HFValidationError" in names or "repo id" in text:
        return "that is not a valid repository id (use owner/name)"
    if "connect" in text or "timed out" in text or "resolve" in text or "network" in text:
        return "no network access to the Hub"
    first = str(err).splitlines()[0][:160] if str(err) else "upload failed"
    return f"{type(err).__name__}: {first}"


def _chain(err: BaseException) -> list[BaseException]:
    out, e = [], err
    while e is not None and len(out) < 6:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


# -- the command --------------------------------------------------------------------------------------------------


def run_export(*, checkpoint: str, out: str, base: str | None, dtype: str, force: bool, repo: str | None,
               private: bool) -> int:
    """The CLI's body: a user's mistake is one `error:` line and exit 2; a failed push keeps the local export."""
    from transformers.utils import logging as hf_logging

    from node.app import user_error

    hf_logging.disable_progress_bar()
    try:
        res = export_checkpoint(checkpoint, out, base=base, dtype=dtype, force=force, repo=repo)
    except KeyboardInterrupt:
        return 130
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - sorted into user mistakes and bugs right here
        msg = user_error(e)
        if msg is None:
            raise
        print(f"error: {msg}", file=sys.stderr)
        return 2
    print(f"exported round {res.round} of {res.checkpoint} to {res.out}: {', '.join(res.files)}")
    if repo:
        try:
            url = push_to_hub(res.out, repo, private=private, round_=res.round)
        except ExportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"pushed to {url}")
    return 0
