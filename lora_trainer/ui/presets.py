"""The presets as the Train tab shows them: the engine's (lora_trainer/presets.py, also `--preset` on the
CLI), with a built-in base's native resolution filled in so the page shows the number, not 0."""

from __future__ import annotations

from ..presets import DEFAULT_PRESET, PRESETS, Preset
from . import system

CUSTOM = "Custom"
__all__ = ["CUSTOM", "DEFAULT_PRESET", "FIELDS", "PRESETS", "Preset", "describe", "settings"]


def settings(name: str, base: str) -> dict[str, object]:
    """Config values {dotted: value} preset `name` sets for `base`."""
    values = dict(PRESETS[name].settings(base))
    size = system.builtin_size(base)
    if size and not values.get("data.resolution"):
        values["data.resolution"], values["data.bucket_step"] = size
    else:
        values.setdefault("data.bucket_step", 0)  # the base's own
    return values


# Every config field some preset sets on some base: what choosing a preset may change on the page.
FIELDS = sorted({k for p in PRESETS for base in (system.TOY, system.TINY_SD, system.SD15) for k in settings(p, base)})


def form_values(name: str, base: str) -> dict[str, object]:
    """settings() for every field in FIELDS: one a preset leaves alone on this base goes back to its default."""
    from ..config import field_info

    values = settings(name, base)
    return {f: values[f] if f in values else field_info(f)["default"] for f in FIELDS}


def describe(name: str) -> str:
    p = PRESETS.get(name)
    if p is None:
        return "Custom: your own settings; nothing is changed for you."
    return (f"**{p.name}** ({p.images}): {p.about}. Rank {p.rank}, alpha {p.alpha:g}, learning rate {p.learning_rate:g}, "
            f"{p.steps} steps, captions *{p.caption_style}* (on the toy world: its measured settings).")
