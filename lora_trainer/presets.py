"""Starting points for the typical jobs, shared by the CLI (`--preset NAME`) and the app.

Each preset sets rank, alpha, learning rate, steps, batch size and resolution (per model family), how often to
render samples and save checkpoints, and the caption style the app suggests. On the toy base the Style preset
keeps the style to its trigger with output preservation (preservation.py; leak 0.00, against 0.96 when a run
without it trains until its style shows) and keeps what triggered prompts ask with guidance-sized training (k =
4.5, trained 1500 steps at lr 4e-3: a smaller change, trained longer), LoRA on the convolutions and feed-forward
layers as well as attention (LoCon), preservation at 12 (of the order of k squared: sizing shrinks the LoRA's
change k times and grows the triggered loss's gradient k times, so preservation at 1 would weigh k^2 times less
than unsized; 16 kept no more), EMA, logit-normal timesteps and pivotal tuning (one vector). Judged on 72
pictures at five seeds, the checkpoint its evaluation recommends (12 prompts, one picture each) shows the style
on 0.90 to 1.00 of triggered prompts and keeps 0.85 to 0.92 of them (the base keeps 0.96), leak 0.00; session
12's preset (k = 4, lr 3e-3, 800 steps) kept 0.78 to 0.86, the first Style preset 0.08 (README, "The toy
world"). These methods are measured on the toy world only, so the real-model presets do not turn them on.

The Style preset's values on the toy world come from `bench/quality.py` and the sweep in `bench/sweep.py` (README,
"Quality"); on real models they follow the same rules scaled by resolution: the same number of
optimizer steps per image seen at the same batch, and the learning rate of AdamW LoRA practice at
512 / 1024 px (1e-4), since a real UNet's attention layers are ~100x wider than the toy base's and
take proportionally smaller steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    images: str  # the dataset size it suits
    about: str
    rank: int
    alpha: float
    learning_rate: float
    steps: int
    caption_style: str  # captioning.STYLES
    resolution: dict[str, int]  # family (sd | sdxl) -> pixels
    batch_size: int = 1
    # The same job on the toy world's base (32 px, a UNet of 1.5 M parameters): measured settings.
    toy: dict[str, object] = field(default_factory=dict)

    def settings(self, base: str) -> dict[str, object]:
        """Config values {dotted: value} for `base`; a built-in base trains at its own native resolution."""
        from .models import BUILTIN_MODELS, TOY_BASE, guess_kind

        values: dict[str, object] = {
            "lora.rank": self.rank, "lora.alpha": self.alpha, "optim.learning_rate": self.learning_rate,
            "optim.steps": self.steps, "optim.batch_size": self.batch_size,
        }
        if base.strip() == TOY_BASE:
            values.update(self.toy)
        if base.strip() in BUILTIN_MODELS:
            values["data.resolution"] = 0  # the base's own (models.geometry)
        else:
            values["data.resolution"] = self.resolution[guess_kind(base)]
        every = max(1, int(values["optim.steps"]) // 5)
        values = {"sampling.every": every, "output.save_every": every, **values}
        return values


PRESETS = {
    p.name: p
    for p in [
        Preset("Style", "15-200 images", "an art style or look, applied to any subject", rank=16, alpha=16,
               learning_rate=1e-4, steps=2000, caption_style="sparse", resolution={"sd": 512, "sdxl": 1024},
               toy={"optim.learning_rate": 4e-3, "optim.steps": 1500, "optim.batch_size": 4, "lora.rank": 8, "lora.alpha": 8,
                    "lora.targets": "attention+ff+conv", "optim.preservation_weight": 12.0, "optim.train_guidance": 4.5,
                    "optim.timestep_sampling": "logit_normal", "optim.ema_decay": 0.99, "lora.trigger_vectors": 1,
                    "sampling.every": 100, "output.save_every": 100, "eval.prompt_count": 12, "eval.seeds": 1}),
        Preset("Character", "30-100 images", "one person, creature or character, recognisable in new scenes", rank=32,
               alpha=16, learning_rate=1e-4, steps=1500, caption_style="full", resolution={"sd": 512, "sdxl": 1024}),
        Preset("Product", "20-50 images", "one object (a bottle, a shoe, a logo) kept faithful in detail", rank=16,
               alpha=8, learning_rate=8e-5, steps=1000, caption_style="full", resolution={"sd": 512, "sdxl": 1024}),
        Preset("Photography style", "200+ images", "a photographer's colour, light and lens, on any photo", rank=32,
               alpha=32, learning_rate=5e-5, steps=4000, caption_style="full", resolution={"sd": 768, "sdxl": 1024}),
    ]
}
DEFAULT_PRESET = "Style"


def preset_settings(name: str, base: str) -> dict[str, object]:
    """The config values preset `name` sets for `base`; an unknown name is a user error."""
    from .errors import ConfigError

    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; the presets are {', '.join(PRESETS)}")
    return PRESETS[name].settings(base)
