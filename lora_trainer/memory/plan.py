"""The automatic memory plan: the fastest settings whose estimate fits the GPU, and why.

Concessions in the order they cost speed (none of them changes what the LoRA learns per image):
1. cache latents and caption embeddings where valid (faster and smaller: the VAE and text
   encoders leave the GPU), and train with half-precision frozen weights (bf16 where the GPU has
   it, else fp16); attention is PyTorch's fused SDPA throughout (memory linear in image size);
2. the largest micro-batch that fits, the same images per optimizer step kept by gradient
   accumulation (smaller micro-batches use the GPU less well);
3. 8-bit AdamW in place of AdamW (bitsandbytes; same updates up to quantisation of the moments);
4. gradient checkpointing (recomputes activations in the backward pass: about 30% slower).
A plan that fits none of these is refused with the change that would make it fit.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
from pathlib import Path

from ..config import TrainConfig
from ..errors import LoraStudioError
from .arch import Architecture, architecture
from .estimator import (
    Estimate,
    GiB,
    estimate,
    gb,
    load_variant_for,
    text_caching,
    weight_dtype,
    with_resolution,
)

HEADROOM = 0.95  # plan to 95% of the card: other processes, fragmentation beyond the estimate

log = logging.getLogger(__name__)


class MemoryPlanError(LoraStudioError):
    """No settings fit the GPU; the message names the change that would."""


def detect_gpu() -> tuple[int, bool] | None:
    """(total bytes, bf16 supported) of GPU 0, or None without one; nvidia-smi first, so torch need not load."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total,compute_cap", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()[0]
            mib, cap = (v.strip() for v in out.split(","))
            return int(float(mib)) * 2**20, float(cap) >= 8.0  # bf16 from Ampere (compute capability 8.0)
        except (OSError, subprocess.SubprocessError, ValueError, IndexError):
            pass
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory, torch.cuda.is_bf16_supported()


def _fits(est: Estimate, budget: int) -> bool:
    return est.total <= budget


def _with(cfg: TrainConfig, **changes) -> TrainConfig:
    new = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        section, name = dotted.split("__")
        setattr(getattr(new, section), name, value)
    return new


def _divisors_desc(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def auto_plan(cfg: TrainConfig, base: str | Architecture | None = None, gpu_bytes: int | None = None, *,
              bf16: bool = True, processes: int = 1, keep_optimizer: bool = False) -> tuple[TrainConfig, list[str]]:
    """The fastest settings for `cfg` that fit a GPU of `gpu_bytes` (detected when None), and the reasons.

    `keep_optimizer`: never switch to 8-bit AdamW (a resumed run's optimizer state is its optimizer's).
    Raises MemoryPlanError when nothing fits, naming the change that would.
    """
    if gpu_bytes is None:
        found = detect_gpu()
        if found is None:
            return copy.deepcopy(cfg), ["no GPU found: the memory plan applies to GPUs (plan for one with --gpu-memory GB)"]
        gpu_bytes, bf16 = found
    arch = base if isinstance(base, Architecture) else architecture(base or cfg.model.base, load_variant_for(cfg))
    cfg = with_resolution(cfg, arch)
    budget = int(gpu_bytes * HEADROOM)
    reasons = [f"GPU memory {gb(gpu_bytes)}: planning to {gb(budget)} ({HEADROOM:.0%})"]
    new = copy.deepcopy(cfg)

    # 1. what is faster and smaller at once
    if not new.data.cache_latents:
        new.data.cache_latents = True
        reasons.append("latent caching on: each image is encoded once and the VAE leaves the GPU")
    if not new.data.cache_text_embeddings and text_caching(_with(new, data__cache_text_embeddings=True)):
        new.data.cache_text_embeddings = True
        reasons.append("caption caching on: the text encoders leave the GPU")
    if weight_dtype(new) == "fp32":
        new.optim.mixed_precision = "bf16" if bf16 else "fp16"
        reasons.append(f"mixed precision {new.optim.mixed_precision}: half the weight memory, tensor-core speed"
                       + ("" if bf16 else " (this GPU has no bf16)"))
    reasons.append("attention: PyTorch's fused scaled-dot-product attention (memory grows linearly with image size)")

    # 2-4. the first candidate that fits, in order of speed
    images = new.optim.batch_size * new.optim.gradient_accumulation
    optimizers = [new.optim.optimizer] + (["adamw8bit"] if new.optim.optimizer == "adamw" and not keep_optimizer else [])
    tried = []
    for checkpointing in (False, True):
        for optimizer in optimizers:
            for micro in _divisors_desc(images):
                candidate = _with(new, optim__batch_size=micro, optim__gradient_accumulation=images // micro,
                                  optim__optimizer=optimizer, optim__gradient_checkpointing=checkpointing)
                est = estimate(candidate, arch, device="cuda", processes=processes)
                tried.append((candidate, est))
                if _fits(est, budget):
                    return candidate, reasons + _explain(cfg, candidate, est, tried[:-1])
    raise MemoryPlanError(_refusal(new, arch, budget, tried[-1][1], processes))


def plan_for_training(cfg: TrainConfig, gpu: tuple[int, bool] | None, *, processes: int = 1,
                      resumed_optimizer: str | None = None, base: str | Architecture | None = None) -> tuple[TrainConfig, list[str]]:
    """What the trainer trains: `cfg` planned by optim.memory = auto for `gpu` ((total bytes, bf16) or None
    for none), and one line per change and its reason. On a CPU, or with optim.memory = off, nothing
    changes and one line says so. A resumed run keeps the optimizer its checkpoints were trained with.
    Raises MemoryPlanError (before any weight loads) when the run cannot fit."""
    if cfg.optim.memory == "off":
        return cfg, ["optim.memory = off: training with the settings as given"]
    if gpu is None:
        return cfg, ["no GPU: the memory plan (optim.memory = auto) applies on a GPU; training with the settings as given"]
    pinned = []
    if resumed_optimizer and resumed_optimizer != cfg.optim.optimizer:
        pinned = [f"optimizer {resumed_optimizer} (set: {cfg.optim.optimizer}): the checkpoints were trained with it"]
        cfg = _with(cfg, optim__optimizer=resumed_optimizer)
    planned, reasons = auto_plan(cfg, base, gpu[0], bf16=gpu[1], processes=processes,
                                 keep_optimizer=resumed_optimizer is not None)
    return planned, pinned + reasons


def checkpoint_optimizer(run_dir: str | Path) -> str | None:
    """The optimizer the run's newest checkpoint was trained with (its saved settings), or None."""
    from ..checkpoints import TRAINER_STATE, checkpoint_dirs

    for checkpoint in reversed(checkpoint_dirs(Path(run_dir))):
        try:
            return json.loads((checkpoint / TRAINER_STATE).read_text())["settings"]["optim.optimizer"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # damaged: check_resumable reports it and falls back to an older one
    return None


def plan_run_memory(cfg: TrainConfig, run_dir: str | Path, processes: int = 1) -> tuple[TrainConfig, list[str]]:
    """The memory plan at train start, for the GPU this process sees (none: a no-op), each line logged."""
    import torch

    gpu = detect_gpu() if torch.cuda.is_available() else None
    planned, notes = plan_for_training(cfg, gpu, processes=processes, resumed_optimizer=checkpoint_optimizer(run_dir))
    for note in notes:
        log.info("memory plan: %s", note)
    return planned, notes


def _explain(old: TrainConfig, new: TrainConfig, est: Estimate, rejected: list) -> list[str]:
    o, n = old.optim, new.optim
    out = []
    if rejected:
        last = rejected[-1][0].optim
        out.append(f"batch {last.batch_size} x {last.gradient_accumulation} with {last.optimizer}"
                   f"{', gradient checkpointing' if last.gradient_checkpointing else ''} would need {gb(rejected[-1][1].total)}")
    out.append(f"batch {n.batch_size} x {n.gradient_accumulation} accumulation"
               + (f" (was {o.batch_size} x {o.gradient_accumulation}; same {n.batch_size * n.gradient_accumulation} images per step)"
                  if (o.batch_size, o.gradient_accumulation) != (n.batch_size, n.gradient_accumulation) else ""))
    if n.optimizer != o.optimizer:
        out.append(f"optimizer {n.optimizer} (was {o.optimizer}): its state is a quarter the size")
    if n.gradient_checkpointing and not o.gradient_checkpointing:
        out.append("gradient checkpointing on: activations are recomputed in the backward pass (about 30% slower)")
    elif o.gradient_checkpointing and not n.gradient_checkpointing:
        out.append("gradient checkpointing off: the run fits without it (about 30% faster)")
    out.append(f"estimated peak {gb(est.total)} ({est.peak_phase})")
    return out


def _refusal(cfg: TrainConfig, arch: Architecture, budget: int, smallest: Estimate, processes: int) -> str:
    """The message of a plan that cannot fit: what the smallest settings need, and the first change
    (or a change with sample renders off) that fits."""
    least = _with(cfg, optim__batch_size=1, optim__gradient_accumulation=cfg.optim.batch_size * cfg.optim.gradient_accumulation,
                  optim__optimizer="adamw8bit" if cfg.optim.optimizer == "adamw" else cfg.optim.optimizer,
                  optim__gradient_checkpointing=True)
    changes: list[tuple[str, dict]] = []
    if cfg.lora.train_text_encoder:
        changes.append(("set lora.train_text_encoder = false", {"lora__train_text_encoder": False}))
    changes += [(f"lower data.resolution to {r}", {"data__resolution": r}) for r in (1024, 768, 640, 512, 384, 256)
                if r < cfg.data.resolution]
    rank = cfg.lora.rank
    while rank > 4:
        rank //= 2
        changes.append((f"lower lora.rank to {rank}", {"lora__rank": rank}))
    no_renders = ("set sampling.every = 0 (no sample images during training)", {"sampling__every": 0})
    tries = [no_renders, *changes] if cfg.sampling.every else changes
    if cfg.sampling.every:
        tries += [(f"{no_renders[0]} and {what}", {**no_renders[1], **change}) for what, change in changes]

    def need(changed: dict) -> int:  # other resolutions scale from this one's simulation: no new ones
        return estimate(_with(least, **changed), arch, device="cuda", processes=processes,
                        simulated_size=cfg.data.resolution).total

    head = (f"this run needs at least {gb(smallest.total)} of GPU memory ({smallest.peak_phase}, even at batch 1 with "
            f"8-bit AdamW and gradient checkpointing); the GPU allows {gb(budget)}")
    for what, changed in tries:
        total = need(changed)
        if total <= budget:
            return f"{head}. To fit: {what} (then about {gb(total)})"
    advice = f"{head}. Use a GPU with at least {_card_gib(smallest.total)} GB"
    if cfg.sampling.every and _card_gib(need(no_renders[1])) < _card_gib(smallest.total):
        advice += f" ({_card_gib(need(no_renders[1]))} GB with sampling.every = 0)"
    return advice


def _card_gib(total: int) -> int:
    """The smallest whole number of GiB whose planning budget holds `total`."""
    return -(-int(total / HEADROOM) // GiB)
