"""The memory a planned run needs: GPU memory per phase and system RAM at load, each term named.

Terms and where they come from:
- frozen weights: the base's real parameter counts (arch.py) x the bytes of their training dtype
  (the VAE stays fp32: in fp16 it overflows);
- LoRA: the trainable tensors the config's targets and rank add (arch.lora_tensors), fp32 weights +
  fp32 gradients + the optimizer's state: AdamW 8 B/param (two fp32 moments), AdamW8bit 2 B/param
  (bitsandbytes' block-wise 8-bit moments, one fp32 scale per 256 values; tensors under 4096 values
  keep 32-bit state), Prodigy 16 B/param (prodigyopt 1.1: exp_avg, exp_avg_sq, s and p0; p0 is a
  scalar for a zero-initialised LoRA B, so 12 B there);
- pivotal tuning (lora.trigger_vectors): the trigger's new embedding rows (vectors x width per text
  encoder) with fp32 gradients and optimizer state, and the text encoders' activations: they run
  forward every step and the rows' gradient flows back through every layer (simulate.py);
- EMA (optim.ema_decay): an fp32 copy of the LoRA weights in system RAM (ema.py), and a second one
  while samples render with the average (the raw weights wait on the CPU);
- activations: one training step simulated on the meta device (simulate.py) at batch 1 and the
  training resolution, scaled by the batch (every saved tensor grows linearly with it); the plan's
  alternative resolutions scale by image area from there (feature maps grow with the area, and fused
  attention keeps attention linear too: within 5% for SD 1.5 between 256 and 1024 px, conservative by
  up to 40% for SDXL with gradient checkpointing from 512 to 1024 px, measured on the simulation);
- the CUDA context (kernels, cuBLAS workspace: 0.3-0.6 GB with CUDA's lazy loading, which
  max_memory_allocated never shows) and the caching allocator's slack over what is allocated.
System RAM while training: the process, the components parked off the GPU, the EMA copies.
Phases: caching latents (VAE encode with everything loaded), training steps, sample renders
(everything back on the GPU: VAE decode at full size). The peak is the largest phase.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

from ..config import TEXT_ENCODER_TARGETS, TrainConfig
from .arch import Architecture, architecture, has_fp16_variant, lora_tensors
from .simulate import (
    inference_peak,
    pivotal_text_encoder_bytes,
    text_encoder_training_bytes,
    unet_training_peak,
)

GiB = 2**30
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
ALLOCATOR_SLACK = 0.10  # of the activation peak; reserved over allocated, to be re-measured by bench/gpu.py
PROCESS_RAM = {"cpu": int(0.45 * GiB), "cuda": int(2.0 * GiB)}  # python + torch + diffusers; CUDA adds its libraries
BNB_BLOCK, BNB_MIN_8BIT = 256, 4096
_SAFETENSORS_DTYPE = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


@dataclass(frozen=True)
class Term:
    label: str
    bytes: int
    note: str = ""


@dataclass
class Estimate:
    device: str  # "cuda" or "cpu"
    phases: dict[str, list[Term]]  # phase name -> its terms (on the GPU, or in RAM when training on a CPU)
    ram: list[Term]  # system memory while the base loads
    source: str
    notes: list[str] = field(default_factory=list)
    ram_training: list[Term] = field(default_factory=list)  # system memory while a GPU trains (none for a CPU run)

    def phase_total(self, phase: str) -> int:
        return sum(t.bytes for t in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def total(self) -> int:
        """Peak GPU memory (or RAM for a CPU run) of the whole run."""
        return self.phase_total(self.peak_phase)

    @property
    def ram_total(self) -> int:
        return sum(t.bytes for t in self.ram)

    @property
    def ram_training_total(self) -> int:
        return sum(t.bytes for t in self.ram_training)

    def text(self) -> str:
        where = "GPU memory" if self.device == "cuda" else "memory (training on the CPU)"
        train = self.phases["training"]
        lines = [f"{where}, training step: {gb(self.phase_total('training'))}"]
        lines += [f"  {t.label:<34} {gb(t.bytes):>9}  {t.note}".rstrip() for t in train]
        for phase in self.phases:
            if phase != "training":
                lines.append(f"{where}, {phase}: {gb(self.phase_total(phase))}  ("
                             + ", ".join(f"{t.label} {gb(t.bytes)}" for t in self.phases[phase] if t.bytes) + ")")
        lines.append(f"peak: {gb(self.total)} ({self.peak_phase})")
        lines.append(f"system RAM while loading: {gb(self.ram_total)}  ("
                     + ", ".join(f"{t.label} {t.note if t.note and not t.bytes else gb(t.bytes)}" for t in self.ram) + ")")
        if self.ram_training:
            lines.append(f"system RAM while training: {gb(self.ram_training_total)}  ("
                         + ", ".join(f"{t.label} {gb(t.bytes)}" for t in self.ram_training if t.bytes) + ")")
        lines.append(f"parameter counts: {self.source}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def gb(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def optimizer_state_bytes(optimizer: str, tensors: list[tuple[str, int]]) -> int:
    total = 0
    for role, n in tensors:
        if optimizer == "adamw8bit":
            total += 2 * n + 2 * 4 * math.ceil(n / BNB_BLOCK) if n >= BNB_MIN_8BIT else 8 * n
        elif optimizer == "prodigy":
            total += 12 * n if role == "B" else 16 * n
        else:
            total += 8 * n
    return total


def text_caching(cfg: TrainConfig) -> bool:
    """The trainer's rule (train.caching): captions are encoded once only when they never change, and not
    with pivotal tuning (the trigger's embedding trains, so the text encoders run every step)."""
    d, lora = cfg.data, cfg.lora
    return d.cache_text_embeddings and not (lora.train_text_encoder or lora.trigger_vectors or d.shuffle_captions
                                            or d.caption_dropout > 0)


def weight_dtype(cfg: TrainConfig) -> str:
    return cfg.optim.mixed_precision if cfg.optim.mixed_precision in ("fp16", "bf16") else "fp32"


def load_dtype_for(cfg: TrainConfig, single_file: bool = False):
    """The dtype to hand `from_pretrained` so frozen weights load directly in their training precision
    (not in fp32 and cast afterwards, which doubles the RAM at load: 15.5 GB for SDXL). The VAE stays fp32.
    A single-file checkpoint takes one dtype only (diffusers' from_single_file)."""
    import torch

    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.optim.mixed_precision)
    if half is None:
        return torch.float32
    return half if single_file else {"default": half, "vae": torch.float32}


def load_variant_for(cfg: TrainConfig) -> str:
    """The weight variant to load: the config's, else fp16 for half-precision training where the model
    has fp16 files (half the download, and no fp32 file in RAM being converted while it loads)."""
    if cfg.model.variant or weight_dtype(cfg) == "fp32" or cfg.model.base.startswith("builtin:"):
        return cfg.model.variant
    return "fp16" if has_fp16_variant(cfg.model.base) else ""


def _te_layers(arch: Architecture, name: str) -> list[int] | None:
    """SDXL reads text encoder 1's penultimate layer: the trainer leaves its last layer without LoRA."""
    if arch.kind == "sdxl" and name == "text_encoder":
        return list(range(arch.components[name].config["num_hidden_layers"] - 1))
    return None


def trainable_tensors(cfg: TrainConfig, arch: Architecture) -> dict[str, list[tuple[str, int]]]:
    lora = cfg.lora
    out = {"unet": lora_tensors(arch.components["unet"], cfg.unet_targets(), lora.rank, use_dora=lora.use_dora)}
    if lora.train_text_encoder:
        for te in arch.text_encoders:
            out[te.name] = lora_tensors(te, TEXT_ENCODER_TARGETS, lora.rank, use_dora=lora.use_dora, layers=_te_layers(arch, te.name))
    return out


def with_resolution(cfg: TrainConfig, arch: Architecture) -> TrainConfig:
    """`cfg` with data.resolution 0 (the base's native resolution) made the number it means."""
    if cfg.data.resolution:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.data.resolution = arch.native_resolution
    return cfg


def estimate(cfg: TrainConfig, base: str | Architecture | None = None, *, device: str = "cuda", processes: int = 1,
             simulated_size: int | None = None) -> Estimate:
    """Peak memory of the run `cfg` describes on `device` ("cuda" or "cpu"), from `base` (default cfg.model.base).

    `simulated_size`: the resolution to simulate at and scale from by area (default: the training resolution).
    """
    arch = base if isinstance(base, Architecture) else architecture(base or cfg.model.base, load_variant_for(cfg))
    cfg = with_resolution(cfg, arch)
    gpu = device == "cuda"
    dt = weight_dtype(cfg)
    wbytes = 4 if dt == "fp32" else 2
    res, batch, opt, lora = cfg.data.resolution, cfg.optim.batch_size, cfg.optim, cfg.lora
    unet, vae, tes = arch.components["unet"], arch.components["vae"], arch.text_encoders
    te_params = sum(t.params for t in tes)
    cache_text, cache_latents = text_caching(cfg), cfg.data.cache_latents
    sim_dtype = "fp16" if dt == "bf16" else dt  # same sizes; one simulation serves both

    flat = [t for ts in trainable_tensors(cfg, arch).values() for t in ts]
    n_lora = sum(n for _, n in flat)
    size = -(-(simulated_size or res) // 64) * 64  # every UNet and VAE level divides a multiple of 64
    area = (res / size) ** 2
    acts = _activations(cfg, arch, size, sim_dtype)
    context = [Term("CUDA context", CUDA_CONTEXT_BYTES, "kernels and cuBLAS workspace")] if gpu else []
    slack = (lambda b: [Term("allocator slack", int(ALLOCATOR_SLACK * b), f"{ALLOCATOR_SLACK:.0%} of activations")]) if gpu else (lambda b: [])
    unet_w = Term("UNet weights", unet.params * wbytes, f"{_millions(unet.params)} params, {dt}")
    te_on_gpu = not (gpu and cache_text)
    te_w = Term("text encoder weights", te_params * wbytes if te_on_gpu else 0,
                f"{_millions(te_params)} params, {dt}" if te_on_gpu else "off the GPU (captions cached)")
    vae_on_gpu = not (gpu and cache_latents)
    vae_w = Term("VAE weights", vae.params * 4 if vae_on_gpu else 0,
                 f"{_millions(vae.params)} params, fp32" if vae_on_gpu else "off the GPU (latents cached)")
    lora_w = Term("LoRA weights", 4 * n_lora, f"{_millions(n_lora)} params, fp32 (rank {lora.rank})")
    state = Term("optimizer state", optimizer_state_bytes(opt.optimizer, flat), opt.optimizer)
    rows, te_acts = pivotal_terms(cfg, arch, sim_dtype)
    ema, ema_swap = ema_terms(cfg, n_lora)
    ckpt = "on" if opt.gradient_checkpointing else "off"
    samples, why = unet_batch(cfg)
    act = Term("activations", acts, f"batch {batch}{f' ({samples} in the UNet: {why})' if why else ''} at {res}x{res}, {dt}, "
               f"gradient checkpointing {ckpt}")
    training = [*context, unet_w, te_w, vae_w, lora_w, Term("LoRA gradients", 4 * n_lora, "fp32"), state, *rows, act, *te_acts]
    if processes > 1:
        training.append(Term("DDP gradient buckets", 4 * n_lora, f"{processes} processes"))
    training += slack(acts + sum(t.bytes for t in te_acts))
    if not gpu:  # a CPU run's memory is the system RAM the EMA lives in
        training += ema

    phases = {"training": training}
    all_w = [unet_w, Term("text encoder weights", te_params * wbytes), Term("VAE weights", vae.params * 4)]
    if cache_latents:
        encode = int(area * inference_peak("vae", vae.config, 1, size, size, "fp32", "encode"))
        phases["caching latents"] = [*context, *all_w, lora_w, *rows, Term("VAE encode", encode)]
    if cfg.sampling.every:
        cfg_batch = 2 if cfg.sampling.guidance > 1 else 1
        render = int(area * max(inference_peak("unet", unet.config, cfg_batch, size, size, sim_dtype, "denoise"),
                                inference_peak("vae", vae.config, 1, size, size, sim_dtype, "decode")))
        phases["sample renders"] = [*context, *all_w, lora_w, state, *rows, Term("render (UNet or VAE decode)", render),
                                    *slack(render), *([] if gpu else ema + ema_swap)]
    ram_training = ram_while_training(cfg, arch, ema + ema_swap) if gpu else []
    return Estimate(device, phases, ram_at_load(cfg, arch, device), arch.source, ram_training=ram_training)


def unet_batch(cfg: TrainConfig) -> tuple[int, str]:
    """Samples in the training step's UNet call, and why: the batch, plus as many regularization images with
    prior preservation (prior.py), all of it twice with output preservation (the untriggered captions ride in
    the same call, loss.py)."""
    batch, why = cfg.optim.batch_size, []
    if cfg.data.reg_images.strip() and cfg.optim.prior_loss_weight > 0:
        batch, why = batch * 2, [*why, "+ as many regularization images"]
    if cfg.optim.preservation_weight > 0:
        batch, why = batch * 2, [*why, "x2 for output preservation"]
    return batch, " ".join(why)


def _activations(cfg: TrainConfig, arch: Architecture, size: int, sim_dtype: str) -> int:
    """The training step's activation peak above the weights (UNet, trained text encoders, an uncached VAE encode)."""
    opt, lora, batch = cfg.optim, cfg.lora, cfg.optim.batch_size
    unet_samples, _ = unet_batch(cfg)
    unet, vae = arch.components["unet"], arch.components["vae"]
    area = (cfg.data.resolution / size) ** 2
    lora_spec = {"rank": lora.rank, "targets": cfg.unet_targets(), "dora": lora.use_dora}
    acts = int(unet_samples * area * unet_training_peak(unet.config, lora_spec, 1, size, size, sim_dtype, opt.gradient_checkpointing))
    if lora.train_text_encoder:
        te_spec = {"rank": lora.rank, "targets": TEXT_ENCODER_TARGETS, "dora": lora.use_dora}
        acts += batch * sum(text_encoder_training_bytes(t.name, t.config, {**te_spec, "layers": _te_layers(arch, t.name)},
                                                        1, sim_dtype, opt.gradient_checkpointing) for t in arch.text_encoders)
    if not cfg.data.cache_latents:  # each step encodes its images first: that peak comes and goes before the UNet's
        acts = max(acts, int(batch * area * inference_peak("vae", vae.config, 1, size, size, "fp32", "encode")))
    return acts


def pivotal_terms(cfg: TrainConfig, arch: Architecture, sim_dtype: str) -> tuple[list[Term], list[Term]]:
    """Pivotal tuning's GPU memory: ([the trigger's embedding rows], [the text encoders' activations]); empty when off.

    Each text encoder gets `vectors` new rows of its width (pivotal.LearnedTokens), trained in fp32 with fp32
    gradients and the optimizer's state. The frozen encoders then run forward every step and keep what the
    rows' gradient needs (simulate.pivotal_text_encoder_bytes); with text-encoder LoRA the activations term
    already holds that graph."""
    vectors = cfg.lora.trigger_vectors
    if not vectors:
        return [], []
    rows = [("vectors", vectors * te.config["hidden_size"]) for te in arch.text_encoders]
    n = sum(k for _, k in rows)
    widths = " + ".join(str(te.config["hidden_size"]) for te in arch.text_encoders)
    nbytes = 8 * n + optimizer_state_bytes(cfg.optim.optimizer, rows)
    embedding = Term("trigger embeddings", nbytes, f"{vectors} x ({widths}) rows: fp32 weights, gradients, {cfg.optim.optimizer} state "
                     f"({nbytes / 2**10:.0f} KiB)")
    if cfg.lora.train_text_encoder:
        return [embedding], []
    batch = cfg.optim.batch_size
    kept = batch * sum(pivotal_text_encoder_bytes(te.name, te.config, vectors, 1, sim_dtype) for te in arch.text_encoders)
    return [embedding], [Term("text encoder activations", kept, f"pivotal tuning: batch {batch} of captions, kept for the "
                                                              "trigger's gradient")]


def ema_terms(cfg: TrainConfig, n_lora: int) -> tuple[list[Term], list[Term]]:
    """The EMA's system RAM (ema.LoraEma): ([its fp32 average of the LoRA weights], [the raw weights it sets
    aside while samples render and LoRA files save with the average]); empty when off."""
    if not cfg.optim.ema_decay:
        return [], []
    return ([Term("EMA average", 4 * n_lora, f"fp32 copy of the LoRA weights on the CPU (decay {cfg.optim.ema_decay:g})")],
            [Term("EMA swap copy", 4 * n_lora, "the raw LoRA weights, on the CPU while samples render with the average")])


def ram_while_training(cfg: TrainConfig, arch: Architecture, ema: list[Term]) -> list[Term]:
    """System RAM while a GPU trains: the process, the components parked on the CPU by the caches
    (Trainables.frozen_off_device), and the EMA's copies (at their peak, while samples render)."""
    wbytes = 4 if weight_dtype(cfg) == "fp32" else 2
    parked = []
    if cfg.data.cache_latents:
        parked.append(Term("VAE (off the GPU)", 4 * arch.params("vae")))
    if text_caching(cfg):
        parked.append(Term("text encoders (off the GPU)", wbytes * sum(t.params for t in arch.text_encoders)))
    return [Term("python, torch, diffusers", PROCESS_RAM["cuda"]), *parked, *ema]


def ram_at_load(cfg: TrainConfig, arch: Architecture, device: str = "cuda") -> list[Term]:
    """System RAM while the pipeline loads in its training dtype (load_dtype_for).

    diffusers maps a component's weights file and, where the file's dtype is the load dtype, uses its
    tensors in place: they are read through the page cache, not held by the process. Otherwise it reads
    the whole file and converts each tensor, both alive until the component is done. Measured on SD 1.5
    (peak RSS, CPU torch, bench/gpu.py's load table): fp32 files for bf16 training 5.52 GiB (estimated
    5.79), fp16 files for bf16 4.24 (4.19), fp16 files for fp16 0.98 (0.92); the trainer's former fp32
    load, cast afterwards: 5.31.
    """
    dt = weight_dtype(cfg)
    wbytes = 4 if dt == "fp32" else 2
    converted, mapped, files = 0, 0, [0]
    for c in arch.components.values():
        load = c.params * (4 if c.name == "vae" else wbytes)
        if c.file_dtype == ("F32" if c.name == "vae" else _SAFETENSORS_DTYPE[dt]):
            mapped += load
        else:
            converted += load
            files.append(c.file_bytes)
    return [
        Term("python, torch, diffusers", PROCESS_RAM["cuda" if device == "cuda" else "cpu"]),
        Term("weights converted while loading", converted, f"to {dt}, VAE fp32"),
        Term("a weights file being converted", max(files)),
        Term("weights mapped from their files", 0, f"{gb(mapped)} through the page cache"),
    ]
