"""Policy loading: model aliases, device/dtype choice, and a fast, clear failure when weights are missing."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

TINY_DIR = Path(__file__).resolve().parent / "assets" / "tiny"
SPARSE_DIR = Path(__file__).resolve().parent / "assets" / "tiny-sparse"  # scripts/build_sparse_model.py
COLD_DIR = SPARSE_DIR.parent / "tiny-cold"  # the same build, 3% of targets in the rewarded format (a colder start)

# Short names users type on the command line -> local dir or Hugging Face Hub id.
ALIASES: dict[str, str] = {
    "tiny": str(TINY_DIR),
    "tiny-sparse": str(SPARSE_DIR),
    "tiny-cold": str(COLD_DIR),
    "qwen-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "llama-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
}

_HINT = "use `--model tiny` or pass a local model directory"


class ModelUnavailable(Exception):
    """The requested model cannot be loaded here; str() is one sentence a user can act on."""

    def __init__(self, name: str, reason: str, target: str | None = None):
        self.name = name
        self.reason = reason
        shown = f"'{name}'" if not target or target == name else f"'{name}' ({target})"
        super().__init__(f"Model {shown} is unavailable: {reason}; {_HINT}.")


@dataclass
class Policy:
    name: str  # what the user asked for (alias or id or path)
    model: torch.nn.Module  # a transformers causal LM
    tokenizer: object  # a transformers tokenizer, pad token set, padding_side="left"
    device: torch.device
    dtype: torch.dtype


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' prefers cuda, then mps, then cpu; an explicit device that is not usable raises ValueError."""
    req = requested.strip().lower()
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if req == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    try:
        dev = torch.device(req)
    except RuntimeError as e:
        raise ValueError(f"Unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps.") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"Device '{requested}' was requested but CUDA is not available on this machine.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"Device '{requested}' was requested but only {torch.cuda.device_count()} CUDA device(s) exist."
            )
    elif dev.type == "mps" and not mps_ok:
        raise ValueError(f"Device '{requested}' was requested but Apple MPS is not available on this machine.")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"Device '{requested}' is not supported; use auto, cpu, cuda, cuda:N or mps.")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """'auto' = bf16 on a bf16-capable GPU, fp32 elsewhere (CPU bf16 training is ~30x slower without bf16 units)."""
    key = name.strip().lower()
    if key == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if key not in _DTYPES:
        raise ValueError(f"Unknown dtype '{name}'; use auto, float32, bfloat16 or float16.")
    return _DTYPES[key]


def resolve_name(name: str) -> str:
    """Alias -> local dir or hub id; anything else is returned unchanged."""
    return ALIASES.get(name.strip().lower(), name)


def _looks_local(target: str) -> bool:
    # A hub id is "name" or "owner/name"; anything that exists, or looks like a filesystem path, is local.
    if os.path.exists(os.path.expanduser(target)):
        return True
    return target.startswith(("/", ".", "~")) or target.count("/") > 1 or "\\" in target


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP probe of the hub, so an offline machine fails in seconds instead of ~25 s of HTTP retries."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct probe says nothing; let the real request decide
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_env() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _reason(err: BaseException) -> str:
    """Map a transformers / huggingface_hub error to a short human reason."""
    chain, e = [], err
    while e is not None and len(chain) < 6:
        chain.append(e)
        e = e.__cause__ or e.__context__
    names = " ".join(type(x).__name__ for x in chain)
    text = " ".join(str(x) for x in chain).lower()
    if "Gated" in names or "gated" in text or "401" in text or "403" in text:
        return "its repository is gated: accept the license on huggingface.co and log in with `hf auth login`"
    if "RepositoryNotFound" in names or "404" in text or "is not a valid model identifier" in text:
        return "no such repository on the Hugging Face Hub"
    if "EntryNotFound" in names or "does not appear to have a file named" in text:
        return "its weights or config files are missing"
    if "offline" in text or "couldn't connect" in text or "connection" in text or "LocalEntryNotFound" in names:
        return "no network access and it is not in the local Hugging Face cache"
    return f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else 'load failed'}"


def _from_pretrained(target: str, dtype: torch.dtype, local_only: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target, local_files_only=local_only)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, local_files_only=local_only)
    return model, tok


def load_policy(name: str, device: str = "auto", dtype: str = "auto") -> Policy:
    """Load an alias, a hub id or a local dir as a Policy; raises ModelUnavailable with one clear sentence."""
    dev = pick_device(device)
    dt = resolve_dtype(dtype, dev)
    target = resolve_name(name)
    if _looks_local(target):
        path = Path(target).expanduser()
        if not path.is_dir():
            raise ModelUnavailable(name, f"no directory at {path}")
        if not (path / "config.json").is_file():
            raise ModelUnavailable(name, f"{path} is not a model directory (no config.json)")
        try:
            model, tok = _from_pretrained(str(path), dt, local_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelUnavailable(name, f"{path} could not be loaded: {_reason(e)}") from e
    else:
        try:  # cache first: no network round trip when the weights are already here
            model, tok = _from_pretrained(target, dt, local_only=True)
        except (OSError, ValueError) as cached_err:
            if _offline_env():
                raise ModelUnavailable(name, "offline mode (HF_HUB_OFFLINE) and it is not in the local "
                                             "Hugging Face cache", target) from cached_err
            if not _hub_reachable():
                raise ModelUnavailable(name, "no network access and it is not in the local Hugging Face cache",
                                       target) from cached_err
            try:
                model, tok = _from_pretrained(target, dt, local_only=False)
            except Exception as e:  # hub errors come in many types (OSError, HfHubHTTPError, requests/httpx errors)
                raise ModelUnavailable(name, _reason(e), target) from e
    if tok.pad_token_id is None:  # many chat models ship without a pad token; eos is the usual stand-in
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends on the right; training reuses the same layout
    model.to(dev)
    model.eval()
    return Policy(name=name, model=model, tokenizer=tok, device=dev, dtype=dt)
