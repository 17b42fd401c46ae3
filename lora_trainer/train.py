"""The training loop. `train(run_dir)` reads top to bottom as the algorithm.

Encode images to latents and captions to embeddings (once, if caching is valid), then for each
step: sample noise and a timestep, add noise (the forward diffusion process), predict it with
the UNet + LoRA, take the (Min-SNR weighted) MSE, step the optimizer. Around it: events for the
UI, fixed-seed samples, checkpoints, SIGTERM = save and stop, resume from the last checkpoint.

Every random choice of a step (noise, timesteps, caption dropout, LoRA dropout) is drawn from
generators seeded by (seed, step), and the batch order by (seed, epoch): so a run resumed at
step k continues exactly as the uninterrupted run would have, with no RNG state to restore.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from . import checkpoints as ckpts
from . import config as config_mod
from . import dataset as ds
from . import models
from .checkpoints import latest_checkpoint
from .errors import LoraStudioError
from .events import EVENTS_FILENAME, EventWriter, NullWriter
from .formats import save_lora
from .fsutil import replace_dir
from .optimizers import make_optimizer

log = logging.getLogger("lora_trainer.train")


class TrainingFailed(LoraStudioError):
    """Training could not go on (e.g. the loss became NaN); `hint` says what to change."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1009 + micro * 31 + rank) % (2**63 - 1)


_PROCESS = None


def _memory() -> dict[str, float]:
    global _PROCESS
    import psutil
    import torch

    _PROCESS = _PROCESS or psutil.Process()
    mem = {"rss_gb": round(_PROCESS.memory_info().rss / 2**30, 3)}
    if torch.cuda.is_available():
        mem["gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return mem


# -- text --------------------------------------------------------------------------------------------
def encode_text(captions: list[str], tokenizers: list, text_encoders: list, kind: str, device) -> tuple[Any, Any]:
    """(prompt embeddings, pooled embeddings or None) exactly as the SD / SDXL pipelines compute them."""
    import torch

    embeds, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        if kind == "sd":
            return encoder(ids)[0], None
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0]  # the last encoder's projected pooled output
        embeds.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
    return torch.cat(embeds, dim=-1), pooled


# -- the run -----------------------------------------------------------------------------------------
def train(run_dir: str | Path, cfg: config_mod.TrainConfig | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns {"status": "finished" | "stopped", "step", ...}.

    Raises LoraStudioError subclasses for what the user can fix (TrainingFailed carries a `hint`).
    The caller's signal handlers are restored afterwards (SIGTERM / Ctrl-C mean "save and stop" only
    while training).
    """
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {s: signal.getsignal(s) for s in signals}
    try:
        return _train(Path(run_dir), cfg)
    finally:
        if threading.current_thread() is threading.main_thread():
            for s, handler in previous.items():
                signal.signal(s, handler)


def _train(run_dir: Path, cfg: config_mod.TrainConfig | None) -> dict[str, Any]:  # noqa: C901 - the algorithm, in order
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, compute_snr
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm.auto import tqdm

    cfg = cfg or config_mod.load(run_dir)
    if cfg.optim.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise config_mod.ConfigError("optim.mixed_precision = 'fp16' needs a CUDA GPU; use 'bf16' or 'no' on this machine")
    # Launched as several processes on a machine without CUDA: data-parallel on CPUs (gloo).
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        mixed_precision=cfg.optim.mixed_precision, gradient_accumulation_steps=cfg.optim.gradient_accumulation,
        cpu=cpu_processes,
    )
    main = accelerator.is_main_process
    if accelerator.num_processes > 1:
        accelerator.wait_for_everyone()  # the main process may still be writing dataset/ and config.toml
        if not main:
            cfg = config_mod.load(run_dir)  # every process trains exactly what the main process saved
    data, lcfg, opt, smp, out = cfg.data, cfg.lora, cfg.optim, cfg.sampling, cfg.output
    ckpt = ckpts.check_resumable(run_dir, cfg)  # before anything loads: a changed rank etc. can't resume
    events = EventWriter(run_dir / EVENTS_FILENAME) if main else NullWriter()
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    set_seed(opt.seed)

    # -- the dataset and the plan: which batches every step sees -----------------------------------
    images_dir = Path(data.images) if Path(data.images).is_absolute() else run_dir / data.images
    items = ds.scan(images_dir, data.trigger)
    base = models.resolve(cfg.model.base, cfg.model.revision)
    buckets = ds.assign_buckets(items, data.resolution, ds.bucket_step_for(cfg.model.base, data.bucket_step), data.buckets)
    plan = ds.make_plan(items, opt.batch_size, opt.gradient_accumulation, world, opt.steps, opt.epochs)
    total_steps = plan.total_steps

    # -- decide caching: only where it cannot change what the model sees --------------------------
    cache_latents = data.cache_latents
    cache_text = data.cache_text_embeddings
    if cache_text and (lcfg.train_text_encoder or data.shuffle_captions or data.caption_dropout > 0):
        cache_text = False
        log.info("text-embedding caching off: captions change every step (text-encoder training, shuffle or dropout)")

    # -- models: frozen base in weight_dtype, LoRA weights trainable in fp32 -----------------------
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(opt.mixed_precision, torch.float32)
    pipe = models.load_pipeline(base, revision=cfg.model.revision, variant=cfg.model.variant)
    unet, vae = pipe.unet, pipe.vae
    tokenizers, text_encoders = models.tokenizers(pipe), models.text_encoders(pipe)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent cell
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False)
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=torch.float32)  # the VAE in fp16 overflows (NaN latents); it runs rarely anyway
    for encoder in text_encoders:
        encoder.to(device, dtype=weight_dtype)

    unet_lora = models.lora_config(lcfg.rank, lcfg.alpha, lcfg.dropout, cfg.unet_targets(), use_dora=lcfg.use_dora, use_rslora=lcfg.use_rslora)
    models.attach_lora(unet, unet_lora, "UNet")
    trained = {"unet": unet}
    if lcfg.train_text_encoder:
        for name, encoder in zip(("text_encoder", "text_encoder_2"), text_encoders, strict=False):
            # SDXL reads text encoder 1's penultimate layer: a LoRA on its last layer would never learn.
            last_unused = base.kind == "sdxl" and name == "text_encoder"
            layers = list(range(encoder.config.num_hidden_layers - 1)) if last_unused else None
            te_lora = models.lora_config(
                lcfg.rank, lcfg.alpha, lcfg.dropout, config_mod.TEXT_ENCODER_TARGETS,
                use_dora=lcfg.use_dora, use_rslora=lcfg.use_rslora, layers=layers,
            )
            models.attach_lora(encoder, te_lora, name.replace("_", " "))
            trained[name] = encoder
    if opt.mixed_precision != "no":
        cast_training_params(list(trained.values()), dtype=torch.float32)
    if opt.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for name in trained:
            if name != "unet":
                trained[name].gradient_checkpointing_enable()

    # -- caches: encode once, then free the encoders' device memory --------------------------------
    latent_cache: dict[ds.Sample, tuple[Any, tuple[int, int]]] = {}
    needed = sorted({s for i in range(len(items)) for s in [(i, False), (i, True)] if data.flip or not s[1]})
    if cache_latents:
        with torch.no_grad():
            for sample in tqdm(needed, desc="caching latents", disable=not main):
                pixels, crop = ds.load_pixels(items[sample[0]], sample[1])
                latent = vae.encode(pixels[None].to(device)).latent_dist.mode() * vae.config.scaling_factor
                latent_cache[sample] = (latent[0].to(weight_dtype), crop)
    text_cache: dict[str, tuple[Any, Any]] = {}
    if cache_text:
        with torch.no_grad():
            for caption in sorted({item.caption for item in items}):
                embeds, pooled = encode_text([caption], tokenizers, text_encoders, base.kind, device)
                text_cache[caption] = (embeds[0], None if pooled is None else pooled[0])
    if cache_latents and device.type != "cpu":
        vae.to("cpu")  # only sampling needs it again
    if cache_text and device.type != "cpu":
        for encoder in text_encoders:
            encoder.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # -- optimizer and schedule ---------------------------------------------------------------------
    params = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": opt.learning_rate}]
    for name, model in trained.items():
        if name != "unet":
            params.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": lcfg.text_encoder_lr or opt.learning_rate})
    trainable = [p for group in params for p in group["params"]]
    optimizer = make_optimizer(opt.optimizer, params, opt.learning_rate, opt.weight_decay, device)
    lr_scheduler = get_scheduler(
        opt.lr_scheduler, optimizer=optimizer,
        num_warmup_steps=opt.warmup_steps * world, num_training_steps=total_steps * world,
    )
    prepared = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
    trained = dict(zip(trained, prepared[: len(trained)], strict=True))
    optimizer, lr_scheduler = prepared[len(trained)], prepared[len(trained) + 1]
    # Forward passes go through the prepared (possibly DistributedDataParallel) wrappers.
    unet_forward = trained["unet"]
    encoders_forward = [trained.get(n, te) for n, te in zip(("text_encoder", "text_encoder_2"), text_encoders, strict=False)]

    # -- resume: adapter weights + optimizer + scheduler from the newest complete checkpoint -----------
    start_step, resumed_from = 0, None
    if ckpt is not None:
        start_step, adapters = ckpts.read_training_state(ckpt, list(trained), optimizer, lr_scheduler, accelerator.scaler)
        for name, model in trained.items():
            set_peft_model_state_dict(accelerator.unwrap_model(model), adapters[name])
        resumed_from = str(ckpt.relative_to(run_dir))
        log.info("resumed from %s at step %d", resumed_from, start_step)

    info = {
        "kind": base.kind, "base": cfg.model.base, "trigger": data.trigger, "name": out.name,
        "rank": lcfg.rank, "alpha": lcfg.alpha, "use_dora": lcfg.use_dora, "use_rslora": lcfg.use_rslora,
        "resolution": data.resolution, "learning_rate": opt.learning_rate, "text_encoder_lr": lcfg.text_encoder_lr,
        "optimizer": opt.optimizer, "mixed_precision": opt.mixed_precision, "num_images": len(items),
        "prediction_type": noise_scheduler.config.prediction_type,
    }
    adapter_configs = {name: _adapter_config(accelerator.unwrap_model(m)) for name, m in trained.items()}

    def save_adapter(dest: Path, step: int) -> None:
        states = {n: get_peft_model_state_dict(accelerator.unwrap_model(m)) for n, m in trained.items()}
        save_lora(
            dest, pipeline_class=type(pipe), peft_state_dicts=states, adapter_configs=adapter_configs,
            info={**info, "steps": step, "epoch": math.ceil(step / plan.steps_per_epoch)}, captions=[i.caption for i in items],
        )

    from .hub.checkpoints import Uploader
    uploader = Uploader(run_dir, out.push_checkpoints_to, out.keep_checkpoints) if out.push_checkpoints_to else None

    def wait_for_uploads() -> None:
        if uploader:
            uploader.close()

    def save_checkpoint(step: int) -> Path:
        """Adapter files + training state into checkpoints/step-N, written aside then renamed into place."""
        final = run_dir / "checkpoints" / f"step-{step:06d}"
        tmp = final.with_name(f".tmp-{final.name}")
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            save_adapter(tmp, step)
            adapters = {n: get_peft_model_state_dict(accelerator.unwrap_model(m)) for n, m in trained.items()}
            meta = {"step": step, "total_steps": total_steps, "seed": opt.seed, "settings": ckpts.resume_settings(cfg)}
            ckpts.write_training_state(tmp, adapters, optimizer, lr_scheduler, meta, scaler=accelerator.scaler)
            replace_dir(tmp, final)
            events.emit("checkpoint", step=step, path=str(final.relative_to(run_dir)))
            log.info("saved checkpoint %s", final.relative_to(run_dir))
            if uploader:
                uploader.submit(final)  # prunes after the push
            elif out.keep_checkpoints:
                ckpts.prune(run_dir, out.keep_checkpoints)
        accelerator.wait_for_everyone()
        return final

    prompts = cfg.sample_prompts()

    def render_samples(step: int) -> None:
        if not main or smp.every == 0:
            return
        for model in trained.values():
            model.eval()  # no LoRA dropout in the samples
        vae.to(device)
        for encoder in text_encoders:
            encoder.to(device)
        folder = run_dir / "samples" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        autocast = torch.autocast(device.type, dtype=weight_dtype) if weight_dtype != torch.float32 else nullcontext()
        with torch.no_grad(), autocast:
            for k, prompt in enumerate(prompts):
                image = pipe(
                    prompt, negative_prompt=smp.negative_prompt or None, num_inference_steps=smp.steps,
                    guidance_scale=smp.guidance, height=data.resolution, width=data.resolution,
                    generator=torch.Generator("cpu").manual_seed(smp.seed + k),
                ).images[0]
                path = folder / f"{k}.png"
                image.save(path)
                paths.append(str(path.relative_to(run_dir)))
        if cache_latents and device.type != "cpu":
            vae.to("cpu")
        if cache_text and device.type != "cpu":
            for encoder in text_encoders:
                encoder.to("cpu")
        for model in trained.values():
            model.train()
        events.emit("sample", step=step, images=paths, prompts=prompts, seed=smp.seed)

    # -- SIGTERM or Ctrl-C: finish the current step, save, stop (a second Ctrl-C aborts) -------------
    stop = {"requested": False}

    def on_stop_signal(signum, frame):  # noqa: ARG001
        if stop["requested"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["requested"] = True
        log.info("stop requested: saving a checkpoint after this step (Ctrl-C again to abort without saving)")

    if threading.current_thread() is threading.main_thread():  # signals can only be caught there
        signal.signal(signal.SIGTERM, on_stop_signal)
        signal.signal(signal.SIGINT, on_stop_signal)

    events.emit(
        "started", step=start_step, total_steps=total_steps, base=cfg.model.base, kind=base.kind,
        resumed=resumed_from is not None, resumed_from=resumed_from, device=str(device), processes=world,
        plan={"images": len(items), "repeats": sum(i.repeats for i in items), "buckets": [list(b) for b in buckets],
              "batch_size": opt.batch_size, "steps_per_epoch": plan.steps_per_epoch, "epochs": plan.epochs,
              "cache_latents": cache_latents, "cache_text_embeddings": cache_text},
    )
    log.info(
        "training %s LoRA on %s: %d images, %d steps (%s epochs), buckets %s, %d process(es) on %s",
        base.kind, cfg.model.base, len(items), total_steps, plan.epochs, buckets, world, device,
    )
    if start_step == 0:
        render_samples(0)  # the base model's images, to compare progress against

    batches = ds.micro_batches(
        items, opt.batch_size, opt.seed, data.flip, plan, start_step=start_step, rank=rank, processes=world
    )
    data_iter = ds.batch_source(batches, items, latent_cache, data.num_workers)
    models_list = list(trained.values())
    for model in models_list:
        model.train()
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not main, desc="training")
    sec_per_step, loss_value = None, float("nan")

    for step in range(start_step, total_steps):
        started = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for micro in range(opt.gradient_accumulation):
            pixels, latents, batch = next(data_iter)  # first: a DataLoader draws its own seed when it starts
            torch.manual_seed(_step_seed(opt.seed, step, micro, rank))  # LoRA dropout and every draw below
            rng = random.Random(_step_seed(opt.seed, step, micro, rank))
            with accelerator.accumulate(*models_list):
                if latents is None:  # not cached: encode this batch now
                    with torch.no_grad():
                        latents = vae.encode(pixels.to(device)).latent_dist.mode() * vae.config.scaling_factor
                latents = latents.to(device, dtype=weight_dtype)
                captions = [
                    ds.process_caption(items[i].caption, rng, shuffle=data.shuffle_captions, keep_tokens=data.keep_tokens, dropout=data.caption_dropout)
                    for i, _ in batch["samples"]
                ]
                if cache_text:
                    embeds = torch.stack([text_cache[c][0] for c in captions])
                    pooled = torch.stack([text_cache[c][1] for c in captions]) if base.kind == "sdxl" else None
                else:
                    with nullcontext() if lcfg.train_text_encoder else torch.no_grad():
                        embeds, pooled = encode_text(captions, tokenizers, encoders_forward, base.kind, device)

                # Sample the noise we'll add to the latents (with an optional offset for dark/bright images).
                noise = torch.randn_like(latents)
                if opt.noise_offset:
                    noise += opt.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=device, dtype=latents.dtype)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
                # The forward diffusion process: noise the latents to each timestep.
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                target = noise if noise_scheduler.config.prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, timesteps)

                added = None
                if base.kind == "sdxl":
                    h, w = latents.shape[-2] * vae_scale, latents.shape[-1] * vae_scale
                    time_ids = torch.tensor(
                        [[items[i].size[1], items[i].size[0], *crop, h, w] for (i, _), crop in zip(batch["samples"], batch["top_left"], strict=True)],
                        device=device, dtype=embeds.dtype,
                    )
                    added = {"text_embeds": pooled, "time_ids": time_ids}
                pred = unet_forward(noisy, timesteps, embeds.to(weight_dtype), added_cond_kwargs=added, return_dict=False)[0]

                if opt.min_snr_gamma:
                    # Min-SNR weighting: don't let the easy, low-noise timesteps dominate the loss.
                    snr = compute_snr(noise_scheduler, timesteps)
                    weights = torch.clamp(snr, max=opt.min_snr_gamma) / (snr + 1 if noise_scheduler.config.prediction_type == "v_prediction" else snr)
                    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
                    loss = (loss * weights).mean()
                else:
                    loss = F.mse_loss(pred.float(), target.float(), reduction="mean")

                accelerator.backward(loss)
                if accelerator.sync_gradients and opt.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable, opt.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach().float() / opt.gradient_accumulation

        # One host sync per step (not per micro-batch): the loss for the events and the NaN check.
        loss_value = (accelerator.reduce(step_loss, "mean") if world > 1 else step_loss).item()
        if not math.isfinite(loss_value):
            progress.close()
            last = latest_checkpoint(run_dir)
            raise TrainingFailed(
                f"the loss became {loss_value} at step {step + 1}; training stopped"
                + (f" (the last good checkpoint is {last.relative_to(run_dir)})" if last else ""),
                hint=f"lower optim.learning_rate (now {opt.learning_rate:g}), keep optim.max_grad_norm > 0, "
                "and use optim.mixed_precision = 'bf16' or 'no' instead of 'fp16'; then start again",
            )
        elapsed = time.perf_counter() - started
        sec_per_step = elapsed if sec_per_step is None else 0.9 * sec_per_step + 0.1 * elapsed
        done = step + 1
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        events.emit(
            "step", step=done, total_steps=total_steps, loss=round(loss_value, 6), lr=lr_scheduler.get_last_lr()[0],
            sec_per_step=round(sec_per_step, 4), eta_seconds=round(sec_per_step * (total_steps - done), 1), memory=_memory() if main else {},
        )

        stop_now = stop["requested"] and done < total_steps  # on the last step, just finish
        if world > 1:
            if stop_now:
                accelerator.set_trigger()
            stop_now = accelerator.check_trigger()
        if stop_now:
            path = save_checkpoint(done)
            events.emit("stopped", step=done, checkpoint=str(path.relative_to(run_dir)))
            log.info("stopped at step %d on request; start again to resume", done)
            wait_for_uploads()
            progress.close()
            events.close()
            return {"status": "stopped", "step": done, "checkpoint": path}
        if smp.every and done % smp.every == 0 and done < total_steps:
            render_samples(done)
        if out.save_every and done % out.save_every == 0 and done < total_steps:
            save_checkpoint(done)
    progress.close()

    # -- the result: final/ (both formats), a last checkpoint to resume or extend from, last samples ---
    final = run_dir / "final"
    if main:
        tmp = run_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(tmp, total_steps)
        replace_dir(tmp, final)
    if start_step < total_steps:  # else this is a finished run started again: its checkpoint and samples exist
        save_checkpoint(total_steps)
        render_samples(total_steps)
    if main:
        ckpts.write_model_card(run_dir, out.name)  # after the last samples: the card shows them
    files = sorted(str(p.relative_to(run_dir)) for p in final.iterdir()) if main else []
    wait_for_uploads()
    log.info("finished: %d steps, final loss %.4f, files in %s", total_steps, loss_value, final)
    events.emit("finished", step=total_steps, final="final", files=files, loss=round(loss_value, 6) if math.isfinite(loss_value) else None)
    events.close()
    accelerator.end_training()
    return {"status": "finished", "step": total_steps, "final": final, "files": files}


def _adapter_config(model) -> dict[str, Any]:
    """The peft LoraConfig as plain data: what diffusers stores next to the weights.

    Dropout is a training-time setting: saved as 0 so nobody generates with it switched on.
    """
    config = model.peft_config["default"].to_dict()
    config["lora_dropout"] = 0.0
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
