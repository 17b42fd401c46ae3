"""The optimizers a LoRA is trained with, and a clear message where one cannot run."""

from __future__ import annotations

from .errors import ConfigError


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
