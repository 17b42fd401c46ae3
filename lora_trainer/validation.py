"""Deterministic validation loss: the denoising loss on a fixed set (images, noise, timesteps).

The same set gives the same number for the same weights, so the curve over checkpoints shows
what the LoRA changed, not which noise a step happened to draw. The trainer can build the set
once (`validation_set`, over its already-loaded VAE) and call
`validation_loss(unet, text_encoders, tokenizers, vset, noise_scheduler)` every N steps;
evaluate.py does the same per checkpoint. The captions are encoded on each call, so a LoRA on the
text encoder counts too. The trainer's event for it is

    validation  step, val_loss, images (how many), timesteps (per image)

The images are the run's own training images (a style LoRA has no held-out set); a loss that
keeps falling on them measures memorisation as much as learning, which is why the recommendation
rests on the generated-image scores, not on this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VALIDATION_EVENT = "validation"


@dataclass
class ValidationCase:
    """One image at several fixed timesteps: (K, C, h, w) latents, noise, timesteps; its caption."""

    latents: Any
    noise: Any
    timesteps: Any
    caption: str
    time_ids: Any = None  # SDXL's size and crop conditioning


@dataclass
class ValidationSet:
    cases: list[ValidationCase]

    @property
    def images(self) -> int:
        return len(self.cases)

    @property
    def timesteps_per_image(self) -> int:
        return int(self.cases[0].timesteps.shape[0]) if self.cases else 0


def fixed_timesteps(count: int, num_train_timesteps: int, offset: int) -> list[int]:
    """`count` timesteps spread evenly over the schedule (stratified), shifted per image by `offset`."""
    width = num_train_timesteps / count
    return [min(num_train_timesteps - 1, int(width * k + (offset * 0.37 % 1.0) * width)) for k in range(count)]


def validation_set(
    items: list, vae, kind: str, num_train_timesteps: int, *,
    images: int = 4, timesteps: int = 4, seed: int = 0, device: Any = "cpu",
) -> ValidationSet:
    """The fixed set: the first `images` dataset items (at their buckets, unflipped), `timesteps` each.

    `items` are dataset.Item with buckets assigned (dataset.assign_buckets). Latents use the VAE's
    mode (no sampling) and the noise a generator seeded by `seed`, so two builds are identical.
    """
    import torch

    from . import dataset as ds

    generator = torch.Generator("cpu").manual_seed(seed)
    cases = []
    with torch.no_grad():
        for index, item in enumerate(items[:images]):
            pixels, crop = ds.load_pixels(item, False)
            vae_dtype = next(vae.parameters()).dtype
            latent = vae.encode(pixels[None].to(device, vae_dtype)).latent_dist.mode() * vae.config.scaling_factor
            latent = latent.float().cpu().repeat(timesteps, 1, 1, 1)
            noise = torch.randn(latent.shape, generator=generator)
            steps = torch.tensor(fixed_timesteps(timesteps, num_train_timesteps, index), dtype=torch.long)
            time_ids = None
            if kind == "sdxl":
                h, w = pixels.shape[-2:]
                time_ids = torch.tensor([[item.size[1], item.size[0], *crop, h, w]], dtype=torch.float32).repeat(timesteps, 1)
            cases.append(ValidationCase(latent, noise, steps, item.caption, time_ids))
    return ValidationSet(cases)


def validation_loss(unet, text_encoders: list, tokenizers: list, vset: ValidationSet, noise_scheduler, kind: str = "sd") -> float:
    """Mean MSE of the UNet's prediction (epsilon or v, as the scheduler says) over the fixed set.

    `noise_scheduler` is the training-time forward process (a DDPMScheduler from the pipeline's
    scheduler config). The models are put in eval mode for the call (no LoRA dropout) and restored.
    """
    import torch
    import torch.nn.functional as F

    from .batch import encode_text

    if not vset.cases:
        raise ValueError("the validation set is empty")
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    modules = [unet, *text_encoders]
    was_training = [m.training for m in modules]
    for module in modules:
        module.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for case in vset.cases:
                noisy = noise_scheduler.add_noise(case.latents, case.noise, case.timesteps)
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = case.noise
                else:
                    target = noise_scheduler.get_velocity(case.latents, case.noise, case.timesteps)
                embeds, pooled = encode_text([case.caption], tokenizers, text_encoders, kind, device)
                k = case.timesteps.shape[0]
                added = None
                if kind == "sdxl":
                    added = {"text_embeds": pooled.to(dtype).repeat(k, 1), "time_ids": case.time_ids.to(device, dtype)}
                pred = unet(noisy.to(device, dtype), case.timesteps.to(device), embeds.to(dtype).repeat(k, 1, 1),
                            added_cond_kwargs=added, return_dict=False)[0]
                total += F.mse_loss(pred.float().cpu(), target.float(), reduction="sum").item()
                count += target.numel()
    finally:
        for module, mode in zip(modules, was_training, strict=True):
            module.train(mode)
    return total / count
