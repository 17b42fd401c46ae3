"""The built-in tiny models: `builtin:tiny-sd` and `builtin:tiny-sdxl`.

Real diffusers/transformers classes (UNet2DConditionModel, AutoencoderKL, CLIPTextModel,
CLIPTextModelWithProjection, CLIPTokenizer, EulerDiscreteScheduler) with tiny configs and
seeded random weights, built offline and saved once as an ordinary diffusers folder. Loading
them goes through the same `from_pretrained` path as a real model, so tests exercise it.

The tokenizer is a genuine CLIP byte-level BPE whose merges are learned here from a small
built-in word list, so words split into sub-word tokens the way they do with the real one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from .errors import ModelLoadError

TINY_MODELS = {"builtin:tiny-sd": "sd", "builtin:tiny-sdxl": "sdxl"}
TINY_VERSION = 1  # bump when a config below changes, so caches rebuild
TINY_RESOLUTION = 64  # what the tiny models are meant to train and sample at
_VAE_BLOCKS = (8, 16, 16, 16)  # four blocks: an 8x downsampling VAE, like the real one
_UNET_BLOCKS = (32, 64)  # two blocks: the UNet halves the latent once
# Pixels per UNet-downsampled latent cell: bucket sides must be multiples of it (models.geometry derives
# the same from the saved configs; this copy lets the UI know it without building the model).
TINY_BUCKET_STEP = 2 ** (len(_VAE_BLOCKS) - 1) * 2 ** (len(_UNET_BLOCKS) - 1)

_CORPUS = """
a an the of in on at with and or by for to from photo photograph picture image painting drawing
illustration sketch render portrait landscape closeup close up shot style art artwork digital oil
watercolor watercolour pencil ink anime cartoon comic realistic detailed high quality masterpiece
woman man girl boy person people child face hair eyes smile dress shirt hat red blue green yellow
black white orange purple pink brown gray grey dark light bright colorful sky cloud clouds sun sunset
sea ocean lake river water mountain mountains tree trees forest flower flowers garden field grass
city street house building castle room table chair window door car road bridge night day morning
dog cat bird horse animal cute small big large old young beautiful standing sitting holding looking
wearing background foreground center left right top bottom view front side back full body head
sks ohwx zwx rifle gun product bottle shoe logo text sign book cup glass lamp vase plate food fruit
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def build_tokenizer_files(
    num_merges: int = 600, extra_words: tuple[str, ...] = ()
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges of a CLIP BPE tokenizer learned from the built-in word list (and `extra_words`)."""
    chars = list(_bytes_to_unicode().values())
    vocab_tokens = chars + [c + "</w>" for c in chars]
    words = Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in [*_CORPUS, *extra_words])
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, freq in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, ties broken deterministically
        merges.append(best)
        vocab_tokens.append(best[0] + best[1])
        merged: Counter = Counter()
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += freq
        words = merged
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
    return vocab, merges


def _tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = build_tokenizer_files()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _text_config(vocab_size: int, eos: int, bos: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, hidden_act="quick_gelu",
        **extra,
    )


def build_tiny_pipeline(kind: str, seed: int = 0):
    """The tiny pipeline of `kind` ('sd' or 'sdxl'), built in memory with seeded random weights."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = _tokenizer()
    vocab_size = len(tokenizer)
    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        block_out_channels=_VAE_BLOCKS,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_BLOCKS), up_block_types=("UpDecoderBlock2D",) * len(_VAE_BLOCKS),
        sample_size=TINY_RESOLUTION,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        timestep_spacing="leading", steps_offset=1,
    )
    unet_common = dict(
        sample_size=TINY_RESOLUTION // 2 ** (len(_VAE_BLOCKS) - 1), in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=_UNET_BLOCKS, norm_num_groups=8, attention_head_dim=(2, 4),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    if kind == "sd":
        unet = UNet2DConditionModel(cross_attention_dim=32, **unet_common)
        text_encoder = CLIPTextModel(_text_config(vocab_size, eos, bos))
        return StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    if kind == "sdxl":
        unet = UNet2DConditionModel(
            cross_attention_dim=64,  # the two text encoders' hidden states, concatenated
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + the pooled text embedding
            transformer_layers_per_block=(1, 1), **unet_common,
        )
        text_encoder = CLIPTextModel(_text_config(vocab_size, eos, bos))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, eos, bos, projection_dim=32))
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=_tokenizer(), unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}")


def cache_root() -> Path:
    root = os.environ.get("LORA_STUDIO_CACHE") or Path.home() / ".cache" / "lora-studio"
    return Path(root)


def _complete(folder: Path) -> bool:
    """A built model folder: model_index.json, and a config and weights for every model it lists."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    models = [k for k, v in index.items() if isinstance(v, list) and v[1] and not k.startswith(("tokenizer", "scheduler"))]
    return all((folder / m / "config.json").exists() and any((folder / m).glob("*.safetensors")) for m in models)


def tiny_model_path(name: str) -> Path:
    """The folder of a built-in tiny model, building it on first use (safe under concurrent processes).

    In a multi-process launch only the local main process builds: transformers writes weights from
    rank 0 alone once torch.distributed is up, so another rank's build would lack its text encoders.
    """
    kind = TINY_MODELS[name]
    target = cache_root() / f"tiny-{kind}-v{TINY_VERSION}"
    if _complete(target):
        return target
    if os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) != "0":
        deadline = time.monotonic() + 600
        while not _complete(target):
            if time.monotonic() > deadline:
                raise ModelLoadError(f"{name}: the main process did not finish building {target} within 10 minutes")
            time.sleep(0.2)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build_tiny_pipeline(kind).save_pretrained(tmp, safe_serialization=True)
        if not _complete(tmp):
            raise ModelLoadError(f"{name}: building it wrote an incomplete folder ({tmp}); please report this")
        if target.exists() and not _complete(target):
            shutil.rmtree(target, ignore_errors=True)  # a broken build from an older version: replace it
        try:
            os.rename(tmp, target)
        except OSError:
            if not _complete(target):  # lost a race to a broken folder: replace it
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
