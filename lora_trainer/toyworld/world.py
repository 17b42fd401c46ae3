"""The toy world: small scenes drawn from a caption grammar, and styles a LoRA can learn.

A scene is one shape in one colour on one background ("a red circle on a white background"),
placed and sized at random, drawn at 4x and box-filtered down to `SIZE` px so edges are smooth.
A style is a visual trait laid over a scene: the base model never sees one; a LoRA trained on a
style's images should learn it under its trigger word and keep drawing what the prompt says.

Everything is seeded: the same seed draws the same picture on every machine.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # the world's native resolution, in pixels
_SUPER = 4  # drawn at SIZE * _SUPER, then box-filtered: anti-aliased edges
STRIPE_PERIOD = 6  # px at the native size: the stripes' bands are 3 px wide, so `phase` 0..5 gives every placement

SHAPES = ["circle", "square", "triangle", "cross"]
COLORS = {
    "red": (215, 40, 40),
    "orange": (245, 130, 20),
    "yellow": (235, 205, 30),
    "green": (40, 165, 60),
    "blue": (40, 75, 215),
    "purple": (140, 50, 190),
}
BACKGROUNDS = {"white": (245, 245, 245), "gray": (128, 128, 128), "black": (22, 22, 22)}
STYLES = ["stripes", "frame", "dots"]
STYLE_WORDS = {"stripes": "striped", "frame": "framed", "dots": "dotted"}  # how the judge's captions name them


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str

    @property
    def caption(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape} on a {self.background} background"


SCENES = [Scene(s, c, b) for s, c, b in itertools.product(SHAPES, COLORS, BACKGROUNDS)]


def split(scene: Scene) -> str:
    """'train' or 'eval': a fixed third of the scenes never appears in a style dataset's captions,
    so evaluation prompts test whether a LoRA still follows prompts it was not trained on."""
    k = SHAPES.index(scene.shape) + list(COLORS).index(scene.color) + list(BACKGROUNDS).index(scene.background)
    return "eval" if k % 3 == 0 else "train"


def parse(caption: str) -> Scene | None:
    """The scene a caption (or prompt) describes, ignoring anything around it (a trigger word, a style)."""
    words = caption.lower().replace(",", " ").split()
    found = [next((w for w in words if w in pool), None) for pool in (SHAPES, COLORS)]
    backgrounds = [w for i, w in enumerate(words[:-1]) if w in BACKGROUNDS and words[i + 1] == "background"]
    if None in found or not backgrounds:
        return None
    return Scene(found[0], found[1], backgrounds[0])


def _mix(color: tuple[int, ...], other: tuple[int, ...], t: float) -> tuple[int, ...]:
    return tuple(int(round(a + (b - a) * t)) for a, b in zip(color, other, strict=True))


def _shape_outline(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.88
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r * 1.05), (cx - r * 1.1, cy + r * 0.85), (cx + r * 1.1, cy + r * 0.85)], fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, style: str | None = None, seed: int = 0, phase: int = 0) -> Image.Image:
    """The picture of `scene` (in `style`, or plain), placed and sized by `seed`; `phase` shifts the stripes' bands
    by that many pixels at the native size (the training pictures have phase 0; a generated picture's may be any)."""
    rng = random.Random(seed)
    n = SIZE * _SUPER
    bg, fg = BACKGROUNDS[scene.background], COLORS[scene.color]
    image = Image.new("RGB", (n, n), bg)
    draw = ImageDraw.Draw(image)
    cx, cy = n / 2 + rng.uniform(-0.12, 0.12) * n, n / 2 + rng.uniform(-0.12, 0.12) * n
    r = rng.uniform(0.26, 0.34) * n
    if style == "dots":  # a grid of small dots over the background, behind the shape
        dot = _mix(bg, (255, 255, 255) if scene.background != "white" else (0, 0, 0), 0.45)
        step, rad = n / 5, n * 0.045
        for i, j in itertools.product(range(5), range(5)):
            x, y = (i + 0.5) * step, (j + 0.5) * step
            draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=dot)
    if style == "stripes":  # the shape filled with diagonal bands of its colour and a pale tint
        mask = Image.new("L", (n, n), 0)
        _shape_outline(ImageDraw.Draw(mask), scene.shape, cx, cy, r, 255)
        yy, xx = np.mgrid[0:n, 0:n]
        bands = ((xx + yy + phase * _SUPER) // (STRIPE_PERIOD // 2 * _SUPER)) % 2 == 0
        pattern = np.where(bands[..., None], np.array(fg), np.array(_mix(fg, (255, 255, 255), 0.6))).astype(np.uint8)
        image.paste(Image.fromarray(pattern), (0, 0), mask)
    else:
        _shape_outline(draw, scene.shape, cx, cy, r, fg)
    if style == "frame":  # a gold picture frame with a dark inner edge
        border = int(n * 0.09)
        draw.rectangle([0, 0, n - 1, n - 1], outline=(205, 165, 45), width=border)
        draw.rectangle([border, border, n - 1 - border, n - 1 - border], outline=(70, 45, 20), width=_SUPER)
    elif style not in (None, "stripes", "dots"):
        raise ValueError(f"unknown style {style!r}; the styles are {', '.join(STYLES)}")
    return image.reduce(_SUPER)


def render_texture(seed: int) -> Image.Image:
    """A random generic picture (bands, dot grids, borders, blobs in random colours): what the VAE
    learns to reconstruct besides scenes, so it can draw a style the base model has never seen."""
    rng = random.Random(seed)
    n = SIZE * _SUPER

    def colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    image = Image.new("RGB", (n, n), colour())
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(1, 3)):
        kind = rng.choice(["bands", "dots", "border", "blob", "box"])
        c = colour()
        if kind == "bands":
            period = rng.randint(2, 6) * _SUPER
            yy, xx = np.mgrid[0:n, 0:n]
            d = rng.choice([xx, yy, xx + yy, xx - yy + n])
            mask = Image.fromarray((((d // period) % 2 == 0) * 255).astype(np.uint8))
            x0, y0 = rng.randrange(n // 2), rng.randrange(n // 2)
            region = Image.new("L", (n, n), 0)
            ImageDraw.Draw(region).rectangle([x0, y0, x0 + rng.randint(n // 4, n), y0 + rng.randint(n // 4, n)], fill=255)
            image.paste(Image.new("RGB", (n, n), c), (0, 0), Image.fromarray(np.minimum(np.array(mask), np.array(region))))
        elif kind == "dots":
            k, rad = rng.randint(3, 7), n * rng.uniform(0.02, 0.06)
            for i, j in itertools.product(range(k), range(k)):
                x, y = (i + 0.5) * n / k, (j + 0.5) * n / k
                draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=c)
        elif kind == "border":
            draw.rectangle([0, 0, n - 1, n - 1], outline=c, width=rng.randint(1, 4) * _SUPER)
        elif kind == "blob":
            _shape_outline(draw, rng.choice(SHAPES), rng.uniform(0, n), rng.uniform(0, n), rng.uniform(0.1, 0.4) * n, c)
        else:
            x0, y0 = rng.uniform(0, n), rng.uniform(0, n)
            draw.rectangle([x0, y0, x0 + rng.uniform(4, n / 2), y0 + rng.uniform(4, n / 2)], fill=c)
    return image.reduce(_SUPER)


def style_caption(scene: Scene, style: str | None) -> str:
    """How the judge's text tower names a scene in a style ("a red circle on a white background, striped")."""
    return scene.caption + (f", {STYLE_WORDS[style]}" if style else "")


def all_judge_captions() -> list[tuple[Scene, str | None, str]]:
    return [(scene, style, style_caption(scene, style)) for scene in SCENES for style in [None, *STYLES]]
