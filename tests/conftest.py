"""Shared fixtures: an isolated cache for the built-in tiny models and generated image folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never touch the network or a real Hub; the tiny models are built into this cache once per run.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LORA_STUDIO_CACHE", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "lora-studio"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs in two processes (pytest-xdist, `addopts` in pyproject.toml), one per core: a process (and any
# trainer it starts) that also spread torch over both cores would spin against the other. Set before torch loads.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The modules that take minutes, slowest first (measured under two workers): xdist hands whole modules to its
# workers in collection order (--dist loadscope --no-loadscope-reorder), so these start first and the two workers
# finish together, the quick modules filling in around them.
SLOW_MODULES = ["test_toyworld.py", "test_toy_sizing.py", "test_cli.py", "test_browser.py", "test_hub_jobs.py",
                "test_memory.py", "test_app.py", "test_jobs_ui.py", "test_toy_evaluate.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES)))  # stable: order within a module kept


@pytest.fixture(scope="module")
def one_torch_thread():
    """On a loaded 2-core machine two torch threads spin against each other: one is ~10x faster here.
    A module that trains in-process takes it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def config_only_model(folder: Path, kind: str) -> Path:
    """A diffusers folder with the published configs of SD 1.5 / SDXL ('sd' / 'sdxl') and no weights: plans, never
    loads."""
    import json

    from lora_trainer.memory.published import PUBLISHED, published_config

    index = {"_class_name": "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"}
    for name in PUBLISHED[kind]:
        config = published_config(kind, name)
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config))
        # diffusers configs name their class in _class_name, transformers configs in architectures
        index[name] = ["diffusers", config["_class_name"]] if "_class_name" in config else ["transformers", config["architectures"][0]]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def make_32px_model(folder):
    """A real diffusers SD folder whose VAE has 2 blocks (x2) and UNet 3 (x4): an 8 px step, 32 px native."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    from lora_trainer.tiny import build_tiny_pipeline

    torch.manual_seed(0)
    tiny = build_tiny_pipeline("sd")
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32), norm_num_groups=8,
        attention_head_dim=4, cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    )
    StableDiffusionPipeline(
        vae=vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=unet, scheduler=tiny.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder, safe_serialization=True)
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

