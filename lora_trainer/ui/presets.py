"""Starting points for the typical jobs: each sets rank, alpha, learning rate, steps, caption style
and resolution (per model family), plus how often to render samples and save checkpoints.

Values follow common practice for AdamW LoRA training on SD 1.5 / SDXL; everything stays editable.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import system


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

    def settings(self, base: str) -> dict[str, object]:
        """Config values {dotted: value} for `base` (a built-in base always trains at its own size)."""
        if system.is_builtin(base):
            resolution, bucket_step = system.builtin_size(base)
        else:
            resolution, bucket_step = self.resolution[system.base_family(base)], 64
        checkpoints = max(1, self.steps // 5)
        return {
            "lora.rank": self.rank, "lora.alpha": self.alpha, "optim.learning_rate": self.learning_rate,
            "optim.steps": self.steps, "data.resolution": resolution, "data.bucket_step": bucket_step,
            "sampling.every": checkpoints, "output.save_every": checkpoints,
        }


PRESETS = {
    p.name: p
    for p in [
        Preset("Style", "50-200 images", "an art style or look, applied to any subject", rank=16, alpha=16, learning_rate=1e-4,
               steps=2000, caption_style="sparse", resolution={"sd": 512, "sdxl": 1024}),
        Preset("Character", "30-100 images", "one person, creature or character, recognisable in new scenes", rank=32,
               alpha=16, learning_rate=1e-4, steps=1500, caption_style="full", resolution={"sd": 512, "sdxl": 1024}),
        Preset("Product", "20-50 images", "one object (a bottle, a shoe, a logo) kept faithful in detail", rank=16,
               alpha=8, learning_rate=8e-5, steps=1000, caption_style="full", resolution={"sd": 512, "sdxl": 1024}),
        Preset("Photography style", "200+ images", "a photographer's colour, light and lens, on any photo", rank=32,
               alpha=32, learning_rate=5e-5, steps=4000, caption_style="full", resolution={"sd": 768, "sdxl": 1024}),
    ]
}
DEFAULT_PRESET = "Style"
FIELDS = list(PRESETS[DEFAULT_PRESET].settings("builtin:tiny-sd"))  # the config fields a preset sets
CUSTOM = "Custom"


def describe(name: str) -> str:
    p = PRESETS.get(name)
    if p is None:
        return "Custom: your own settings; nothing is changed for you."
    return (f"**{p.name}** ({p.images}): {p.about}. Rank {p.rank}, alpha {p.alpha:g}, learning rate {p.learning_rate:g}, "
            f"{p.steps} steps, captions *{p.caption_style}*.")
