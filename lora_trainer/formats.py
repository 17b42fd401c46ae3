"""Save a trained LoRA in the two formats people load.

1. diffusers/peft: `pytorch_lora_weights.safetensors`, what `pipe.load_lora_weights` reads. The
   peft adapter config (rank, alpha, DoRA, rsLoRA, targets) is stored in the file's metadata so
   the scaling survives a reload.
2. kohya (A1111, ComfyUI, Forge): `<name>.safetensors` with `lora_unet_*` / `lora_te_*`
   (SD 1.x) or `lora_te1_*` / `lora_te2_*` (SDXL) modules, `.lora_down/.lora_up/.alpha` tensors
   and `ss_*` / `modelspec.*` metadata. Module names use the diffusers UNet spelling
   (`lora_unet_down_blocks_0_attentions_0_...`), which kohya's own SD 1.x LoRAs use and
   which A1111, ComfyUI and diffusers' kohya loader all map.

diffusers' own `convert_state_dict_to_kohya` writes alpha = rank and `lora_te1_` for SD 1.x;
here alpha is the one that gives the trained scale (alpha * sqrt(rank) for rsLoRA, whose
scale is alpha / sqrt(rank) while kohya's is alpha / rank).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_text

DIFFUSERS_FILENAME = "pytorch_lora_weights.safetensors"
INFO_FILENAME = "lora_info.json"
EMBEDDINGS_SUFFIX = "_emb.safetensors"  # pivotal tuning's textual-inversion file, as diffusers' advanced script names it
BASE_MODEL_VERSION = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}


def kohya_prefixes(kind: str, n_text_encoders: int) -> list[str]:
    if kind == "sdxl":
        return ["lora_te1_", "lora_te2_"][:n_text_encoders]
    return ["lora_te_"]


def to_kohya(peft_state_dicts: dict[str, dict[str, Any]], kind: str, alphas: dict[str, float]) -> dict[str, Any]:
    """peft state dicts {"unet": ..., "text_encoder": ..., "text_encoder_2": ...} -> one kohya state dict.

    `alphas` maps the same keys to the kohya alpha of that model's modules.
    """
    import torch

    prefix = {"unet": "lora_unet_", **dict(zip(("text_encoder", "text_encoder_2"), kohya_prefixes(kind, 2), strict=False))}
    out: dict[str, Any] = {}
    for model, state in peft_state_dicts.items():
        for key, tensor in state.items():
            module, _, leaf = key.rpartition(".lora_")
            name = prefix[model] + module.replace(".", "_")
            if leaf == "A.weight":
                out[f"{name}.lora_down.weight"] = tensor.contiguous()
                out[f"{name}.alpha"] = torch.tensor(float(alphas[model]))
            elif leaf == "B.weight":
                out[f"{name}.lora_up.weight"] = tensor.contiguous()
            elif leaf.startswith("magnitude_vector"):
                out[f"{name}.dora_scale"] = tensor.reshape(-1, 1).contiguous()  # LyCORIS stores (out, 1)
            else:
                raise ValueError(f"unexpected LoRA tensor {key}")
    return out


def with_classic_text_encoder_names(model: str, state: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 dropped CLIPTextModel's `text_model.` level; every LoRA tool still expects it."""
    if model == "unet":
        return state
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}


def kohya_alpha(alpha: float, rank: int, rslora: bool) -> float:
    return alpha * math.sqrt(rank) if rslora else alpha


def kohya_metadata(info: dict[str, Any], tag_frequency: dict[str, int]) -> dict[str, str]:
    """ss_* (kohya / A1111 'additional networks' panel) and modelspec.* (ComfyUI, Stability spec) metadata."""
    kind, res = info["kind"], info["resolution"]
    meta = {
        "ss_network_module": "lycoris.kohya" if info["use_dora"] else "networks.lora",
        "ss_network_dim": str(info["rank"]),
        "ss_network_alpha": str(info["kohya_alpha"]),
        "ss_network_args": json.dumps(
            {"algo": "lora", "dora_wd": "True"} if info["use_dora"] else {"rslora": info["use_rslora"], "peft_alpha": info["alpha"]}
        ),
        "ss_base_model_version": BASE_MODEL_VERSION[kind],
        "ss_sd_model_name": info["base"],
        "ss_v2": "False",
        "ss_resolution": f"({res}, {res})",
        "ss_steps": str(info["steps"]),
        "ss_epoch": str(info.get("epoch", 0)),
        "ss_learning_rate": str(info["learning_rate"]),
        "ss_unet_lr": str(info["learning_rate"]),
        "ss_text_encoder_lr": str(info.get("text_encoder_lr", 0.0)),
        "ss_num_train_images": str(info.get("num_images", 0)),
        "ss_optimizer": info.get("optimizer", ""),
        "ss_mixed_precision": info.get("mixed_precision", "no"),
        "ss_output_name": info["name"],
        "ss_training_comment": f"trigger: {info['trigger']}; trained with LoRA Studio",
        "ss_tag_frequency": json.dumps({"dataset": tag_frequency}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCH[kind],
        "modelspec.implementation": "diffusers",
        "modelspec.title": info["name"],
        "modelspec.trigger_phrase": info["trigger"],
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.prediction_type": "v" if info.get("prediction_type") == "v_prediction" else "epsilon",
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()),
    }
    return meta


def tag_frequency(captions: list[str]) -> dict[str, int]:
    return dict(Counter(tag.strip() for caption in captions for tag in caption.split(",") if tag.strip()))


def embeddings_filename(name: str) -> str:
    """The trigger's learned embedding (pivotal tuning) beside a LoRA named `name` (kohya's `<name>.safetensors`)."""
    return f"{name}{EMBEDDINGS_SUFFIX}"


def embeddings_file(folder: str | Path) -> Path | None:
    """The textual-inversion file in a LoRA folder (final/, a checkpoint), if it has one."""
    found = sorted(Path(folder).glob(f"*{EMBEDDINGS_SUFFIX}"))
    return found[0] if found else None


def save_lora(
    dest: Path,
    *,
    pipeline_class,
    peft_state_dicts: dict[str, dict[str, Any]],
    adapter_configs: dict[str, dict[str, Any]],
    info: dict[str, Any],
    captions: list[str],
    embeddings: dict[str, Any] | None = None,
) -> list[Path]:
    """Write both formats and `lora_info.json` into `dest` (which the caller swaps in atomically); with
    `embeddings` (pivotal tuning's textual-inversion tensors), also `<name>_emb.safetensors`, and the same
    tensors bundled in the kohya file."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    peft_state_dicts = {m: with_classic_text_encoder_names(m, s) for m, s in peft_state_dicts.items()}
    kwargs: dict[str, Any] = {}
    for model, state in peft_state_dicts.items():
        kwargs[f"{model}_lora_layers"] = convert_state_dict_to_diffusers(state)
        kwargs[f"{model}_lora_adapter_metadata"] = adapter_configs[model]
    pipeline_class.save_lora_weights(dest, weight_name=DIFFUSERS_FILENAME, safe_serialization=True, **kwargs)

    alphas = {m: kohya_alpha(info["alpha"], info["rank"], info["use_rslora"]) for m in peft_state_dicts}
    kohya = to_kohya({m: {k: v.detach().to("cpu") for k, v in s.items()} for m, s in peft_state_dicts.items()}, info["kind"], alphas)
    kohya_path = dest / f"{info['name']}.safetensors"
    info = {**info, "kohya_alpha": alphas["unet"]}
    written = [dest / DIFFUSERS_FILENAME, kohya_path, dest / INFO_FILENAME]
    if embeddings:
        from . import pivotal

        kohya.update(pivotal.kohya_bundle(info["kind"], info["trigger"], embeddings))
        emb_path = dest / embeddings_filename(info["name"])
        save_file(embeddings, emb_path, metadata={"trigger": info["trigger"], "vectors": str(len(next(iter(embeddings.values()))))})
        info["embeddings"] = {"file": emb_path.name, "trigger": info["trigger"], "keys": sorted(embeddings)}
        written.append(emb_path)
    save_file(kohya, kohya_path, metadata=kohya_metadata(info, tag_frequency(captions)))
    atomic_write_text(dest / INFO_FILENAME, json.dumps(info, indent=2))
    return written


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a .safetensors file, read by safetensors from the header alone; {} when the
    file is missing or not a readable .safetensors file (callers use it for descriptions, never to decide)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - SafetensorError, OSError: a damaged file simply has no metadata
        return {}
