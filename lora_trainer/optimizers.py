"""The optimizers a LoRA is trained with, their parameter groups, and a clear message where one cannot run."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import ConfigError


def lora_plus_groups(named_params: Iterable[tuple[str, Any]], lr: float, ratio: float) -> list[dict[str, Any]]:
    """One model's trainable tensors as optimizer parameter groups: with LoRA+ (Hayou et al. 2024) the B
    matrices in a group of their own at lr x ratio, everything else (A, DoRA magnitudes) at lr.

    B starts at zero and its updates are what the LoRA's output moves with, so a larger step on B learns
    features faster at the same stability; ratio 0 or 1 is plain LoRA (one group). Empty groups are left
    out (an optimizer refuses them)."""
    params = [(name, p) for name, p in named_params if p.requires_grad]
    if ratio in (0, 1):
        return [{"params": [p for _, p in params], "lr": lr}] if params else []
    b = [p for name, p in params if is_lora_b(name)]
    rest = [p for name, p in params if not is_lora_b(name)]
    return [group for group in ({"params": rest, "lr": lr}, {"params": b, "lr": lr * ratio}) if group["params"]]


def is_lora_b(name: str) -> bool:
    """A peft LoRA up-projection: `...lora_B.<adapter>.weight` (or an embedding's `lora_embedding_B`)."""
    return ".lora_B." in name or ".lora_embedding_B." in name


def make_optimizer(name: str, params: list[dict], lr: float, weight_decay: float, device):
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        if device.type != "cuda":
            raise ConfigError("optim.optimizer = 'adamw8bit' needs a CUDA GPU (bitsandbytes); use 'adamw' on this machine")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optim.optimizer = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("optim.optimizer = 'prodigy' needs prodigyopt: pip install prodigyopt") from None
        return Prodigy(params, lr=lr, weight_decay=weight_decay, safeguard_warmup=True, use_bias_correction=True)
    raise ConfigError(f"unknown optimizer {name!r}")
