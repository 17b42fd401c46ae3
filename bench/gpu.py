"""Peak memory and seconds per step of a LoRA training step, beside diffusers' own scripts, and the
estimate's error against each measurement.

Models: SD 1.5 at 512 px and SDXL at 1024 px, their full published architectures with seeded random
weights (lora_trainer/memory/published.py, no download); LoRA rank 32 on the attention projections;
batch 1. Rows: fp16 and bf16 x gradient checkpointing off / on x AdamW / AdamW8bit, each measured
twice in the same process:
  ours       the step as lora_trainer.train sets it up: latents and caption embeddings cached (VAE and
             text encoders off the GPU), frozen weights in half precision, LoRA in fp32, accelerate
             autocast, our optimizer factory;
  diffusers  the step as examples/text_to_image/train_text_to_image_lora(_sdxl).py set it up: VAE and
             text encoders on the GPU and run every step (the SD 1.5 script keeps its VAE in the weight
             dtype, the SDXL one in fp32), AdamW / bnb AdamW8bit over the LoRA parameters.
Columns: s/step, peak VRAM (CUDA context + the caching allocator's peak reserved), the ratio ours /
diffusers, the memory estimate (lora_trainer.memory) and its error against our measurement, and the
process's peak RAM. A second table measures system RAM while a pipeline saved in fp32 loads, the trainer's
former way (fp32, cast afterwards) and directly in the training dtype, as lora_trainer.train loads it now
(memory.load_dtype_for / load_variant_for).

    python bench/gpu.py                 # on a CUDA machine (about 10 minutes on one H100-class GPU)
    python bench/gpu.py --tiny          # the same code on the tiny models on the CPU: RAM and s/step only

On the CPU the measured figure is the process's resident memory increase over the step (glibc is told to
return freed memory, so RSS follows the live tensors); the estimate is compared with it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Freed memory goes back to the OS at once, so the resident size tracks live tensors (the CPU measurement).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0"}
FULL = {"sd": 512, "sdxl": 1024}
TINY = {"builtin:tiny-sd": 256, "builtin:tiny-sdxl": 256}
RANK = 32
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
GiB = 2**30


def rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass


@dataclass
class Row:
    model: str
    resolution: int
    dtype: str
    checkpointing: bool
    optimizer: str
    setup: str
    sec_per_step: float | None = None
    peak: int | None = None  # VRAM (GPU) or RSS increase over the step (CPU)
    estimate: int | None = None
    ram_peak: int | None = None
    note: str = ""


# -- models ------------------------------------------------------------------------------------------
def build(spec: str, device: str, seed: int = 0) -> dict:
    """unet, vae, text encoders (+ tokenizers) with seeded random weights: full published configs or the tiny pipeline."""
    import torch

    if spec.startswith("builtin:"):
        from lora_trainer import models

        pipe = models.load_pipeline(models.resolve(spec))
        return {"kind": models.resolve(spec).kind, "unet": pipe.unet, "vae": pipe.vae,
                "text_encoders": models.text_encoders(pipe), "tokenizers": models.tokenizers(pipe)}
    from lora_trainer.memory.arch import meta_model
    from lora_trainer.memory.published import PUBLISHED

    torch.manual_seed(seed)
    # Random initialisation right where the model lives (seconds on a GPU, not minutes on a CPU).
    parts = {name: meta_model(name, config, device) for name, config in PUBLISHED[spec].items()}
    return {"kind": spec, "unet": parts["unet"], "vae": parts["vae"],
            "text_encoders": [parts[n] for n in ("text_encoder", "text_encoder_2") if n in parts], "tokenizers": None}


def inputs(resolution: int, device: str, vocab: int):
    """Pixels and caption token ids of one batch-1 step."""
    import torch

    g = torch.Generator("cpu").manual_seed(1)
    pixels = torch.rand(1, 3, resolution, resolution, generator=g).to(device) * 2 - 1
    ids = torch.randint(0, min(1000, vocab), (1, 77), generator=g).to(device)
    return pixels, ids


def encode_text(parts: dict, ids):
    import torch

    if parts["kind"] == "sd":
        return parts["text_encoders"][0](ids)[0], None
    embeds, pooled = [], None
    for encoder in parts["text_encoders"]:
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0]
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


# -- the two setups -------------------------------------------------------------------------------------
def make_step(parts: dict, row: Row, device: str):
    """A closure running one optimizer step, set up as `row.setup` says; returns (step, cleanup, optimizer)."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    from lora_trainer import models
    from lora_trainer.optimizers import make_optimizer

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision=row.dtype if row.dtype != "fp32" else "no", cpu=device == "cpu")
    wdt = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(row.dtype, torch.float32)
    unet, vae, tes = parts["unet"], parts["vae"], parts["text_encoders"]
    for m in (unet, vae, *tes):
        m.requires_grad_(False)
    unet.to(device, dtype=wdt)
    name = f"{row.setup}_{row.dtype}_{int(row.checkpointing)}_{row.optimizer}"
    if row.setup == "ours":
        config = models.lora_config(RANK, RANK, 0.0, TARGETS, use_dora=False, use_rslora=False)
    else:  # train_text_to_image_lora.py: LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=...)
        config = LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    unet.add_adapter(config, adapter_name=name)
    unet.set_adapter(name)
    if row.dtype != "fp32":
        cast_training_params(unet, dtype=torch.float32)
    if row.checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    pixels, ids = inputs(row.resolution, device, min(te.config.vocab_size for te in tes))
    vae_dtype = torch.float32 if (row.setup == "ours" or parts["kind"] == "sdxl") else wdt
    vae.to(device, dtype=vae_dtype)
    for te in tes:
        te.to(device, dtype=wdt)
    if row.setup == "ours":  # cached once, then the encoders leave the GPU, as the trainer does
        with torch.no_grad():
            cached_latents = vae.encode(pixels.to(vae_dtype)).latent_dist.mode() * vae.config.scaling_factor
            cached_text = encode_text(parts, ids)
        if device != "cpu":
            vae.to("cpu")
            for te in tes:
                te.to("cpu")
            torch.cuda.empty_cache()
        optimizer = make_optimizer(row.optimizer, [{"params": params, "lr": 1e-4}], 1e-4, 1e-2, torch.device(device))
    elif row.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    unet_p, optimizer = accelerator.prepare(unet, optimizer)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)

    def step():
        with accelerator.accumulate(unet_p):
            if row.setup == "ours":
                latents, (embeds, pooled) = cached_latents, cached_text
            else:
                with torch.no_grad():
                    latents = vae.encode(pixels.to(vae_dtype)).latent_dist.sample() * vae.config.scaling_factor
                    embeds, pooled = encode_text(parts, ids)
            latents = latents.to(wdt)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (1,), device=device)
            noisy = latents + noise  # the scheduler's arithmetic costs nothing next to the UNet
            added = None
            if parts["kind"] == "sdxl":
                size = latents.shape[-1] * scale
                added = {"text_embeds": pooled.to(wdt), "time_ids": torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=wdt)}
            pred = unet_p(noisy, timesteps, embeds.to(wdt), added_cond_kwargs=added, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float())
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def cleanup():
        optimizer.zero_grad(set_to_none=True)
        accelerator.unwrap_model(unet_p, keep_fp32_wrapper=False)  # drop this row's autocast wrapper of forward
        unet.delete_adapters(name)
        vae.to("cpu")
        for te in tes:
            te.to("cpu")

    return step, cleanup, optimizer


def estimate_for(spec: str, row: Row, device: str) -> int:
    from lora_trainer import memory
    from lora_trainer.config import TrainConfig

    cfg = TrainConfig()
    cfg.data.resolution, cfg.lora.rank, cfg.sampling.every = row.resolution, RANK, 0
    cfg.optim.mixed_precision = row.dtype if row.dtype != "fp32" else "no"
    cfg.optim.gradient_checkpointing, cfg.optim.optimizer = row.checkpointing, row.optimizer
    arch = memory.arch.from_published(spec) if spec in FULL else memory.architecture(spec)
    est = memory.estimate(cfg, arch, device="cuda" if device == "cuda" else "cpu")
    if device == "cuda":
        return est.phase_total("training")
    # On the CPU the measurement starts after the models load: what the step adds.
    return sum(t.bytes for t in est.phases["training"] if t.label in ("LoRA gradients", "optimizer state", "activations"))


def measure(spec: str, parts: dict, row: Row, device: str, steps: int) -> Row:
    import torch

    if device == "cuda" and row.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            row.note = "bitsandbytes missing"
            return row
    if device == "cpu" and (row.optimizer == "adamw8bit" or row.dtype == "fp16"):
        row.note = "needs CUDA"
        return row
    if device == "cpu" and row.dtype == "bf16" and row.setup == "diffusers":
        row.note = "not on a CPU"  # bf16 autocast on a CPU is slow and unlike CUDA's: no comparison to make
        return row
    step, cleanup, optimizer = make_step(parts, row, device)
    step()  # warm-up: the optimizer state is created, kernels are chosen, one-time caches fill
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        context = torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0] - torch.cuda.memory_reserved()
    # The state exists from the warm-up on; the RSS measured from here on adds it back, counted tensor by tensor.
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    base = rss()
    reset_peak_rss()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    row.sec_per_step = (time.perf_counter() - started) / steps
    if device == "cuda":
        row.peak = context + torch.cuda.max_memory_reserved()
    else:
        row.peak = rss("VmHWM") - base + state
    row.ram_peak = rss("VmHWM")
    if row.setup == "ours":
        row.estimate = estimate_for(spec, row, device)
    cleanup()
    return row


# -- RAM at load -------------------------------------------------------------------------------------
def ram_at_load(folder: Path, mode: str) -> int:
    """Peak RSS of a fresh process loading the pipeline in `folder`: 'fp32-then-cast' (the trainer before issue 11) or 'direct' (the trainer now)."""
    code = f"""
import sys, torch; sys.path.insert(0, {str(ROOT)!r})
from lora_trainer import models, memory
from lora_trainer.config import TrainConfig
cfg = TrainConfig(); cfg.optim.mixed_precision = "bf16"
base = models.resolve({str(folder)!r})
if {mode!r} == "direct":
    pipe = models.load_pipeline(base, memory.load_dtype_for(cfg))
else:
    pipe = models.load_pipeline(base)
    pipe.unet.to(dtype=torch.bfloat16)
    for te in models.text_encoders(pipe): te.to(dtype=torch.bfloat16)
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"): print(int(line.split()[1]) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else -1


def load_table(specs: list[str], device: str) -> list[str]:
    from lora_trainer import memory
    from lora_trainer.config import TrainConfig

    lines = ["", "system RAM while loading a pipeline saved in fp32, training in bf16:",
             f"{'model':<18} {'fp32 then cast':>15} {'direct (load_dtype_for)':>24} {'estimate':>10} {'error':>7}"]
    for spec in specs:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "pipe"
            save_pipeline(spec, folder)
            today, direct = ram_at_load(folder, "fp32-then-cast"), ram_at_load(folder, "direct")
            cfg = TrainConfig()
            cfg.optim.mixed_precision = "bf16"
            est = memory.estimate(cfg, memory.architecture(str(folder)), device=device).ram_total
        err = f"{(est - direct) / direct:+.0%}" if direct > 0 else "—"
        lines.append(f"{spec:<18} {today / GiB:>13.2f} G {direct / GiB:>22.2f} G {est / GiB:>8.2f} G {err:>7}")
    return lines


def save_pipeline(spec: str, folder: Path) -> None:
    from lora_trainer import models

    if spec.startswith("builtin:"):
        models.load_pipeline(models.resolve(spec)).save_pretrained(folder, safe_serialization=True)
        return
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from lora_trainer.tiny import _tokenizer

    parts = build(spec, "cpu")
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    tes = parts["text_encoders"]
    if spec == "sd":
        pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=tes[0], tokenizer=_tokenizer(), unet=parts["unet"],
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=tes[0], text_encoder_2=tes[1], tokenizer=_tokenizer(),
                                         tokenizer_2=_tokenizer(), unet=parts["unet"], scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)


# -- the table -----------------------------------------------------------------------------------------
def rows_for(spec: str, resolution: int, device: str) -> list[Row]:
    dtypes = ("fp16", "bf16") if device == "cuda" else ("fp32", "bf16")
    optimizers = ("adamw", "adamw8bit")
    return [Row(spec, resolution, dt, ck, opt, setup) for dt in dtypes for ck in (False, True) for opt in optimizers
            for setup in ("ours", "diffusers")]


def format_table(rows: list[Row], device: str) -> list[str]:
    what = "peak VRAM" if device == "cuda" else "RSS +step"
    lines = [f"{'model':<18} {'res':>5} {'dtype':>5} {'ckpt':>4} {'optimizer':>9} | {'s/step':>7} {what:>10} | "
             f"{'diffusers s/step':>16} {'VRAM' if device == 'cuda' else 'RSS':>8} | {'ratio s':>7} {'ratio mem':>9} | "
             f"{'estimate':>9} {'error':>6} | {'peak RAM':>8}"]
    mib = (lambda b: f"{b / GiB:.2f} G") if device == "cuda" else (lambda b: f"{b / 2**20:.1f} M")
    for ours, ref in zip(rows[::2], rows[1::2], strict=True):
        head = f"{ours.model:<18} {ours.resolution:>5} {ours.dtype:>5} {'on' if ours.checkpointing else 'off':>4} {ours.optimizer:>9} | "
        if ours.sec_per_step is None:
            lines.append(head + ours.note)
            continue
        ratio_s = f"{ours.sec_per_step / ref.sec_per_step:.2f}" if ref.sec_per_step else "—"
        ratio_m = f"{ours.peak / ref.peak:.2f}" if ref.peak else "—"
        err = f"{(ours.estimate - ours.peak) / ours.peak:+.0%}" if ours.estimate and ours.peak > 0 else "—"
        lines.append(
            head + f"{ours.sec_per_step:>7.3f} {mib(ours.peak):>10} | "
            f"{(f'{ref.sec_per_step:.3f}' if ref.sec_per_step else ref.note or '—'):>16} {(mib(ref.peak) if ref.peak else '—'):>8} | "
            f"{ratio_s:>7} {ratio_m:>9} | {mib(ours.estimate):>9} {err:>6} | {ours.ram_peak / GiB:>6.2f} G"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny models on the CPU (no GPU needed)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per row (default 5 on a GPU, 1 tiny)")
    parser.add_argument("--models", default="", help="comma-separated subset: sd,sdxl (or the builtin:tiny-* names)")
    parser.add_argument("--no-load-ram", action="store_true", help="skip the RAM-at-load table")
    args = parser.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):  # glibc reads these at start: run again with them
        return subprocess.call([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env={**os.environ, **MALLOC_ENV})

    import torch

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.tiny:
        print("no CUDA GPU here: running the --tiny table instead")
    specs = TINY if device == "cpu" else FULL
    chosen = [s for s in specs if not args.models or s in args.models.split(",")]
    steps = args.steps or (5 if device == "cuda" else 1)
    print(f"device: {torch.cuda.get_device_name(0) if device == 'cuda' else 'cpu'} ({torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, LoRA rank {RANK} on {', '.join(TARGETS)}, batch 1, {steps} timed steps per row")
    rows = []
    for spec in chosen:
        parts = build(spec, device)
        for row in rows_for(spec, specs[spec], device):
            rows.append(measure(spec, parts, row, device, steps))
        del parts
        if device == "cuda":
            torch.cuda.empty_cache()
    print("\n".join(format_table(rows, device)))
    if not args.no_load_ram:
        print("\n".join(load_table(chosen, device)))
    print(json.dumps({"rows": [r.__dict__ for r in rows]}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
