"""Local checkpoints that resume training bit-identically, written atomically, with no pickle anywhere.

Layout: <dir>/round-000123/{model.safetensors, optimizer.safetensors, state.json}. Tensors go to safetensors, everything
else (config, optimizer hyper-parameters, RNG states, caller's extras, file hashes) to JSON. A LoRA model (node.lora)
stores only its adapters, with its LoRA settings and a fingerprint of the frozen base in state.json["model"]. A checkpoint is built in
<dir>/.tmp-round-000123-<random>/ and renamed into place, so a `round-*` directory is either complete or absent;
`latest_checkpoint` still verifies hashes to survive disk damage. One writer per directory.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
_ROUND_RE = re.compile(r"^round-(\d+)$")
_TMP_PREFIX = ".tmp-round-"
_TRASH_PREFIX = ".trash-round-"


class CheckpointError(Exception):
    """A checkpoint is damaged, incomplete, or was made for another model."""


def round_dir_name(round: int) -> str:
    return f"round-{round:06d}"


# -- saving -------------------------------------------------------------------------------------------------------------


class _StateOnly:
    """What save_checkpoint reads of a model or optimizer (its state_dict), frozen at one moment."""

    def __init__(self, state: dict, adapters: dict | None = None) -> None:
        self._state = state
        self.adapters = adapters  # a LoRA model's _adapter_info, taken with the state

    def state_dict(self) -> dict:
        return self._state


def _is_lora(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def _model_state(model: Any) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of a model: its whole state_dict, or a LoRA model's adapters only (the frozen base is
    loaded from the model source at every start; all a resume needs beyond it is what trains)."""
    if _is_lora(model):
        from node.lora import adapter_state_dict

        return adapter_state_dict(model)
    return model.state_dict()


def _adapter_info(model: Any) -> dict | None:
    """A LoRA model's settings and base fingerprint (None: not a LoRA model); read back by load_checkpoint."""
    if isinstance(model, _StateOnly):
        return model.adapters
    if not _is_lora(model):
        return None
    from node.lora import base_fingerprint

    conf = model.peft_config[model.active_adapter]
    targets = conf.target_modules
    return {"r": int(conf.r), "alpha": float(conf.lora_alpha), "dropout": float(conf.lora_dropout),
            # leaf names: peft expands "all-linear" into full module paths
            "target_modules": targets if isinstance(targets, str) else sorted({t.split(".")[-1] for t in targets}),
            "base_fingerprint": base_fingerprint(model),
            "base_dtype": str(next((p.dtype for p in model.parameters() if not p.requires_grad), torch.float32))}


@dataclass(frozen=True)
class Snapshot:
    """Copies of everything a checkpoint holds, so it can be written while training goes on."""

    model: Any
    optimizer: Any
    rng_state: dict


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, rng: random.Random | None) -> Snapshot:
    """Copy model and optimizer state to CPU memory (tied weights stay tied) and the RNG states, as of now."""
    clones: dict[tuple, torch.Tensor] = {}
    sd = {}
    for name, t in _model_state(model).items():
        t = t.detach()
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride()) if t.numel() \
            else None
        if key is None or key not in clones:
            c = t.to("cpu", copy=True)
            if key is not None:
                clones[key] = c
        sd[name] = c if key is None else clones[key]
    opt = None if optimizer is None else _StateOnly(_cpu_copy(optimizer.state_dict()))
    return Snapshot(_StateOnly(sd, _adapter_info(model)), opt, _rng_state(rng))


def _cpu_copy(v: Any) -> Any:
    """A copy of a state_dict tree whose tensors are new CPU tensors (one copy, whatever the device)."""
    if isinstance(v, torch.Tensor):
        return v.detach().to("cpu", copy=True)
    if isinstance(v, dict):
        return {k: _cpu_copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_cpu_copy(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_cpu_copy(x) for x in v)
    return v


def save_checkpoint(
    dir: str | os.PathLike[str],
    *,
    round: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: dict,
    model_name: str,
    rng: random.Random | None,
    extra: dict | None = None,
    keep: int = 3,
    rng_state: dict | None = None,
) -> Path:
    """Write round `round` atomically, then prune to the newest `keep` checkpoints; returns the checkpoint's path.

    `model`/`optimizer` may be a Snapshot's, with its `rng_state` (then `rng` is not read).
    On any failure nothing that existed before is touched (only the temporary directory is removed).
    """
    if round < 0:
        raise ValueError("round must be non-negative")
    if keep < 1:
        raise ValueError("keep must be at least 1")
    root = Path(dir)
    root.mkdir(parents=True, exist_ok=True)
    name = round_dir_name(round)
    final = root / name
    tmp = root / f"{_TMP_PREFIX}{round:06d}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        model_tensors, aliases, shapes = _model_tensors(model)
        _write_safetensors(tmp / MODEL_FILE, model_tensors)
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_json = None if optimizer is None else _encode_optimizer(optimizer.state_dict(), opt_tensors)
        _write_safetensors(tmp / OPTIMIZER_FILE, opt_tensors)
        state = {
            "format_version": FORMAT_VERSION,
            "round": round,
            "model_name": model_name,
            "config": config,
            "extra": extra if extra is not None else {},
            "created_at": time.time(),
            "torch_version": torch.__version__,
            "model": {"aliases": aliases, "shapes": shapes, "lora": _adapter_info(model)},
            "optimizer": opt_json,
            "rng": rng_state if rng_state is not None else _rng_state(rng),
            "files": {f: _sha256(tmp / f) for f in (MODEL_FILE, OPTIMIZER_FILE)},
        }
        try:
            text = json.dumps(state, indent=1, allow_nan=True)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config/extra for checkpoint {name} is not JSON-serialisable: {e}") from e
        _write_bytes(tmp / STATE_FILE, text.encode("utf-8"))
        _fsync_dir(tmp)
        install_replacing(tmp, final, root / f"{_TRASH_PREFIX}{name[len('round-'):]}-{secrets.token_hex(4)}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep=keep, current=final)
    return final


def install_replacing(tmp: Path, dest: Path, aside: Path) -> None:
    """rename(2) `tmp` to `dest`; an existing `dest` is renamed to `aside` first, put back if the rename fails, and
    removed only once `tmp` is in place: at every moment `dest` is the old or the new one, complete."""
    moved = dest.exists()
    if moved:
        os.rename(dest, aside)
    try:
        os.rename(tmp, dest)
    except BaseException:
        if moved:
            os.rename(aside, dest)
        raise
    _fsync_dir(dest.parent)
    if moved:
        if aside.is_dir():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.unlink(missing_ok=True)


def _prune(root: Path, *, keep: int, current: Path) -> None:
    rounds = sorted(_round_dirs(root), key=lambda rp: rp[0], reverse=True)
    kept = {current}
    for _, path in rounds:
        if len(kept) >= keep:
            break
        kept.add(path)
    for _, path in rounds:
        if path not in kept:
            _discard(path, root)
    sweep_leftovers(root)


def sweep_leftovers(dir: str | os.PathLike[str]) -> None:
    """Remove what crashed saves left (single writer per directory, so none of these is in progress)."""
    root = Path(dir)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.is_dir() and (p.name.startswith(_TMP_PREFIX) or p.name.startswith(_TRASH_PREFIX)):
            shutil.rmtree(p, ignore_errors=True)


def _discard(path: Path, root: Path) -> None:
    """Remove a checkpoint without ever leaving a half-deleted `round-*` directory behind (a process killed inside
    rmtree would): it leaves the `round-*` namespace by one rename first, and a leftover `.trash-*` is swept later."""
    trash = root / f"{_TRASH_PREFIX}{path.name[len('round-'):]}-{secrets.token_hex(4)}"
    try:
        os.rename(path, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _alias_map(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """name -> earlier name for entries that are the very same view of the same storage (tied weights)."""
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in sd.items():
        if not t.numel():
            continue
        view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view in seen:
            aliases[name] = seen[view]
        else:
            seen[view] = name
    return aliases


def _model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, list[int]]]:
    """Full state_dict (a LoRA model's: its adapters) minus exact aliases (tied weights), recorded by name instead."""
    sd = _model_state(model)
    aliases = _alias_map(sd)
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[tuple] = set()
    for name, t in sd.items():
        if name in aliases:
            continue
        t = t.detach()
        storage = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
        # Partial overlaps (not exact aliases) cannot be stored twice by safetensors: store a private copy.
        shared = storage is not None and storage in seen_storage
        if storage is not None:
            seen_storage.add(storage)
        t = t.to("cpu")
        tensors[name] = t.clone() if shared or not t.is_contiguous() else t
    return tensors, aliases, {name: list(t.shape) for name, t in sd.items()}


_TENSOR = "__tensor__"
_TUPLE = "__tuple__"


def _encode_value(v: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(v, torch.Tensor):
        # no clone: the write is synchronous, and a snapshot's tensors are private copies already (a clone would add
        # one more copy of all optimizer state, twice the weights of a full model, at every checkpoint)
        tensors[key] = v.detach().to("cpu").contiguous()
        return {_TENSOR: key}
    if isinstance(v, tuple):
        return {_TUPLE: [_encode_value(x, f"{key}.{i}", tensors) for i, x in enumerate(v)]}
    if isinstance(v, list):
        return [_encode_value(x, f"{key}.{i}", tensors) for i, x in enumerate(v)]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise CheckpointError(f"optimizer state has a non-string key under {key!r}")
        return {k: _encode_value(x, f"{key}.{k}", tensors) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise CheckpointError(f"optimizer state value of type {type(v).__name__} at {key!r} cannot be stored without pickle")


def _decode_value(v: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(v, dict):
        if set(v) == {_TENSOR}:
            return tensors[v[_TENSOR]]
        if set(v) == {_TUPLE}:
            return tuple(_decode_value(x, tensors) for x in v[_TUPLE])
        return {k: _decode_value(x, tensors) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode_value(x, tensors) for x in v]
    return v


def _encode_optimizer(sd: dict, tensors: dict[str, torch.Tensor]) -> dict:
    # Param indices are ints in torch's state_dict; JSON keys must be strings, so keep them as [idx, state] pairs.
    state = [[int(idx), _encode_value(s, f"state.{int(idx)}", tensors)] for idx, s in sd["state"].items()]
    groups = [_encode_value(g, f"group.{i}", tensors) for i, g in enumerate(sd["param_groups"])]
    return {"state": state, "param_groups": groups}


def _decode_optimizer(enc: dict, tensors: dict[str, torch.Tensor]) -> dict:
    return {
        "state": {int(idx): _decode_value(s, tensors) for idx, s in enc["state"]},
        "param_groups": [_decode_value(g, tensors) for g in enc["param_groups"]],
    }


def _rng_state(rng: random.Random | None) -> dict:
    out: dict[str, Any] = {"torch_cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}
    if rng is not None:
        version, internal, gauss_next = rng.getstate()
        out["python"] = [version, list(internal), gauss_next]
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return out


def _restore_rng(state: dict, rng: random.Random | None) -> None:
    raw = base64.b64decode(state["torch_cpu"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    if rng is not None and "python" in state:
        version, internal, gauss_next = state["python"]
        rng.setstate((version, tuple(internal), gauss_next))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
                                          for s in cuda])
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this machine has %d: not restored",
                        len(cuda), torch.cuda.device_count())


# -- files --------------------------------------------------------------------------------------------------------------


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    _fsync_file(path)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _round_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _ROUND_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return out


# -- loading ------------------------------------------------------------------------------------------------------------


def _read_verified_state(path: Path) -> dict:
    """Parse state.json and check the format and every file's hash; raises CheckpointError with the reason."""
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {STATE_FILE} is missing")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {STATE_FILE} is unreadable ({e})") from e
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else None
        raise CheckpointError(f"checkpoint {path} has format version {found!r}; this node reads {FORMAT_VERSION}")
    for key in ("round", "model_name", "config", "extra", "model", "optimizer", "rng", "files"):
        if key not in state:
            raise CheckpointError(f"checkpoint {path} is damaged: {STATE_FILE} lacks {key!r}")
    for fname in (MODEL_FILE, OPTIMIZER_FILE):
        fpath = path / fname
        expected = state["files"].get(fname)
        if not fpath.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {fname} is missing")
        if expected is None or _sha256(fpath) != expected:
            raise CheckpointError(f"checkpoint {path} is damaged: {fname} does not match its recorded SHA-256")
    return state


def latest_checkpoint(dir: str | os.PathLike[str]) -> Path | None:
    """Newest checkpoint that is complete and intact; damaged ones are skipped with a warning."""
    for _, path in sorted(_round_dirs(Path(dir)), key=lambda rp: rp[0], reverse=True):
        try:
            _read_verified_state(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path.name, e)
            continue
        return path
    return None


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    rng: random.Random | None,
    expected_model_name: str | None = None,
) -> dict:
    """Restore model, optimizer, torch (CPU, CUDA) and python RNG in place; returns the parsed state.json.

    Everything is checked before anything is modified, so a CheckpointError leaves model and optimizer untouched.
    """
    path = Path(path)
    state = _read_verified_state(path)
    if expected_model_name is not None and state["model_name"] != expected_model_name:
        raise CheckpointError(f"checkpoint {path} was made for model {state['model_name']!r}, "
                              f"not {expected_model_name!r}")
    try:
        tensors = load_file(str(path / MODEL_FILE))
        opt_tensors = load_file(str(path / OPTIMIZER_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: cannot read tensors ({e})") from e

    _check_adapters_fit(path, state["model"].get("lora"), _adapter_info(model))
    # Model: same parameter names, shapes and tying as the checkpoint's.
    target = _model_state(model)
    saved_shapes = {k: tuple(v) for k, v in state["model"]["shapes"].items()}
    target_shapes = {k: tuple(v.shape) for k, v in target.items()}
    if saved_shapes != target_shapes:
        missing = sorted(set(target_shapes) - set(saved_shapes))
        unexpected = sorted(set(saved_shapes) - set(target_shapes))
        differ = sorted(k for k in set(saved_shapes) & set(target_shapes) if saved_shapes[k] != target_shapes[k])
        raise CheckpointError(
            f"checkpoint {path} ({state['model_name']!r}) does not fit this model: "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(differ)} differently shaped parameters"
            + (f" (e.g. {(missing + unexpected + differ)[0]})" if missing or unexpected or differ else "")
        )
    aliases: dict[str, str] = state["model"]["aliases"]
    full: dict[str, torch.Tensor] = {}
    for name in target:
        src = aliases.get(name, name)
        if src not in tensors or tuple(tensors[src].shape) != target_shapes[name]:
            raise CheckpointError(f"checkpoint {path} is damaged: tensor {name!r} is missing or misshapen")
        full[name] = tensors[src]
    target_aliases = _alias_map(target)
    if target_aliases != aliases:
        raise CheckpointError(f"checkpoint {path} ties weights {aliases} but this model ties {target_aliases}")

    # Optimizer: same parameter groups and sizes.
    opt_sd = None
    if optimizer is not None:
        if state["optimizer"] is None:
            raise CheckpointError(f"checkpoint {path} has no optimizer state")
        try:
            opt_sd = _decode_optimizer(state["optimizer"], opt_tensors)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path} is damaged: optimizer state is inconsistent ({e})") from e
        _check_optimizer_fits(path, optimizer, opt_sd)

    with torch.no_grad():
        if _is_lora(model):  # the adapters only; the frozen base stays as loaded (its fingerprint matched)
            for name, p in target.items():
                p.copy_(full[name])
        else:
            model.load_state_dict(full, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(opt_sd)
    _restore_rng(state["rng"], rng)
    return state


def _check_adapters_fit(path: Path, saved: dict | None, here: dict | None) -> None:
    """A LoRA checkpoint resumes only into the same LoRA settings on the same base; a full one only without LoRA."""
    if saved is None and here is None:
        return
    if saved is None:
        raise CheckpointError(f"checkpoint {path} holds every weight of the model (trained without LoRA); "
                              "start the node with --lora-r 0 to resume it")
    if here is None:
        raise CheckpointError(f"checkpoint {path} holds LoRA adapters (rank {saved['r']}); start the node with "
                              f"--lora-r {saved['r']} to resume it")
    for key, flag in (("r", "--lora-r"), ("alpha", "--lora-alpha"), ("target_modules", "--lora-target-modules")):
        if saved[key] != here[key]:
            raise CheckpointError(f"checkpoint {path} was trained with {flag} {saved[key]}, this node has "
                                  f"{here[key]}; start it with the checkpoint's setting to resume")
    if saved["base_fingerprint"] != here["base_fingerprint"]:
        raise CheckpointError(f"checkpoint {path} holds LoRA adapters trained on another base model than the one "
                              "loaded here; load the base the node was started with")


def _check_optimizer_fits(path: Path, optimizer: torch.optim.Optimizer, sd: dict) -> None:
    groups = optimizer.param_groups
    saved = sd["param_groups"]
    if len(groups) != len(saved) or any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
        raise CheckpointError(f"checkpoint {path}: optimizer parameter groups do not match this optimizer")
    index_to_param = {}
    for g, s in zip(groups, saved):
        index_to_param.update(zip(s["params"], g["params"]))
    for idx, st in sd["state"].items():
        p = index_to_param.get(idx)
        if p is None:
            raise CheckpointError(f"checkpoint {path}: optimizer state for unknown parameter index {idx}")
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and tuple(v.shape) != tuple(p.shape):
                raise CheckpointError(f"checkpoint {path}: optimizer state {k!r} of parameter {idx} has shape "
                                      f"{tuple(v.shape)}, the parameter has {tuple(p.shape)}")
