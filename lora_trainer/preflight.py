"""The pre-flight check: dataset, buckets, plan, memory and the duration, before any training.

`python -m lora_trainer check` prints it; the web app's Check button shows it. The memory part is
lora_trainer.memory's estimate of the run (each term) and, for a GPU (the one found, or `--gpu-memory
GB`), the memory plan's verdict: the settings optim.memory = auto will train with, or the refusal
the trainer would raise. The duration (timing.py) counts loading, steps, sample renders and the
evaluation after training; with `calibrate` its rates are measured on this machine from a few real
steps and renders where the base is on disk (the one thing here that loads weights), else they come
from the fixed table below. Nothing here touches the network.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import dataset as ds
from . import memory, timing
from .config import TrainConfig
from .memory.plan import HEADROOM, checkpoint_optimizer
from .plan import RunPlan, plan_run

log = logging.getLogger(__name__)

# Rough seconds per optimizer step at batch size 1, measured on the tiny model on 2 CPU cores and
# taken from common reports for real models on a 24 GB GPU (A10G-class) at their native resolution.
TINY_STEP_SECONDS, TINY_SAMPLE_STEP_SECONDS = 0.04, 0.02
GPU_STEP_SECONDS = {"sd": (0.35, 512), "sdxl": (1.1, 1024)}
GPU_SAMPLE_STEP_SECONDS = {"sd": 0.05, "sdxl": 0.15}
CHECKPOINTING_SLOWDOWN = 1.3  # activations recomputed in the backward pass (config.py's "~30% slower")
TIME_BASIS = {
    "builtin": "a fixed table: the tiny model's seconds per step on 2 CPU cores (check measures this machine instead)",
    "gpu": "rough seconds per step of SD 1.5 / SDXL at native size on a 24 GB (A10G-class) GPU, scaled by area and batch",
}


def gpu_present() -> bool:
    """An NVIDIA GPU is present, seen without importing torch (LORA_STUDIO_GPU=0/1 overrides)."""
    forced = os.environ.get("LORA_STUDIO_GPU", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return Path("/proc/driver/nvidia/gpus").is_dir() or shutil.which("nvidia-smi") is not None


def table_rates(cfg: TrainConfig, run: RunPlan, gpu: bool) -> timing.Rates | None:
    """The fixed table's rates for this run, or None where it would take days (a real model without a GPU)."""
    if run.base.is_builtin:
        per_step, per_sample_step, load = TINY_STEP_SECONDS, TINY_SAMPLE_STEP_SECONDS, 10.0
    elif gpu:
        seconds, native = GPU_STEP_SECONDS[run.base.kind]
        per_step = seconds * (run.resolution / native) ** 2
        per_sample_step, load = GPU_SAMPLE_STEP_SECONDS[run.base.kind], 60.0
    else:
        return None
    per_step *= cfg.optim.batch_size * cfg.optim.gradient_accumulation
    if run.reg_items:  # prior preservation: each batch gains as many regularization images
        per_step *= 2
    if cfg.optim.gradient_checkpointing:
        per_step *= CHECKPOINTING_SLOWDOWN
    return timing.Rates(per_step, per_sample_step, 0.0, TIME_BASIS["builtin" if run.base.is_builtin else "gpu"], load)


def measured_rates(cfg: TrainConfig, run: RunPlan, gpu: bool) -> timing.Rates | None:
    """Rates measured on this machine (timing.calibrate) where that is cheap and safe: a built-in base (a few
    MB, on the CPU), or a base already on disk with a GPU here; None otherwise (nothing to download)."""
    from .memory.arch import _cached_hub_folder

    on_disk = run.base.is_builtin or Path(run.base.source).exists() or _cached_hub_folder(run.base.source) is not None
    if not on_disk or not (run.base.is_builtin or gpu):
        return None
    try:
        return timing.calibrate(cfg, run.base, run.resolution)
    except Exception as e:  # noqa: BLE001 - a failed measurement leaves the table's estimate, never the check
        log.warning("time calibration failed (%s: %s); the estimate uses the fixed table", type(e).__name__, e)
        return None


def estimate_seconds(cfg: TrainConfig, run: RunPlan, gpu: bool, rates: timing.Rates | None = None) -> float | None:
    """The run's duration (loading, training, sample renders, evaluation after training) at `rates` (default:
    the fixed table), or None where it would take days (a real model without a GPU)."""
    from .evaluate import runs_after_training

    rates = rates or table_rates(cfg, run, gpu)
    if rates is None:
        return None
    return timing.run_seconds(cfg, run.total_steps, rates, runs_after_training(cfg.eval, cfg.model.base, gpu))


def time_basis(run: RunPlan) -> str:
    return TIME_BASIS["builtin" if run.base.is_builtin else "gpu"]


@dataclass
class MemoryCheck:
    """The memory part of the check: the estimate of what will train, and on a GPU the plan's verdict."""

    estimate: memory.Estimate | None
    gpu_bytes: int | None  # the GPU planned for (found, or --gpu-memory); None: no GPU
    plan: list[str] = field(default_factory=list)  # the memory plan's changes and reasons
    refusal: str = ""  # the plan cannot fit: MemoryPlanError's message, naming the change that would
    problem: str = ""  # the estimate could not be made, and why

    def lines(self) -> list[str]:
        if self.problem:
            return [f"memory: not estimated ({self.problem})"]
        where = f"a GPU of {memory.gb(self.gpu_bytes)}" if self.gpu_bytes else "no GPU found"
        if self.refusal:
            return [f"memory plan for {where}: does not fit, the trainer would refuse it before loading: {self.refusal}"]
        lines = [f"memory plan for {where}:"] + [f"  {reason}" for reason in self.plan]
        lines += self.estimate.text().splitlines()
        if self.gpu_bytes and self.estimate.device == "cuda":
            budget = int(self.gpu_bytes * HEADROOM)
            fits = self.estimate.total <= budget
            lines.append(f"memory: {'fits' if fits else 'DOES NOT FIT'}: peak {memory.gb(self.estimate.total)} of "
                         f"{memory.gb(budget)} planned ({HEADROOM:.0%} of the GPU)"
                         + ("" if fits else "; set optim.memory = auto to plan it, or lower the settings"))
        return lines


def memory_check(cfg: TrainConfig, run: RunPlan, run_dir: Path, gpu: tuple[int, bool] | None) -> tuple[TrainConfig, MemoryCheck]:
    """The config the trainer will train (optim.memory = auto planned for `gpu`) and its memory check.

    Without a GPU a built-in model is estimated as it trains here (on the CPU), a real model as it
    would need a GPU with these settings."""
    planned, check = cfg, MemoryCheck(None, gpu[0] if gpu else None)
    try:
        try:
            planned, check.plan = memory.plan_for_training(cfg, gpu, processes=run.processes,
                                                           resumed_optimizer=checkpoint_optimizer(run_dir))
        except memory.MemoryPlanError as e:
            check.refusal = str(e)
            return cfg, check
        if gpu is None and cfg.optim.memory == "auto":
            check.plan.append("`check --gpu-memory GB` plans for a GPU of that size")
        device = "cuda" if gpu is not None or not run.base.is_builtin else "cpu"
        check.estimate = memory.estimate(planned, device=device, processes=run.processes)
        if gpu is None and device == "cuda":
            check.estimate.notes.append("no GPU here: these are the settings as given, on a GPU")
    except (KeyError, OSError, ValueError) as e:  # a model folder without the files an estimate reads
        check.problem = f"{type(e).__name__}: {e}"
    return planned, check


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
    memory: MemoryCheck | None = None
    time_basis: str = ""
    reg_images: int = 0  # prior preservation's regularization images (0: off)
    reg_dir: Path | None = None
    prior_loss_weight: float = 1.0

    @property
    def refused(self) -> bool:
        """The trainer would refuse this run before loading: it cannot fit the GPU."""
        return bool(self.memory and self.memory.refusal)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config_source, "base": self.base, "images_dir": str(self.images_dir), "images": self.images,
            "per_epoch": self.per_epoch, "captioned": self.captioned, "buckets": [list(b) for b in self.buckets],
            "total_steps": self.plan.total_steps, "steps_per_epoch": self.plan.steps_per_epoch, "epochs": self.plan.epochs,
            "processes": self.processes, "estimate_seconds": self.estimate_seconds, "small_images": self.small,
            "resolution": self.resolution, "warnings": self.warnings, "reg_images": self.reg_images,
            "reg_dir": str(self.reg_dir) if self.reg_dir else None,
            "memory": None if self.memory is None or self.memory.estimate is None else {
                "peak_bytes": self.memory.estimate.total, "peak_phase": self.memory.estimate.peak_phase,
                "ram_bytes": self.memory.estimate.ram_total, "device": self.memory.estimate.device,
            },
            "memory_plan": self.memory.plan if self.memory else [], "refusal": self.memory.refusal if self.memory else "",
        }

    def format(self, images_label: str | None = None) -> str:
        p = self.plan
        lines = [
            f"config: ok ({self.config_source})",
            f"base model: {self.base}",
            f"images: {self.images} from {images_label or self.images_dir} ({self.per_epoch} per epoch with repeats)",
            f"captions: {self.captioned} written, the rest use the trigger '{self.trigger}'",
            "buckets: " + ", ".join(f"{w}x{h} ({n})" for w, h, n in self.buckets),
        ]
        if self.reg_dir is not None:
            lines.append(f"regularization images: {self.reg_images} from {self.reg_dir} (prior preservation at weight "
                         f"{self.prior_loss_weight:g}: each batch gains as many of them, cropped to its bucket)")
        lines += [
            f"plan: {p.total_steps} steps, {p.steps_per_epoch} steps per epoch, {p.epochs} epochs, batch "
            f"{self.batch_size} x {self.accumulation} accumulation x {self.processes} process(es)",
        ]
        if self.estimate_seconds is not None:
            lines.append(f"estimated time: about {format_duration(self.estimate_seconds)} (from {self.time_basis}; "
                         "loading, sample renders and evaluation included)")
        else:
            lines.append("estimated time: days without a GPU; real models need one (builtin:tiny-sd runs anywhere)")
        lines += [f"warning: {w}" for w in self.warnings]
        if self.small:
            lines.append(
                f"warning: {len(self.small)} image(s) are smaller than {self.resolution} px and will be upscaled: "
                + ", ".join(self.small[:5])
            )
        if self.memory is not None:
            lines += self.memory.lines()
        return "\n".join(lines)


def preflight(run_dir: Path, cfg: TrainConfig, *, config_source: str = "", processes: int | None = None,
              gpu: bool | None = None, gpu_memory: int | None = None, calibrate: bool = False) -> Preflight:
    """Scan the dataset and plan the run exactly as the trainer will (`plan_run`, then the memory plan);
    raises DatasetError if it can't train. `gpu_memory`: plan for a GPU of that many bytes (with bf16)
    instead of the one found. `calibrate`: time a few real steps and renders of the run here where the base
    is on disk (measured_rates: it loads the base, so the check is no longer weight-free)."""
    run = plan_run(cfg, run_dir, processes)
    data = cfg.data
    has_gpu = gpu_present() if gpu is None else gpu
    card = (gpu_memory, True) if gpu_memory else (memory.detect_gpu() if has_gpu else None)
    trained, mem = memory_check(cfg, run, Path(run_dir), card)
    if (trained.optim.batch_size, trained.optim.gradient_accumulation) != (cfg.optim.batch_size, cfg.optim.gradient_accumulation):
        run = plan_run(trained, run_dir, processes)  # the micro-batches the trainer will draw
    rates = measured_rates(trained, run, has_gpu) if calibrate and not mem.refusal else None
    return Preflight(
        config_source=config_source or "defaults and flags", base=cfg.model.base, images_dir=run.images_dir,
        images=len(run.items), per_epoch=run.per_epoch,
        captioned=sum(1 for i in run.items if i.caption != data.trigger), trigger=data.trigger,
        buckets=run.bucket_counts(), plan=run.batches, processes=run.processes,
        batch_size=trained.optim.batch_size, accumulation=trained.optim.gradient_accumulation,
        estimate_seconds=estimate_seconds(trained, run, has_gpu or card is not None, rates),
        small=[i.image.name for i in run.items if min(i.size) < run.resolution], resolution=run.resolution,
        warnings=run.warnings, memory=mem, time_basis=rates.basis if rates else time_basis(run),
        reg_images=len(run.reg_items), reg_dir=run.reg_dir, prior_loss_weight=cfg.optim.prior_loss_weight,
    )
