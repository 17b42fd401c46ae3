"""The model card (README.md) and loss curve that go with a published LoRA.

Everything here reads a run folder and returns text or bytes; nothing touches the network or writes
files. The card follows the diffusers LoRA convention (the YAML that diffusers' training scripts
write), so the Hub shows the sample gallery, the widget and "Use this model" for it.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from PIL import Image, ImageDraw, ImageFont

from .. import config as config_mod
from ..errors import LoraStudioError
from ..events import EVENTS_FILENAME, read_events, smooth_losses
from ..formats import (
    DIFFUSERS_FILENAME,
    EMBEDDINGS_SUFFIX,
    INFO_FILENAME,
    embeddings_file,
    read_safetensors_metadata,
)
from ..models import guess_kind
from .client import looks_like_repo_id

LOSS_CURVE = "loss.png"
LICENSES = {"sd": "creativeml-openrail-m", "sdxl": "openrail++"}
KIND_TAGS = {"sd": "stable-diffusion", "sdxl": "stable-diffusion-xl"}
# Config fields that change speed or paths, not the LoRA: left out of the card's settings table.
_UNINTERESTING_FIELDS = {
    "data.images", "data.num_workers", "data.cache_latents", "data.cache_text_embeddings",
    "optim.gradient_checkpointing",
}
# What A1111 does to a DoRA LoRA (its magnitude is normalised over the other axis of the weight:
# measured 55 % off on one layer), while ComfyUI applies it closely.
DORA_WARNING = (
    "This LoRA uses DoRA. Do not use it in AUTOMATIC1111 or Forge: they apply DoRA's magnitude along the "
    "wrong axis of the weight (measured 55 % off on one layer), so it will not look as trained. "
    "ComfyUI and diffusers apply it as trained."
)


class RunNotReadyError(LoraStudioError):
    """The run folder has nothing to publish yet."""


@dataclass
class RunSummary:
    """What a published LoRA is made of, read from a run folder."""

    run_dir: Path
    kind: str  # "sd" or "sdxl"
    base: str  # model.base as configured: a Hub id, a local path or builtin:tiny-*
    trigger: str
    name: str
    steps: int | None
    diffusers_file: Path
    kohya_file: Path | None
    config: config_mod.TrainConfig | None
    dora: bool = False
    embeddings_file: Path | None = None  # the trigger's learned embedding (pivotal tuning)
    sample_step: int | None = None
    # (path relative to the run folder, prompt) of the newest sampled step: the card's gallery.
    widget_samples: list[tuple[str, str]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def hub_base_model(self) -> str | None:
        return hub_base_model(self.base, self.run_dir)


def hub_base_model(base: str, run_dir: Path | None = None) -> str | None:
    """The Hub id of a base model, or None when it is builtin, a local folder or a file."""
    if base.startswith("builtin:") or base.endswith((".safetensors", ".ckpt")):
        return None
    if Path(base).expanduser().exists() or (run_dir is not None and (run_dir / base).exists()):
        return None  # user/name-looking, but a local folder
    return base if looks_like_repo_id(base) else None


def _embedding_lines(run: RunSummary, repo_id: str) -> list[str]:
    """The diffusers snippet's lines that load the trigger's learned embedding (pivotal tuning), if it has one."""
    if run.embeddings_file is None:
        return []
    emb = run.embeddings_file.name
    lines = ["from huggingface_hub import hf_hub_download", "from safetensors.torch import load_file", "",
             f'embedding = load_file(hf_hub_download("{repo_id}", "{emb}"))']
    if run.kind == "sdxl":
        return lines + [f'pipe.load_textual_inversion(embedding["clip_l"], token="{run.trigger}", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)',
                        f'pipe.load_textual_inversion(embedding["clip_g"], token="{run.trigger}", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)']
    return lines + [f'pipe.load_textual_inversion(embedding["emb_params"], token="{run.trigger}")']


def read_run(run_dir: str | Path) -> RunSummary:
    """Collect what the card and the upload need; raise RunNotReadyError if there is no final LoRA."""
    run_dir = Path(run_dir)
    final = run_dir / "final"
    if not run_dir.is_dir():
        raise RunNotReadyError(f"There is no run folder at {run_dir}: check the path.")
    if not (final / DIFFUSERS_FILENAME).is_file():
        raise RunNotReadyError(
            f"{run_dir} has no finished LoRA yet ({final / DIFFUSERS_FILENAME} is missing). "
            "Let training run to the end (or resume it), then publish."
        )
    cfg = config_mod.load(run_dir) if (run_dir / config_mod.CONFIG_FILENAME).exists() else None
    info = _read_json(final / INFO_FILENAME)
    kohya = sorted(p for p in final.glob("*.safetensors") if p.name != DIFFUSERS_FILENAME and not p.name.endswith(EMBEDDINGS_SUFFIX))
    metadata = read_safetensors_metadata(kohya[0]) if kohya else {}
    events, _ = read_events(run_dir / EVENTS_FILENAME)

    base = info.get("base") or (cfg.model.base if cfg else "") or "unknown"
    name = info.get("name") or (cfg.output.name if cfg else None) or (kohya[0].stem if kohya else run_dir.name)
    preferred = final / f"{name}.safetensors"
    summary = RunSummary(
        run_dir=run_dir,
        kind=_kind(info, metadata, base),
        base=base,
        trigger=info.get("trigger") or metadata.get("modelspec.trigger_phrase") or (cfg.data.trigger if cfg else ""),
        name=name,
        steps=_steps(info, metadata, events),
        diffusers_file=final / DIFFUSERS_FILENAME,
        kohya_file=preferred if preferred.is_file() else (kohya[0] if kohya else None),
        config=cfg,
        dora=bool(info.get("use_dora", cfg.lora.use_dora if cfg else False)),
        embeddings_file=embeddings_file(final),
        events=events,
    )
    summary.sample_step, summary.widget_samples = _latest_samples(run_dir, events, cfg)
    return summary


def sample_files(run_dir: str | Path) -> list[Path]:
    """Every sample image of the run (all sampled steps), oldest step first."""
    return sorted((Path(run_dir) / "samples").glob("step-*/*.png"))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _kind(info: dict[str, Any], metadata: dict[str, str], base: str) -> str:
    if info.get("kind") in LICENSES:
        return info["kind"]
    if "ss_base_model_version" in metadata:
        return "sdxl" if "xl" in metadata["ss_base_model_version"] else "sd"
    return guess_kind(base)


def _steps(info: dict[str, Any], metadata: dict[str, str], events: list[dict[str, Any]]) -> int | None:
    for value in (info.get("steps"), metadata.get("ss_steps")):
        if value is not None and str(value).isdigit():
            return int(value)
    for event in reversed(events):
        if event["type"] in ("finished", "step") and isinstance(event.get("step"), int):
            return event["step"]
    return None


def _latest_samples(
    run_dir: Path, events: list[dict[str, Any]], cfg: config_mod.TrainConfig | None
) -> tuple[int | None, list[tuple[str, str]]]:
    """Images and prompts of the newest sampled step whose files exist (and are uploaded: see sample_files)."""
    uploaded = {p.relative_to(run_dir).as_posix() for p in sample_files(run_dir)}
    for event in sorted((e for e in events if e["type"] == "sample"), key=lambda e: e.get("step", 0), reverse=True):
        pairs = [
            (Path(image).as_posix(), prompt)
            for image, prompt in zip(event.get("images", []), event.get("prompts", []), strict=False)
            if Path(image).as_posix() in uploaded
        ]
        if pairs:
            return event.get("step"), pairs
    # No events (e.g. a run copied without events.jsonl): take the newest folder, prompts from the config.
    folders = sorted((run_dir / "samples").glob("step-*"))
    if not folders:
        return None, []
    prompts = cfg.sample_prompts() if cfg else []
    images = sorted(folders[-1].glob("*.png"), key=lambda p: (len(p.stem), p.stem))
    pairs = [
        (p.relative_to(run_dir).as_posix(), prompts[int(p.stem)] if p.stem.isdigit() and int(p.stem) < len(prompts) else "")
        for p in images
    ]
    step = folders[-1].name.removeprefix("step-")
    return (int(step) if step.isdigit() else None), pairs


# -- the card -----------------------------------------------------------------------------------
def render_model_card(run_dir: str | Path, repo_id: str) -> str:
    """README.md for `repo_id`: diffusers-style YAML front matter, then usage, settings and loss curve.

    Raises RunNotReadyError when the run has no final LoRA.
    """
    run = read_run(run_dir)
    hub_base = run.hub_base_model
    data = ModelCardData(
        base_model=hub_base,  # None (left out) unless it really is a Hub id
        library_name="diffusers",
        license=LICENSES[run.kind],
        tags=["text-to-image", "diffusers", "lora", "template:sd-lora", KIND_TAGS[run.kind], "lora-studio"],
        instance_prompt=run.trigger or None,
        widget=[{"text": prompt, "output": {"url": path}} for path, prompt in run.widget_samples] or None,
    )
    body = "\n".join(_card_body(run, repo_id, has_loss=bool(_loss_points(run.events))))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def _card_body(run: RunSummary, repo_id: str, *, has_loss: bool) -> list[str]:
    family = "Stable Diffusion XL" if run.kind == "sdxl" else "Stable Diffusion 1.x"
    hub_base = run.hub_base_model
    if hub_base:
        base_text = f"[{hub_base}](https://huggingface.co/{hub_base})"
        pipe_base = hub_base
    elif run.base.startswith("builtin:"):
        what = "toy-world model (32 px drawn scenes)" if run.base == "builtin:toy" else "tiny test model"
        base_text = f"`{run.base}`, LoRA Studio's built-in {what} (it only loads into that model)"
        pipe_base = "<the base model this LoRA was trained on>"
    else:
        # A local folder or file: name it, but do not publish the full local path.
        base_text = f"a local {family} model (`{Path(run.base).name}`), not on the Hub"
        pipe_base = "<the base model this LoRA was trained on>"
    prompt = f"a photo of {run.trigger}" if run.trigger else "a photo"
    lines = [
        f"# {run.name}",
        "",
        f"A {family} LoRA for {base_text}, trained with LoRA Studio.",
        "",
        "## Trigger word",
        "",
        f"Use `{run.trigger}` in your prompt to trigger what this LoRA learned." if run.trigger else "This LoRA has no trigger word.",
        "",
        "## Use it with diffusers",
        "",
        "```python",
        "import torch",
        "from diffusers import AutoPipelineForText2Image",
        "",
        f'pipe = AutoPipelineForText2Image.from_pretrained("{pipe_base}", torch_dtype=torch.float16).to("cuda")',
        f'pipe.load_lora_weights("{repo_id}", weight_name="{DIFFUSERS_FILENAME}")',
        *_embedding_lines(run, repo_id),
        f'image = pipe("{prompt}").images[0]',
        "```",
        "",
    ]
    if run.kohya_file is not None:
        kohya = run.kohya_file.name
        if run.dora:
            lines += [
                "## Use it in ComfyUI (not AUTOMATIC1111 or Forge)",
                "",
                f"> **{DORA_WARNING}**",
                "",
                f"Download [`{kohya}`](./{kohya}) (kohya/LyCORIS format) into `models/loras` and load it with a "
                f"LoraLoader node. `{DIFFUSERS_FILENAME}` is the same LoRA in the diffusers/peft layout.",
                "",
            ]
        else:
            lines += [
                "## Use it in AUTOMATIC1111, Forge or ComfyUI",
                "",
                f"Download [`{kohya}`](./{kohya}) (kohya format) into `models/Lora` (A1111, Forge) or "
                f"`models/loras` (ComfyUI), then write `<lora:{Path(kohya).stem}:1>` in the prompt (A1111, Forge) "
                "or load it with a LoraLoader node (ComfyUI). "
                f"`{DIFFUSERS_FILENAME}` is the same LoRA in the diffusers/peft layout.",
                "",
            ]
            if run.embeddings_file is not None:
                emb = run.embeddings_file.name
                lines += [
                    f"`{run.trigger}` has its own learned embedding (pivotal tuning). AUTOMATIC1111 and Forge load it from "
                    f"the kohya file itself (it is bundled there). In ComfyUI, also put [`{emb}`](./{emb}) into "
                    f"`models/embeddings` and write `embedding:{Path(emb).stem}` where the prompt says `{run.trigger}`.",
                    "",
                ]
    if run.widget_samples:
        lines += [f"## Samples (step {run.sample_step})", ""]
        lines += [f"![{_md(p)}](./{path})" for path, p in run.widget_samples] + [""]
    lines += ["## Training settings", "", "| Setting | Value |", "|---|---|"]
    lines += [f"| {_md(k)} | {_md(v)} |" for k, v in _settings_rows(run)]
    lines += ["", "The complete configuration is in [`config.toml`](./config.toml).", ""]
    if has_loss:
        lines += ["## Training loss", "", f"![Training loss]({LOSS_CURVE})", ""]
    from ..eval_report import evaluation_markdown

    evaluation = evaluation_markdown(run.run_dir, published="final")
    if evaluation:
        lines += [evaluation, ""]
    return lines


def _settings_rows(run: RunSummary) -> list[tuple[str, str]]:
    rows = [("base model", run.base if not Path(run.base).is_absolute() else Path(run.base).name)]
    rows.append(("steps trained", str(run.steps) if run.steps is not None else "unknown"))
    if run.config is None:
        return rows
    cfg = run.config.to_dict()
    for section in ("data", "lora", "optim"):
        for name, value in cfg[section].items():
            dotted = f"{section}.{name}"
            if dotted in _UNINTERESTING_FIELDS or (name == "custom_targets" and not value):
                continue
            rows.append((dotted, _format_value(value)))
    return rows


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "(none)"
    return str(value) if value != "" else "(empty)"


def _md(text: str) -> str:
    """Text safe inside a markdown table cell or image alt text."""
    return str(text).replace("|", "\\|").replace("\n", " ").replace("[", "(").replace("]", ")")


# -- the loss curve -------------------------------------------------------------------------------
def _loss_points(events: Iterable[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) of the 'step' events; a resumed run re-trains some steps, the newest value wins."""
    by_step: dict[int, float] = {}
    for event in events:
        if event.get("type") == "step" and isinstance(event.get("step"), int):
            loss = event.get("loss")
            if isinstance(loss, int | float) and math.isfinite(loss):
                by_step[event["step"]] = float(loss)
    return sorted(by_step.items())


def loss_curve_png(events: Iterable[dict[str, Any]], width: int = 640, height: int = 320) -> bytes:
    """A PNG line chart of the raw (light) and smoothed (dark) training loss, drawn with PIL."""
    points = _loss_points(events)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=11)
    left, right, top, bottom = 56, width - 14, 26, height - 30
    draw.text((left, 6), "training loss", fill=(30, 30, 30), font=font)
    if not points:
        draw.text((left, height // 2), "no loss recorded yet", fill=(120, 120, 120), font=font)
        return _png(img)

    steps = [s for s, _ in points]
    raw = [v for _, v in points]
    smooth = smooth_losses(raw)
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)
    # Clip the top at the 99th percentile so one spike does not flatten the whole curve.
    lo, hi = min(raw), sorted(raw)[min(len(raw) - 1, int(0.99 * len(raw)))]
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def xy(step: int, value: float) -> tuple[float, float]:
        value = min(max(value, lo), hi)
        return (left + (step - s0) / (s1 - s0) * (right - left), bottom - (value - lo) / (hi - lo) * (bottom - top))

    for i in range(5):  # horizontal grid with loss labels
        value = lo + (hi - lo) * i / 4
        y = xy(s0, value)[1]
        draw.line([(left, y), (right, y)], fill=(232, 232, 232))
        draw.text((left - 6, y), f"{value:.3g}", fill=(90, 90, 90), font=font, anchor="rm")
    labels: dict[int, str] = {}  # step labels under the x axis; the first anchor of a step wins
    for step, anchor in ((s0, "lt"), (steps[-1], "rt"), ((s0 + steps[-1]) // 2, "mt")):
        labels.setdefault(step, anchor)
    for step, anchor in labels.items():
        draw.text((xy(step, lo)[0], bottom + 6), str(step), fill=(90, 90, 90), font=font, anchor=anchor)
    draw.text(((left + right) / 2, height - 4), "step", fill=(90, 90, 90), font=font, anchor="mb")
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))

    stride = max(1, len(points) // (2 * width))  # a few points per pixel column is plenty
    if len(points) > 1:
        draw.line([xy(s, v) for s, v in points[::stride]], fill=(160, 190, 235), width=1)
        draw.line([xy(s, v) for s, v in zip(steps[::stride], smooth[::stride], strict=True)], fill=(25, 70, 170), width=2)
    else:
        x, y = xy(steps[0], raw[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(25, 70, 170))
    draw.text((right - 130, 6), "raw", fill=(120, 160, 225), font=font)
    draw.text((right - 90, 6), "smoothed", fill=(25, 70, 170), font=font)
    return _png(img)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
