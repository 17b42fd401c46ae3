"""Scoring one adapter: generate the evaluation images with the run's base model, measure them.

`Scorer` loads everything once per evaluation (the pipeline through inference.Generator, the fixed
validation set, the metric models, the training images' embeddings, the toy world's judge) and
then scores the base (lora None) and each checkpoint the same way: same prompts, same seeds.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from . import eval_metrics as em
from .errors import ModelLoadError

log = logging.getLogger("lora_trainer.evaluate")
MAX_REFERENCE_IMAGES = 256  # training images embedded as the style reference


def toyworld():
    """The toy world's module if it is there with the judge API (it lands separately), else None."""
    try:
        from . import toyworld as tw
    except ImportError:
        return None
    return tw if all(hasattr(tw, n) for n in ("judge_path", "judge", "eval_prompts")) else None


def content_prompts(settings, base: str, captions: list[str], trigger: str) -> list[str]:
    """Evaluation prompts without the trigger: the settings', the toy world's, or built-in ones not in the captions."""
    from .evaluate import DEFAULT_PROMPTS, TOY_BASE

    if settings.prompts:
        return list(settings.prompts)
    tw = toyworld() if base == TOY_BASE else None
    if tw is not None:
        return list(tw.eval_prompts(settings.prompt_count))
    seen = " | ".join(c.lower() for c in captions)
    fresh = [p for p in DEFAULT_PROMPTS if p not in seen]
    return (fresh or DEFAULT_PROMPTS)[: settings.prompt_count]


def with_trigger(prompt: str, trigger: str) -> str:
    """As the training captions put it: 'ohwx, a house by a lake'."""
    return f"{trigger}, {prompt}" if trigger else prompt


class Scorer:
    def __init__(self, run_dir: Path, cfg, settings, notes: list[str], device: str | None = None):
        from diffusers import DDPMScheduler
        from PIL import Image

        from .inference import Generator, default_device
        from .plan import plan_run
        from .validation import validation_set

        self.settings, self.notes = settings, notes
        self.base_spec = cfg.model.base
        self.gen = Generator(cfg.model.base, device or default_device())
        plan = plan_run(cfg, run_dir, 1)  # the images, buckets and resolution the run trained on
        self.kind, self.trigger, self.size = self.gen.base.kind, cfg.data.trigger.strip(), plan.resolution
        self.items = plan.items
        self.noise_scheduler = DDPMScheduler.from_config(self.gen.pipe.scheduler.config)
        self.vset = validation_set(
            self.items, self.gen.pipe.vae, self.kind, self.noise_scheduler.config.num_train_timesteps,
            images=settings.validation_images, timesteps=settings.validation_timesteps, seed=settings.seed,
            device=self.gen.device,
        )
        self.prompts = content_prompts(settings, cfg.model.base, [i.caption for i in self.items], self.trigger)
        self.clip = self.features = self.reference = None
        self.judge, self.judged_style = None, None
        references = []
        for item in self.items[:MAX_REFERENCE_IMAGES]:
            with Image.open(item.image) as im:
                references.append(im.convert("RGB"))
        try:
            self._load_models()
        except ModelLoadError as e:
            notes.append(f"scores skipped (validation loss only): {e}")
            log.warning("%s", notes[-1])
            return
        self.reference = self.features.images(references)
        if len(self.items) < settings.kid_min_images:
            notes.append(f"kid skipped: {len(self.items)} training images < {settings.kid_min_images}")
        self._load_judge(references)

    def _load_models(self) -> None:
        from .evaluate import TOY_BASE, EvalSettings

        spec = self.settings.clip_model
        if self.base_spec == TOY_BASE and spec == EvalSettings().clip_model:
            tw = toyworld()
            if tw is None:
                raise ModelLoadError("the toy world's judge CLIP is not available (lora_trainer.toyworld has no judge_path)")
            spec = str(tw.judge_path())
        self.clip = em.ImageTextModel(spec, self.gen.device)
        self.features = self.clip if self.settings.style_model == "clip" else em.ImageModel(self.settings.dino_model, self.gen.device)

    def _load_judge(self, references: list) -> None:
        from .evaluate import TOY_BASE

        tw = toyworld() if self.base_spec == TOY_BASE else None
        if tw is None:
            return
        styles = Counter(v.style for v in tw.judge(references) if v.style)
        if not styles:
            self.notes.append("judged rates skipped: the toy world's judge sees no style in the training images")
            return
        self.judge, self.judged_style = tw.judge, styles.most_common(1)[0][0]
        seeds = self.settings.seeds
        n = len(self.prompts) * seeds
        self.notes.append(
            f"judged on {n} pictures per checkpoint ({len(self.prompts)} prompts x {seeds} seed{'s' * (seeds != 1)}): a rate near "
            f"0.85 is uncertain by about {(0.85 * 0.15 / n) ** 0.5:.2f} (one standard error), so rates a picture or two "
            "apart are close to a tie; more prompts (eval.prompt_count) or seeds (eval.seeds) make the pick surer")

    # -- per adapter ------------------------------------------------------------------------------------
    def validation_loss(self, lora: Path | None) -> float:
        from . import models
        from .inference import LoraSpec
        from .validation import validation_loss

        loras = [] if lora is None else [LoraSpec(str(lora), self.settings.strength)]
        with self.gen.using(loras) as pipe:
            return validation_loss(pipe.unet, models.text_encoders(pipe), models.tokenizers(pipe), self.vset,
                                   self.noise_scheduler, self.kind)

    def images(self, lora: Path | None) -> tuple[list, list, list[str]]:
        """(with the trigger, without it, the content prompt of each): prompts x seeds, in that order."""
        from .inference import LoraSpec

        s = self.settings
        loras = [] if lora is None else [LoraSpec(str(lora), s.strength)]
        texts = [prompt for prompt in self.prompts for _ in range(s.seeds)]
        seeds = [s.seed + k for _ in self.prompts for k in range(s.seeds)]
        asked = [with_trigger(t, self.trigger) for t in texts] + (texts if self.trigger else [])
        images = self.gen.generate_many(asked, seeds * (2 if self.trigger else 1), loras, steps=s.steps,
                                        guidance=s.guidance, size=self.size)
        on = images[: len(texts)]
        return on, images[len(texts) :] or on, texts

    def scores(self, lora: Path | None, name: str) -> dict[str, Any]:
        if self.clip is None:
            return {}
        on, off, texts = self.images(lora)
        on_clip = self.clip.images(on)
        on_f = on_clip if self.features is self.clip else self.features.images(on)
        off_f = self.features.images(off)
        seeds = self.settings.seeds
        out: dict[str, Any] = {
            "adherence": em.paired_similarity(on_clip, self.clip.texts(texts)),
            "style": em.mean_similarity(on_f, self.reference),
            "leak": em.mean_similarity(off_f, self.reference),
            "diversity": em.diversity([on_f[i : i + seeds] for i in range(0, len(on), seeds)]),
        }
        if len(self.items) >= self.settings.kid_min_images and len(on) >= 2:
            out["kid"] = em.kid(on_f, self.reference)
        if self.judge is not None:
            verdicts_on, verdicts_off = self.judge(on), self.judge(off)
            out["judged_style_rate"] = sum(v.style == self.judged_style for v in verdicts_on) / len(on)
            out["judged_adherence_rate"] = sum(v.matches(t) for v, t in zip(verdicts_on, texts, strict=True)) / len(on)
            out["judged_leak_rate"] = sum(v.style == self.judged_style for v in verdicts_off) / len(off)
        return out
