"""What a base model is made of, without loading a weight: parameter counts and layer shapes.

Read from the safetensors headers where the weights are on disk (safetensors' `safe_open`, no
torch needed), else built from the components' config.json on the meta device, else (a Hub id
not downloaded yet) from the published SD 1.5 / SDXL configs of its kind.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .published import PUBLISHED, PUBLISHED_IDS, published_config

COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
# A single .safetensors checkpoint in the original (ldm) layout: which key prefix is which component.
_SINGLE_FILE_PREFIXES = {
    "model.diffusion_model.": "unet", "first_stage_model.": "vae", "cond_stage_model.": "text_encoder",
    "conditioner.embedders.0.": "text_encoder", "conditioner.embedders.1.": "text_encoder_2",
}


@dataclass(frozen=True)
class Component:
    name: str  # unet, text_encoder, text_encoder_2, vae
    params: int
    file_bytes: int  # the weights' size on disk (params x 4 where unknown)
    config: dict[str, Any]  # config.json: what the meta-device simulation builds
    file_dtype: str = "F32"  # safetensors' name of the weights' dtype on disk (the most common one)
    shapes: dict[str, tuple[int, ...]] = field(repr=False, default_factory=dict)  # module name -> weight shape


@dataclass(frozen=True)
class Architecture:
    kind: str  # "sd" or "sdxl"
    components: dict[str, Component]
    source: str  # where the counts came from, for the printed estimate

    def params(self, name: str) -> int:
        return self.components[name].params if name in self.components else 0

    @property
    def native_resolution(self) -> int:
        """The side the base was trained at: the UNet's sample size times the VAE's downsampling."""
        vae, unet = self.components["vae"].config, self.components["unet"].config
        sample = unet.get("sample_size", 64)
        sample = sample if isinstance(sample, int) else min(sample)
        return sample * 2 ** (len(vae.get("block_out_channels", (0,) * 4)) - 1)

    @property
    def text_encoders(self) -> list[Component]:
        return [self.components[n] for n in ("text_encoder", "text_encoder_2") if n in self.components]


# -- reading shapes -----------------------------------------------------------------------------------
def header_shapes(files: list[Path]) -> tuple[dict[str, tuple[int, ...]], int, str]:
    """Float tensor shapes by name, their bytes and their most common dtype, from safetensors headers
    (no weights read)."""
    from collections import Counter

    from safetensors import safe_open

    shapes, nbytes, dtypes = {}, 0, Counter()
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                dtype = piece.get_dtype()
                if dtype not in _FLOAT_BYTES:  # position ids and other integer buffers are no parameters
                    continue
                shape = tuple(piece.get_shape())
                shapes[key] = shape
                nbytes += math.prod(shape) * _FLOAT_BYTES[dtype]
                dtypes[dtype] += math.prod(shape)
    return shapes, nbytes, (dtypes.most_common(1)[0][0] if dtypes else "F32")


def meta_model(name: str, config: dict[str, Any], device: str = "meta"):
    """The component built from its config on the meta device (real classes, no memory, no weights), or
    with random weights on `device`."""
    import torch

    with torch.device(device):
        if name == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        if name == "vae":
            from diffusers import AutoencoderKL

            return AutoencoderKL.from_config(config)
        import transformers

        cls = getattr(transformers, (config.get("architectures") or ["CLIPTextModel"])[0])
        settings = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "_name_or_path")}
        return cls(transformers.CLIPTextConfig(**settings))


@lru_cache(maxsize=16)
def _meta_shapes_cached(name: str, config_json: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    model = meta_model(name, json.loads(config_json))
    return tuple((k, tuple(p.shape)) for k, p in model.named_parameters())


def meta_shapes(name: str, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    return dict(_meta_shapes_cached(name, json.dumps(config, sort_keys=True)))


def _component(name: str, config: dict[str, Any], shapes: dict[str, tuple[int, ...]], file_bytes: int | None,
               file_dtype: str = "F32") -> Component:
    params = sum(math.prod(s) for s in shapes.values())
    if file_bytes is None:
        file_bytes = _FLOAT_BYTES[file_dtype] * params
    module_shapes = {k.removesuffix(".weight"): s for k, s in shapes.items() if k.endswith(".weight") and len(s) in (2, 4)}
    return Component(name, params, file_bytes, config, shapes=module_shapes, file_dtype=file_dtype)


def _weight_files(folder: Path, variant: str) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if variant:
        chosen = [f for f in files if f".{variant}." in f.name]
    else:
        chosen = [f for f in files if f.name.count(".") == 1]  # model.safetensors, not model.fp16.safetensors
    return chosen or files


# -- the architectures ----------------------------------------------------------------------------------
def from_folder(folder: Path, kind: str, variant: str = "") -> Architecture:
    """A diffusers folder: headers where weights exist, else configs on the meta device."""
    index = json.loads((folder / "model_index.json").read_text())
    components, sources = {}, set()
    for name in COMPONENTS:
        if not isinstance(index.get(name), list) or not index[name][1] or not (folder / name / "config.json").exists():
            continue
        config = json.loads((folder / name / "config.json").read_text())
        files = _weight_files(folder / name, variant)
        if files:
            shapes, nbytes, dtype = header_shapes(files)
            sources.add("safetensors headers")
        else:
            shapes, nbytes, dtype = meta_shapes(name, config), None, "F16" if variant == "fp16" else "F32"
            sources.add("configs on the meta device")
        components[name] = _component(name, config, shapes, nbytes, dtype)
    return Architecture(kind, components, f"{folder} ({', '.join(sorted(sources))})")


def from_published(kind: str, note: str = "", variant: str = "") -> Architecture:
    """The published architecture; its files are fp32, or fp16 with variant = fp16 (both repositories have both)."""
    dtype = "F16" if variant == "fp16" else "F32"
    components = {n: _component(n, published_config(kind, n), meta_shapes(n, published_config(kind, n)), None, dtype)
                  for n in PUBLISHED[kind]}
    label = "SD 1.5" if kind == "sd" else "SDXL base 1.0"
    return Architecture(kind, components, note or f"published {label} configs on the meta device")


def from_single_file(path: Path, kind: str) -> Architecture:
    """A single checkpoint: its header gives each component's size; layer shapes follow the published
    config of its kind (the one diffusers' from_single_file loads it into)."""
    shapes, _, dtype = header_shapes([path])
    published = from_published(kind)
    sizes: dict[str, list[int]] = {}
    for key, shape in shapes.items():
        for prefix, name in _SINGLE_FILE_PREFIXES.items():
            if key.startswith(prefix):
                sizes.setdefault(name, [0, 0])[0] += math.prod(shape)
                break
    file_ratio = path.stat().st_size / max(1, sum(math.prod(s) for s in shapes.values()))
    components = {
        name: Component(name, sizes[name][0] if name in sizes else c.params,
                        int((sizes[name][0] if name in sizes else c.params) * file_ratio), c.config,
                        shapes=c.shapes, file_dtype=dtype)
        for name, c in published.components.items()
    }
    return Architecture(kind, components, f"{path.name} (safetensors header; layer shapes from the published configs)")


def has_fp16_variant(spec: str) -> bool:
    """The model's folder (local, or the Hub cache) holds fp16 weight files; a published id not yet
    downloaded is known to have them."""
    spec = spec.strip()
    if spec in PUBLISHED_IDS:
        return True
    folder = Path(spec).expanduser() if Path(spec).expanduser().is_dir() else _cached_hub_folder(spec)
    return folder is not None and any(folder.glob("unet/*.fp16.safetensors"))


def _cached_hub_folder(repo_id: str) -> Path | None:
    """The local snapshot of a Hub model that is already in the cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    index = try_to_load_from_cache(repo_id, "model_index.json")
    return Path(index).parent if isinstance(index, str) else None


def architecture(spec: str, variant: str = "") -> Architecture:
    """The architecture of a base model as the user names it (Hub id, folder, file, builtin:*), offline."""
    from ..config import REPO_ID
    from ..models import BUILTIN_MODELS, guess_kind, resolve

    spec = spec.strip()
    path = Path(spec).expanduser()
    if spec in BUILTIN_MODELS or path.exists():  # the toy base too: its own folder, not SD 1.5's size
        base = resolve(spec)
        if base.loader == "single_file":
            return from_single_file(Path(base.source), base.kind)
        return from_folder(Path(base.source), base.kind, variant)
    kind = PUBLISHED_IDS.get(spec) or guess_kind(spec)
    cached = _cached_hub_folder(spec) if REPO_ID.match(spec) else None
    if cached is not None:
        return from_folder(cached, kind, variant)
    if spec in PUBLISHED_IDS:
        return from_published(kind, variant=variant)
    return from_published(kind, variant=variant, note=f"'{spec}' is not downloaded yet: assumed the size of the published "
                                                      f"{'SDXL' if kind == 'sdxl' else 'SD 1.5'} architecture")


# -- LoRA -------------------------------------------------------------------------------------------
def _matches(module: str, targets: list[str]) -> bool:
    """peft's rule for a list of target_modules: the module name is a target or ends with '.<target>'."""
    return any(module == t or module.endswith("." + t) for t in targets)


def _layer_index(module: str) -> int | None:
    parts = module.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def lora_tensors(component: Component, targets: list[str], rank: int, *, use_dora: bool = False,
                 layers: list[int] | None = None) -> list[tuple[str, int]]:
    """The trainable tensors a LoRA adds: ("A" | "B" | "magnitude", elements) per tensor.

    Linear (out, in): A is rank x in, B is out x rank. Conv (out, in, kh, kw): A is a rank x in x kh x kw
    conv, B a 1x1 out x rank conv. DoRA adds one magnitude per output feature.
    """
    out = []
    for module, shape in component.shapes.items():
        if not _matches(module, targets):
            continue
        if layers is not None and _layer_index(module) not in layers:
            continue
        fan_out, fan_in = shape[0], math.prod(shape[1:])
        out += [("A", rank * fan_in), ("B", fan_out * rank)]
        if use_dora:
            out.append(("magnitude", fan_out))
    return out
