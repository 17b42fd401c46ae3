"""The toy world's judge: a tiny CLIP trained on the world's pictures against its whole caption grammar.

`judge(images)` names what each picture shows (shape, colour, background, style or none) by CLIP's
zero-shot rule: the caption of the grammar whose text embedding is nearest the image's. The same
model gives real CLIP scores (`clip_embeddings`) for the evaluation of any run on the toy base.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

from . import world

JUDGE_DIR = Path(__file__).resolve().parent / "judge"


@dataclass(frozen=True)
class Verdict:
    scene: world.Scene
    style: str | None  # None: plain, as the base draws
    confidence: float  # softmax probability of the chosen caption

    @property
    def shape(self) -> str:
        return self.scene.shape

    @property
    def color(self) -> str:
        return self.scene.color

    @property
    def background(self) -> str:
        return self.scene.background

    def matches(self, prompt: str) -> bool:
        """The picture shows what `prompt` asks for (shape, colour and background; style aside)."""
        return world.parse(prompt) == self.scene


@cache
def _load(folder: str):
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    if not (Path(folder) / "config.json").exists():
        from ..errors import ModelLoadError

        raise ModelLoadError(f"the toy-world judge is not built ({folder}): run `python -m lora_trainer.toyworld.build`")
    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    grammar = world.all_judge_captions()
    ids = tokenizer([c for _, _, c in grammar], padding="max_length", max_length=24, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        text = torch.nn.functional.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)
    return model, grammar, text


def pixel_values(images):
    """Pictures as the judge reads them: RGB at the world's size, scaled to [-1, 1] (what its
    CLIPImageProcessor does too)."""
    import torch
    from PIL import Image

    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (world.SIZE, world.SIZE):
            image = image.resize((world.SIZE, world.SIZE), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def image_embeddings(images, folder: Path = JUDGE_DIR):
    """Unit-length CLIP image embeddings (n, d) of `images`."""
    import torch

    model, _, _ = _load(str(folder))
    with torch.no_grad():
        feats = model.get_image_features(pixel_values=pixel_values(images)).pooler_output
    return torch.nn.functional.normalize(feats, dim=-1)


def judge(images, folder: Path = JUDGE_DIR) -> list[Verdict]:
    """What each picture shows, by the nearest caption of the world's grammar."""
    import torch

    if not images:
        return []
    model, grammar, text = _load(str(folder))
    embeds = image_embeddings(images, folder)
    probs = torch.softmax(model.logit_scale.exp() * embeds @ text.T, dim=-1)
    best = probs.argmax(-1)
    return [Verdict(grammar[k][0], grammar[k][1], round(float(probs[i, k]), 4)) for i, k in enumerate(best.tolist())]
