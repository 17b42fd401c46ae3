"""One micro-batch as the UNet takes it: latents, caption embeddings (cached or encoded now), SDXL's
micro-conditioning, and the untriggered captions output preservation compares against the base."""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import dataset as ds
from .loss import _inner
from .preservation import adapters_disabled, without_trigger

if TYPE_CHECKING:
    from .train import Trainables


def encode_text(captions: list[str], tokenizers: list, text_encoders: list, kind: str, device) -> tuple[Any, Any]:
    """(prompt embeddings, pooled embeddings or None) exactly as the SD / SDXL pipelines compute them."""
    import torch

    embeds, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        if kind == "sd":
            return encoder(ids)[0], None
        out = encoder(ids, output_hidden_states=True)
        pooled = out[0]  # the last encoder's projected pooled output
        embeds.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer
    return torch.cat(embeds, dim=-1), pooled


@dataclass
class Batch:
    """One micro-batch as the UNet takes it."""

    latents: Any  # scaled VAE latents, (B, C, h, w), in the frozen weights' dtype
    embeds: Any  # caption embeddings
    added_cond: dict[str, Any] | None = None  # SDXL: pooled caption embeddings and the size/crop time ids
    # Output preservation: the captions without the trigger, as the LoRA model and as the base model read them.
    preserve: tuple[Any, Any, dict[str, Any] | None, dict[str, Any] | None] | None = None
    reg_count: int = 0  # prior preservation: the last reg_count samples are regularization images


def prepare_batch(pixels, latents, where: dict[str, list], t: Trainables, items: list[ds.Item], data, rng: random.Random) -> Batch:
    """Latents (encoded now unless cached) and caption embeddings of one micro-batch."""
    import torch

    if latents is None:  # not cached: encode this batch now
        with torch.no_grad():
            latents = t.encode_pixels(pixels)
    latents = latents.to(t.device, dtype=t.weight_dtype)
    captions = [
        ds.process_caption(items[i].caption, rng, shuffle=data.shuffle_captions, keep_tokens=data.keep_tokens, dropout=data.caption_dropout)
        for i, _ in where["samples"]
    ]
    captions += where.get("reg_captions", [])  # regularization images keep their class captions as written
    embeds, pooled = _embed(captions, t)
    time_ids = None
    if t.kind == "sdxl":  # SDXL's micro-conditioning: original size, crop top-left, target size
        h, w = latents.shape[-2] * t.vae_scale, latents.shape[-1] * t.vae_scale
        sizes = [items[i].size for i, _ in where["samples"]] + where.get("reg_sizes", [])
        crops = where["top_left"] + where.get("reg_top_left", [])
        time_ids = torch.tensor(
            [[size[1], size[0], *crop, h, w] for size, crop in zip(sizes, crops, strict=True)], device=t.device, dtype=embeds.dtype,
        )
    added = {"text_embeds": pooled, "time_ids": time_ids} if time_ids is not None else None
    preserve = None
    if t.preserve_weight:
        plain = [without_trigger(c, data.trigger, t.preserve_class) for c in captions]
        lora_embeds, lora_pooled = _embed(plain, t)
        with adapters_disabled([_inner(m) for n, m in t.trained.items() if n != "unet"]):
            base_embeds, base_pooled = _embed(plain, t, grad=False)
        conds = [{"text_embeds": p, "time_ids": time_ids} if time_ids is not None else None for p in (lora_pooled, base_pooled)]
        preserve = (lora_embeds.to(t.weight_dtype), base_embeds.to(t.weight_dtype), *conds)
    return Batch(latents, embeds.to(t.weight_dtype), added, preserve, len(where.get("reg_captions", [])))


def _embed(captions: list[str], t: Trainables, grad: bool = True):
    """Caption embeddings: from the cache, or from the text encoders (with gradients when their LoRA trains)."""
    import torch

    if t.cache_text:
        embeds = torch.stack([t.text_cache[c][0] for c in captions])
        pooled = torch.stack([t.text_cache[c][1] for c in captions]) if t.kind == "sdxl" else None
        return embeds, pooled
    if t.pivotal is not None:
        captions = t.pivotal.expand(captions)
    with nullcontext() if grad and (t.train_text_encoder or t.pivotal is not None) else torch.no_grad():
        return encode_text(captions, t.tokenizers, t.text_encoders, t.kind, t.device)
