"""Shared fixtures: an isolated cache for the built-in tiny models and generated image folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network or a real Hub; the tiny models are built into this cache once per run.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LORA_STUDIO_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "lora-studio"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_images(folder: Path, count: int = 4, *, captions: bool = True, sizes=((64, 64), (96, 64), (64, 96), (80, 80))) -> Path:
    """`count` distinct striped images (various aspect ratios) with 'ohwx, ...' captions."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        pixels = np.zeros((h, w, 3), np.uint8)
        pixels[..., i % 3] = 60 + 40 * (i % 5)
        pixels[:: 4 + i % 4] = 255
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        if captions:
            (folder / f"img{i:03d}.txt").write_text(f"ohwx, stripes number {i}")
    return folder


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return make_images(tmp_path / "images")


def tiny_config(images: Path, **overrides):
    """A config that trains builtin:tiny-sd in a few seconds on 2 CPU cores."""
    from lora_trainer.config import TrainConfig, validate

    cfg = TrainConfig()
    settings = {
        "data.images": str(images), "data.resolution": 64, "data.bucket_step": 16, "lora.rank": 4,
        "optim.steps": 10, "optim.learning_rate": 1e-3, "sampling.every": 0, "sampling.steps": 3,
        "sampling.prompts": ["ohwx, stripes number 1"], "output.save_every": 0,
    }
    settings.update({k.replace("__", "."): v for k, v in overrides.items()})
    for key, value in settings.items():
        cfg.set(key, value)
    return validate(cfg)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide state; in-process training runs with other settings need it cleared."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
