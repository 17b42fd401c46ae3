"""The memory estimate and the automatic memory plan, against real architectures built from their configs."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from lora_trainer import memory
from lora_trainer.config import TrainConfig
from lora_trainer.memory.arch import from_published, lora_tensors, meta_model
from lora_trainer.memory.estimator import trainable_tensors
from lora_trainer.memory.published import published_config

GiB = 2**30
ROOT = Path(__file__).resolve().parent.parent
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def sd():
    return from_published("sd")


@pytest.fixture(scope="module")
def sdxl():
    return from_published("sdxl")


def config(base: str, resolution: int, **changes) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.base, cfg.data.resolution, cfg.lora.rank, cfg.optim.mixed_precision = base, resolution, 32, "bf16"
    for dotted, value in changes.items():
        cfg.set(dotted.replace("__", "."), value)
    return cfg


# -- parameter counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, component, millions", [
    ("sd", "unet", 859.52), ("sd", "text_encoder", 123.06), ("sd", "vae", 83.65),
    ("sdxl", "unet", 2567.46), ("sdxl", "text_encoder", 123.06), ("sdxl", "text_encoder_2", 694.66), ("sdxl", "vae", 83.65),
])
def test_the_published_architectures_have_their_known_parameter_counts(kind, component, millions, sd, sdxl):
    arch = sd if kind == "sd" else sdxl
    assert round(arch.params(component) / 1e6, 2) == millions


def test_safetensors_headers_count_what_the_configs_build(tmp_path):
    arch = memory.architecture("builtin:tiny-sdxl")
    assert "safetensors headers" in arch.source
    for component in arch.components.values():
        built = meta_model(component.name, component.config)
        assert component.params == sum(p.numel() for p in built.parameters()), component.name
        assert component.file_bytes == 4 * component.params  # the tiny models are saved in fp32


@pytest.mark.parametrize("kind, targets, rank, dora", [
    ("sd", ATTENTION, 32, False), ("sd", ATTENTION + ["ff.net.0.proj", "ff.net.2"], 8, False),
    ("sdxl", ATTENTION, 32, False), ("sdxl", ATTENTION, 4, True), ("sd", ["proj_in", "conv1"], 4, False),
])
def test_lora_parameter_counts_match_what_peft_adds(kind, targets, rank, dora):
    import torch

    from lora_trainer.models import attach_lora, lora_config

    unet = meta_model("unet", published_config(kind, "unet")).requires_grad_(False)
    with torch.device("meta"):
        attach_lora(unet, lora_config(rank, rank, 0.0, targets, use_dora=dora, use_rslora=False), "UNet")
    added = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    arch = from_published(kind)
    assert sum(n for _, n in lora_tensors(arch.components["unet"], targets, rank, use_dora=dora)) == added


def test_sdxl_text_encoder_1_gets_no_lora_on_its_unused_last_layer(sdxl):
    cfg = config("stabilityai/stable-diffusion-xl-base-1.0", 1024, lora__train_text_encoder=True)
    tensors = trainable_tensors(cfg, sdxl)
    per_layer = 4 * 2 * 32 * 768  # q, k, v, out: A and B of 768 x 32 each
    assert sum(n for _, n in tensors["text_encoder"]) == 11 * per_layer
    assert sum(n for _, n in tensors["text_encoder_2"]) == 32 * 4 * 2 * 32 * 1280


@pytest.mark.parametrize("optimizer, tensors, expected", [
    ("adamw", [("A", 10_000), ("B", 10_000)], 160_000),
    ("adamw8bit", [("A", 10_240), ("B", 10_240)], 2 * (2 * 10_240 + 8 * 40)),  # 8-bit moments + a scale per 256
    ("adamw8bit", [("A", 1_000)], 8_000),  # bitsandbytes keeps small tensors in 32 bits
    ("prodigy", [("A", 1_000), ("B", 1_000)], 16_000 + 12_000),  # zero-initialised B: p0 is a scalar
])
def test_optimizer_state_per_optimizer(optimizer, tensors, expected):
    assert memory.optimizer_state_bytes(optimizer, tensors) == expected


# -- the estimate ----------------------------------------------------------------------------------------
def terms(est) -> dict[str, int]:
    return {t.label: t.bytes for t in est.phases["training"]}


def test_the_estimate_prints_every_term_and_the_ram_at_load(sd):
    est = memory.estimate(config("stable-diffusion-v1-5/stable-diffusion-v1-5", 512), sd)
    t = terms(est)
    assert t["UNet weights"] == 2 * sd.params("unet")
    assert t["text encoder weights"] == 0 and t["VAE weights"] == 0  # both cached, so off the GPU
    assert t["LoRA weights"] == t["LoRA gradients"] == 4 * 6_377_472
    assert t["optimizer state"] == 8 * 6_377_472
    assert t["CUDA context"] > 0 and t["activations"] > 0
    text = est.text()
    for label in t:
        assert label in text
    assert "system RAM while loading" in text and "sample renders" in text
    assert est.ram_total > 2 * (sd.params("unet") + sd.params("text_encoder")) + 4 * sd.params("vae")


@pytest.mark.parametrize("change, term, bigger", [
    ({"data__cache_latents": False}, "VAE weights", True),
    ({"data__cache_text_embeddings": False}, "text encoder weights", True),
    ({"optim__gradient_checkpointing": True}, "activations", False),
    ({"optim__batch_size": 2}, "activations", True),
    ({"optim__mixed_precision": "no"}, "activations", True),
    ({"optim__mixed_precision": "no"}, "UNet weights", True),
    ({"optim__optimizer": "adamw8bit"}, "optimizer state", False),
    ({"lora__rank": 64}, "LoRA weights", True),
    ({"data__resolution": 768}, "activations", True),
])
def test_each_setting_moves_its_term(sd, change, term, bigger):
    base = terms(memory.estimate(config("stable-diffusion-v1-5/stable-diffusion-v1-5", 512), sd))[term]
    changed = terms(memory.estimate(config("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, **change), sd))[term]
    assert (changed > base) if bigger else (changed < base)


def test_activations_grow_linearly_with_the_batch(sd):
    one, four = (terms(memory.estimate(config("x/sd", 512, optim__batch_size=b), sd))["activations"] for b in (1, 4))
    assert four == 4 * one


def test_training_on_the_cpu_has_no_cuda_context_and_keeps_the_encoders(sd):
    est = memory.estimate(config("stable-diffusion-v1-5/stable-diffusion-v1-5", 512), sd, device="cpu")
    t = terms(est)
    assert "CUDA context" not in t and t["VAE weights"] == 4 * sd.params("vae")


# -- the plan ----------------------------------------------------------------------------------------------
SD_BATCH4 = ("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, {"optim__batch_size": 4})
SDXL = ("stabilityai/stable-diffusion-xl-base-1.0", 1024, {})


@pytest.mark.parametrize("model, gib, micro, accumulation, optimizer, checkpointing", [
    (SD_BATCH4, 6, 1, 4, "adamw", False),
    (SD_BATCH4, 8, 2, 2, "adamw", False),
    (SD_BATCH4, 12, 4, 1, "adamw", False),
    (SD_BATCH4, 16, 4, 1, "adamw", False),
    (SDXL, 12, 1, 1, "adamw", True),
    (SDXL, 16, 1, 1, "adamw", True),
    (SDXL, 24, 1, 1, "adamw", False),
    (SDXL, 80, 1, 1, "adamw", False),
])
def test_the_plan_picks_the_fastest_settings_that_fit(model, gib, micro, accumulation, optimizer, checkpointing):
    base, resolution, changes = model
    cfg = config(base, resolution, **changes)
    planned, reasons = memory.auto_plan(cfg, gpu_bytes=gib * GiB)
    o = planned.optim
    assert (o.batch_size, o.gradient_accumulation, o.optimizer, o.gradient_checkpointing) == (micro, accumulation, optimizer, checkpointing)
    assert memory.estimate(planned).total <= 0.95 * gib * GiB
    assert planned.data.cache_latents and planned.data.cache_text_embeddings
    assert any("estimated peak" in r for r in reasons)


def test_the_plan_turns_on_what_is_faster_and_smaller_at_once(sd):
    cfg = config("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, data__cache_latents=False, optim__mixed_precision="no",
                 optim__gradient_checkpointing=True)
    planned, reasons = memory.auto_plan(cfg, sd, gpu_bytes=24 * GiB, bf16=False)
    assert planned.data.cache_latents and planned.optim.mixed_precision == "fp16"
    assert not planned.optim.gradient_checkpointing
    assert any("gradient checkpointing off" in r for r in reasons)
    assert cfg.optim.gradient_checkpointing  # the caller's config is left alone


@pytest.mark.parametrize("model, gib, advice", [
    (SDXL, 8, "sampling.every = 0"),
    (SDXL, 6, "Use a GPU with at least"),
    (("stable-diffusion-v1-5/stable-diffusion-v1-5", 1024, {}), 3, "lower data.resolution"),
])
def test_a_plan_that_cannot_fit_is_refused_with_the_change_that_would(model, gib, advice):
    base, resolution, changes = model
    with pytest.raises(memory.MemoryPlanError, match="needs at least") as refused:
        memory.auto_plan(config(base, resolution, **changes), gpu_bytes=gib * GiB)
    assert advice in str(refused.value)


def test_without_a_gpu_the_plan_changes_nothing(monkeypatch, sd):
    monkeypatch.setattr(memory.plan, "detect_gpu", lambda: None)
    cfg = config("stable-diffusion-v1-5/stable-diffusion-v1-5", 512)
    planned, reasons = memory.auto_plan(cfg, sd)
    assert planned == cfg and "no GPU" in reasons[0]


@pytest.mark.parametrize("precision, single_file, expected", [
    ("no", False, "float32"), ("bf16", False, {"default": "bfloat16", "vae": "float32"}),
    ("fp16", False, {"default": "float16", "vae": "float32"}), ("bf16", True, "bfloat16"),
])
def test_frozen_weights_load_directly_in_their_training_dtype(precision, single_file, expected):
    cfg = config("x/sd", 512, optim__mixed_precision=precision)
    got = memory.load_dtype_for(cfg, single_file)
    names = {k: str(v).removeprefix("torch.") for k, v in got.items()} if isinstance(got, dict) else str(got).removeprefix("torch.")
    assert names == expected


# -- the measurement behind the activation term ------------------------------------------------------
@pytest.mark.slow
def test_bench_gpu_tiny_prints_the_table_and_the_estimate_holds_on_a_real_cpu_step():
    """bench/gpu.py --tiny: real training steps of the tiny UNet at 256 px on the CPU, the RSS each adds
    against the estimate (whose activation term is the meta-device simulation), and the RAM at load."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--models", "builtin:tiny-sd", "--steps", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("builtin:tiny-sd ")]
    table, load = rows[:8], rows[8:]
    assert len(table) == 8 and len(load) == 1  # fp32 / bf16 x checkpointing x AdamW / AdamW8bit; one load row
    measured = [line for line in table if "needs CUDA" not in line]
    assert len(measured) == 4 and all(" adamw " in line for line in measured)
    for line in measured:
        seconds = float(line.split("|")[1].split()[0])
        assert math.isfinite(seconds) and seconds > 0
        if " fp32 " in line:  # bf16 autocast on a CPU casts differently from CUDA's, which the estimate follows
            error = int(line.split("|")[4].split()[-1].rstrip("%"))
            assert abs(error) <= 20, line
