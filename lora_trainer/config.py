"""The training configuration: one typed, documented, validated source of truth.

`config.toml` in a run folder is the contract between the UI and the trainer. Every field has a
default, a type, a one-line help text (the UI shows it as the tooltip) and a validation rule
(`choices`, `min`, `max`). An invalid value raises `ConfigError` naming the field and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .errors import ConfigError
from .timesteps import TIMESTEP_SAMPLINGS

CONFIG_VERSION = 1
CONFIG_FILENAME = "config.toml"

TARGET_PRESETS: dict[str, list[str]] = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "attention+ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    # LoCon: also the ResNet blocks' 3x3 convolutions (resnets.N.conv1 / conv2), which draw local texture; the kohya
    # file stores them as lora_unet_*_resnets_N_conv1 with a 3x3 lora_down and a 1x1 lora_up, the layout of kohya's
    # LoCon files (A1111's loader maps resnets' conv1 / conv2; diffusers' kohya loader reloads it: tests/test_train.py).
    "attention+ff+conv": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"],
    # The same without the cross-attention's keys and values (attn2.to_k / to_v), the only layers that read the text
    # encoder's output: the LoRA changes how the picture is drawn, not what the prompt's words mean. Self-attention's
    # are kept. In the toy world, at equal steps, it keeps more of the prompt and shows less of the style: the trade
    # that guidance-sized training's k makes (README, "What else was tried against the remaining gap").
    "image-side": ["to_q", "attn1.to_k", "attn1.to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"],
}
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# A Hugging Face Hub repo id, user/name or org/name (the Hub allows 96 characters a part).
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]


def _f(default: Any, help: str, **rules: Any) -> Any:
    """A config field: default + help text + validation rules, in one place."""
    meta = {"help": help, **rules}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    base: str = _f(
        "builtin:tiny-sd",
        "Base model: a Hub id (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-xl-base-1.0), "
        "a local diffusers folder, a single .safetensors checkpoint, or builtin:tiny-sd / builtin:tiny-sdxl.",
        nonempty=True,
    )
    revision: str = _f("", "Hub revision (branch, tag or commit) of the base model; empty for the default.")
    variant: str = _f("", "Weight variant to load from the Hub, e.g. fp16; empty for the default.")


@dataclass
class DataSection:
    images: str = _f(
        "dataset",
        "Folder of training images with same-named .txt captions (relative paths are inside the run folder). "
        "Sub-folders named N_name repeat their images N times per epoch.",
        nonempty=True,
    )
    trigger: str = _f("ohwx", "Trigger word: the caption of an image without one, and the token the LoRA learns.")
    resolution: int = _f(
        0,
        "Training resolution in pixels (the side of a square bucket); 0 = the base model's native resolution "
        "(512 for SD 1.5, 1024 for SDXL, 32 for builtin:toy). It must be a multiple of the base's bucket step.",
        min=0, max=4096, multiple_of=8,
    )
    buckets: bool = _f(True, "Aspect-ratio buckets: train each image near its own shape instead of a centre crop.")
    bucket_step: int = _f(
        0,
        "Bucket sides are multiples of this many pixels; 0 = the base model's own step (VAE x UNet downsampling: "
        "64 for SD 1.5, 32 for SDXL, 8 for builtin:toy). A value that is not a multiple of it is raised to one.",
        min=0, max=256, multiple_of=8,
    )
    repeats: int = _f(1, "How many times each image is seen per epoch (multiplies a folder's own N_ repeats).", min=1, max=1000)
    flip: bool = _f(False, "Random horizontal flip (off for subjects with asymmetric features such as text or logos).")
    caption_dropout: float = _f(0.0, "Probability of training a step with an empty caption.", min=0.0, max=1.0)
    shuffle_captions: bool = _f(False, "Shuffle comma-separated caption tags each step, keeping the first keep_tokens in place.")
    keep_tokens: int = _f(1, "Leading comma-separated tags kept in place by shuffling (the trigger word).", min=0, max=32)
    cache_latents: bool = _f(True, "Encode images with the VAE once before training (faster; turned off automatically when invalid).")
    cache_text_embeddings: bool = _f(
        True, "Encode captions once before training (turned off automatically with text-encoder training, shuffle or dropout)."
    )
    num_workers: int = _f(0, "Image-loading worker processes when latents are not cached.", min=0, max=32)
    reg_images: str = _f(
        "", "Prior preservation (DreamBooth's class images, kohya's reg subsets): a folder of regularization images of "
        "the class (e.g. paintings the base model drew) with optional same-named .txt captions (relative paths are "
        "inside the run folder; the CLI's --reg-images takes a folder or zip into RUN/reg). Each step trains an "
        "equal-size batch of them beside the training images, repeated as needed; the step costs ~2x. Empty = off.",
    )
    reg_caption: str = _f("", "Caption of a regularization image without a .txt caption: the class prompt, e.g. "
                          "'a painting' (kohya's class_tokens of the reg subset).")


@dataclass
class LoraSection:
    rank: int = _f(16, "LoRA rank (dimension): capacity of the adapter; 4-32 is typical.", min=1, max=1024)
    alpha: float = _f(16.0, "LoRA alpha: the update is scaled by alpha / rank (alpha / sqrt(rank) with rsLoRA).", min=0.0, max=4096.0)
    dropout: float = _f(0.0, "Dropout on the LoRA path during training.", min=0.0, max=0.9)
    targets: str = _f(
        "attention",
        "Which UNet layers get LoRA: attention (to_q/to_k/to_v/to_out.0), attention+ff (also feed-forward), "
        "attention+ff+conv (also the ResNet blocks' 3x3 convolutions, LoCon: texture and style), image-side (LoCon "
        "without the text's keys and values in cross-attention, attn2.to_k / to_v: the LoRA changes how things are "
        "drawn, not what the prompt's words mean; keeps more of the prompt, takes less style), or custom.",
        choices=[*TARGET_PRESETS, "custom"],
    )
    custom_targets: list[str] = _f([], "Module name suffixes for targets = custom, e.g. [\"to_q\", \"proj_in\"].")
    train_text_encoder: bool = _f(False, "Also train LoRA on the text encoder(s) (disables text-embedding caching).")
    text_encoder_lr: float = _f(0.0, "Learning rate for the text-encoder LoRA; 0 uses the UNet learning rate.", min=0.0, max=1.0)
    use_dora: bool = _f(False, "DoRA: weight-decomposed LoRA (slower per step, often better at low rank).")
    use_rslora: bool = _f(False, "rsLoRA: scale by alpha / sqrt(rank), which keeps high ranks stable.")
    trigger_vectors: int = _f(
        0, "Pivotal tuning: the trigger word gets its own learned embedding of this many vectors in each text encoder, "
        "trained with the LoRA (textual inversion; 1-2 typical); 0 = off. Saved as <name>_emb.safetensors beside the "
        "LoRA (diffusers, A1111, ComfyUI) and bundled in the kohya file; prompts must use the trigger word.",
        min=0, max=16,
    )
    embedding_lr: float = _f(0.0, "Learning rate of the trigger's embedding (pivotal tuning); 0 uses the UNet learning rate.",
                             min=0.0, max=10.0)
    embedding_init: str = _f("", "Word whose embedding the trigger's starts from (pivotal tuning), e.g. 'painting'; "
                             "empty: random, at the scale of the vocabulary's embeddings.")


@dataclass
class OptimSection:
    optimizer: str = _f(
        "adamw", "adamw, adamw8bit (bitsandbytes, CUDA only) or prodigy (adaptive; use learning_rate = 1.0).",
        choices=["adamw", "adamw8bit", "prodigy"],
    )
    learning_rate: float = _f(1e-4, "UNet LoRA learning rate (1e-4 typical for AdamW, 1.0 for Prodigy).", min=0.0, max=10.0, exclusive_min=True)
    weight_decay: float = _f(1e-2, "Weight decay.", min=0.0, max=1.0)
    lr_scheduler: str = _f("constant", "Learning-rate schedule (diffusers' get_scheduler).", choices=LR_SCHEDULERS)
    warmup_steps: int = _f(0, "Linear warm-up steps at the start of the schedule.", min=0, max=100000)
    steps: int = _f(1000, "Optimizer steps to train (ignored when epochs > 0).", min=1, max=1_000_000)
    epochs: int = _f(0, "Train this many passes over the (repeated) dataset instead of a fixed step count; 0 = use steps.", min=0, max=100000)
    batch_size: int = _f(1, "Images per batch per device.", min=1, max=256)
    gradient_accumulation: int = _f(1, "Batches accumulated per optimizer step.", min=1, max=1024)
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass: less memory, ~30% slower.")
    mixed_precision: str = _f("no", "no, fp16 (GPU) or bf16: frozen weights in half precision, LoRA weights stay fp32.", choices=["no", "fp16", "bf16"])
    memory: str = _f(
        "auto", "auto: on a GPU, train with the fastest settings that fit its memory (caching, half precision, batch "
        "split into accumulation, 8-bit AdamW, gradient checkpointing; each change logged) and refuse a run that "
        "cannot fit before the model loads; off: train exactly as set. No effect on a CPU.", choices=["auto", "off"],
    )
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.", min=0.0, max=1000.0)
    min_snr_gamma: float = _f(0.0, "Min-SNR loss weighting gamma (5 is the paper's value); 0 disables it.", min=0.0, max=100.0)
    noise_offset: float = _f(0.0, "Noise offset (0.05-0.1 helps very dark or bright images); 0 disables it.", min=0.0, max=1.0)
    seed: int = _f(42, "Random seed: same seed, same data and settings give the same LoRA on CPU.", min=0, max=2**31 - 1)
    preservation_weight: float = _f(
        0.0, "Output preservation: pull the LoRA's prediction for each caption without the trigger towards the base "
        "model's, so the style appears only when triggered (weight; 1 is typical, 0 = off; ~1.7x the cost per step). "
        "With guidance-sized training at k, of the order of k squared weighs the same (the toy Style preset: 12 at k = 4.5).",
        min=0.0, max=100.0,
    )
    train_guidance: float = _f(
        0.0, "Guidance-sized training (with output preservation): the triggered prediction trains as the base model's "
        "plus this many times the LoRA's change, so the LoRA learns 1/this of the change. Classifier-free guidance at "
        "scale g multiplies a preserved LoRA's change by g, which overcooks the style (colours wash out, shapes break); "
        "sized this way it arrives g/this times. 1 or less = off; 4.5 in the toy Style preset, measured at guidance 7 "
        "(README, toy world).",
        min=0.0, max=20.0,
    )
    prior_loss_weight: float = _f(
        1.0, "Prior preservation: the regularization images' loss is added at this weight to the training images' "
        "(DreamBooth's prior_loss_weight; 1 is typical, 0 = they train nothing). Only with data.reg_images.",
        min=0.0, max=100.0,
    )
    preservation_class: str = _f("", "Word that replaces the trigger in the preservation captions (e.g. 'painting'); empty removes it.")
    lora_plus_ratio: float = _f(
        0.0, "LoRA+: the LoRA B (up) matrices train at learning_rate x this ratio, the A (down) matrices at "
        "learning_rate (16 is the paper's value; 0 or 1 = off). Works with every optimizer.", min=0.0, max=1000.0,
    )
    timestep_sampling: str = _f(
        "uniform", "Which noise levels the steps train on: uniform (every timestep equally), logit_normal (SD3: "
        "concentrated around the middle, see logit_mean / logit_std) or shifted (toward high noise, see timestep_shift).",
        choices=TIMESTEP_SAMPLINGS,
    )
    logit_mean: float = _f(0.0, "logit_normal timestep sampling: the mean of the normal before the sigmoid; "
                           "> 0 leans toward high noise, < 0 toward low noise (SD3 uses 0).", min=-5.0, max=5.0)
    logit_std: float = _f(1.0, "logit_normal timestep sampling: the spread; smaller concentrates more around "
                          "the middle (SD3 uses 1).", min=0.01, max=10.0)
    timestep_shift: float = _f(3.0, "shifted timestep sampling: SD3's shift of the schedule; > 1 moves the steps "
                               "toward high noise (3 is SD3's value), < 1 toward low noise, 1 = uniform.", min=0.05, max=20.0)
    ema_decay: float = _f(
        0.0, "EMA: keep an exponential moving average of the LoRA weights (on the CPU) with this decay (e.g. 0.999; "
        "0 = off; the decay ramps up as (1 + step) / (10 + step) at the start). When on, the saved LoRA files "
        "(final/ and every checkpoint's) and the samples are the averaged weights.", min=0.0, max=0.99999,
    )

    @property
    def guidance_sizing(self) -> float:
        """Guidance-sized training's k (train_guidance), or 0.0 when it is off (1 or less sizes nothing)."""
        return self.train_guidance if self.train_guidance > 1 else 0.0


@dataclass
class SamplingSection:
    every: int = _f(100, "Render the sample prompts every this many steps (and at step 0 and the end); 0 = never.", min=0, max=1_000_000)
    prompts: list[str] = _f([], "Sample prompts; {trigger} is replaced by the trigger word. Empty = a few built-in ones.")
    seed: int = _f(1234, "Seed of the sample images, fixed so samples are comparable across steps.", min=0, max=2**31 - 1)
    steps: int = _f(20, "Denoising steps per sample image.", min=1, max=200)
    guidance: float = _f(7.0, "Classifier-free guidance scale of the sample images.", min=0.0, max=50.0)
    negative_prompt: str = _f("", "Negative prompt of the sample images.")


@dataclass
class OutputSection:
    name: str = _f("my-lora", "Name of the LoRA: the kohya file is <name>.safetensors.", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    save_every: int = _f(250, "Save a checkpoint (adapter + training state) every this many steps; 0 = only at stop and end.", min=0, max=1_000_000)
    keep_checkpoints: int = _f(0, "Keep only the newest N checkpoints; 0 keeps all.", min=0, max=10000)
    push_checkpoints_to: str = _f("", "Hub repo (user/name) that every saved checkpoint is pushed to; empty = don't push.")


@dataclass
class EvalSection:
    """How checkpoints are evaluated (evaluate.py): metric models, prompts, seeds, and the recommendation rule."""

    clip_model: str = _f("openai/clip-vit-base-patch32", "CLIP model for adherence and style: a Hub id or a local "
                         "transformers folder; on builtin:toy the toy world's judge CLIP is used instead.", nonempty=True)
    style_model: str = _f("clip", "Image features for style, leak, diversity and KID: clip, or dinov2.", choices=["clip", "dinov2"])
    dino_model: str = _f("facebook/dinov2-small", "DINOv2 model (transformers Dinov2Model) when style_model = dinov2.")
    prompts: list[str] = _f([], "Evaluation prompts without the trigger (not training captions). Empty = built-in ones.")
    prompt_count: int = _f(4, "How many evaluation prompts when prompts is empty.", min=1, max=64)
    seeds: int = _f(2, "Images per prompt (seeds seed, seed+1, ...); diversity needs at least 2.", min=1, max=16)
    seed: int = _f(0, "First seed of the evaluation images and of the validation noise.", min=0, max=2**31 - 1)
    steps: int = _f(20, "Denoising steps per evaluation image.", min=1, max=200)
    guidance: float = _f(7.0, "Guidance scale of the evaluation images.", min=0.0, max=50.0)
    strength: float = _f(1.0, "LoRA strength the checkpoints are evaluated at.", min=0.0, max=2.0)
    validation_images: int = _f(4, "Training images in the fixed validation-loss set.", min=1, max=64)
    validation_timesteps: int = _f(4, "Fixed timesteps per validation image.", min=1, max=32)
    adherence_margin: float = _f(0.1, "A recommended checkpoint keeps its prompt adherence within this fraction of "
                                 "the base model's (0.1 = at most 10% lower).", min=0.0, max=1.0)
    leak_ratio: float = _f(0.5, "A recommended checkpoint's style without the trigger may rise by at most this "
                           "fraction of its style gain with the trigger.", min=0.0, max=10.0)
    kid_min_images: int = _f(50, "KID is computed only with at least this many training images.", min=2, max=100000)
    after_training: str = _f("auto", "Evaluate every checkpoint when training ends: auto (on for builtin:toy and on a "
                             "GPU), on, off.", choices=["auto", "on", "off"])


@dataclass
class TrainConfig:
    version: int = _f(CONFIG_VERSION, "Config format version.", choices=[CONFIG_VERSION])
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    optim: OptimSection = field(default_factory=OptimSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    output: OutputSection = field(default_factory=OutputSection)
    eval: EvalSection = field(default_factory=EvalSection)

    # -- conveniences -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def set(self, dotted: str, value: Any) -> None:
        """Set `section.field` from a Python value or a string (as a CLI flag or form gives it)."""
        section, _, name = dotted.partition(".")
        target = getattr(self, section, None)
        if target is None or not dataclasses.is_dataclass(target) or name not in _field_map(type(target)):
            raise ConfigError(f"unknown config field '{dotted}'; known fields: {', '.join(field_names())}")
        f = _field_map(type(target))[name]
        setattr(target, name, _coerce(dotted, f, value))

    def unet_targets(self) -> list[str]:
        if self.lora.targets == "custom":
            return list(self.lora.custom_targets)
        return list(TARGET_PRESETS[self.lora.targets])

    def _default_sample_prompts(self) -> list[str]:
        if self.model.base.strip() == "builtin:toy":  # its world has its own words: scenes, not portraits
            from .toyworld import sample_prompts

            return sample_prompts()
        return ["{trigger}", "a portrait of a woman, {trigger}", "a house by a lake, {trigger}"]

    def sample_prompts(self) -> list[str]:
        prompts = self.sampling.prompts or self._default_sample_prompts()
        return [p.replace("{trigger}", self.data.trigger).strip(", ") for p in prompts]


SECTIONS = ["model", "data", "lora", "optim", "sampling", "output", "eval"]


def _field_map(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {name: hints[name] for name in SECTIONS}


def field_names() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in _section_types().items() for f in dataclasses.fields(cls)]


def field_info(dotted: str) -> dict[str, Any]:
    """Default, type name, help and rules of one field (what the UI needs to build its control)."""
    section, _, name = dotted.partition(".")
    cls = _section_types()[section]
    f = _field_map(cls)[name]
    hint = typing.get_type_hints(cls)[name]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    return {"name": dotted, "type": _type_name(hint), "default": default, **f.metadata}


def _type_name(hint: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(hint, "list[str]")


def _coerce(dotted: str, f: dataclasses.Field, value: Any) -> Any:
    section, _, name = dotted.partition(".")
    hint = typing.get_type_hints(_section_types()[section])[name]
    try:
        if hint is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, bool | int):
                return bool(value)
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        # list[str]
        if isinstance(value, str):
            return [v.strip() for v in value.split("|" if "|" in value else ",") if v.strip()]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{dotted}: expected {_type_name(hint)}, got {value!r}. {f.metadata['help']}") from None


def _check_rules(dotted: str, value: Any, meta: dict[str, Any]) -> list[str]:
    errors = []
    if "choices" in meta and value not in meta["choices"]:
        errors.append(f"{dotted} = {value!r} is not allowed; choose one of {', '.join(map(str, meta['choices']))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None and isinstance(value, int | float) and not isinstance(value, bool):
        if value < lo or value > hi or (meta.get("exclusive_min") and value <= lo):
            left = "(" if meta.get("exclusive_min") else "["
            errors.append(f"{dotted} = {value!r} is out of range; allowed {left}{lo}, {hi}]")
        elif meta.get("multiple_of") and value % meta["multiple_of"]:
            errors.append(f"{dotted} = {value!r} must be a multiple of {meta['multiple_of']}")
    if meta.get("nonempty") and not str(value).strip():
        errors.append(f"{dotted} must not be empty")
    if "pattern" in meta and not re.match(meta["pattern"], str(value)):
        errors.append(f"{dotted} = {value!r} is not a valid name; use letters, digits, '.', '_' or '-' (max 100)")
    return errors


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field's rules plus the cross-field ones; raise one ConfigError listing all problems."""
    errors = _check_rules("version", cfg.version, _field_map(TrainConfig)["version"].metadata)
    for section, cls in _section_types().items():
        obj = getattr(cfg, section)
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            dotted = f"{section}.{f.name}"
            try:
                value = _coerce(dotted, f, value)  # type check (TOML may hold the wrong type)
            except ConfigError as e:
                errors.append(str(e))
                continue
            errors += _check_rules(dotted, value, f.metadata)
    if cfg.lora.targets == "custom" and not cfg.lora.custom_targets:
        errors.append("lora.custom_targets must list at least one module name when lora.targets = 'custom'")
    if cfg.lora.trigger_vectors and not cfg.data.trigger.strip():
        errors.append("lora.trigger_vectors > 0 (pivotal tuning) needs a trigger word: set data.trigger, e.g. 'ohwx'")
    if cfg.lora.trigger_vectors and " " in cfg.data.trigger.strip():
        errors.append(f"data.trigger = {cfg.data.trigger!r}: pivotal tuning learns one word; use a single word, e.g. 'ohwx'")
    if "," in cfg.data.trigger:
        errors.append(
            f"data.trigger = {cfg.data.trigger!r} contains a comma: a trigger is one caption tag, and caption "
            "shuffling and keep_tokens split tags at commas; use one word, e.g. 'ohwx'"
        )
    if cfg.output.push_checkpoints_to and not REPO_ID.match(cfg.output.push_checkpoints_to):
        errors.append(f"output.push_checkpoints_to = {cfg.output.push_checkpoints_to!r} must look like user/name")
    if errors:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(errors))
    return cfg


# -- TOML ---------------------------------------------------------------------------------------
def from_dict(data: dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig()
    unknown = [k for k in data if k not in ("version", *SECTIONS)]
    if unknown:
        raise ConfigError(f"unknown config section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    if "version" in data:
        cfg.version = data["version"]
    for section in SECTIONS:
        values = data.get(section, {})
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of fields")
        for name, value in values.items():
            cfg.set(f"{section}.{name}", value)
    return validate(cfg)


def load(path: str | Path) -> TrainConfig:
    path = Path(path)
    if path.suffix != ".toml":  # a run folder
        path = path / CONFIG_FILENAME
    if not path.exists():
        raise ConfigError(f"no config file at {path}; create one with `python -m lora_trainer train --out RUN ...`")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    return from_dict(data)


def dumps(cfg: TrainConfig) -> str:
    header = "# LoRA Studio training config. Every field is documented in lora_trainer/config.py.\n"
    return header + tomli_w.dumps(cfg.to_dict())


def save(cfg: TrainConfig, path: str | Path) -> Path:
    from .fsutil import atomic_write_text

    path = Path(path)
    if path.suffix != ".toml":  # a run folder
        path = path / CONFIG_FILENAME
    validate(cfg)
    atomic_write_text(path, dumps(cfg))
    return path
