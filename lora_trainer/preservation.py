"""Differential output preservation: the LoRA acts when triggered, and leaves the base alone otherwise.

On every batch, the captions are also taken without the trigger word (or with a class word in its
place), and the LoRA model's prediction for those captions is pulled towards the base model's (LoRA
disabled) at the same noisy latents and timesteps. The trigger then carries the style; a prompt
without it keeps drawing what the base drew (ai-toolkit's "differential output preservation").

Both predictions share one UNet call with the training prediction (the batch doubled), so a
data-parallel run sees one forward per step, as DDP expects.
"""

from __future__ import annotations

import re
from contextlib import contextmanager


def without_trigger(caption: str, trigger: str, class_word: str = "") -> str:
    """The caption with the trigger word removed (as a tag "ohwx, ..." or a word "... by ohwx"), or
    replaced by `class_word`."""
    if not trigger:
        return caption
    pattern = re.compile(rf"(?<![\w-]){re.escape(trigger)}(?![\w-])")
    if class_word:
        return pattern.sub(class_word, caption)
    tags = [tag.strip() for tag in caption.split(",")]
    kept = [pattern.sub("", tag).strip() for tag in tags if tag.strip() != trigger]
    return ", ".join(re.sub(r"\s{2,}", " ", tag) for tag in kept if tag)


@contextmanager
def adapters_disabled(models: list):
    """The base model: every LoRA adapter of `models` (unwrapped diffusers/transformers modules) off."""
    for model in models:
        model.disable_adapters()
    try:
        yield
    finally:
        for model in models:
            model.enable_adapters()
