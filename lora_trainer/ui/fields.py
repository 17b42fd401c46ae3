"""Form controls generated from the config's own metadata, and the way back to a TrainConfig.

One source of truth: `config.field_names()` / `config.field_info()` give each field's type,
default, help text and rules; this module turns them into gradio controls (choices -> dropdown,
bool -> checkbox, numbers with min/max, list[str] -> a textbox with one item per line) and the
submitted values back into a validated config. A field added to config.py appears here by itself.
"""

from __future__ import annotations

import math
from typing import Any

import gradio as gr

from .. import config as config_mod
from ..errors import ConfigError

SECTION_TITLES = {
    "model": "Model", "data": "Data", "lora": "LoRA", "optim": "Optimizer", "sampling": "Sample images", "output": "Output",
    "eval": "Evaluation",
}


# Where the field name alone would be ambiguous on the page (three "steps", two "seeds").
LABELS = {
    "optim.steps": "Training steps", "optim.seed": "Training seed", "optim.learning_rate": "Learning rate",
    "lora.rank": "Rank", "lora.alpha": "Alpha", "output.name": "LoRA name", "data.resolution": "Resolution (px)",
    "data.images": "Image folder", "sampling.every": "Samples every N steps", "sampling.steps": "Sample denoising steps",
    "eval.steps": "Evaluation denoising steps", "eval.seed": "Evaluation seed", "eval.seeds": "Evaluation images per prompt",
    "eval.guidance": "Evaluation guidance", "eval.prompts": "Evaluation prompts", "optim.preservation_weight": "Output preservation",
    "sampling.seed": "Sample seed", "sampling.guidance": "Sample guidance", "sampling.prompts": "Sample prompts",
    "sampling.negative_prompt": "Sample negative prompt", "output.save_every": "Checkpoint every N steps",
}


def label(dotted: str) -> str:
    return LABELS.get(dotted) or dotted.split(".", 1)[1].replace("_", " ").capitalize()


def control(dotted: str, **overrides: Any) -> gr.components.Component:
    """The control of one config field, with its help text as the info line."""
    info = config_mod.field_info(dotted)
    kind, default, help_text = info["type"], info["default"], info["help"]
    common = {"label": label(dotted), "info": help_text, "value": default, "elem_id": "cfg-" + dotted.replace(".", "-"),
              **overrides}
    if "choices" in info:
        return gr.Dropdown(choices=list(info["choices"]), **common)
    if kind == "bool":
        return gr.Checkbox(**common)
    if kind in ("int", "float"):
        bounds = {"minimum": info.get("min"), "maximum": info.get("max")}
        if kind == "int":
            return gr.Number(precision=0, step=info.get("multiple_of", 1), **bounds, **common)
        return gr.Number(step=_float_step(default), **bounds, **common)
    if kind == "list[str]":
        common["value"] = "\n".join(default)
        common["info"] = f"{help_text} One per line."
        return gr.Textbox(lines=3, **common)
    return gr.Textbox(**common)


def _float_step(default: float) -> float:
    """Arrow-key step: a tenth of the default's order of magnitude for small values, 0.5 otherwise."""
    if default >= 1:
        return 0.5
    if default > 0:
        return 10 ** math.floor(math.log10(default))
    return 0.01


def to_config(values: dict[str, Any], base: config_mod.TrainConfig | None = None) -> config_mod.TrainConfig:
    """Form values {dotted: value} -> a validated config; one ConfigError listing every bad field."""
    cfg = base or config_mod.TrainConfig()
    errors = []
    for dotted, value in values.items():
        kind = config_mod.field_info(dotted)["type"]
        if kind == "list[str]" and isinstance(value, str):
            value = [line.strip() for line in value.splitlines() if line.strip()]
        elif kind in ("int", "float") and value is None:
            errors.append(f"{dotted} is empty; enter a number")
            continue
        elif kind == "int" and isinstance(value, float) and value.is_integer():
            value = int(value)
        try:
            cfg.set(dotted, value)
        except ConfigError as e:
            errors.append(str(e))
    if errors:
        raise ConfigError("invalid settings:\n  - " + "\n  - ".join(errors))
    return config_mod.validate(cfg)


def from_config(cfg: config_mod.TrainConfig, dotted: str) -> Any:
    """A config value as its control shows it."""
    section, _, name = dotted.partition(".")
    value = getattr(getattr(cfg, section), name)
    return "\n".join(value) if isinstance(value, list) else value
