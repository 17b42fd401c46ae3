"""The training loop. `train(run_dir)` reads top to bottom as the algorithm.

Encode images to latents and captions to embeddings (once, if caching is valid), then for each
step: sample noise and a timestep, add noise (the forward diffusion process), predict it with
the UNet + LoRA, take the (Min-SNR weighted) MSE, step the optimizer. The setup is
`load_trainables`, the diffusion step is `compute_loss`, and everything around the loop (events,
samples, checkpoints, uploads, SIGTERM = save and stop) is the `Recorder` (recorder.py).

Every random choice of a step (noise, timesteps, caption dropout, LoRA dropout) is drawn from
generators seeded by (seed, step), and the batch order by (seed, epoch): so a run resumed at
step k continues exactly as the uninterrupted run would have, with no RNG state to restore.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import checkpoints as ckpts
from . import config as config_mod
from . import dataset as ds
from . import ema as ema_mod
from . import models
from . import prior as prior_mod
from .batch import encode_text, prepare_batch
from .checkpoints import latest_checkpoint
from .errors import ModelLoadError, TrainingFailed
from .fsutil import disk_full_from
from .loss import (  # noqa: F401
    PREDICTION_TYPES,
    DiffusionStep,
    Loss,
    LossTerm,
    compute_loss,
    min_snr_weights,
    prediction_target,
    sample_noise,
)
from .memory import load_dtype_for, load_variant_for, plan_run_memory
from .optimizers import lora_plus_groups, make_optimizer
from .plan import plan_run
from .preservation import without_trigger
from .recorder import Listener, Recorder, StopRequested

if TYPE_CHECKING:
    from .pivotal import Pivotal

log = logging.getLogger("lora_trainer.train")



def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1009 + micro * 31 + rank) % (2**63 - 1)


def _dropout_seed(step_seed: int) -> int:
    """A second, unrelated seed for the global RNG (LoRA dropout), so its draws never repeat the noise's."""
    return (step_seed * 6364136223846793005 + 1442695040888963407) % (2**63 - 1)


# -- the run -----------------------------------------------------------------------------------------
def train(
    run_dir: str | Path, cfg: config_mod.TrainConfig | None = None, listeners: Sequence[Listener] = ()
) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns {"status": "finished" | "stopped", "step", ...}.

    Raises LoraStudioError subclasses for what the user can fix (TrainingFailed carries a `hint`).
    `listeners` are called with every event (besides events.jsonl); one that raises is skipped.
    The caller's signal handlers are restored afterwards (SIGTERM / Ctrl-C mean "save and stop" only
    while training).
    """
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals}
    try:
        return _train(Path(run_dir), cfg, listeners)
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in previous.items():
                signal.signal(s, handler)


def _train(run_dir: Path, cfg: config_mod.TrainConfig | None, listeners: Sequence[Listener]) -> dict[str, Any]:
    import torch
    from accelerate.utils import set_seed

    accelerator, cfg, memory_notes = _accelerator(run_dir, cfg)
    opt, data, rank = cfg.optim, cfg.data, accelerator.process_index
    recorder = Recorder(run_dir, cfg, accelerator, list(listeners))  # from here on, SIGTERM means "stop"
    checkpoint = None
    try:  # before anything loads: a changed rank etc. can't resume; damaged checkpoints are passed over (notes)
        checkpoint, notes = ckpts.resumable_checkpoint(run_dir, cfg)
        set_seed(opt.seed)
        plan = plan_run(cfg, run_dir, accelerator.num_processes)
        t = load_trainables(cfg, plan.base, accelerator, plan.total_steps)
        t.ema = ema_mod.for_run(opt.ema_decay, t.trained, accelerator)  # None when off
        recorder.check_stop()
        # Prior preservation: the regularization images that join each micro-batch (None without data.reg_images).
        reg = prior_mod.RegStream(plan.reg_items, opt.seed, data.flip, opt.batch_size) if plan.reg_items else None
        fill_caches(t, plan.items, cfg, show_progress=accelerator.is_main_process, check_stop=recorder.check_stop,
                    reg=reg, reg_needed=_reg_needed(reg, plan, cfg, rank) if reg and t.cache_latents else ())
        if checkpoint:  # adapter, optimizer and schedule; a checkpoint that cannot load falls back to an older one
            start_step, resumed = ckpts.resume(run_dir, checkpoint, t.trained, t.optimizer, t.lr_scheduler, accelerator, t.ema)
            if resumed != checkpoint:
                notes.append(f"checkpoint {checkpoint.name} cannot be loaded (train.log says why); resumed from {resumed.name}")
            checkpoint = resumed
            if t.pivotal is not None:
                load_pivotal_state(t.pivotal, checkpoint)
        else:
            start_step = 0
        recorder.attach(t, plan)
        recorder.info["memory_plan"] = memory_notes  # lora_info.json says what the plan changed and why
        recorder.check_disk()
        recorder.started(start_step, str(checkpoint.relative_to(run_dir)) if checkpoint else None, notes + plan.warnings)
        if start_step == 0:
            recorder.validate(0)
            recorder.render_samples(0)  # the base model's images, to compare progress against
        recorder.check_stop()

        batches = ds.batch_source(
            ds.micro_batches(plan.items, opt.batch_size, opt.seed, data.flip, plan.batches, start_step=start_step,
                             rank=rank, processes=plan.processes),
            plan.items, t.latent_cache, data.num_workers,
        )
        for model in t.trained.values():
            model.train()
        sec_per_step, loss_value = None, float("nan")

        for step in range(start_step, plan.total_steps):
            started = time.perf_counter()
            step_loss = torch.zeros((), device=t.device)
            step_terms: dict[str, Any] = {}
            for micro in range(opt.gradient_accumulation):
                pixels, latents, where = next(batches)  # first: a DataLoader draws its own seed when it starts
                if reg is not None:  # prior preservation: an equal-size batch of regularization images joins it
                    g = prior_mod.global_batch(step, micro, opt.gradient_accumulation, rank, plan.processes)
                    pixels, latents, where = reg.join(pixels, latents, where, g, plan.items, t.reg_cache)
                seed = _step_seed(opt.seed, step, micro, rank)
                torch.manual_seed(_dropout_seed(seed))  # LoRA dropout draws from the global RNG
                with accelerator.accumulate(*t.trained.values()):
                    # Encode the batch: latents (unless cached) and its (dropped out, shuffled) captions.
                    batch = prepare_batch(pixels, latents, where, t, plan.items, data, random.Random(seed))
                    # The diffusion step: noise, timesteps, the forward process, the prediction and its loss.
                    loss = compute_loss(batch, t, torch.Generator(t.device).manual_seed(seed), opt)
                    # Backpropagate, clip, step (accelerate skips the step until the last accumulated micro-batch).
                    accelerator.backward(loss.value)
                    if t.pivotal is not None and accelerator.sync_gradients:
                        t.pivotal.sync_gradients(accelerator)
                    if accelerator.sync_gradients and opt.max_grad_norm:
                        accelerator.clip_grad_norm_(t.params, opt.max_grad_norm)
                    t.optimizer.step()
                    t.lr_scheduler.step()
                    t.optimizer.zero_grad(set_to_none=True)
                step_loss += loss.value.detach().float() / opt.gradient_accumulation
                for name, term in loss.terms.items():  # each extra term (prior, preservation) for the step event
                    step_terms[name] = step_terms.get(name, 0) + term.detach().float() / opt.gradient_accumulation
            if t.ema is not None:  # the weights' moving average, once per optimizer step
                t.ema.update(step + 1)

            # One host sync per step (not per micro-batch): the loss for the events and the NaN check.
            losses = torch.stack([step_loss, *step_terms.values()])
            losses = (accelerator.reduce(losses, "mean") if plan.processes > 1 else losses).tolist()
            loss_value, terms = losses[0], dict(zip(step_terms, losses[1:], strict=True))
            if not math.isfinite(loss_value):
                raise _nan_failure(loss_value, step + 1, run_dir, opt.learning_rate)
            elapsed = time.perf_counter() - started
            sec_per_step = elapsed if sec_per_step is None else 0.9 * sec_per_step + 0.1 * elapsed
            done = step + 1
            recorder.step(done, loss_value, t.lr_scheduler.get_last_lr()[0], sec_per_step, terms)
            if recorder.should_stop(done):
                return recorder.stopped(done)
            recorder.after_step(done)  # samples and checkpoints, on their schedule

        result = recorder.finished(start_step, loss_value)
        accelerator.end_training()
        return result
    except StopRequested:
        return recorder.stopped_before_training(checkpoint)
    except Exception as e:  # a full disk anywhere (samples, caches, the LoRA files) is told as such
        if (full := disk_full_from(e, run_dir)) is None:
            raise
        raise full from e
    finally:
        recorder.close()


def _accelerator(run_dir: Path, cfg: config_mod.TrainConfig | None):
    """The accelerate Accelerator for this process, and the config every process trains."""
    import torch
    from accelerate import Accelerator

    cfg = cfg or config_mod.load(run_dir)
    if cfg.optim.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise config_mod.ConfigError("optim.mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on this machine")
    # Launched as several processes on a machine without CUDA: data-parallel on CPUs (gloo).
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    # optim.memory = auto: before the Accelerator, which takes the planned precision and accumulation.
    cfg, memory_notes = plan_run_memory(cfg, run_dir, int(os.environ.get("WORLD_SIZE", "1")))
    accelerator = Accelerator(
        mixed_precision=cfg.optim.mixed_precision, gradient_accumulation_steps=cfg.optim.gradient_accumulation,
        cpu=cpu_processes,
    )
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()  # the main process may still be writing dataset/ and config.toml
        if not accelerator.is_main_process:
            cfg = config_mod.load(run_dir)  # every process trains exactly what the main process saved
            cfg, _ = plan_run_memory(cfg, run_dir, accelerator.num_processes)
    return accelerator, cfg, memory_notes


def _nan_failure(loss: float, step: int, run_dir: Path, learning_rate: float) -> TrainingFailed:
    last = latest_checkpoint(run_dir)
    return TrainingFailed(
        f"the loss became {loss} at step {step}; training stopped"
        + (f" (the last good checkpoint is {last.relative_to(run_dir)})" if last else ""),
        hint=f"lower optim.learning_rate (now {learning_rate:g}), keep optim.max_grad_norm > 0, "
        "and use optim.mixed_precision = 'bf16' or 'no' instead of 'fp16'; then start again",
    )


# -- setup: what the loop trains with --------------------------------------------------------------------
@dataclass
class Trainables:
    """The models (frozen base, LoRA attached), optimizer, LR schedule and caches of a run."""

    kind: str  # "sd" or "sdxl"
    pipe: Any  # the diffusers pipeline: samples are rendered with it
    unet: Any  # the UNet as forward passes call it (accelerate's prepared, possibly DDP-wrapped module)
    text_encoders: list  # likewise: the prepared wrapper where its LoRA trains
    tokenizers: list
    trained: dict[str, Any]  # "unet", "text_encoder", "text_encoder_2" -> prepared module whose LoRA trains
    noise_scheduler: Any  # DDPM: the training-time forward process
    optimizer: Any
    lr_scheduler: Any
    params: list  # every trainable tensor (for gradient clipping)
    device: Any
    weight_dtype: Any  # of the frozen weights; LoRA weights stay fp32
    cache_latents: bool
    cache_text: bool
    preserve_weight: float = 0.0  # output preservation's weight (0: off)
    preserve_class: str = ""  # the word that stands in for the trigger in preservation captions
    train_guidance: float = 0.0  # guidance-sized training's k: the LoRA's triggered change counts k times (0: off)
    ema: Any = None  # the LoRA weights' moving average (ema.py); None when off or not the main process
    pivotal: Pivotal | None = None  # the trigger's learned embeddings (pivotal tuning), None when off
    latent_cache: dict = field(default_factory=dict)  # (item, flipped) -> (latent, crop top-left)
    reg_cache: dict = field(default_factory=dict)  # prior.RegSample -> (latent, crop top-left)
    text_cache: dict = field(default_factory=dict)  # caption -> (embeddings, pooled or None)

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)  # pixels per latent cell

    @property
    def train_text_encoder(self) -> bool:
        return len(self.trained) > 1

    def encode_pixels(self, pixels):
        return self.vae.encode(pixels.to(self.device)).latent_dist.mode() * self.vae.config.scaling_factor

    def frozen_to_device(self) -> None:
        """VAE and text encoders back on the device (sampling needs them)."""
        self.vae.to(self.device)
        for encoder in models.text_encoders(self.pipe):
            encoder.to(self.device)

    def frozen_off_device(self) -> None:
        """Free the device memory of what the caches made unnecessary (on a CPU there is nothing to free)."""
        if self.device.type == "cpu":
            return
        if self.cache_latents:
            self.vae.to("cpu")
        if self.cache_text:
            for encoder in models.text_encoders(self.pipe):
                encoder.to("cpu")
        if self.device.type == "cuda":
            import torch

            torch.cuda.empty_cache()


def load_trainables(cfg: config_mod.TrainConfig, base: models.BaseModel, accelerator, total_steps: int) -> Trainables:
    """The base model frozen in its training dtype with LoRA attached (in fp32), the optimizer and the LR
    schedule, prepared by accelerate."""
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    opt, device, world = cfg.optim, accelerator.device, accelerator.num_processes
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(opt.mixed_precision, torch.float32)
    # Frozen weights load straight in their training dtype (fp32 first, cast afterwards, doubles the RAM at load).
    pipe = models.load_pipeline(base, load_dtype_for(cfg, base.loader == "single_file"), revision=cfg.model.revision,
                                variant=load_variant_for(cfg))
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    check_prediction_type(noise_scheduler.config.prediction_type, cfg.model.base)
    text_encoders = models.text_encoders(pipe)
    for module in (pipe.unet, pipe.vae, *text_encoders):
        module.requires_grad_(False)
    pipe.unet.to(device, dtype=weight_dtype)
    pipe.vae.to(device, dtype=torch.float32)  # the VAE in fp16 overflows (NaN latents); it runs rarely anyway
    for encoder in text_encoders:
        encoder.to(device, dtype=weight_dtype)
    # Before accelerate wraps a text encoder whose LoRA trains: its DDP wrapper then covers the embedding too.
    pivotal = install_pivotal(cfg, base.kind, models.tokenizers(pipe), text_encoders, device)

    trained = attach_loras(cfg, base.kind, pipe.unet, text_encoders)
    if opt.mixed_precision != "no":
        cast_training_params(list(trained.values()), dtype=torch.float32)
    if opt.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        for name, model in trained.items():
            if name != "unet":
                model.gradient_checkpointing_enable()

    groups = param_groups(cfg, trained, pivotal)
    optimizer = make_optimizer(opt.optimizer, groups, opt.learning_rate, opt.weight_decay, device)
    # accelerate steps a prepared scheduler once per process per optimizer step, so it counts x processes.
    lr_scheduler = get_scheduler(
        opt.lr_scheduler, optimizer=optimizer, num_warmup_steps=opt.warmup_steps * world, num_training_steps=total_steps * world,
    )
    prepared = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
    trained = dict(zip(trained, prepared[: len(trained)], strict=True))
    cache_latents, cache_text = caching(cfg)
    return Trainables(
        kind=base.kind, pipe=pipe, unet=trained["unet"],
        text_encoders=[trained.get(n, te) for n, te in zip(("text_encoder", "text_encoder_2"), text_encoders, strict=False)],
        tokenizers=models.tokenizers(pipe), trained=trained, noise_scheduler=noise_scheduler,
        optimizer=prepared[len(trained)], lr_scheduler=prepared[len(trained) + 1],
        params=[p for group in groups for p in group["params"]], device=device, weight_dtype=weight_dtype,
        cache_latents=cache_latents, cache_text=cache_text, pivotal=pivotal,
        preserve_weight=cfg.optim.preservation_weight, preserve_class=cfg.optim.preservation_class,
        train_guidance=cfg.optim.guidance_sizing,
    )


def check_prediction_type(prediction_type: str, base: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ModelLoadError(
            f"base model '{base}' predicts {prediction_type!r} (its scheduler's prediction_type); this trainer trains "
            f"{' or '.join(PREDICTION_TYPES)} models only. Use an SD 1.x / SDXL base that predicts noise or velocity"
        )


def attach_loras(cfg: config_mod.TrainConfig, kind: str, unet, text_encoders: list) -> dict[str, Any]:
    """Add the LoRA adapters; returns {model name: model} of everything that trains."""
    lcfg = cfg.lora
    models.attach_lora(unet, models.lora_config(
        lcfg.rank, lcfg.alpha, lcfg.dropout, cfg.unet_targets(), use_dora=lcfg.use_dora, use_rslora=lcfg.use_rslora
    ), "UNet")
    trained = {"unet": unet}
    if lcfg.train_text_encoder:
        for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders, strict=False):
            # SDXL reads text encoder 1's penultimate layer: a LoRA on its last layer would never learn.
            last_unused = kind == "sdxl" and name == "text_encoder"
            layers = list(range(encoder.config.num_hidden_layers - 1)) if last_unused else None
            te_lora = models.lora_config(
                lcfg.rank, lcfg.alpha, lcfg.dropout, config_mod.TEXT_ENCODER_TARGETS,
                use_dora=lcfg.use_dora, use_rslora=lcfg.use_rslora, layers=layers,
            )
            models.attach_lora(encoder, te_lora, name.replace("_", " "))
            trained[name] = encoder
    return trained


def param_groups(cfg: config_mod.TrainConfig, trained: dict[str, Any], pivotal: Pivotal | None = None) -> list[dict[str, Any]]:
    """The optimizer's parameter groups, with their learning rates: the one place they are decided."""
    groups = []
    for name, model in trained.items():
        lr = cfg.optim.learning_rate if name == "unet" else (cfg.lora.text_encoder_lr or cfg.optim.learning_rate)
        own = {id(p) for p in pivotal.params} if pivotal else set()
        named = [(n, p) for n, p in model.named_parameters() if id(p) not in own]
        groups += lora_plus_groups(named, lr, cfg.optim.lora_plus_ratio)  # LoRA+: B at lr x ratio
    if pivotal is not None:  # no weight decay: it would pull the trigger's embedding towards zero, off the vocabulary
        groups.append({"params": pivotal.params, "lr": cfg.lora.embedding_lr or cfg.optim.learning_rate, "weight_decay": 0.0})
    return groups


def install_pivotal(cfg: config_mod.TrainConfig, kind: str, tokenizers: list, text_encoders: list, device) -> Pivotal | None:
    """Pivotal tuning's learned trigger embedding in every text encoder (None when lora.trigger_vectors = 0)."""
    from .pivotal import install

    return install(cfg, kind, tokenizers, text_encoders, device)


def load_pivotal_state(pivotal: Pivotal, checkpoint: Path) -> None:
    """The trigger's embedding as `checkpoint` saved it (resume)."""
    from safetensors.torch import load_file

    from .pivotal import embeddings_file

    path = embeddings_file(checkpoint)
    if path is None:
        raise TrainingFailed(f"checkpoint {checkpoint.name} has no trigger embedding (*_emb.safetensors) to resume pivotal tuning from",
                             hint="set lora.trigger_vectors back to what the run was trained with, or train into a new run folder")
    pivotal.load_state(load_file(str(path)))


def caching(cfg: config_mod.TrainConfig) -> tuple[bool, bool]:
    """(cache latents, cache text embeddings): each only where it cannot change what the model sees."""
    data = cfg.data
    cache_text = data.cache_text_embeddings
    if cache_text and (cfg.lora.train_text_encoder or cfg.lora.trigger_vectors or data.shuffle_captions or data.caption_dropout > 0):
        cache_text = False
        log.info("text-embedding caching off: captions change every step (text-encoder training, pivotal tuning, "
                 "shuffle or dropout)")
    return data.cache_latents, cache_text


def _reg_needed(reg: prior_mod.RegStream, plan, cfg: config_mod.TrainConfig, rank: int) -> set:
    """The regularization samples (image, flip, bucket) this process trains over the whole run."""
    opt = cfg.optim
    batches = ds.micro_batches(plan.items, opt.batch_size, opt.seed, cfg.data.flip, plan.batches, start_step=0,
                               rank=rank, processes=plan.processes)
    return reg.needed(batches, plan.items, plan.total_steps * opt.gradient_accumulation, rank, plan.processes)


def fill_caches(t: Trainables, items: list[ds.Item], cfg: config_mod.TrainConfig, *, show_progress: bool,
                check_stop: Callable[[], None] | None = None, reg: prior_mod.RegStream | None = None,
                reg_needed=()) -> None:
    """Encode every image (and its flip) and every caption once, then free the encoders' device memory.

    With prior preservation, also every regularization sample in `reg_needed` (each at the bucket it
    joins) and the regularization captions. `check_stop` runs between two images (it raises
    StopRequested when a stop was requested)."""
    import torch
    from tqdm.auto import tqdm

    with torch.no_grad():
        if t.cache_latents:
            needed = sorted({s for i in range(len(items)) for s in [(i, False), (i, True)] if cfg.data.flip or not s[1]})
            for index, flip in tqdm(needed, desc="caching latents", disable=not show_progress):
                if check_stop is not None:
                    check_stop()
                pixels, crop = ds.load_pixels_or_fail(items[index], flip)
                t.latent_cache[(index, flip)] = (t.encode_pixels(pixels[None])[0].to(t.weight_dtype), crop)
            for sample in tqdm(sorted(reg_needed), desc="caching regularization latents", disable=not show_progress):
                if check_stop is not None:
                    check_stop()
                pixels, crop = prior_mod.load_reg(reg.items, sample)
                t.reg_cache[sample] = (t.encode_pixels(pixels[None])[0].to(t.weight_dtype), crop)
        if t.cache_text:
            captions = {item.caption for item in items} | {item.caption for item in (reg.items if reg else [])}
            if t.preserve_weight:
                captions |= {without_trigger(c, cfg.data.trigger, t.preserve_class) for c in captions}
            for caption in sorted(captions):
                if check_stop is not None:
                    check_stop()
                embeds, pooled = encode_text([caption], t.tokenizers, t.text_encoders, t.kind, t.device)
                t.text_cache[caption] = (embeds[0], None if pooled is None else pooled[0])
    t.frozen_off_device()
