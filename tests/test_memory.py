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
    ram = {t.label: t.bytes for t in est.ram}  # fp32 files, bf16 training: the fp32 VAE is used in place
    assert ram["weights converted while loading"] == 2 * (sd.params("unet") + sd.params("text_encoder"))


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


@pytest.mark.parametrize("change, factor", [
    ({"optim__preservation_weight": 1.0}, 2),  # the untriggered captions in the same UNet call
    ({"data__reg_images": "reg"}, 2),  # as many regularization images as training images
    ({"data__reg_images": "reg", "optim__prior_loss_weight": 0.0}, 1),
    ({"data__reg_images": "reg", "optim__preservation_weight": 1.0}, 4),
])
def test_preservation_and_regularization_images_grow_the_unets_batch(sd, change, factor):
    plain, changed = (terms(memory.estimate(config("x/sd", 512, **c), sd))["activations"] for c in ({}, change))
    assert changed == factor * plain


def test_training_on_the_cpu_has_no_cuda_context_and_keeps_the_encoders(sd):
    est = memory.estimate(config("stable-diffusion-v1-5/stable-diffusion-v1-5", 512), sd, device="cpu")
    t = terms(est)
    assert "CUDA context" not in t and t["VAE weights"] == 4 * sd.params("vae")


# -- the plan ----------------------------------------------------------------------------------------------
SD_BATCH4 = ("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, {"optim__batch_size": 4})
SDXL = ("stabilityai/stable-diffusion-xl-base-1.0", 1024, {})


@pytest.mark.parametrize("model, gib, micro, accumulation, optimizer, checkpointing", [
    (SD_BATCH4, 4, 1, 4, "adamw", False),  # 4 images per step, one at a time
    (SD_BATCH4, 6, 2, 2, "adamw", False),
    (SD_BATCH4, 8, 4, 1, "adamw", False),
    (SD_BATCH4, 12, 4, 1, "adamw", False),
    (SD_BATCH4, 16, 4, 1, "adamw", False),
    (SD_BATCH4, 24, 4, 1, "adamw", False),
    (SD_BATCH4, 80, 4, 1, "adamw", False),
    (SDXL, 12, 1, 1, "adamw", True),  # without checkpointing the step needs about 14 GiB
    (SDXL, 16, 1, 1, "adamw", False),
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
    # The step fits; caching latents (everything loaded, fp32 VAE encode at 1024 px) and renders do not.
    (SDXL, 8, "To fit: lower data.resolution to 256"),
    (SDXL, 6, "Use a GPU with at least 11 GB"),
    (("stable-diffusion-v1-5/stable-diffusion-v1-5", 2048, {"sampling__every": 0}), 6, "To fit: lower data.resolution to 1024"),
    (SD_BATCH4, 2, "Use a GPU with at least 4 GB"),  # the UNet and the CUDA context alone need 2.1 GiB
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


def test_the_shipped_simulations_are_current_and_are_what_the_simulation_computes(sd):
    """The plans' simulations ship with the package (bench/memory_table.py writes them): a stale table would
    quietly cost every plan its simulations again, a wrong one would misplan."""
    import json

    from lora_trainer.memory import simulate

    table = json.loads(simulate.TABLE.read_text())
    assert table["versions"] == simulate._versions(), "made with other versions: run python bench/memory_table.py"
    assert len(table["results"]) >= 30
    args = ("vae", json.dumps(sd.components["vae"].config, sort_keys=True), 1, 512, 512, "fp32", "encode", False)
    key = simulate.cache_key("_inference", args)  # caching latents at 512 px: every SD 1.5 plan needs it
    assert key in table["results"] and key in simulate.shipped()  # shipped() serves it unless told to simulate afresh
    assert table["results"][key] == simulate._inference.__wrapped__(*args) > 0


@pytest.mark.parametrize("base, precision, variant, expected", [
    ("stabilityai/stable-diffusion-xl-base-1.0", "bf16", "", "fp16"),  # published with fp16 files
    ("stabilityai/stable-diffusion-xl-base-1.0", "no", "", ""),  # fp32 training reads the fp32 files
    ("stabilityai/stable-diffusion-xl-base-1.0", "bf16", "custom", "custom"),  # the user's choice stands
    ("builtin:tiny-sd", "bf16", "", ""),
    ("someone/not-downloaded", "fp16", "", ""),  # unknown offline: the default files
])
def test_half_precision_loads_the_fp16_files_where_the_model_has_them(base, precision, variant, expected):
    cfg = config(base, 512, optim__mixed_precision=precision, model__variant=variant)
    assert memory.load_variant_for(cfg) == expected


def test_ram_at_load_counts_what_is_converted_and_not_what_is_mapped_from_its_file(sdxl):
    cfg = config("stabilityai/stable-diffusion-xl-base-1.0", 1024, optim__mixed_precision="fp16")
    same = {t.label: t.bytes for t in memory.estimate(cfg, from_published("sdxl", variant="fp16")).ram}
    converted = {t.label: t.bytes for t in memory.estimate(cfg, from_published("sdxl")).ram}  # fp32 files
    # fp16 files for fp16 weights: used in place (page cache); only the VAE (fp16 file, fp32 weights) converts.
    assert same["weights converted while loading"] == 4 * sdxl.params("vae")
    assert same["a weights file being converted"] == 2 * sdxl.params("vae")
    assert converted["weights converted while loading"] == 2 * (sdxl.params("unet") + sum(t.params for t in sdxl.text_encoders))
    assert converted["a weights file being converted"] == 4 * sdxl.params("unet")
    cfg.optim.mixed_precision = "bf16"  # fp16 files, bf16 weights: same size, still a conversion
    bf16 = {t.label: t.bytes for t in memory.estimate(cfg, from_published("sdxl", variant="fp16")).ram}
    assert bf16["a weights file being converted"] == 2 * sdxl.params("unet")


def test_a_single_checkpoint_file_is_sized_from_its_header(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file({
        "model.diffusion_model.a.weight": np.zeros((100, 10), np.float16),
        "first_stage_model.b.weight": np.zeros((7,), np.float16),
        "conditioner.embedders.0.c.weight": np.zeros((5, 4), np.float16),
        "conditioner.embedders.1.d.weight": np.zeros((3, 3), np.float16),  # SDXL's second text encoder
    }, str(path))
    arch = memory.architecture(str(path))
    assert arch.kind == "sdxl"
    assert [arch.params(n) for n in ("unet", "vae", "text_encoder", "text_encoder_2")] == [1000, 7, 20, 9]
    assert arch.components["unet"].file_dtype == "F16"
    # Layer shapes: the published SDXL UNet (70 transformer blocks, two attentions each, A and B per projection).
    assert len(lora_tensors(arch.components["unet"], ATTENTION, 4)) == 70 * 2 * 4 * 2


# -- the plan at train start (optim.memory) ------------------------------------------------------------
def test_at_train_start_the_plan_applies_on_a_gpu_and_says_why(sdxl):
    cfg = config("stabilityai/stable-diffusion-xl-base-1.0", 1024, data__cache_latents=False)
    planned, notes = memory.plan_for_training(cfg, (12 * GiB, True), base=sdxl)
    assert planned.optim.gradient_checkpointing and planned.data.cache_latents
    assert any("gradient checkpointing on" in n for n in notes) and any("latent caching on" in n for n in notes)
    assert not cfg.optim.gradient_checkpointing  # the caller's config is left alone


@pytest.mark.parametrize("memory_field, gpu, note", [
    ("auto", None, "no GPU: the memory plan (optim.memory = auto) applies on a GPU; training with the settings as given"),
    ("off", (12 * GiB, True), "optim.memory = off: training with the settings as given"),
])
def test_on_a_cpu_or_with_memory_off_the_plan_changes_nothing_and_says_so(sdxl, memory_field, gpu, note):
    cfg = config("stabilityai/stable-diffusion-xl-base-1.0", 1024, optim__memory=memory_field, data__cache_latents=False)
    planned, notes = memory.plan_for_training(cfg, gpu, base=sdxl)
    assert planned == cfg and notes == [note]


def test_a_resumed_run_keeps_the_optimizer_its_checkpoints_were_trained_with(sd):
    cfg = config("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, optim__batch_size=4)
    fresh, _ = memory.plan_for_training(cfg, (4 * GiB, True), base=sd)
    assert fresh.optim.optimizer == "adamw"
    resumed, notes = memory.plan_for_training(cfg, (4 * GiB, True), base=sd, resumed_optimizer="adamw8bit")
    assert resumed.optim.optimizer == "adamw8bit" and "the checkpoints were trained with it" in notes[0]


def test_the_run_is_refused_before_loading_when_it_cannot_fit(sdxl):
    with pytest.raises(memory.MemoryPlanError, match="To fit: lower data.resolution to 256"):
        memory.plan_for_training(config("stabilityai/stable-diffusion-xl-base-1.0", 1024), (8 * GiB, True), base=sdxl)


def _checkpoint(run, optimizer: str) -> None:
    import json

    from lora_trainer.checkpoints import RESUME_FILES, resume_settings, write_manifest

    folder = run / "checkpoints" / "step-000002"
    for name in RESUME_FILES[:-1]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"state")
    settings = resume_settings(config("builtin:tiny-sd", 64, optim__optimizer=optimizer))
    (folder / RESUME_FILES[-1]).write_text(json.dumps({"step": 2, "settings": settings}))
    write_manifest(folder)


@pytest.mark.parametrize("memory_field, resumes", [("auto", True), ("off", False)])
def test_a_run_the_plan_gave_8bit_adamw_resumes_with_it(tmp_path, memory_field, resumes):
    from lora_trainer.checkpoints import check_resumable
    from lora_trainer.errors import ConfigError
    from lora_trainer.memory.plan import checkpoint_optimizer

    _checkpoint(tmp_path, "adamw8bit")
    assert checkpoint_optimizer(tmp_path) == "adamw8bit"
    cfg = config("builtin:tiny-sd", 64, optim__optimizer="adamw", optim__memory=memory_field)
    if resumes:
        assert check_resumable(tmp_path, cfg).name == "step-000002"
    else:
        with pytest.raises(ConfigError, match="optim.optimizer was 'adamw8bit', now 'adamw'"):
            check_resumable(tmp_path, cfg)


@pytest.mark.parametrize("precision, unet, text_encoder, vae", [
    ("no", "float32", "float32", "float32"),
    ("bf16", "bfloat16", "bfloat16", "float32"),  # the VAE stays fp32: in half precision it overflows
])
def test_the_pipeline_loads_in_its_training_dtype(precision, unet, text_encoder, vae):
    from lora_trainer import models

    cfg = config("builtin:tiny-sd", 64, optim__mixed_precision=precision)
    pipe = models.load_pipeline(models.resolve("builtin:tiny-sd"), memory.load_dtype_for(cfg), variant=memory.load_variant_for(cfg))
    dtypes = {name: {str(p.dtype).removeprefix("torch.") for p in getattr(pipe, name).parameters()}
              for name in ("unet", "text_encoder", "vae")}
    assert dtypes == {"unet": {unet}, "text_encoder": {text_encoder}, "vae": {vae}}


def test_training_loads_in_the_training_dtype_and_records_the_memory_plan(tmp_path, monkeypatch):
    import json

    import torch
    from accelerate.state import AcceleratorState
    from conftest import make_images, tiny_config

    from lora_trainer import config as config_mod
    from lora_trainer import models
    from lora_trainer.train import train

    loaded = []
    real_load = models.load_pipeline

    def spy(base, dtype=None, **kwargs):
        pipe = real_load(base, dtype, **kwargs)
        loaded.append((dtype, pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype))  # as loaded, before any cast
        return pipe

    monkeypatch.setattr(models, "load_pipeline", spy)
    cfg = tiny_config(make_images(tmp_path / "images"), optim__steps=1, optim__mixed_precision="bf16")
    config_mod.save(cfg, tmp_path / "run")
    try:
        train(tmp_path / "run", cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert loaded == [({"default": torch.bfloat16, "vae": torch.float32}, torch.bfloat16, torch.bfloat16, torch.float32)]
    info = json.loads((tmp_path / "run" / "final" / "lora_info.json").read_text())
    assert info["memory_plan"] == ["no GPU: the memory plan (optim.memory = auto) applies on a GPU; training with the "
                                   "settings as given"]


def test_pivotal_tuning_keeps_the_text_encoders_on_the_gpu(sd):
    cached = terms(memory.estimate(config("stable-diffusion-v1-5/stable-diffusion-v1-5", 512), sd))
    pivotal = terms(memory.estimate(config("stable-diffusion-v1-5/stable-diffusion-v1-5", 512, lora__trigger_vectors=1), sd))
    assert cached["text encoder weights"] == 0 and pivotal["text encoder weights"] == 2 * sd.params("text_encoder")


# -- pivotal tuning and EMA ------------------------------------------------------------------------------
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL_ID = "stabilityai/stable-diffusion-xl-base-1.0"


@pytest.mark.parametrize("kind, vectors, optimizer, rows_bytes", [
    ("sd", 1, "adamw", 768 * (4 + 4 + 8)),  # fp32 weights + fp32 gradients + AdamW's two fp32 moments
    ("sd", 2, "adamw8bit", 2 * 768 * (4 + 4 + 8)),  # under 4096 values: bitsandbytes keeps 32-bit state
    ("sdxl", 1, "adamw", (768 + 1280) * (4 + 4 + 8)),  # a row in each text encoder
    ("sdxl", 4, "adamw8bit", 4 * 768 * 16 + 4 * 1280 * (4 + 4 + 2) + 8 * (4 * 1280 // 256)),  # 5120 values: 8-bit
    ("sdxl", 2, "prodigy", 2 * (768 + 1280) * (4 + 4 + 16)),
])
def test_pivotal_tuning_adds_the_trigger_rows_and_the_text_encoders_activations(kind, vectors, optimizer, rows_bytes, sd, sdxl):
    arch, base, res = (sd, SD15, 512) if kind == "sd" else (sdxl, SDXL_ID, 1024)
    plain = config(base, res, optim__optimizer=optimizer, data__cache_text_embeddings=False, data__trigger="ohwx")
    pivotal = config(base, res, optim__optimizer=optimizer, data__cache_text_embeddings=False, data__trigger="ohwx",
                     lora__trigger_vectors=vectors)
    before, after = memory.estimate(plain, arch), memory.estimate(pivotal, arch)
    t = terms(after)
    assert t["trigger embeddings"] == rows_bytes
    assert t["text encoder activations"] > 0
    # Nothing else moves but the slack over the new activations.
    assert after.total - before.total == rows_bytes + t["text encoder activations"] + int(0.1 * (terms(before)["activations"]
                                                   + t["text encoder activations"])) - int(0.1 * terms(before)["activations"])
    assert "trigger embeddings" in after.text() and "text encoder activations" in after.text()


def test_pivotal_activations_grow_with_the_captions_and_are_the_text_lora_term_when_that_trains(sd):
    one, four = (terms(memory.estimate(config(SD15, 512, data__trigger="ohwx", lora__trigger_vectors=1, optim__batch_size=b), sd))
                 for b in (1, 4))
    assert four["text encoder activations"] == 4 * one["text encoder activations"]
    with_lora = terms(memory.estimate(config(SD15, 512, data__trigger="ohwx", lora__trigger_vectors=1,
                                             lora__train_text_encoder=True), sd))
    assert "text encoder activations" not in with_lora and with_lora["trigger embeddings"] == one["trigger embeddings"]


@pytest.mark.parametrize("model, component", [("builtin:tiny-sd", "text_encoder"), ("builtin:tiny-sdxl", "text_encoder_2")])
def test_the_pivotal_simulation_keeps_what_autograd_saves_on_a_real_text_encoder(model, component):
    """The meta-device count against the tensors autograd really saves (weights excluded) on the CPU, in fp32."""
    import torch

    from lora_trainer.memory.simulate import pivotal_text_encoder_bytes
    from lora_trainer.pivotal import LearnedTokens

    cfg = memory.architecture(model).components[component].config
    encoder = meta_model(component, cfg, device="cpu").requires_grad_(False)
    frozen = encoder.get_input_embeddings()
    encoder.set_input_embeddings(LearnedTokens(frozen, frozen.num_embeddings - 2, torch.randn(2, frozen.weight.shape[1])))
    saved = {}

    def keep(t):
        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = encoder(torch.randint(0, frozen.num_embeddings, (1, cfg["max_position_embeddings"])), output_hidden_states=True)
    for tensor in [out[0], out[1], *out.hidden_states]:
        keep(tensor)
    weights = {p.untyped_storage()._cdata for p in encoder.parameters()} | {b.untyped_storage()._cdata for b in encoder.buffers()}
    measured = sum(n for key, n in saved.items() if key not in weights)
    assert out[0].requires_grad and measured > 0
    assert pivotal_text_encoder_bytes(component, cfg, 2, 1, "fp32") == measured


def _ema_kept(kind: str, targets: list[str], rank: int, dora: bool, monkeypatch) -> int:
    """The elements ema.LoraEma averages of a real (meta-device) UNet with peft's LoRA attached."""
    import torch

    from lora_trainer.ema import LoraEma
    from lora_trainer.models import attach_lora, lora_config

    unet = meta_model("unet", published_config(kind, "unet")).requires_grad_(False)
    with torch.device("meta"):
        attach_lora(unet, lora_config(rank, rank, 0.0, targets, use_dora=dora, use_rslora=False), "UNet")
    monkeypatch.setattr(LoraEma, "restart", lambda self: None)  # its CPU copy of meta tensors cannot be made
    return sum(p.numel() for p in LoraEma({"unet": unet}, 0.999).params.values())


@pytest.mark.parametrize("kind, rank, dora", [("sd", 32, False), ("sd", 4, True), ("sdxl", 16, False)])
def test_ema_keeps_an_fp32_copy_of_the_lora_weights_in_system_ram(kind, rank, dora, monkeypatch, sd, sdxl):
    arch, base, res = (sd, SD15, 512) if kind == "sd" else (sdxl, SDXL_ID, 1024)
    cfg = config(base, res, lora__rank=rank, lora__use_dora=dora, optim__ema_decay=0.999)
    est = memory.estimate(cfg, arch)
    ram = {t.label: t.bytes for t in est.ram_training}
    kept = 4 * _ema_kept(kind, ATTENTION, rank, dora, monkeypatch)
    assert ram["EMA average"] == ram["EMA swap copy"] == kept
    assert est.total == memory.estimate(config(base, res, lora__rank=rank, lora__use_dora=dora), arch).total  # not on the GPU
    assert "system RAM while training" in est.text() and "EMA average" in est.text()


def test_on_a_cpu_the_ema_is_part_of_the_training_memory(sd):
    cfg = config(SD15, 512, optim__ema_decay=0.99)
    est = memory.estimate(cfg, sd, device="cpu")
    without = memory.estimate(config(SD15, 512), sd, device="cpu")
    lora = terms(est)["LoRA weights"]
    assert est.phase_total("training") - without.phase_total("training") == lora
    assert est.phase_total("sample renders") - without.phase_total("sample renders") == 2 * lora
    assert est.ram_training == []


@pytest.mark.parametrize("changes, parked", [
    ({}, {"VAE (off the GPU)": 4 * 83_653_863, "text encoders (off the GPU)": 2 * 123_060_480}),
    ({"data__cache_latents": False}, {"text encoders (off the GPU)": 2 * 123_060_480}),
    ({"data__cache_text_embeddings": False, "data__cache_latents": False}, {}),
])
def test_system_ram_while_training_holds_what_the_caches_moved_off_the_gpu(sd, changes, parked):
    ram = {t.label: t.bytes for t in memory.estimate(config(SD15, 512, **changes), sd).ram_training}
    assert {k: v for k, v in ram.items() if "off the GPU" in k} == parked
