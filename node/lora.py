"""LoRA, the low-memory mode (--lora-r > 0): the base model stays frozen and only small adapters train.

Only the adapters get gradients and AdamW state (GRPOTrainer builds its optimizer from the trainable parameters), a
checkpoint holds only the adapters (the base comes from the model source at every start; a fingerprint of it is kept so
adapters are never resumed onto another base), and the KL reference (beta != 0) is the same model with its adapters
switched off instead of a deep copy. `merged_model` folds the adapters into a plain transformers model for export.

peft is imported only here and only when LoRA is on: it costs seconds of start-up.
"""
from __future__ import annotations

import copy
import hashlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from node.config import ConfigError

ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer except the output head


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: str = ALL_LINEAR  # "all-linear" or PEFT module names, comma-separated ("q_proj,v_proj")

    @property
    def effective_alpha(self) -> float:
        return self.alpha if self.alpha > 0 else 2.0 * self.r  # 0 = 2r: the scale alpha / r stays 2 whatever r is

    def targets(self) -> str | list[str]:
        return parse_targets(self.target_modules)

    def to_json(self) -> dict:
        return {"r": self.r, "alpha": self.effective_alpha, "dropout": self.dropout,
                "target_modules": self.target_modules}


def parse_targets(spec: str) -> str | list[str]:
    """'all-linear' stays PEFT's keyword; anything else is a comma-separated list of module names."""
    spec = spec.strip()
    if spec == ALL_LINEAR:
        return ALL_LINEAR
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError("--lora-target-modules needs 'all-linear' or module names such as q_proj,v_proj")
    return names


def settings_from_config(cfg) -> LoraSettings | None:
    """The LoRA settings of a NodeConfig, or None when LoRA is off (--lora-r 0)."""
    if cfg.lora_r <= 0:
        return None
    return LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                        target_modules=cfg.lora_target_modules)


def is_lora(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap a causal LM in LoRA adapters (a peft PeftModel); every base parameter is frozen. The adapters' B matrices
    start at zero, so the wrapped model computes exactly what the base did; A is drawn from torch's RNG (seeded)."""
    from peft import LoraConfig, get_peft_model

    conf = LoraConfig(r=settings.r, lora_alpha=settings.effective_alpha, lora_dropout=settings.dropout,
                      target_modules=settings.targets(), bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        try:
            wrapped = get_peft_model(model, conf)
        except ValueError as e:  # e.g. target modules not found in the base model
            raise ConfigError(f"--lora-target-modules {settings.target_modules!r} does not fit this model: "
                             f"{str(e).splitlines()[0][:200]}") from None
    wrapped.eval()
    return wrapped


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What trains, by state_dict name: the adapters (what a LoRA checkpoint holds)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def base_fingerprint(model: nn.Module) -> str:
    """A cheap identity of the frozen base: names, shapes and a few leading values of every frozen tensor, rounded to
    bf16 so a base loaded in another dtype (fp32 on CPU, bf16 on a GPU) still matches while another base does not."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                continue
            sample = p.detach().reshape(-1)[:64].to("cpu", torch.bfloat16).view(torch.int16)
            h.update(f"{name}:{tuple(p.shape)};".encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def merged_model(model: nn.Module, *, in_place: bool = False) -> nn.Module:
    """A plain transformers model with the adapters folded into the base weights (W + B A * alpha / r), ready for
    save_pretrained. A model without adapters is returned as it is. Unless in_place, the training model is left as it
    was (the merge runs on a copy, which costs one more copy of the weights)."""
    if not is_lora(model):
        return model
    target = model if in_place else copy.deepcopy(model)
    merged = target.merge_and_unload()
    merged.eval()
    return merged
