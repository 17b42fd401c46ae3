"""Which diffusion timesteps a training step sees: uniform (the DDPM default), logit-normal or shifted.

Every method draws from the step's own generator, so a resumed run draws what the uninterrupted run
would have. Timestep t runs from 0 (clean) to num_train_timesteps - 1 (pure noise); the non-uniform
methods draw a fraction u in (0, 1) and take t = floor(u * num_train_timesteps):

- logit_normal (SD3, Esser et al. 2024, "Scaling Rectified Flow Transformers"): u = sigmoid(m + s * n),
  n ~ N(0, 1). Mean 0 / std 1 concentrate the steps around the middle of the schedule, where the
  composition and the style are decided, and spend few on the nearly clean and nearly pure-noise ends.
- shifted (SD3's resolution shift, applied to the DDPM fraction): u' = shift * u / (1 + (shift - 1) * u)
  with u uniform; shift > 1 moves the steps toward high noise (the coarse structure a style lives in),
  shift < 1 toward low noise (fine detail), shift = 1 is uniform.
"""

from __future__ import annotations

from typing import Any

TIMESTEP_SAMPLINGS = ["uniform", "logit_normal", "shifted"]


def sample_timesteps(batch_size: int, num_train_timesteps: int, rng, device, opt: Any = None):
    """A training timestep per sample (a long tensor on `device`), drawn from `rng` by `opt.timestep_sampling`.

    `opt` is the config's OptimSection (None or uniform: exactly the draws the trainer always made)."""
    import torch

    method = getattr(opt, "timestep_sampling", "uniform")
    if method == "uniform":
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=rng, device=device).long()
    if method == "logit_normal":
        normal = torch.randn((batch_size,), generator=rng, device=device, dtype=torch.float32)
        fraction = torch.sigmoid(opt.logit_mean + opt.logit_std * normal)
    elif method == "shifted":
        uniform = torch.rand((batch_size,), generator=rng, device=device, dtype=torch.float32)
        fraction = shift_fraction(uniform, opt.timestep_shift)
    else:
        raise ValueError(f"unknown timestep sampling {method!r}; expected one of {', '.join(TIMESTEP_SAMPLINGS)}")
    return (fraction * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def shift_fraction(fraction, shift: float):
    """SD3's timestep shift of a fraction of the schedule: monotone, fixes 0 and 1, > the input for shift > 1."""
    return shift * fraction / (1 + (shift - 1) * fraction)
