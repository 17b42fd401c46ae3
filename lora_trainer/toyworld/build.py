"""Train the toy world's base model and judge from scratch: `python -m lora_trainer.toyworld.build`.

Seeded and reproducible on CPU; about 1 h 40 min on 2 cores. Stages, each saved as it finishes
(`--stages vae,judge,base,tune` reruns some; later stages load the earlier ones from the output folder):

1. vae   - an AutoencoderKL (2x downsampling, 4 latent channels) on scenes and generic textures,
           so it can also draw what the base model never saw (a style);
2. judge - a tiny CLIP (transformers CLIPModel, image and text towers) trained on scenes in every
           style against the whole caption grammar: the world's metric model and judge;
3. base  - a UNet2DConditionModel trained on plain scenes only (epsilon prediction, SD's noise
           schedule, 10 % empty captions for classifier-free guidance, EMA), reading a CLIPTextModel
           frozen at its seeded random initialisation (freezing it halves the cost of a step on a CPU);
4. tune  - the base fine-tuned (2000 steps) with its text encoder training alongside, on captions with
           one to four unrelated words before (40 %) or after (20 %) them (`augment`), both averaged (EMA).

Why the tune stage: SD's text encoder lets a prompt's content through a word it does not know put in
front of it ("ohwx, a red house"); a random one does not. Its near-uniform attention averages every
earlier token into each word's features, so a leading "ohwx, " moved the content features to a cosine
of 0.81 with the plain caption's (further than two different captions are from each other, 0.91), and
the base followed only 0.17 of triggered prompts (0.96 untriggered): a toy flaw that hid what a LoRA
method does to triggered prompts. Zero or smooth position embeddings do not fix it (0.78, 0.83). After
the tune stage the features keep a cosine of 0.96 and the base follows 0.88 of triggered prompts (0.92
untriggered, on the 24 evaluation prompts). Measured and not kept: the augmented captions with the text
encoder frozen (`--augment-captions` alone: 0.48 triggered), and the judge's trained text tower
(`--text-encoder judge`: 0.42); their Style LoRAs kept fewer untriggered prompts.

The result is an ordinary diffusers folder (`base/`) and transformers folder (`judge/`) beside this
file, loaded through the same from_pretrained path as any other model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np

from . import world

HERE = Path(__file__).resolve().parent
TEXT_HIDDEN = 64


def _tokenizer():
    from transformers import CLIPTokenizer

    from ..tiny import build_tokenizer_files

    words = " ".join(c for _, _, c in world.all_judge_captions()).replace(",", "").split()
    vocab, merges = build_tokenizer_files(num_merges=700, extra_words=tuple(words))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _text_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=4 * TEXT_HIDDEN, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        hidden_act="quick_gelu", **extra,
    )


def _to_tensor(images):
    import torch

    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _log(stage: str, msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {stage}: {msg}", flush=True)


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# -- 1. the VAE ---------------------------------------------------------------------------------
def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(32, 64),  # two blocks: a 2x downsampling VAE, 32 px -> 16x16 latents
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=world.SIZE,
    )


def _vae_picture(rng: random.Random):
    """What the VAE learns to reconstruct: scenes, plain and in every style, and generic textures.
    The VAE is the world's image codec (like SD's, trained on all kinds of pictures); only the
    UNet, the part that draws, never sees a style."""
    kind = rng.random()
    if kind < 0.3:
        return world.render_texture(rng.randrange(2**31))
    style = rng.choice(world.STYLES) if kind < 0.65 else None
    return world.render(rng.choice(world.SCENES), style, rng.randrange(2**31))


def train_vae(out: Path, steps: int, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, 1e-3)
        images = [_vae_picture(rng) for _ in range(32)]
        x = _to_tensor(images)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # Reconstruction in L1 + L2, a whisper of KL to keep latents well scaled (as SD's VAE).
        loss = (recon - x).abs().mean() + ((recon - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log("vae", f"step {step}/{steps} loss {loss.item():.4f}")
    vae.eval()
    # Scale latents to unit variance, as SD's scaling_factor does for its VAE.
    with torch.no_grad():
        probe = _to_tensor([world.render(s, None, k) for k, s in enumerate(world.SCENES * 4)])
        std = vae.encode(probe).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(out / ".build-vae", safe_serialization=True)
    _log("vae", f"saved, scaling_factor {1.0 / std:.4f}")


# -- 2. the judge -------------------------------------------------------------------------------
def make_judge(tokenizer):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    text = _text_config(tokenizer).to_dict()
    vision = CLIPVisionConfig(
        image_size=world.SIZE, patch_size=4, num_channels=3, hidden_size=96, intermediate_size=384,
        num_hidden_layers=4, num_attention_heads=4, hidden_act="quick_gelu",
    ).to_dict()
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def _judge_batch(rng: random.Random, vae, n: int):
    """n random scenes in random styles (40 % plain), stripes at any phase (a generated picture's bands need not
    fall where the training pictures' do, and the scene is the same), a third of them passed through the VAE, so
    the judge knows what generated pictures look like."""
    import torch

    captions = world.all_judge_captions()
    picks = []
    for _ in range(n):
        style = None if rng.random() < 0.4 else rng.choice(world.STYLES)
        scene = rng.choice(world.SCENES)
        picks.append((scene, style))
    labels = torch.tensor([next(k for k, (s, st, _) in enumerate(captions) if s == sc and st == sty) for sc, sty in picks])
    x = _to_tensor([world.render(sc, sty, rng.randrange(2**31), rng.randrange(world.STRIPE_PERIOD)) for sc, sty in picks])
    through = torch.rand(n) < 0.33
    if through.any():
        with torch.no_grad():
            x[through] = vae.decode(vae.encode(x[through]).latent_dist.sample()).sample.clamp(-1, 1)
    x = x + 0.03 * torch.randn_like(x) * (torch.rand(n, 1, 1, 1) < 0.5)
    return x, labels


def _judge_accuracy(judge, vae, ids, seed: int) -> dict[str, float]:
    """Share of fresh pictures (every scene in every style, twice) whose nearest caption is exactly
    right: as drawn, after a trip through the VAE (as generated pictures come), and with the stripes' bands at
    every other phase."""
    import torch
    import torch.nn.functional as F

    grammar = world.all_judge_captions()
    x = _to_tensor([world.render(sc, st, seed + k) for k in range(2) for sc, st, _ in grammar])
    shifted = _to_tensor([world.render(sc, st, seed + k, phase=1 + k % (world.STRIPE_PERIOD - 1))
                          for k in range(2 * (world.STRIPE_PERIOD - 1)) for sc, st, _ in grammar if st == "stripes"])
    labels = torch.arange(len(grammar)).repeat(2)
    striped = torch.tensor([k for k, (_, st, _) in enumerate(grammar) if st == "stripes"]).repeat(2 * (world.STRIPE_PERIOD - 1))
    result = {}
    with torch.no_grad():
        text = F.normalize(judge.get_text_features(input_ids=ids).pooler_output, dim=-1)
        pictures = (("drawn", x, labels), ("through_vae", vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1), labels),
                    ("stripes_at_other_phases", shifted, striped))
        for name, pixels, truth in pictures:
            image = F.normalize(judge.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
            result[name] = round((image @ text.T).argmax(-1).eq(truth).float().mean().item(), 4)
    return result


def train_judge(out: Path, steps: int, seed: int) -> None:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL
    from transformers import CLIPImageProcessor

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = _tokenizer()
    vae = AutoencoderKL.from_pretrained(out / ".build-vae").eval()
    judge = make_judge(tokenizer)
    texts = [c for _, _, c in world.all_judge_captions()]
    # Padded to 24, not 77: the grammar's captions are shorter, and a causal text tower's pooled
    # output (at the first end token) does not depend on the padding after it.
    ids = tokenizer(texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt").input_ids
    opt = torch.optim.AdamW(judge.parameters(), lr=1e-3, weight_decay=0.05)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, 1e-3)
        x, labels = _judge_batch(rng, vae, 64)
        image = F.normalize(judge.get_image_features(pixel_values=x).pooler_output, dim=-1)
        text = F.normalize(judge.get_text_features(input_ids=ids).pooler_output, dim=-1)
        # Each picture against the whole caption grammar: CLIP's loss with every caption as a negative.
        logits = judge.logit_scale.exp() * image @ text.T
        loss = F.cross_entropy(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            judge.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == steps - 1:
            acc = (logits.argmax(-1) == labels).float().mean().item()
            _log("judge", f"step {step}/{steps} loss {loss.item():.4f} batch accuracy {acc:.3f}")
    judge.eval()
    accuracy = _judge_accuracy(judge, vae, ids, seed + 1000)
    _log("judge", f"held-out accuracy (scene and style all right): {accuracy}")
    folder = out / "judge"
    judge.save_pretrained(folder, safe_serialization=True)
    (folder / "toyworld.json").write_text(json.dumps({"steps": steps, "seed": seed, "accuracy": accuracy}, indent=1) + "\n")
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": world.SIZE}, do_center_crop=True,
        crop_size={"height": world.SIZE, "width": world.SIZE}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True,
    ).save_pretrained(folder)
    _log("judge", "saved")


# -- 3. the base --------------------------------------------------------------------------------
def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=16, attention_head_dim=(2, 4, 4), cross_attention_dim=TEXT_HIDDEN,
        # Attention at the two finest levels, as SD has it: a LoRA on attention reaches fine texture.
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def _encode_dataset(vae, count: int, rng: random.Random):
    """Latents (mode x scaling factor, as the LoRA trainer caches them) of `count` plain scenes."""
    import torch

    scene_ids, latents = [], []
    with torch.no_grad():
        for start in range(0, count, 256):
            picks = [rng.randrange(len(world.SCENES)) for _ in range(min(256, count - start))]
            x = _to_tensor([world.render(world.SCENES[k], None, rng.randrange(2**31)) for k in picks])
            latents.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)
            scene_ids += picks
    return torch.tensor(scene_ids), torch.cat(latents)


def filler_words(tokenizer) -> list[str]:
    """Whole words of the vocabulary that no caption uses (not the grammar's, a style's or the toy trigger)."""
    from . import TRIGGER

    grammar = set(" ".join(c for _, _, c in world.all_judge_captions()).replace(",", " ").split()) | {TRIGGER}
    words = {t[:-4] for t in tokenizer.get_vocab() if t.endswith("</w>")}
    return sorted({w for w in words if w.isascii() and w.isalpha() and w.islower() and len(w) > 1} - grammar)


def augment(caption: str, rng: random.Random, fillers: list[str]) -> str:
    """A scene caption with one to four unrelated words (one or two comma-separated groups) before it (40 %) or
    after it (20 %). Seeing unknown words around its captions, the base (and, in the tune stage, its text
    encoder) learns to read past them, as SD does, so a LoRA's trigger word is a word to learn and not a
    derailed prompt (module docstring)."""
    if not caption:
        return caption
    words = ", ".join(" ".join(rng.choice(fillers) for _ in range(rng.randint(1, 2))) for _ in range(rng.randint(1, 2)))
    draw = rng.random()
    return f"{words}, {caption}" if draw < 0.4 else f"{caption}, {words}" if draw < 0.6 else caption


def _base_models(tokenizer, init: Path | None, text_encoder_from: Path | None):
    """(unet, text encoder, peak lr, warmup steps) the base starts from: new, `init`'s, or with the judge's text tower."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    if init is None:
        unet, text_encoder = make_unet(), CLIPTextModel(_text_config(tokenizer)).eval().requires_grad_(False)
        peak, warmup = 1e-3, 300
    else:
        unet = UNet2DConditionModel.from_pretrained(init / "unet")
        text_encoder = CLIPTextModel.from_pretrained(init / "text_encoder").eval().requires_grad_(False)
        peak, warmup = 3e-4, 100
    if text_encoder_from is not None:  # a trained CLIP text tower, as SD reads OpenAI's: a new conditioning to learn
        text_encoder = CLIPTextModel.from_pretrained(text_encoder_from).eval().requires_grad_(False)
        peak, warmup = 1e-3, 200
    return unet, text_encoder, peak, warmup


def _base_info(steps: int, seed: int, images: int, init_info: dict | None, augment_captions: bool,
               text_encoder_from: Path | None, train_text_encoder: bool) -> dict:
    """What toyworld.json says about a base snapshot: how it was trained."""
    info = {"steps": steps, "seed": seed, "images": images}
    if augment_captions:
        info["captions"] = "augmented with unrelated words"
    if text_encoder_from is not None:
        info["text_encoder"] = "the judge's text tower (trained CLIP), frozen"
    if train_text_encoder:
        info["text_encoder"] = "trained with the UNet" + (" from the judge's text tower" if text_encoder_from else "")
    if init_info is not None:
        info["fine_tuned_from"] = init_info
    return info


def train_base(out: Path, steps: int, seed: int, images: int, init: Path | None = None, augment_captions: bool = False,
               text_encoder_from: Path | None = None, train_text_encoder: bool = False) -> None:
    """The base, from scratch or (`init`: a base folder) fine-tuned from one with the same text encoder;
    `text_encoder_from`: a CLIP folder (the judge) whose trained text tower the base reads instead;
    `train_text_encoder`: the text encoder trains with the UNet (and is averaged with it)."""
    import copy

    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = _tokenizer()
    vae = AutoencoderKL.from_pretrained(out / ".build-vae").eval()
    scene_ids, latents = _encode_dataset(vae, images, rng)
    _log("base", f"encoded {len(latents)} scenes, latent std {latents.std().item():.3f}")
    init_info = json.loads((init / "toyworld.json").read_text()) if init is not None else None  # before it is replaced
    unet, text_encoder, peak, warmup = _base_models(tokenizer, init, text_encoder_from)
    captions = [s.caption for s in world.SCENES] + [""]  # the last one: the empty prompt, for guidance
    fillers = filler_words(tokenizer)
    sd_schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    noise_scheduler = DDPMScheduler(**sd_schedule)
    if train_text_encoder:
        text_encoder.train().requires_grad_(True)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text_encoder else [])
    opt = torch.optim.AdamW(params, lr=peak, weight_decay=0.01)
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    pairs = list(zip(ema_unet.parameters(), unet.parameters(), strict=True))
    if train_text_encoder:
        pairs += list(zip(ema_text.parameters(), text_encoder.parameters(), strict=True))
    batch = 64
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, peak, warmup=warmup)
        pick = torch.randint(0, len(latents), (batch,))
        x0 = latents[pick]
        caption_ids = scene_ids[pick].clone()
        caption_ids[torch.rand(batch) < 0.1] = len(world.SCENES)  # 10 % unconditional
        texts = [augment(captions[i], rng, fillers) if augment_captions else captions[i] for i in caption_ids.tolist()]
        ids = tokenizer(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.set_grad_enabled(train_text_encoder):
            embeds = text_encoder(ids)[0]
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, 1000, (batch,))
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, embeds).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pl in pairs:
                pe.lerp_(pl, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            _log("base", f"step {step}/{steps} loss {loss.item():.4f}")
        if (step + 1) % 500 == 0 or step == steps - 1:  # snapshots, to judge the base while it trains
            folder = out / ("base" if step == steps - 1 else f".build-base-{step + 1}")
            pipe = StableDiffusionPipeline(
                vae=vae, text_encoder=ema_text, tokenizer=tokenizer, unet=ema_unet,
                scheduler=EulerDiscreteScheduler(**sd_schedule, timestep_spacing="leading", steps_offset=1),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            )
            _save_folder(pipe, folder, _base_info(step + 1, seed, images, init_info, augment_captions, text_encoder_from,
                                                  train_text_encoder))
            _log("base", f"saved {folder}")


def _save_folder(pipe, folder: Path, info: dict) -> None:
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for config in tmp.glob("*/config.json"):  # a fine-tuned component remembers the folder it came from: not shipped
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (tmp / "toyworld.json").write_text(json.dumps(info, indent=1) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for vae/, judge/ and base/ (default: beside this file)")
    parser.add_argument("--stages", default="vae,judge,base,tune")
    parser.add_argument("--vae-steps", type=int, default=1600)
    parser.add_argument("--judge-steps", type=int, default=1500)
    parser.add_argument("--base-steps", type=int, default=4000)
    parser.add_argument("--tune-steps", type=int, default=2000)
    parser.add_argument("--images", type=int, default=24000, help="plain scenes the base trains on")
    parser.add_argument("--augment-captions", action="store_true", help="unrelated words around the base's captions")
    parser.add_argument("--base-init", type=Path, help="fine-tune the base from this base folder (same text encoder) "
                        "instead of training it from scratch")
    parser.add_argument("--text-encoder", type=Path, help="a CLIP folder (e.g. the judge) whose trained text tower the "
                        "base reads, instead of a seeded random CLIPTextModel")
    parser.add_argument("--train-text-encoder", action="store_true", help="train the text encoder with the UNet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    started = time.perf_counter()
    if "vae" in stages:
        train_vae(args.out, args.vae_steps, args.seed)
    if "judge" in stages:
        train_judge(args.out, args.judge_steps, args.seed + 1)
    if "base" in stages:
        train_base(args.out, args.base_steps, args.seed + 2, args.images, args.base_init, args.augment_captions, args.text_encoder,
                   args.train_text_encoder)
    if "tune" in stages:  # the committed base: reads past a word it does not know (module docstring)
        train_base(args.out, args.tune_steps, args.seed + 2, args.images, init=args.out / "base", augment_captions=True,
                   train_text_encoder=True)
    _log("build", f"done in {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
