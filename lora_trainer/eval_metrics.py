"""The models evaluation measures with, and the measures: CLIP text-image and image-image
similarity, DINOv2 image similarity, diversity, KID.

A metric model is named like a base model: a Hub id (openai/clip-vit-base-patch32,
facebook/dinov2-small), a local transformers folder, or `builtin:tiny-clip` (random weights,
built offline: plumbing for tests and benchmarks, its numbers mean nothing). Hub ids that are
neither cached nor reachable fail in seconds with a ModelLoadError (models.ensure_downloadable);
the caller turns that into a one-line "skipped" message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ModelLoadError

TINY_CLIP = "builtin:tiny-clip"
KID_MIN_IMAGES = 50  # below this many training images KID's estimate is mostly noise


class ImageTextModel:
    """A CLIPModel + CLIPProcessor: unit-length embeddings of images and texts."""

    def __init__(self, spec: str, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        source = _source(spec, "evaluation CLIP model", "config.json")
        try:
            self.model = CLIPModel.from_pretrained(source).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(source)
        except Exception as e:  # noqa: BLE001 - every failure becomes one clear line
            raise ModelLoadError(f"evaluation CLIP model '{spec}' could not be loaded: {_first_line(e)}") from None
        self.spec, self.device = spec, device

    def images(self, images: list) -> Any:
        import torch

        with torch.no_grad():
            inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
            return _unit(_pooled(self.model.get_image_features(**inputs)))

    def texts(self, texts: list[str]) -> Any:
        import torch

        with torch.no_grad():
            inputs = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
            return _unit(_pooled(self.model.get_text_features(**inputs)))


class ImageModel:
    """A DINOv2 backbone (transformers' Dinov2Model): unit-length CLS embeddings."""

    def __init__(self, spec: str, device: str = "cpu"):
        from transformers import AutoImageProcessor, Dinov2Model

        source = _source(spec, "evaluation DINOv2 model", "config.json")
        try:
            self.model = Dinov2Model.from_pretrained(source).to(device).eval()
            self.processor = AutoImageProcessor.from_pretrained(source)
        except Exception as e:  # noqa: BLE001
            raise ModelLoadError(f"evaluation DINOv2 model '{spec}' could not be loaded: {_first_line(e)}") from None
        self.spec, self.device = spec, device

    def images(self, images: list) -> Any:
        import torch

        with torch.no_grad():
            inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").to(self.device)
            return _unit(self.model(**inputs).pooler_output)


def _pooled(out: Any) -> Any:
    """transformers 5 returns a model output from get_*_features; older versions a tensor."""
    return out if hasattr(out, "norm") else out.pooler_output


def _unit(x: Any) -> Any:
    return (x / x.norm(dim=-1, keepdim=True)).float().cpu()


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _source(spec: str, what: str, probe: str) -> str:
    """A local folder for `spec`: the built-in tiny CLIP, a folder, or a Hub id that can be fetched."""
    from .models import ensure_downloadable

    if spec == TINY_CLIP:
        return str(tiny_clip_path())
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path)
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"{what} '{spec}' is neither a local folder nor a Hub id (org/name)")
    ensure_downloadable(spec, probe, what)
    return spec


# -- measures -----------------------------------------------------------------------------------------
def mean_similarity(a: Any, b: Any) -> float:
    """Mean cosine similarity of every row of `a` to every row of `b` (unit embeddings)."""
    return float((a @ b.T).mean())


def paired_similarity(a: Any, b: Any) -> float:
    """Mean cosine similarity of row i of `a` to row i of `b`."""
    return float((a * b).sum(dim=-1).mean())


def diversity(groups: list[Any]) -> float | None:
    """Mean pairwise cosine distance inside each group (the images of one prompt), averaged over groups."""
    values = []
    for emb in groups:
        n = emb.shape[0]
        if n < 2:
            continue
        sims = emb @ emb.T
        values.append(float(((1 - sims).sum() - (1 - sims.diagonal()).sum()) / (n * (n - 1))))
    return sum(values) / len(values) if values else None


def kid(x: Any, y: Any) -> float:
    """Kernel Inception Distance's unbiased MMD^2 with the cubic polynomial kernel, on the given features.

    Here on CLIP/DINOv2 features, not Inception's: comparable between checkpoints, not to published KIDs.
    """
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1)) + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
                 - 2 * kxy.mean())


# -- the built-in tiny CLIP ------------------------------------------------------------------------------
def tiny_clip_path() -> Path:
    """A random tiny CLIPModel folder (model + tokenizer + image processor), built once into the cache."""
    import os
    import shutil
    import tempfile

    from .tiny import cache_root

    target = cache_root() / "tiny-clip-v1"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tiny-clip."))
    try:
        build_tiny_clip(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process built it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_tiny_clip(dest: Path, seed: int = 0) -> Path:
    """Write a tiny CLIPModel (random, seeded) with the tiny models' tokenizer and a 32 px processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from .tiny import tiny_model_path

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_path("builtin:tiny-sd") / "tokenizer")
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(dest, safe_serialization=True)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(dest)
    return dest
