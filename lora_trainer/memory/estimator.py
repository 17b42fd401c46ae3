"""The memory a planned run needs: GPU memory per phase and system RAM at load, each term named.

Terms and where they come from:
- frozen weights: the base's real parameter counts (arch.py) x the bytes of their training dtype
  (the VAE stays fp32: in fp16 it overflows);
- LoRA: the trainable tensors the config's targets and rank add (arch.lora_tensors), fp32 weights +
  fp32 gradients + the optimizer's state: AdamW 8 B/param (two fp32 moments), AdamW8bit 2 B/param
  (bitsandbytes' block-wise 8-bit moments, one fp32 scale per 256 values; tensors under 4096 values
  keep 32-bit state), Prodigy 16 B/param (prodigyopt 1.1: exp_avg, exp_avg_sq, s and p0; p0 is a
  scalar for a zero-initialised LoRA B, so 12 B there);
- activations: one training step simulated on the meta device (simulate.py) at batch 1 and 512 px,
  scaled by the batch and the image area (every feature map, hence every saved tensor, grows linearly
  with both; fused attention keeps attention linear too);
- the CUDA context (kernels, cuBLAS workspace: 0.3-0.6 GB with CUDA's lazy loading, which
  max_memory_allocated never shows) and the caching allocator's slack over what is allocated.
Phases: caching latents (VAE encode with everything loaded), training steps, sample renders
(everything back on the GPU: VAE decode at full size). The peak is the largest phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import TEXT_ENCODER_TARGETS, TrainConfig
from .arch import Architecture, architecture, lora_tensors
from .simulate import inference_peak, text_encoder_training_bytes, unet_training_peak

GiB = 2**30
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
ALLOCATOR_SLACK = 0.10  # of the activation peak; reserved over allocated, to be re-measured by bench/gpu.py
PROCESS_RAM = {"cpu": int(0.45 * GiB), "cuda": int(2.0 * GiB)}  # python + torch + diffusers; CUDA adds its libraries
BNB_BLOCK, BNB_MIN_8BIT = 256, 4096
SIMULATED_SIZE = 512  # px; other sizes scale by area, so a plan's alternatives need no new simulation


def _area(resolution: int) -> float:
    return (resolution / SIMULATED_SIZE) ** 2


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
                     + ", ".join(f"{t.label} {gb(t.bytes)}" for t in self.ram) + ")")
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
    """The trainer's rule: captions are encoded once only when they never change."""
    d = cfg.data
    return d.cache_text_embeddings and not (cfg.lora.train_text_encoder or d.shuffle_captions or d.caption_dropout > 0)


def weight_dtype(cfg: TrainConfig) -> str:
    return cfg.optim.mixed_precision if cfg.optim.mixed_precision in ("fp16", "bf16") else "fp32"


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


def estimate(cfg: TrainConfig, base: str | Architecture | None = None, *, device: str = "cuda", processes: int = 1) -> Estimate:
    """Peak memory of the run `cfg` describes on `device` ("cuda" or "cpu"), from `base` (default cfg.model.base)."""
    arch = base if isinstance(base, Architecture) else architecture(base or cfg.model.base, cfg.model.variant)
    gpu = device == "cuda"
    dt = weight_dtype(cfg)
    wbytes = 4 if dt == "fp32" else 2
    res, batch, opt, lora = cfg.data.resolution, cfg.optim.batch_size, cfg.optim, cfg.lora
    unet, vae, tes = arch.components["unet"], arch.components["vae"], arch.text_encoders
    te_params = sum(t.params for t in tes)
    cache_text, cache_latents = text_caching(cfg), cfg.data.cache_latents
    sim_dtype = "fp16" if dt == "bf16" else dt  # same sizes; one simulation serves both

    tensors = trainable_tensors(cfg, arch)
    flat = [t for ts in tensors.values() for t in ts]
    n_lora = sum(n for _, n in flat)
    lora_spec = {"rank": lora.rank, "targets": cfg.unet_targets(), "dora": lora.use_dora}
    size, area = SIMULATED_SIZE, _area(res)
    acts = int(batch * area * unet_training_peak(unet.config, lora_spec, 1, size, size, sim_dtype, opt.gradient_checkpointing))
    if lora.train_text_encoder:
        te_spec = {"rank": lora.rank, "targets": TEXT_ENCODER_TARGETS, "dora": lora.use_dora}
        acts += batch * sum(text_encoder_training_bytes(t.name, t.config, {**te_spec, "layers": _te_layers(arch, t.name)},
                                                        1, sim_dtype, opt.gradient_checkpointing) for t in tes)
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
    ckpt = "on" if opt.gradient_checkpointing else "off"
    act = Term("activations", acts, f"batch {batch} at {res}x{res}, {dt}, gradient checkpointing {ckpt}")
    training = [*context, unet_w, te_w, vae_w, lora_w, Term("LoRA gradients", 4 * n_lora, "fp32"), state, act]
    if processes > 1:
        training.append(Term("DDP gradient buckets", 4 * n_lora, f"{processes} processes"))
    training += slack(acts)

    phases = {"training": training}
    all_w = [unet_w, Term("text encoder weights", te_params * wbytes), Term("VAE weights", vae.params * 4)]
    if cache_latents:
        encode = int(area * inference_peak("vae", vae.config, 1, size, size, "fp32", "encode"))
        phases["caching latents"] = [*context, *all_w, lora_w, Term("VAE encode", encode)]
    if cfg.sampling.every:
        cfg_batch = 2 if cfg.sampling.guidance > 1 else 1
        render = int(area * max(inference_peak("unet", unet.config, cfg_batch, size, size, sim_dtype, "denoise"),
                                inference_peak("vae", vae.config, 1, size, size, sim_dtype, "decode")))
        phases["sample renders"] = [*context, *all_w, lora_w, state, Term("render (UNet or VAE decode)", render), *slack(render)]
    return Estimate(device, phases, ram_at_load(cfg, arch, device), arch.source)


def ram_at_load(cfg: TrainConfig, arch: Architecture, device: str = "cuda") -> list[Term]:
    """System RAM while the pipeline loads in its training dtype (load_dtype_for): everything is in RAM
    before it moves to the GPU, plus one component's weights file read and converted at a time."""
    dt = weight_dtype(cfg)
    wbytes = 4 if dt == "fp32" else 2
    loaded = sum(c.params * (4 if c.name == "vae" else wbytes) for c in arch.components.values())
    largest = max(c.file_bytes for c in arch.components.values())
    return [
        Term("python, torch, diffusers", PROCESS_RAM["cuda" if device == "cuda" else "cpu"]),
        Term(f"base weights ({dt}, VAE fp32)", loaded),
        Term("largest file being read", largest),
    ]
