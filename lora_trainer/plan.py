"""What a run will train on and for how long: the one plan the trainer follows and the pre-flight shows.

`plan_run` scans the dataset, assigns buckets and counts steps and epochs. The trainer and
`preflight` both call it, so what Check predicts is what training does. Nothing here imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import dataset as ds
from .config import TrainConfig


@dataclass
class RunPlan:
    images_dir: Path
    items: list[ds.Item]  # every image, its caption, repeats and bucket
    resolution: int  # side of the square bucket, pixels
    bucket_step: int  # bucket sides are multiples of this
    buckets: list[tuple[int, int]]  # (width, height) in use
    batches: ds.Plan  # steps, epochs, micro-batches per step
    processes: int

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
        }


def images_dir(cfg: TrainConfig, run_dir: str | Path) -> Path:
    """data.images, relative paths being inside the run folder."""
    path = Path(cfg.data.images)
    return path if path.is_absolute() else Path(run_dir) / path


def plan_run(cfg: TrainConfig, run_dir: str | Path, processes: int | None = None) -> RunPlan:
    """Scan, bucket and plan the run; raises DatasetError where there is nothing to train on.

    `processes` is the data-parallel world size (default: WORLD_SIZE, else 1): each optimizer step
    takes one micro-batch from every process.
    """
    data, opt = cfg.data, cfg.optim
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    folder = images_dir(cfg, run_dir)
    items = ds.scan(folder, data.trigger)
    step = ds.bucket_step_for(cfg.model.base, data.bucket_step)
    buckets = ds.assign_buckets(items, data.resolution, step, data.buckets)
    batches = ds.make_plan(items, opt.batch_size, opt.gradient_accumulation, processes, opt.steps, opt.epochs)
    return RunPlan(folder, items, data.resolution, step, buckets, batches, processes)
