"""Everything around the training loop: events, sample images, checkpoints, uploads and the stop request.

The loop tells a `Recorder` what happened (`started`, `step`, ...) and asks it whether to stop; the
recorder writes what a run leaves behind. Events go out to listeners: the events.jsonl writer, the
progress bar, and whatever a caller adds. As in OneTrainer, a listener that fails is logged and
skipped: it never takes training down.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import checkpoints as ckpts
from . import timing
from .config import TrainConfig
from .ema import applied as ema_applied
from .events import EVENTS_FILENAME, EventWriter, make_event
from .formats import save_lora
from .fsutil import ensure_free, remove_partial_dirs, write_dir
from .hub.checkpoints import Uploader

if TYPE_CHECKING:
    from .plan import RunPlan
    from .train import Trainables

log = logging.getLogger("lora_trainer.train")

Listener = Callable[[dict[str, Any]], None]
_PROCESS = None


def memory_in_use() -> dict[str, float]:
    """Resident memory of this process and peak GPU memory, in GiB."""
    global _PROCESS
    import psutil
    import torch

    _PROCESS = _PROCESS or psutil.Process()
    mem = {"rss_gb": round(_PROCESS.memory_info().rss / 2**30, 3)}
    if torch.cuda.is_available():
        mem["gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return mem


class StopRequested(Exception):  # noqa: N818 - a request, not an error
    """Raised while the model loads or caches fill, when a stop was requested: nothing to save yet."""


class StopRequest:
    """SIGTERM or Ctrl-C mean: finish the current step, save, stop. A second Ctrl-C aborts without saving."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.info("stop requested: saving a checkpoint after this step (Ctrl-C again to abort without saving)")

    def check(self) -> None:
        if self.requested:
            raise StopRequested


class ProgressBar:
    """A tqdm bar on the terminal, driven by the events."""

    def __init__(self) -> None:
        self._bar = None

    def __call__(self, event: dict[str, Any]) -> None:
        from tqdm.auto import tqdm

        if event["type"] == "started":
            self._bar = tqdm(initial=event["step"], total=event["total_steps"], desc="training")
        elif event["type"] == "step" and self._bar is not None:
            self._bar.update(event["step"] - self._bar.n)
            self._bar.set_postfix(loss=f"{event['loss']:.4f}", refresh=False)
        elif event["type"] in ("stopped", "finished", "failed"):
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Recorder:
    """Owns the run folder's outputs and the stop request. Every process has one; only the main process
    writes events and files, but all take part in checkpoints (they wait for each other there)."""

    def __init__(self, run_dir: Path, cfg: TrainConfig, accelerator, listeners: list[Listener] | None = None):
        self.run_dir, self.cfg, self.accelerator = run_dir, cfg, accelerator
        self.main = accelerator.is_main_process
        self._progress = ProgressBar()
        self._writer = EventWriter(run_dir / EVENTS_FILENAME) if self.main else None
        self.listeners: list[Listener] = [self._writer, self._progress, *(listeners or [])] if self.main else []
        self.stop = StopRequest()
        self.stop.install()
        out = cfg.output
        self.uploader = (
            Uploader(run_dir, out.push_checkpoints_to, out.keep_checkpoints, on_pending=lambda data: self.emit("upload_pending", **data))
            if out.push_checkpoints_to and self.main else None
        )
        self.t: Trainables | None = None
        self.plan: RunPlan | None = None
        self._failed_listeners: set[int] = set()
        self._measured: dict[str, float] = {}  # seconds of the last set of samples ("render") and validation ("validate")
        if self.main:  # what a killed run left half-written is not a checkpoint, and takes space
            for folder in (run_dir, run_dir / "checkpoints"):
                for path in remove_partial_dirs(folder):
                    log.info("removed %s, left half-written by an earlier run", path.relative_to(run_dir))

    # -- events ------------------------------------------------------------------------------------
    def emit(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        event = make_event(kind, **fields)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception as e:  # noqa: BLE001 - a listener must never take training down
                if id(listener) not in self._failed_listeners:
                    self._failed_listeners.add(id(listener))
                    log.warning("event listener %r failed (%s: %s); training goes on", listener, type(e).__name__, e)
        return event

    def attach(self, t: Trainables, plan: RunPlan) -> None:
        """What samples and checkpoints are made of: the trainables and the plan."""
        self.t, self.plan = t, plan
        cfg, data, lcfg, opt = self.cfg, self.cfg.data, self.cfg.lora, self.cfg.optim
        self.info = {
            "kind": t.kind, "base": cfg.model.base, "trigger": data.trigger, "name": cfg.output.name,
            "rank": lcfg.rank, "alpha": lcfg.alpha, "use_dora": lcfg.use_dora, "use_rslora": lcfg.use_rslora,
            "resolution": plan.resolution, "learning_rate": opt.learning_rate, "text_encoder_lr": lcfg.text_encoder_lr,
            "optimizer": opt.optimizer, "mixed_precision": opt.mixed_precision, "num_images": len(plan.items),
            "prediction_type": t.noise_scheduler.config.prediction_type,
            "lora_plus_ratio": opt.lora_plus_ratio, "timestep_sampling": opt.timestep_sampling,
            "ema_decay": opt.ema_decay, "weights": "ema" if opt.ema_decay else "last step",
        }
        self.adapter_configs = {name: _adapter_config(self._unwrap(m)) for name, m in t.trained.items()}
        self.validation = None
        if self.main and cfg.sampling.every:  # a fixed set, so its loss is comparable across steps
            from .validation import validation_set

            t.frozen_to_device()
            self.validation = validation_set(
                plan.items, t.vae, t.kind, t.noise_scheduler.config.num_train_timesteps, images=cfg.eval.validation_images,
                timesteps=cfg.eval.validation_timesteps, seed=cfg.eval.seed, device=t.device,
            )
            t.frozen_off_device()

    def started(self, step: int, resumed_from: str | None, warnings: list[str]) -> None:
        t, plan, opt = self.t, self.plan, self.cfg.optim
        for warning in warnings:
            log.warning("%s", warning)
        self.emit(
            "started", step=step, total_steps=plan.total_steps, base=self.cfg.model.base, kind=t.kind,
            resumed=resumed_from is not None, resumed_from=resumed_from, device=str(t.device), processes=plan.processes,
            plan={
                **plan.summary(opt.batch_size), "cache_latents": t.cache_latents, "cache_text_embeddings": t.cache_text,
                "num_workers": 0 if t.cache_latents else self.cfg.data.num_workers,
                "gradient_checkpointing": opt.gradient_checkpointing,
            },
            warnings=warnings,
        )
        log.info(
            "training %s LoRA on %s: %d images, %d steps (%s epochs), buckets %s, %d process(es) on %s",
            t.kind, self.cfg.model.base, len(plan.items), plan.total_steps, plan.batches.epochs, plan.buckets,
            plan.processes, t.device,
        )

    def step(self, done: int, loss: float, lr: float, sec_per_step: float, terms: dict[str, float] | None = None) -> None:
        """`terms`: the extra loss terms inside `loss` (e.g. prior, preservation), each as <name>_loss."""
        total = self.plan.total_steps
        parts = self.seconds_left(done, sec_per_step)
        self.emit(
            "step", step=done, total_steps=total, loss=round(loss, 6), lr=lr, sec_per_step=round(sec_per_step, 4),
            eta_seconds=round(sum(parts.values()), 1), eta_parts={k: round(v, 3) for k, v in parts.items()},  # ms: a tiny model's renders take under 0.05 s
            memory=memory_in_use() if self.main else {},
            **{f"{name}_loss": round(value, 6) for name, value in (terms or {}).items()},
        )

    def seconds_left(self, done: int, sec_per_step: float) -> dict[str, float]:
        """What the run still needs after step `done` (timing.py): the steps at their measured pace and, once a
        set of samples has been timed, the renders and validations still to come and the evaluation after
        training at that pace (before then, steps only: a resumed run renders first at its next sample step)."""
        import torch

        from .evaluate import runs_after_training

        total = self.plan.total_steps
        render = self._measured.get("render")
        if render is None:
            return {"training": sec_per_step * (total - done)}
        rates = timing.rates_from_render(self.cfg, sec_per_step, render)
        evaluates = runs_after_training(self.cfg.eval, self.cfg.model.base, torch.cuda.is_available())
        parts = timing.seconds_left(self.cfg, done, total, rates, evaluates)
        parts["validation"] = timing.sample_renders_left(self.cfg.sampling.every, done, total) * self._measured.get("validate", 0.0)
        return parts

    # -- the stop request ----------------------------------------------------------------------------
    def check_stop(self) -> None:
        """Before training starts: raise StopRequested if a stop was requested. Only a single process stops
        here; the processes of a data-parallel run agree on a stop at the end of a step (should_stop), or one
        would wait for the others forever."""
        if self.accelerator.num_processes == 1:
            self.stop.check()

    def should_stop(self, done: int) -> bool:
        """A stop was requested (on any process) and this is not the last step (that one just finishes)."""
        stop_now = self.stop.requested and done < self.plan.total_steps
        if self.accelerator.num_processes > 1:
            if stop_now:
                self.accelerator.set_trigger()
            stop_now = self.accelerator.check_trigger()
        return stop_now

    def stopped(self, done: int) -> dict[str, Any]:
        """Save a checkpoint, say so, wait for uploads: what a stop request gets."""
        path = self.save_checkpoint(done)
        self.emit("stopped", step=done, checkpoint=str(path.relative_to(self.run_dir)))
        log.info("stopped at step %d on request; start again to resume", done)
        self.wait_for_uploads()
        return {"status": "stopped", "step": done, "checkpoint": path}

    def stopped_before_training(self, resume_from: Path | None) -> dict[str, Any]:
        """A stop while the model loaded or the caches filled: nothing new to save; a restart resumes where
        it would have."""
        step = ckpts.checkpoint_step(resume_from) if resume_from else 0
        where = str(resume_from.relative_to(self.run_dir)) if resume_from else None
        self.emit("stopped", step=step, checkpoint=where, before_training=True)
        log.info("stopped on request before training started%s", f"; {where} is kept" if where else "")
        return {"status": "stopped", "step": step, "checkpoint": resume_from}

    # -- what the schedule asks for after a step -------------------------------------------------------
    def after_step(self, done: int) -> None:
        every, save_every = self.cfg.sampling.every, self.cfg.output.save_every
        if every and done % every == 0 and done < self.plan.total_steps:
            self.validate(done)
            self.render_samples(done)
        if save_every and done % save_every == 0 and done < self.plan.total_steps:
            self.save_checkpoint(done)

    def finished(self, start_step: int, loss: float) -> dict[str, Any]:
        """final/ (both formats), a last checkpoint to resume or extend from, the last samples, the card."""
        total = self.plan.total_steps
        final = self.run_dir / "final"
        if self.main:
            write_dir(final, lambda tmp: self._save_adapter(tmp, total), self.checkpoint_bytes())
        if start_step < total:  # else this is a finished run started again: its checkpoint and samples exist
            self.save_checkpoint(total)
            self.validate(total)
            self.render_samples(total)
            self.evaluate_checkpoints()
        files = []
        if self.main:
            ckpts.write_model_card(self.run_dir, self.cfg.output.name)  # after the last samples: the card shows them
            files = sorted(str(p.relative_to(self.run_dir)) for p in final.iterdir())
        self.wait_for_uploads()
        log.info("finished: %d steps, final loss %.4f, files in %s", total, loss, final)
        self.emit("finished", step=total, final="final", files=files, loss=round(loss, 6) if math.isfinite(loss) else None)
        return {"status": "finished", "step": total, "final": final, "files": files}

    # -- files ---------------------------------------------------------------------------------------
    def _unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def _adapter_states(self) -> dict[str, dict[str, Any]]:
        from peft.utils import get_peft_model_state_dict

        return {n: get_peft_model_state_dict(self._unwrap(m)) for n, m in self.t.trained.items()}

    def _save_adapter(self, dest: Path, step: int) -> None:
        with ema_applied(self.t.ema):  # the LoRA files hold the moving average when EMA is on (the state dicts are views)
            save_lora(
                dest, pipeline_class=type(self.t.pipe), peft_state_dicts=self._adapter_states(), adapter_configs=self.adapter_configs,
                info={**self.info, "steps": step, "epoch": math.ceil(step / self.plan.batches.steps_per_epoch)},
                captions=[i.caption for i in self.plan.items],
                embeddings=self.t.pivotal.state() if self.t.pivotal is not None else None,
            )

    def checkpoint_bytes(self) -> int:
        """About what one checkpoint takes on disk: the adapter three times (two LoRA files and the resume
        copy) and optimizer state of up to three times its size (AdamW keeps two moments, Prodigy more)."""
        adapter = sum(p.numel() * p.element_size() for p in self.t.params)
        return 6 * adapter + 2**20

    def check_disk(self, what: str = "training") -> None:
        """Refuse to start, or to write a checkpoint, on a disk that cannot hold it."""
        if self.main:
            copies = 2 if what == "training" else 1  # training: a checkpoint and final/
            ensure_free(self.run_dir, copies * self.checkpoint_bytes(), f"{what} (checkpoints of this LoRA)")

    def save_checkpoint(self, step: int) -> Path:
        """Adapter files + training state into checkpoints/step-N, written aside then renamed into place."""
        t, opt = self.t, self.cfg.optim
        final = self.run_dir / "checkpoints" / f"step-{step:06d}"
        if self.main:
            self.check_disk(f"checkpoint {final.name}")
            meta = {"step": step, "total_steps": self.plan.total_steps, "seed": opt.seed, "settings": ckpts.resume_settings(self.cfg)}

            def write(tmp: Path) -> None:
                self._save_adapter(tmp, step)
                ckpts.write_training_state(tmp, self._adapter_states(), t.optimizer, t.lr_scheduler, meta, scaler=self.accelerator.scaler,
                                           ema_state=t.ema.state_dict() if t.ema else None)

            write_dir(final, write, self.checkpoint_bytes())
            self.emit("checkpoint", step=step, path=str(final.relative_to(self.run_dir)))
            log.info("saved checkpoint %s", final.relative_to(self.run_dir))
            if self.uploader:
                self.uploader.submit(final)  # prunes after the push
            elif self.cfg.output.keep_checkpoints:
                ckpts.prune(self.run_dir, self.cfg.output.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return final

    # -- measurements --------------------------------------------------------------------------------
    def validate(self, step: int) -> None:
        """The denoising loss on the fixed validation set (same images, noise and timesteps every time)."""
        from .validation import validation_loss

        if self.validation is None:
            return
        t, begun = self.t, time.perf_counter()
        t.frozen_to_device()
        unet = self._unwrap(t.trained["unet"])
        names = ("text_encoder", "text_encoder_2")
        encoders = [self._unwrap(t.trained.get(n, te)) for n, te in zip(names, t.text_encoders, strict=False)]
        with ema_applied(t.ema):
            value = validation_loss(unet, encoders, t.tokenizers, self.validation, t.noise_scheduler, t.kind)
        t.frozen_off_device()
        self._measured["validate"] = time.perf_counter() - begun
        self.emit("validation", step=step, val_loss=round(value, 6), images=len(self.validation.cases))

    def evaluate_checkpoints(self) -> None:
        """Score every checkpoint and pick one (best/) when eval.after_training says so; a finished LoRA is
        never lost to an evaluation that fails."""
        import torch

        from .evaluate import evaluate, runs_after_training

        if not self.main or not runs_after_training(self.cfg.eval, self.cfg.model.base, torch.cuda.is_available()):
            return
        try:  # a stop skips what is left of it (checked between checkpoints): the LoRA is saved, scoring can wait
            self.stop.check()
            data = evaluate(self.run_dir, self.cfg.eval, "all", device=str(self.t.device), progress=lambda done, _: done < 1 and self.stop.check())
        except StopRequested:
            log.info("evaluation skipped: a stop was requested; run `python -m lora_trainer evaluate %s` to score the checkpoints",
                     self.run_dir)
            self.emit("evaluation", file=None, best=None, reason="skipped: a stop was requested", seconds=None, notes=[])
            return
        except Exception as e:  # noqa: BLE001 - the LoRA is saved; `evaluate` can be run again later
            first = str(e).splitlines()[0][:200] if str(e) else ""
            log.warning("evaluation after training failed (%s: %s); run `python -m lora_trainer evaluate %s`",
                        type(e).__name__, first, self.run_dir)
            return
        pick = data.get("recommendation") or {}
        self.emit("evaluation", file="evaluation.json", best=pick.get("name"), reason=pick.get("reason"),
                  seconds=data.get("seconds"), notes=data.get("notes", []))

    def render_samples(self, step: int) -> None:
        """The sample prompts at fixed seeds, LoRA on, into samples/step-N/."""
        import torch

        t, smp = self.t, self.cfg.sampling
        if not self.main or smp.every == 0:
            return
        prompts, begun = self.cfg.sample_prompts(), time.perf_counter()
        for model in t.trained.values():
            model.eval()  # no LoRA dropout in the samples
        t.frozen_to_device()
        folder = self.run_dir / "samples" / f"step-{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []

        def interrupt_on_stop(pipe, i, timestep, tensors):  # noqa: ARG001 - diffusers' callback signature
            if self.stop.requested:
                pipe._interrupt = True  # diffusers skips the remaining denoising steps
            return {}

        autocast = torch.autocast(t.device.type, dtype=t.weight_dtype) if t.weight_dtype != torch.float32 else nullcontext()
        with torch.no_grad(), autocast, ema_applied(t.ema):
            for k, prompt in enumerate(prompts):
                image = t.pipe(
                    prompt, negative_prompt=smp.negative_prompt or None, num_inference_steps=smp.steps,
                    guidance_scale=smp.guidance, height=self.plan.resolution, width=self.plan.resolution,
                    generator=torch.Generator("cpu").manual_seed(smp.seed + k), callback_on_step_end=interrupt_on_stop,
                ).images[0]
                if self.stop.requested:
                    break
                path = folder / f"{k}.png"
                image.save(path)
                paths.append(str(path.relative_to(self.run_dir)))
        t.frozen_off_device()
        for model in t.trained.values():
            model.train()
        if self.stop.requested:  # half a set of samples compares with nothing: leave none
            shutil.rmtree(folder, ignore_errors=True)
            log.info("sample images of step %d skipped: a stop was requested", step)
            return
        self._measured["render"] = time.perf_counter() - begun  # the live ETA's price of the renders to come
        self.emit("sample", step=step, images=paths, prompts=prompts, seed=smp.seed)

    def wait_for_uploads(self) -> None:
        if self.uploader:
            self.uploader.close()

    def close(self) -> None:
        self._progress.close()
        if self._writer is not None:
            self._writer.close()


def _adapter_config(model) -> dict[str, Any]:
    """The peft LoraConfig as plain data: what diffusers stores next to the weights.

    Dropout is a training-time setting: saved as 0 so nobody generates with it switched on.
    """
    config = model.peft_config["default"].to_dict()
    config["lora_dropout"] = 0.0
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
