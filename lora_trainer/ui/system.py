"""What machine the app runs on: GPU or not, a Hugging Face Space or not, which Hub endpoint.

Nothing here imports torch: the page must come up in seconds, and a GPU is visible without it.
"""

from __future__ import annotations

import os
from functools import cache

from ..models import guess_kind
from ..preflight import gpu_present
from ..tiny import TINY_BUCKET_STEP, TINY_RESOLUTION  # noqa: F401 - the UI's names for them
from ..tiny import TINY_MODELS as TINY_BASES

TINY_SD = "builtin:tiny-sd"
TINY_SDXL = "builtin:tiny-sdxl"
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"

BASE_CHOICES = [
    ("Stable Diffusion 1.5", SD15),
    ("SDXL base 1.0", SDXL),
    ("Tiny SD (built in, for trying things on a CPU)", TINY_SD),
    ("Tiny SDXL (built in, for trying things on a CPU)", TINY_SDXL),
]


@cache
def has_gpu() -> bool:
    """An NVIDIA GPU is present (LORA_STUDIO_GPU=0/1 overrides, for tests and odd drivers)."""
    return gpu_present()


def space_id() -> str | None:
    """The Space's id (owner/name) when running on Hugging Face Spaces."""
    return os.environ.get("SPACE_ID") or None


def oauth_available() -> bool:
    """Sign-in with Hugging Face works only on a Space whose README enables `hf_oauth`."""
    return bool(space_id() and os.environ.get("OAUTH_CLIENT_ID"))


def hub_endpoint() -> str | None:
    """HF_ENDPOINT, read at call time (tests point it at a fake Hub after import)."""
    return os.environ.get("HF_ENDPOINT") or None


def default_base() -> str:
    return SD15 if has_gpu() else TINY_SD


def is_tiny(base: str) -> bool:
    return (base or "").strip() in TINY_BASES


def base_family(base: str) -> str:
    """'sd' or 'sdxl', without downloading anything: known ids, local folders, else a guess by name."""
    return guess_kind(base)


def hardware_notice() -> str:
    """The line under the title: what this machine can do."""
    if has_gpu():
        return ""
    if space_id():
        return (
            "**This Space has no GPU, so it cannot train real models.** Duplicate it and choose a GPU in its "
            "settings to train SD 1.5 or SDXL LoRAs; here you can try every step with the built-in tiny model."
        )
    return (
        "**No GPU found on this machine.** The built-in tiny model is selected so you can try every step; "
        "real models (SD 1.5, SDXL) need an NVIDIA GPU."
    )
