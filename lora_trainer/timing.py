"""How long a run takes: its training steps, its sample renders and the evaluation after training.

One rule for the pre-flight estimate (preflight.py, before anything trains) and the live ETA
(recorder.py, from the steps and renders measured so far), so the two agree:

- training: seconds per optimizer step x the steps left;
- sample renders: the renders still to come (the base's at step 0, every `sampling.every` steps, one at the end)
  x the prompts x (denoising steps x seconds per denoising step + one VAE decode);
- evaluation (eval.after_training): the base and every checkpoint kept, each rendering its prompts
  x seeds with the trigger and (when there is one) without, at eval.steps, priced the same way.

The rates come from `calibrate` (a few real steps and renders of the planned run on this machine,
when the base is on disk) or from the fixed table in preflight.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .config import TrainConfig


@dataclass(frozen=True)
class Rates:
    step: float  # seconds per optimizer step (all its micro-batches)
    denoise: float  # seconds per denoising step of one sample image (both halves of guidance)
    decode: float  # seconds to decode (and save) one image
    basis: str  # what the figures are, for the printed estimate
    load: float = 0.0  # seconds to load the base before training starts


def sample_renders_left(every: int, done: int, total: int) -> int:
    """Sample renders still to come after optimizer step `done`: one at each multiple of `every` before the
    last step (Recorder.after_step) and one at the end (Recorder.finished)."""
    if not every:
        return 0
    return max(0, (total - 1) // every - done // every) + 1


def evaluation_rows(cfg: TrainConfig, total: int) -> int:
    """Adapters the evaluation scores: the base, each checkpoint kept (one every output.save_every steps
    before the last, at most output.keep_checkpoints of them) and the last step's."""
    saved = (total - 1) // cfg.output.save_every if cfg.output.save_every else 0
    if cfg.output.keep_checkpoints:
        saved = min(saved, max(0, cfg.output.keep_checkpoints - 1))
    return 1 + saved + 1


def evaluation_images(cfg: TrainConfig, total: int) -> int:
    prompts = len(cfg.eval.prompts) or cfg.eval.prompt_count
    per_row = prompts * cfg.eval.seeds * (2 if cfg.data.trigger.strip() else 1)  # with and without the trigger
    return evaluation_rows(cfg, total) * per_row


def render_set_seconds(cfg: TrainConfig, rates: Rates) -> float:
    """One set of sample images (every sample prompt once)."""
    return len(cfg.sample_prompts()) * (cfg.sampling.steps * rates.denoise + rates.decode)


def evaluation_seconds(cfg: TrainConfig, total: int, rates: Rates) -> float:
    return evaluation_images(cfg, total) * (cfg.eval.steps * rates.denoise + rates.decode)


def seconds_left(cfg: TrainConfig, done: int, total: int, rates: Rates, evaluates: bool) -> dict[str, float]:
    """{"training", "samples", "evaluation"}: seconds each still needs after optimizer step `done`."""
    return {
        "training": max(0, total - done) * rates.step,
        "samples": sample_renders_left(cfg.sampling.every, done, total) * render_set_seconds(cfg, rates),
        "evaluation": evaluation_seconds(cfg, total, rates) if evaluates else 0.0,
    }


def run_seconds(cfg: TrainConfig, total: int, rates: Rates, evaluates: bool) -> float:
    """A whole run from the start: loading, then the base model's set of samples at step 0 (to compare
    progress against), then everything `seconds_left` counts."""
    base_set = render_set_seconds(cfg, rates) if cfg.sampling.every else 0.0
    return rates.load + base_set + sum(seconds_left(cfg, 0, total, rates, evaluates).values())


def rates_from_render(cfg: TrainConfig, step_seconds: float, render_seconds: float) -> Rates:
    """Rates of a running job: its measured seconds per step and per set of samples (decode folded into the
    denoising steps: the live ETA has only the set's total)."""
    per_image_step = render_seconds / max(1, len(cfg.sample_prompts()) * cfg.sampling.steps)
    return Rates(step_seconds, per_image_step, 0.0, "measured")


# -- calibration ------------------------------------------------------------------------------------------
def calibrate(cfg: TrainConfig, base, resolution: int, steps: int = 2) -> Rates:
    """Seconds per step and per render of the planned run, measured here: the base loaded as the trainer
    loads it, LoRA attached, `steps` optimizer steps (after one to warm up) of the UNet at the planned batch
    and resolution, and sample images (after one to warm up) at 1 and 3 denoising steps (their difference is the steps' cost, the
    rest the decode). Data loading and caching are left out (a few percent of a step with caches on)."""
    import torch

    from . import models
    from .memory import load_dtype_for, load_variant_for
    from .train import attach_loras

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    pipe = models.load_pipeline(base, load_dtype_for(cfg, base.loader == "single_file"), variant=load_variant_for(cfg))
    pipe.to(device)
    load = time.perf_counter() - started
    pipe.unet.requires_grad_(False)
    trained = attach_loras(cfg, base.kind, pipe.unet, [])
    params = [p for p in trained["unet"].parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    step = _time_steps(pipe.unet, params, cfg, resolution // pipe.vae_scale_factor, device, steps)
    _time_render(pipe, cfg, resolution, 1)  # warms up: the first call pays for the first text encode and kernels
    one, three = (_time_render(pipe, cfg, resolution, n) for n in (1, 3))
    denoise = max(0.0, (three - one) / 2)
    where = "this GPU" if device == "cuda" else "this machine's CPU, as loaded now"
    return Rates(step, denoise, max(0.0, one - denoise), f"{steps} steps and 2 renders of this run measured on {where}", load)


def _time_steps(unet, params, cfg: TrainConfig, latent_size: int, device: str, steps: int) -> float:
    """Seconds per optimizer step at the UNet batch the trainer runs (memory.estimator.unet_batch: regularization
    images and output preservation's untriggered captions ride in the same call), plus preservation's
    base-model forward (no gradient)."""
    import torch

    from .memory.estimator import unet_batch

    opt = torch.optim.AdamW(params, lr=cfg.optim.learning_rate)
    (batch, _), c = unet_batch(cfg), unet.config.in_channels
    dtype = next(p.dtype for p in unet.parameters() if not p.requires_grad)
    latents = torch.randn(batch, c, latent_size, latent_size, device=device, dtype=dtype)
    embeds = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    added = _added_cond(unet, batch, device, dtype)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    if cfg.optim.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    seconds = []
    for _ in range(steps + 1):  # the first warms up (allocations, kernels)
        begun = time.perf_counter()
        for _ in range(cfg.optim.gradient_accumulation):
            with autocast:
                pred = unet(latents, torch.tensor([500] * batch, device=device), embeds, added_cond_kwargs=added).sample
            torch.nn.functional.mse_loss(pred.float(), latents.float()).backward()
            if cfg.optim.preservation_weight > 0:  # the base model's prediction for the untriggered half
                with torch.no_grad(), autocast:
                    half = batch // 2
                    unet(latents[:half], torch.tensor([500] * half, device=device), embeds[:half],
                         added_cond_kwargs=_added_cond(unet, half, device, dtype))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - begun)
    unet.eval()
    return sum(seconds[1:]) / steps


def _added_cond(unet, batch: int, device: str, dtype):
    import torch

    if unet.config.addition_embed_type != "text_time":
        return None
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return {"text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.zeros(batch, 6, device=device, dtype=dtype)}


def _time_render(pipe, cfg: TrainConfig, resolution: int, denoising_steps: int) -> float:
    import torch

    smp = cfg.sampling
    dtype = pipe.unet.dtype
    autocast = torch.autocast(pipe.device.type, dtype=dtype, enabled=dtype != torch.float32)  # as Recorder.render_samples
    begun = time.perf_counter()
    with torch.no_grad(), autocast:
        pipe(cfg.sample_prompts()[0], negative_prompt=smp.negative_prompt or None, num_inference_steps=denoising_steps,
             guidance_scale=smp.guidance, height=resolution, width=resolution, generator=torch.Generator("cpu").manual_seed(0))
    return time.perf_counter() - begun
