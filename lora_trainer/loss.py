"""The diffusion step of one micro-batch: noise, timesteps, the forward process, the prediction and its loss.

Split from train.py, which reads as the loop; `compute_loss` is pure (a batch, the trainables and a seeded
generator in, a loss out), so tests call it directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import config as config_mod
from .errors import ModelLoadError
from .preservation import adapters_disabled
from .timesteps import sample_timesteps

if TYPE_CHECKING:
    from .batch import Batch
    from .train import Trainables


PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the UNet of a base can be trained to predict


def _inner(model):
    """The module inside accelerate's DistributedDataParallel wrapper (itself when not wrapped)."""
    return getattr(model, "module", model)


# -- the diffusion step ----------------------------------------------------------------------------------
@dataclass
class DiffusionStep:
    """What one denoising prediction saw and gave: extra loss terms build on it."""

    noise: Any
    timesteps: Any
    noisy: Any
    target: Any
    pred: Any


@dataclass
class Loss:
    value: Any  # the scalar to backpropagate
    per_sample: Any  # the unweighted MSE of each sample (the regularization images' last)
    weights: Any | None  # the Min-SNR weight of each sample; None when it is off
    step: DiffusionStep
    terms: dict[str, Any] = field(default_factory=dict)  # extra terms, as added to `value`


# An extra loss term (e.g. output preservation): computed from the batch, the trainables and the step.
LossTerm = Callable[["Batch", "Trainables", DiffusionStep], Any]


def _predict(t: Trainables, batch: Batch, noisy, timesteps):
    """(the LoRA model's prediction, None) or, with output preservation, (prediction, (the LoRA model's and
    the base model's predictions for the untriggered captions))."""
    import torch

    if batch.preserve is None:
        return t.unet(noisy, timesteps, batch.embeds, added_cond_kwargs=batch.added_cond, return_dict=False)[0], None
    lora_embeds, base_embeds, lora_cond, base_cond = batch.preserve
    with torch.no_grad(), adapters_disabled([_inner(t.unet)]):
        base = t.unet(noisy, timesteps, base_embeds, added_cond_kwargs=base_cond, return_dict=False)[0]
    both = t.unet(
        torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]), torch.cat([batch.embeds, lora_embeds]),
        added_cond_kwargs=_cat_conds(batch.added_cond, lora_cond), return_dict=False,
    )[0]
    pred, preserved = both.chunk(2)
    return pred, (preserved, base)


def _cat_conds(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    import torch

    return None if a is None else {k: torch.cat([a[k], b[k]]) for k in a}


def sample_noise(latents, rng, noise_offset: float):
    """Gaussian noise like the latents, plus an optional per-channel offset (helps very dark or bright images)."""
    import torch

    noise = torch.randn(latents.shape, generator=rng, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=rng, device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    return noise


def prediction_target(noise_scheduler, latents, noise, timesteps):
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ModelLoadError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")


def min_snr_weights(noise_scheduler, timesteps, gamma: float):
    """Min-SNR weighting: don't let the easy, low-noise timesteps dominate the loss."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    divisor = snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr
    return torch.clamp(snr, max=gamma) / divisor


def compute_loss(
    batch: Batch, t: Trainables, rng, opt: config_mod.OptimSection, extra_terms: Mapping[str, LossTerm] | None = None
) -> Loss:
    """The denoising loss of one micro-batch; `rng` (a torch.Generator) draws the noise and the timesteps."""
    import torch
    import torch.nn.functional as F

    latents = batch.latents
    n = latents.shape[0] - batch.reg_count  # training images; the regularization images follow them
    # Sample the noise we'll add to the latents, and a timestep per image (uniform, logit-normal or shifted).
    noise = sample_noise(latents[:n], rng, opt.noise_offset)
    timesteps = sample_timesteps(n, t.noise_scheduler.config.num_train_timesteps, rng, latents.device, opt)
    if batch.reg_count:  # drawn after the training images': theirs stay what they would be without prior preservation
        noise = torch.cat([noise, sample_noise(latents[n:], rng, opt.noise_offset)])
        timesteps = torch.cat([timesteps, sample_timesteps(
            batch.reg_count, t.noise_scheduler.config.num_train_timesteps, rng, latents.device, opt)])
    # The forward diffusion process: noise the latents to each timestep.
    noisy = t.noise_scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(t.noise_scheduler, latents, noise, timesteps)
    # Predict the noise (or velocity) with the UNet + LoRA (and, for output preservation, the same noisy
    # latents with the untriggered captions, in the same call).
    pred, preserved = _predict(t, batch, noisy, timesteps)
    if preserved is not None and t.train_guidance:
        # Guidance-sized training: sampling draws u + g * (c - u), and output preservation keeps untriggered
        # predictions (the empty prompt's u among them) the base's, so the LoRA's change to the triggered c arrives
        # g times over. Train that change k times over here (base + k * change): guidance g brings it in g / k times.
        base = preserved[1]
        pred = base + t.train_guidance * (pred - base)
    # Mean squared error per image, optionally Min-SNR weighted.
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    weights = min_snr_weights(t.noise_scheduler, timesteps, opt.min_snr_gamma) if opt.min_snr_gamma else None
    weighted = per_sample * weights if weights is not None else per_sample
    value = weighted[:n].mean()
    step = DiffusionStep(noise, timesteps, noisy, target, pred)
    terms = {name: term(batch, t, step) for name, term in (extra_terms or {}).items()}
    if batch.reg_count:
        # Prior preservation (DreamBooth): the regularization images' own loss, at its weight.
        terms["prior"] = opt.prior_loss_weight * weighted[n:].mean()
    if preserved is not None:
        # Output preservation: untriggered, the LoRA model should predict what the base model predicts.
        terms["preservation"] = t.preserve_weight * F.mse_loss(preserved[0].float(), preserved[1].float())
    return Loss(value + sum(terms.values()) if terms else value, per_sample, weights, step, terms)
