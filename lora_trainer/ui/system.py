"""What machine the app runs on: GPU or not, a Hugging Face Space or not, which Hub endpoint.

Nothing here imports torch: the page must come up in seconds, and a GPU is visible without it.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from ..models import BUILTIN_MODELS, TOY_BASE, TOY_BASE_DIR, geometry, guess_kind, resolve
from ..preflight import gpu_present
from ..tiny import TINY_BUCKET_STEP, TINY_MODELS, TINY_RESOLUTION

TINY_SD = "builtin:tiny-sd"
TINY_SDXL = "builtin:tiny-sdxl"
TOY = TOY_BASE
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # lora_trainer/
TOY_BASE_INDEX = TOY_BASE_DIR / "model_index.json"  # the toy world's committed base model
EXAMPLE_DATASET = PACKAGE_ROOT.parent / "examples" / "toy-style"  # images + .txt captions in the toy world's style



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


def jobs_enabled() -> bool:
    """Whether the app is set to offer Hugging Face Jobs (LORA_STUDIO_JOBS=1). On a Space, its README's
    hf_oauth_scopes must then list `jobs`, so that signing in lets the app start jobs on the visitor's account."""
    return os.environ.get("LORA_STUDIO_JOBS", "").strip().lower() in ("1", "true", "yes", "on")


JOBS_SCOPE = "jobs"  # the sign-in scope that lets the app start jobs on the visitor's account
JOBS_SCOPE_MISSING = ("**Hugging Face Jobs is turned on (LORA_STUDIO_JOBS=1), but this Space's sign-in cannot ask for "
                      "the `jobs` scope:** add `- jobs` under `hf_oauth_scopes` in the Space's README.md.")


def space_scopes() -> list[str] | None:
    """The scopes the Space lets sign-in ask for: OAUTH_SCOPES, which Spaces sets to openid, profile and the README's
    hf_oauth_scopes (the Hub refuses any other); None where sign-in is not set up."""
    scopes = os.environ.get("OAUTH_SCOPES")
    return scopes.split() if scopes is not None else None


def jobs_scope_missing() -> bool:
    """Jobs is turned on, on a Space whose README does not let sign-in ask for `jobs`: visitors could not start jobs."""
    return jobs_enabled() and oauth_available() and JOBS_SCOPE not in (space_scopes() or [])


def jobs_offered() -> bool:
    """Whether the Train tab offers Hugging Face Jobs: turned on, and (on a Space) sign-in may ask for `jobs`."""
    return jobs_enabled() and not jobs_scope_missing()


def sign_in_scopes() -> str | None:
    """What sign-in asks for: the Space's scopes, `jobs` among them only where the Train tab offers Jobs
    (a visitor is not asked to let the app run jobs it never starts); None where sign-in is not set up."""
    scopes = space_scopes()
    if scopes is None:
        return None
    return " ".join(s for s in scopes if s != JOBS_SCOPE or jobs_offered())


def hub_endpoint() -> str | None:
    """HF_ENDPOINT, read at call time (tests point it at a fake Hub after import)."""
    return os.environ.get("HF_ENDPOINT") or None


def toy_available() -> bool:
    return TOY_BASE_INDEX.is_file()


def base_choices() -> list[tuple[str, str]]:
    """The base model picker's list: real models first, then the built-in ones this install has."""
    choices = [("Stable Diffusion 1.5", SD15), ("SDXL base 1.0", SDXL)]
    if toy_available():
        choices.append(("Toy world (built in: learns small drawn scenes on a CPU)", TOY))
    return choices + [("Tiny SD (built in, random weights: plumbing only)", TINY_SD),
                      ("Tiny SDXL (built in, random weights: plumbing only)", TINY_SDXL)]


def default_base() -> str:
    """The base the page starts with: SD 1.5 on a GPU; without one the toy world's base (it can learn on a CPU),
    else the tiny random model."""
    if has_gpu():
        return SD15
    return TOY if toy_available() else TINY_SD


def is_builtin(base: str) -> bool:
    return (base or "").strip() in BUILTIN_MODELS


def builtin_size(base: str) -> tuple[int, int] | None:
    """(resolution, bucket step) a built-in base trains at, its native geometry (models.geometry reads the toy
    base's configs; the tiny ones are known without building them); None for any other base."""
    base = (base or "").strip()
    if base in TINY_MODELS:
        return TINY_RESOLUTION, TINY_BUCKET_STEP
    if base == TOY and TOY_BASE_INDEX.is_file():
        native = geometry(resolve(base))
        return native.default_resolution, native.bucket_step
    return None


def example_dataset() -> Path | None:
    """The bundled example images, if this install has them."""
    return EXAMPLE_DATASET if EXAMPLE_DATASET.is_dir() else None


@cache
def blip_loadable(model: str) -> bool:
    """Whether the BLIP captioner `model` can load here: cached, or the Hub is reachable (asked once per process)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if Path(model).expanduser().is_dir() or isinstance(try_to_load_from_cache(model, "config.json"), str):
        return True
    if constants.HF_HUB_OFFLINE:
        return False
    from ..errors import LoraStudioError
    from ..models import ensure_downloadable

    try:
        ensure_downloadable(model, "config.json", "The captioning model")
    except LoraStudioError:
        return False
    return True


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
            f"settings to train SD 1.5 or SDXL LoRAs; here you can try every step with {_builtin_phrase()}."
        )
    return (
        f"**No GPU found on this machine.** {_builtin_phrase()[0].upper()}{_builtin_phrase()[1:]} is selected so you can try every step; "
        "real models (SD 1.5, SDXL) need an NVIDIA GPU."
    )


def _builtin_phrase() -> str:
    return "the built-in toy world model" if toy_available() else "the built-in tiny model"
