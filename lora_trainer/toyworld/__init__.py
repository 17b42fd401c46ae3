"""The toy world: a small world of pictures that mean something, a base model that draws it, a judge.

- `world`: scenes from a caption grammar (shape x colour x background) and styles the base never saw;
- `builtin:toy`: a real diffusers SD pipeline (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
  CLIPTokenizer) trained from scratch on the world by `build.py`, committed in `base/`;
- `judge`: a tiny transformers CLIPModel trained on the world's pictures and captions, committed in
  `judge/`: it says what a picture shows, and gives real CLIP scores offline.

So a LoRA trained on one of the world's styles can be judged without a GPU or a network: does it
show the style with its trigger word, does it still draw what the prompt asks, and does the style
stay away without the trigger.
"""

from __future__ import annotations

import random
from pathlib import Path

from .judge import JUDGE_DIR, Verdict, judge
from .world import SCENES, SIZE, STYLES, Scene, render, split

BASE_SPEC = "builtin:toy"
BASE_DIR = Path(__file__).resolve().parent / "base"
TRIGGER = "ohwx"

__all__ = [
    "BASE_DIR", "BASE_SPEC", "JUDGE_DIR", "SCENES", "SIZE", "STYLES", "TRIGGER", "Scene", "Verdict",
    "base_path", "eval_prompts", "sample_prompts", "with_trigger", "judge", "judge_path", "make_style_dataset", "render", "train_scenes",
]


def base_path() -> Path:
    return BASE_DIR


def judge_path() -> Path:
    return JUDGE_DIR


def train_scenes() -> list[Scene]:
    return [s for s in SCENES if split(s) == "train"]


def eval_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    """Content prompts that no style dataset's captions use (a fixed third of the scenes)."""
    scenes = [s for s in SCENES if split(s) == "eval"]
    random.Random(seed).shuffle(scenes)
    return [s.caption for s in scenes[: n or len(scenes)]]


def sample_prompts() -> list[str]:
    """The toy base's default sample prompts ({trigger} stands for the trigger word): three scenes no
    style dataset shows, with the trigger, and one without it (where the style should not appear)."""
    prompts = eval_prompts(4)
    return [with_trigger(p, "{trigger}") for p in prompts[:3]] + [prompts[3]]


def with_trigger(prompt: str, trigger: str = TRIGGER, position: str = "first") -> str:
    """A caption or prompt with the trigger word first ("ohwx, a red ...") or last ("a red ..., ohwx")."""
    if position == "first":
        return f"{trigger}, {prompt}"
    if position == "last":
        return f"{prompt}, {trigger}"
    raise ValueError(f"trigger position must be 'first' or 'last', not {position!r}")


def make_style_dataset(
    dest: str | Path, style: str, n: int = 12, trigger: str = TRIGGER, seed: int = 0, position: str = "first",
    captions: bool = True,
) -> Path:
    """Write `n` pictures of `style` (distinct training scenes) with .txt captions that carry the
    trigger word and describe the content, as a user's style dataset would; returns the folder."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; the styles are {', '.join(STYLES)}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    scenes = train_scenes()
    rng.shuffle(scenes)
    for k in range(n):
        scene = scenes[k % len(scenes)]
        render(scene, style, seed=rng.randrange(2**31)).save(dest / f"{style}-{k:03d}.png")
        if captions:
            text = with_trigger(scene.caption, trigger, position) if trigger else scene.caption
            (dest / f"{style}-{k:03d}.txt").write_text(text + "\n")
    return dest
