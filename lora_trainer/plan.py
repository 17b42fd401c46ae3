"""What a run will train on and for how long: the one plan the trainer follows and the pre-flight shows.

`plan_run` resolves the base model (its family and geometry, from configs: no weights), checks the
resolution against it, scans the dataset, assigns buckets and counts steps and epochs. The trainer
and `preflight` both call it, so what Check predicts is what training does. Nothing here imports
torch, except building a built-in tiny model on its first use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import dataset as ds
from . import models
from .config import ConfigError, TrainConfig
from .prior import scan_reg

# Learning rates people use with each optimizer; one far outside (x10 either way) is almost surely a slip.
# Prodigy adapts its own step size: its learning rate is a multiplier, 1.0 as its authors advise.
USUAL_LEARNING_RATES = {"adamw": (1e-6, 1e-2), "adamw8bit": (1e-6, 1e-2), "prodigy": (1.0, 1.0)}


@dataclass
class RunPlan:
    base: models.BaseModel
    geometry: models.Geometry
    images_dir: Path
    items: list[ds.Item]  # every image, its caption, repeats and bucket
    resolution: int  # side of the square bucket, pixels
    bucket_step: int  # bucket sides are multiples of this
    buckets: list[tuple[int, int]]  # (width, height) in use
    batches: ds.Plan  # steps, epochs, micro-batches per step
    processes: int
    warnings: list[str] = field(default_factory=list)  # settings that will train, probably not as meant
    reg_items: list[ds.Item] = field(default_factory=list)  # prior preservation's regularization images (prior.py)
    reg_dir: Path | None = None

    @property
    def total_steps(self) -> int:
        return self.batches.total_steps

    @property
    def per_epoch(self) -> int:
        """Images seen per epoch, repeats included."""
        return sum(i.repeats for i in self.items)

    def bucket_counts(self) -> list[tuple[int, int, int]]:
        """(width, height, images) of every bucket in use."""
        return [(w, h, sum(1 for i in self.items if i.bucket == (w, h))) for w, h in self.buckets]

    def summary(self, batch_size: int) -> dict[str, Any]:
        """The plan as the `started` event reports it."""
        return {
            "images": len(self.items), "repeats": self.per_epoch, "buckets": [list(b) for b in self.buckets],
            "batch_size": batch_size, "steps_per_epoch": self.batches.steps_per_epoch, "epochs": self.batches.epochs,
            "reg_images": len(self.reg_items),
        }


def images_dir(cfg: TrainConfig, run_dir: str | Path, folder: str | None = None) -> Path:
    """data.images (or `folder`, e.g. data.reg_images), relative paths being inside the run folder."""
    path = Path(cfg.data.images if folder is None else folder)
    return path if path.is_absolute() else Path(run_dir) / path


def plan_run(cfg: TrainConfig, run_dir: str | Path, processes: int | None = None) -> RunPlan:
    """Scan, bucket and plan the run; raises DatasetError where there is nothing to train on.

    `processes` is the data-parallel world size (default: WORLD_SIZE, else 1): each optimizer step
    takes one micro-batch from every process.
    """
    data, opt = cfg.data, cfg.optim
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    base = models.resolve(cfg.model.base, cfg.model.revision)
    geometry = models.geometry(base)
    resolution = resolution_for(cfg, geometry)
    folder = images_dir(cfg, run_dir)
    unreadable: list[str] = []
    items = ds.scan(folder, data.trigger, data.repeats, unreadable)
    check_trigger(cfg, items)
    step = ds.bucket_step_for(geometry.bucket_step, data.bucket_step)
    buckets = ds.assign_buckets(items, resolution, step, data.buckets)
    batches = ds.make_plan(items, opt.batch_size, opt.gradient_accumulation, processes, opt.steps, opt.epochs)
    left_out = [f"{len(unreadable)} image(s) cannot be read and are left out: {'; '.join(unreadable[:3])}"] if unreadable else []
    reg_dir = images_dir(cfg, run_dir, data.reg_images) if data.reg_images.strip() else None
    reg_items = scan_reg(reg_dir, data.reg_caption) if reg_dir else []
    return RunPlan(base, geometry, folder, items, resolution, step, buckets, batches, processes, advice(cfg) + left_out,
                   reg_items, reg_dir)


def check_trigger(cfg: TrainConfig, items: list[ds.Item]) -> None:
    """An empty trigger is only refused where it would leave an image with an empty caption."""
    uncaptioned = [i.image.name for i in items if not i.caption]
    if uncaptioned:
        raise ConfigError(
            f"data.trigger is empty and {len(uncaptioned)} image(s) have no caption (e.g. {uncaptioned[0]}): they would "
            "train on an empty caption and teach the LoRA nothing it can be asked for. Set a trigger word (e.g. ohwx) or "
            "caption those images"
        )


def advice(cfg: TrainConfig) -> list[str]:
    """Settings that are allowed but probably not meant: shown by Check, logged and in the `started` event."""
    notes = []
    trigger = cfg.data.trigger.strip()
    if not trigger:
        notes.append("data.trigger is empty: the LoRA is tied to no word, so it changes every prompt")
    elif any(c.isspace() for c in trigger):
        notes.append(
            f"data.trigger = {trigger!r} has spaces: the model reads it as several words it already knows; a single "
            "made-up word (e.g. ohwx) is learned faster and does not change prompts that use those words"
        )
    low, high = USUAL_LEARNING_RATES[cfg.optim.optimizer]
    rates = [("optim.learning_rate", cfg.optim.learning_rate)]
    if cfg.lora.train_text_encoder and cfg.lora.text_encoder_lr:
        rates.append(("lora.text_encoder_lr", cfg.lora.text_encoder_lr))
    for name, lr in rates:
        if not low / 10 <= lr <= high * 10:
            usual = f"usually {low:g}" if low == high else f"usually {low:g} to {high:g}"
            notes.append(
                f"{name} = {lr:g} is far outside the usual range for {cfg.optim.optimizer} ({usual}): "
                + ("expect the loss to explode (NaN)" if lr > high else "expect the LoRA to learn almost nothing")
            )
    notes += [f"{name} is set but does nothing here: it {why}" for name, why in idle_settings(cfg)]
    return notes


def idle_settings(cfg: TrainConfig) -> list[tuple[str, str]]:
    """(field, why) for each field changed from its default that the other settings make do nothing."""
    d, lora, opt = cfg.data, cfg.lora, cfg.optim
    rules = [
        ("data.keep_tokens", d.keep_tokens != 1 and not d.shuffle_captions, "only applies with data.shuffle_captions on"),
        ("data.bucket_step", d.bucket_step != 0 and not d.buckets, "only applies with data.buckets on"),
        ("data.num_workers", d.num_workers > 0 and d.cache_latents,
         "loads images only with data.cache_latents off (cached latents need no loading)"),
        ("lora.text_encoder_lr", lora.text_encoder_lr > 0 and not lora.train_text_encoder, "only applies with lora.train_text_encoder on"),
        ("lora.custom_targets", bool(lora.custom_targets) and lora.targets != "custom", "only applies with lora.targets = custom"),
        ("lora.embedding_lr", lora.embedding_lr > 0 and not lora.trigger_vectors, "only applies with lora.trigger_vectors above 0"),
        ("lora.embedding_init", bool(lora.embedding_init.strip()) and not lora.trigger_vectors,
         "only applies with lora.trigger_vectors above 0"),
        ("optim.warmup_steps", opt.warmup_steps > 0 and opt.lr_scheduler == "constant",
         "is ignored by the constant schedule; use lr_scheduler = constant_with_warmup"),
        ("optim.preservation_class", bool(opt.preservation_class.strip()) and opt.preservation_weight == 0,
         "only applies with optim.preservation_weight above 0"),
        ("optim.train_guidance", bool(opt.guidance_sizing) and opt.preservation_weight == 0,
         "only applies with optim.preservation_weight above 0 (it sizes the change against the base's prediction)"),
        ("optim.prior_loss_weight", opt.prior_loss_weight != 1.0 and not d.reg_images.strip(), "only applies with data.reg_images"),
        ("data.reg_caption", bool(d.reg_caption.strip()) and not d.reg_images.strip(), "only applies with data.reg_images"),
        ("data.reg_images", bool(d.reg_images.strip()) and opt.prior_loss_weight == 0,
         "trains nothing with optim.prior_loss_weight = 0 (each step still computes its images)"),
    ]
    return [(name, why) for name, idle, why in rules if idle]


def resolution_for(cfg: TrainConfig, geometry: models.Geometry) -> int:
    """data.resolution (0 = the base's native one), refused where the base cannot take it."""
    resolution = cfg.data.resolution or geometry.default_resolution
    if resolution < geometry.min_resolution or resolution % geometry.bucket_step:
        raise ConfigError(
            f"data.resolution = {resolution} does not suit the base model {cfg.model.base}: it must be a multiple of "
            f"{geometry.bucket_step} px (its VAE x UNet downsampling) and at least {geometry.min_resolution} px. "
            f"Its native resolution is {geometry.default_resolution} (data.resolution = 0 uses it)"
        )
    return resolution
