"""The pre-flight check: dataset, buckets, plan and a rough duration, before any model loads.

`python -m lora_trainer check` prints it; the web app's Check button shows it. Nothing here
imports torch or touches the network.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import dataset as ds
from .config import TrainConfig
from .plan import RunPlan, plan_run

# Rough seconds per optimizer step at batch size 1, measured on the tiny model on 2 CPU cores and
# taken from common reports for real models on a 24 GB GPU (A10G-class) at their native resolution.
TINY_STEP_SECONDS, TINY_SAMPLE_STEP_SECONDS = 0.04, 0.02
GPU_STEP_SECONDS = {"sd": (0.35, 512), "sdxl": (1.1, 1024)}
GPU_SAMPLE_STEP_SECONDS = {"sd": 0.05, "sdxl": 0.15}


def gpu_present() -> bool:
    """An NVIDIA GPU is present, seen without importing torch (LORA_STUDIO_GPU=0/1 overrides)."""
    forced = os.environ.get("LORA_STUDIO_GPU", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return Path("/proc/driver/nvidia/gpus").is_dir() or shutil.which("nvidia-smi") is not None


def estimate_seconds(cfg: TrainConfig, run: RunPlan, gpu: bool) -> float | None:
    """A rough duration of the run, or None where it would take days (a real model without a GPU)."""
    total_steps = run.total_steps
    if run.base.is_builtin:  # the toy base is not measured yet: the tiny model's figures stand in
        per_step, per_sample_step, overhead = TINY_STEP_SECONDS, TINY_SAMPLE_STEP_SECONDS, 10.0
    elif gpu:
        seconds, native = GPU_STEP_SECONDS[run.base.kind]
        per_step = seconds * (run.resolution / native) ** 2
        per_sample_step, overhead = GPU_SAMPLE_STEP_SECONDS[run.base.kind], 60.0
    else:
        return None
    per_step *= cfg.optim.batch_size * cfg.optim.gradient_accumulation
    renders = (total_steps // cfg.sampling.every + 1) if cfg.sampling.every else 0
    sampling = renders * len(cfg.sample_prompts()) * cfg.sampling.steps * per_sample_step
    return overhead + total_steps * per_step + sampling


def format_duration(seconds: float | None) -> str:
    """h:mm:ss or m:ss; a dash when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class Preflight:
    config_source: str
    base: str
    images_dir: Path
    images: int
    per_epoch: int
    captioned: int
    trigger: str
    buckets: list[tuple[int, int, int]]  # (width, height, images)
    plan: ds.Plan
    processes: int
    batch_size: int
    accumulation: int
    estimate_seconds: float | None
    small: list[str] = field(default_factory=list)
    resolution: int = 0
    warnings: list[str] = field(default_factory=list)  # settings that train, probably not as meant

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config_source, "base": self.base, "images_dir": str(self.images_dir), "images": self.images,
            "per_epoch": self.per_epoch, "captioned": self.captioned, "buckets": [list(b) for b in self.buckets],
            "total_steps": self.plan.total_steps, "steps_per_epoch": self.plan.steps_per_epoch, "epochs": self.plan.epochs,
            "processes": self.processes, "estimate_seconds": self.estimate_seconds, "small_images": self.small,
            "resolution": self.resolution, "warnings": self.warnings,
        }

    def format(self, images_label: str | None = None) -> str:
        p = self.plan
        lines = [
            f"config: ok ({self.config_source})",
            f"base model: {self.base}",
            f"images: {self.images} from {images_label or self.images_dir} ({self.per_epoch} per epoch with repeats)",
            f"captions: {self.captioned} written, the rest use the trigger '{self.trigger}'",
            "buckets: " + ", ".join(f"{w}x{h} ({n})" for w, h, n in self.buckets),
            f"plan: {p.total_steps} steps, {p.steps_per_epoch} steps per epoch, {p.epochs} epochs, batch "
            f"{self.batch_size} x {self.accumulation} accumulation x {self.processes} process(es)",
        ]
        if self.estimate_seconds is not None:
            lines.append(f"estimated time: about {format_duration(self.estimate_seconds)} (rough: it depends on the hardware)")
        else:
            lines.append("estimated time: days without a GPU; real models need one (builtin:tiny-sd runs anywhere)")
        lines += [f"warning: {w}" for w in self.warnings]
        if self.small:
            lines.append(
                f"warning: {len(self.small)} image(s) are smaller than {self.resolution} px and will be upscaled: "
                + ", ".join(self.small[:5])
            )
        return "\n".join(lines)


def preflight(run_dir: Path, cfg: TrainConfig, *, config_source: str = "", processes: int | None = None,
              gpu: bool | None = None) -> Preflight:
    """Scan the dataset and plan the run exactly as the trainer will (`plan_run`); raises DatasetError if it can't train."""
    run = plan_run(cfg, run_dir, processes)
    data = cfg.data
    return Preflight(
        config_source=config_source or "defaults and flags", base=cfg.model.base, images_dir=run.images_dir,
        images=len(run.items), per_epoch=run.per_epoch,
        captioned=sum(1 for i in run.items if i.caption != data.trigger), trigger=data.trigger,
        buckets=run.bucket_counts(), plan=run.batches, processes=run.processes,
        batch_size=cfg.optim.batch_size, accumulation=cfg.optim.gradient_accumulation,
        estimate_seconds=estimate_seconds(cfg, run, gpu_present() if gpu is None else gpu),
        small=[i.image.name for i in run.items if min(i.size) < run.resolution], resolution=run.resolution,
        warnings=run.warnings,
    )
