"""Base models: resolve what the user typed, load the pipeline, attach LoRA with peft.

A base model is one of:
  builtin:tiny-sd / builtin:tiny-sdxl   built offline into a cache folder (tiny.py)
  builtin:toy                           the toy world's trained base, committed in lora_trainer/toyworld/base/
  a local diffusers folder              (has model_index.json)
  a single checkpoint file              (.safetensors / .ckpt, loaded with from_single_file)
  a Hub id                              (org/name, loaded with from_pretrained)

Its geometry (the pixels per latent cell, the bucket step, the native resolution) is read from the
model's own config.json files by `geometry`, without loading weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import REPO_ID
from .errors import ModelLoadError
from .tiny import TINY_MODELS, tiny_model_path

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
TOY_BASE = "builtin:toy"
TOY_BASE_DIR = Path(__file__).resolve().parent / "toyworld" / "base"
BUILTIN_MODELS = {**TINY_MODELS, TOY_BASE: "sd"}  # name -> family
# Families of well-known Hub bases, so a pre-flight or the app knows them before (or without) a download.
KNOWN_KINDS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd", "runwayml/stable-diffusion-v1-5": "sd",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl", **BUILTIN_MODELS,
}


@dataclass(frozen=True)
class BaseModel:
    spec: str  # what the user typed
    kind: str  # "sd" or "sdxl"
    source: str  # local path or Hub id handed to diffusers
    loader: str  # "pretrained" or "single_file"
    revision: str = ""  # of a Hub id

    @property
    def is_builtin(self) -> bool:
        return self.spec in BUILTIN_MODELS

    @property
    def pipeline_class_name(self) -> str:
        return "StableDiffusionXLPipeline" if self.kind == "sdxl" else "StableDiffusionPipeline"


def _kind_from_class_name(name: str) -> str:
    return "sdxl" if "XL" in name else "sd"


def guess_kind(spec: str) -> str:
    """'sd' or 'sdxl' without downloading anything: known ids, local models, else a guess by name.

    The one place the family of a base is decided before it is resolved (pre-flight, the app, the card).
    """
    spec = (spec or "").strip()
    if spec in KNOWN_KINDS:
        return KNOWN_KINDS[spec]
    if Path(spec).expanduser().exists():
        try:
            return resolve(spec).kind
        except Exception:  # noqa: BLE001 - an unreadable model is reported when it is resolved for real
            pass
    return "sdxl" if "xl" in spec.lower() else "sd"


def _kind_from_single_file(path: Path) -> str:
    """SDXL checkpoints have a second text encoder under conditioner.embedders.1."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
    else:
        import torch

        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        keys = list(sd.get("state_dict", sd))
    return "sdxl" if any(k.startswith("conditioner.embedders.1") for k in keys) else "sd"


def ensure_downloadable(repo_id: str, probe_file: str, what: str) -> None:
    """Fail in seconds, not minutes, when a Hub model is neither cached nor reachable.

    Without a network huggingface_hub retries each file for about half a minute. A cached file or
    HF_HUB_OFFLINE=1 skip the probe (the cache is then used); otherwise one TCP connect to the Hub.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or isinstance(try_to_load_from_cache(repo_id, probe_file), str):
        return
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError as e:
        raise ModelLoadError(
            f"{what} '{repo_id}' could not be loaded: it is not in this machine's cache and {constants.ENDPOINT} cannot "
            f"be reached ({type(e).__name__}). Connect to the network, or download it elsewhere and pass its local folder"
        ) from None


def resolve(spec: str, revision: str = "") -> BaseModel:
    """Decide what kind of model `spec` names and how to load it, without loading weights."""
    spec = spec.strip()
    if spec in TINY_MODELS:
        return BaseModel(spec, TINY_MODELS[spec], str(tiny_model_path(spec)), "pretrained")
    if spec == TOY_BASE:
        if not (TOY_BASE_DIR / "model_index.json").is_file():
            raise ModelLoadError("the toy-world base is not built: run `python -m lora_trainer.toyworld.build`")
        return BaseModel(spec, BUILTIN_MODELS[spec], str(TOY_BASE_DIR), "pretrained")
    if spec.startswith("builtin:"):
        raise ModelLoadError(f"unknown built-in model '{spec}'; the built-in ones are {', '.join(BUILTIN_MODELS)}")
    path = Path(spec).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise ModelLoadError(
                f"base model '{spec}': the folder exists but has no model_index.json, so it is not a diffusers "
                "model folder; point to the folder that holds model_index.json, or to a single .safetensors file"
            )
        kind = _kind_from_class_name(json.loads(index.read_text()).get("_class_name", ""))
        return BaseModel(spec, kind, str(path), "pretrained")
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(f"base model '{spec}' is a {path.suffix or 'suffix-less'} file; expected .safetensors or .ckpt")
        return BaseModel(spec, _kind_from_single_file(path), str(path), "single_file")
    if not REPO_ID.match(spec):
        raise ModelLoadError(
            f"base model '{spec}' not found: no such local folder or file, and it is not a Hub id (org/name); "
            f"use a Hub id, a local diffusers folder, a .safetensors file, or one of {', '.join(BUILTIN_MODELS)}"
        )
    ensure_downloadable(spec, "model_index.json", "base model")
    try:
        from huggingface_hub import hf_hub_download

        index = hf_hub_download(spec, "model_index.json", revision=revision or None)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear line
        raise ModelLoadError(
            f"base model '{spec}' could not be loaded: tried a local path (none) and the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no details'}). Check the id and your "
            "network/HF_TOKEN, or download the model and pass its local folder"
        ) from None
    kind = _kind_from_class_name(json.loads(Path(index).read_text()).get("_class_name", ""))
    return BaseModel(spec, kind, spec, "pretrained", revision)


@dataclass(frozen=True)
class Geometry:
    """How a base model's pixels map to its latents, read from its configs."""

    vae_scale: int  # pixels per latent cell: 2 ** (VAE blocks - 1)
    unet_downsampling: int  # latent cells per cell of the UNet's deepest level: 2 ** (UNet down blocks - 1)
    default_resolution: int  # what the model was trained at: the UNet's sample_size x vae_scale

    @property
    def bucket_step(self) -> int:
        """Image sides must be multiples of this, or the UNet's skip connections do not line up."""
        return self.vae_scale * self.unet_downsampling

    @property
    def min_resolution(self) -> int:
        """The smallest side the model can take: one cell at its deepest level."""
        return self.bucket_step


# Single-file checkpoints carry no diffusers configs: the published SD 1.x and SDXL ones.
STANDARD_GEOMETRY = {"sd": Geometry(8, 8, 512), "sdxl": Geometry(8, 4, 1024)}


def geometry(base: BaseModel) -> Geometry:
    """The base's geometry from its vae/ and unet/ config.json (no weights are read or downloaded)."""
    if base.loader == "single_file":
        return STANDARD_GEOMETRY[base.kind]
    vae, unet = _component_config(base, "vae"), _component_config(base, "unet")
    try:
        vae_scale = 2 ** (len(vae["block_out_channels"]) - 1)
        sample_size = unet["sample_size"]
        sample_size = sample_size if isinstance(sample_size, int) else min(sample_size)
        return Geometry(vae_scale, 2 ** (len(unet["down_block_types"]) - 1), sample_size * vae_scale)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"base model '{base.spec}': its vae/unet config.json lacks {e}; is it a Stable Diffusion model?") from None


def native_resolution(spec: str) -> int:
    """The base's native resolution (what intake compares images with); the family's standard one where the
    base cannot be resolved yet, e.g. a Hub id not downloaded (training reports that itself)."""
    try:
        return geometry(resolve(spec)).default_resolution
    except ModelLoadError:
        return STANDARD_GEOMETRY[guess_kind(spec)].default_resolution


def _component_config(base: BaseModel, component: str) -> dict[str, Any]:
    path = Path(base.source) / component / "config.json"
    try:
        if not path.is_file() and not Path(base.source).is_dir():  # a Hub id: the cached (or downloaded) config
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(base.source, f"{component}/config.json", revision=base.revision or None))
        return json.loads(path.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - a missing, unreachable or broken config is one clear line
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"base model '{base.spec}': cannot read {component}/config.json ({first})") from None


def load_pipeline(base: BaseModel, dtype: Any = None, *, revision: str = "", variant: str = ""):
    """The diffusers pipeline of `base` (all components), frozen weights in `dtype`."""
    import diffusers

    cls = getattr(diffusers, base.pipeline_class_name)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if base.kind == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        if base.loader == "single_file":
            pipe = cls.from_single_file(base.source, **kwargs)
        else:
            if revision:
                kwargs["revision"] = revision
            if variant:
                kwargs["variant"] = variant
            pipe = cls.from_pretrained(base.source, **kwargs)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        hint = (
            " (single-file loading fetches the model's config from the Hub; offline, convert the file to a "
            "diffusers folder once and use that)"
            if base.loader == "single_file"
            else ""
        )
        raise ModelLoadError(f"base model '{base.spec}' could not be loaded with {cls.__name__}: {first}{hint}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_tokenizer(spec: str):
    """The (first) CLIP tokenizer of a base model, for caption checks; no model weights are loaded."""
    from transformers import CLIPTokenizer

    base = resolve(spec)
    if base.loader == "single_file":
        raise ModelLoadError(f"'{spec}' is a single checkpoint file; caption checks need a diffusers folder or Hub id")
    try:
        return CLIPTokenizer.from_pretrained(base.source, subfolder="tokenizer")
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"tokenizer of '{spec}' could not be loaded: {str(e).splitlines()[0][:200]}") from None


def text_encoders(pipe) -> list:
    return [te for te in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if te is not None]


def tokenizers(pipe) -> list:
    return [tok for tok in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if tok is not None]


def lora_config(
    rank: int, alpha: float, dropout: float, targets: list[str], *, use_dora: bool, use_rslora: bool,
    layers: list[int] | None = None,
):
    """A peft LoraConfig; `layers` limits it to those indices of the model's `layers` list."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
        target_modules=targets, use_dora=use_dora, use_rslora=use_rslora,
        layers_to_transform=layers, layers_pattern="layers" if layers is not None else None,
    )


def attach_lora(model, config, name: str) -> None:
    """Add a peft LoRA adapter to `model`; a target list that matches nothing is a user error."""
    try:
        model.add_adapter(config)
    except ValueError as e:
        raise ModelLoadError(
            f"LoRA targets {sorted(config.target_modules)} match no layer of the {name}: {str(e).splitlines()[0][:200]}. "
            "Use lora.targets = attention, attention+ff, attention+ff+conv or image-side, or module names that exist in the model"
        ) from None
