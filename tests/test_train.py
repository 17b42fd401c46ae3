"""Training on the built-in tiny models: it learns, it saves both formats, they reload exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_images, tiny_config
from PIL import Image
from safetensors import safe_open

from lora_trainer import config as config_mod
from lora_trainer.events import read_events
from lora_trainer.formats import DIFFUSERS_FILENAME, read_safetensors_metadata
from lora_trainer.inference import Generator, LoraSpec
from lora_trainer.train import TrainingFailed, train

PROMPT = "ohwx, stripes number 1"


def run_training(tmp_path: Path, name: str = "run", images: Path | None = None, **overrides) -> Path:
    images = images or make_images(tmp_path / "images")
    run = tmp_path / name
    cfg = tiny_config(images, **overrides)
    config_mod.save(cfg, run)
    try:
        train(run, cfg)
    finally:  # accelerate keeps one state per process: the next run may train with other precision settings
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    return run


def events_of(run: Path, kind: str) -> list[dict]:
    return [e for e in read_events(run / "events.jsonl")[0] if e["type"] == kind]


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def final_sample(run: Path) -> np.ndarray:
    """The image the trainer rendered at the last step with the LoRA still in memory."""
    last = events_of(run, "sample")[-1]
    return pixels(Image.open(run / last["images"][0]))


def reload_image(run: Path, file: str, base: str = "builtin:tiny-sd", strength: float = 1.0) -> np.ndarray:
    cfg = config_mod.load(run)
    image = Generator(base).generate(
        cfg.sample_prompts()[0], [LoraSpec(str(run / "final" / file), strength)],
        seed=cfg.sampling.seed, steps=cfg.sampling.steps, guidance=cfg.sampling.guidance, size=cfg.data.resolution,
    )
    return pixels(image)


def fixed_denoising_loss(run: Path | None, images: Path) -> float:
    """The denoising loss on the training images at fixed noise and timesteps (with the run's LoRA, or none)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from lora_trainer import dataset as ds
    from lora_trainer.tiny import tiny_model_path

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_path("builtin:tiny-sd"))
    if run is not None:
        pipe.load_lora_weights(str(run / "final"), weight_name=DIFFUSERS_FILENAME)
    items = ds.scan(images, "ohwx")
    ds.assign_buckets(items, 64, 16, enabled=False)
    generator = torch.Generator().manual_seed(0)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the training-time forward process
    losses = []
    with torch.no_grad():
        for item in items:
            latents = pipe.vae.encode(ds.load_pixels(item, False)[0][None]).latent_dist.mode() * pipe.vae.config.scaling_factor
            ids = pipe.tokenizer([item.caption], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
            embeds = pipe.text_encoder(ids)[0]
            for t in (100, 300, 500, 700, 900):
                noise = torch.randn(latents.shape, generator=generator)
                timesteps = torch.tensor([t])
                noisy = scheduler.add_noise(latents, noise, timesteps)
                pred = pipe.unet(noisy, timesteps, embeds).sample
                losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return float(np.mean(losses))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One SD run shared by the tests below: 4 images overfitted for 100 steps, alpha != rank."""
    tmp = tmp_path_factory.mktemp("sd")
    return run_training(
        tmp, images=make_images(tmp / "images"), optim__steps=100, optim__learning_rate=2e-3, lora__rank=4,
        lora__alpha=8.0, lora__targets="attention+ff", sampling__every=50, output__save_every=25,
    )


def test_loss_falls_when_overfitting_four_images(trained):
    images = Path(config_mod.load(trained).data.images)
    before, after = fixed_denoising_loss(None, images), fixed_denoising_loss(trained, images)
    assert after < 0.85 * before, (before, after)


def test_run_folder_has_events_samples_checkpoints_and_both_formats(trained):
    kinds = [e["type"] for e in read_events(trained / "events.jsonl")[0]]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    steps = events_of(trained, "step")
    assert [e["step"] for e in steps] == list(range(1, 101))
    assert all({"loss", "lr", "sec_per_step", "eta_seconds", "memory"} <= e.keys() for e in steps)
    last = steps[-1]  # after the last step only the end's sample render is still to come (timing.sample_renders_left)
    assert last["eta_parts"]["training"] == 0 and abs(last["eta_seconds"] - sum(last["eta_parts"].values())) <= 0.15
    assert last["eta_seconds"] <= steps[-2]["eta_seconds"]
    assert [e["step"] for e in events_of(trained, "sample")] == [0, 50, 100]
    assert [e["step"] for e in events_of(trained, "checkpoint")] == [25, 50, 75, 100]
    for ckpt in ("step-000025", "step-000050", "step-000075", "step-000100"):
        assert (trained / "checkpoints" / ckpt / "state" / "optimizer.pt").exists()
    assert sorted(p.name for p in (trained / "final").iterdir()) == ["lora_info.json", "my-lora.safetensors", DIFFUSERS_FILENAME]
    card = (trained / "README.md").read_text()
    assert "samples/step-000100/0.png" in card and "step-000000" not in card  # the card shows the final samples


def test_the_lora_changes_pixels_and_strength_zero_restores_the_base(trained):
    cfg = config_mod.load(trained)
    base = pixels(Image.open(trained / events_of(trained, "sample")[0]["images"][0]))  # step 0: the base model
    assert np.abs(final_sample(trained) - base).mean() > 1.0
    assert np.array_equal(reload_image(trained, DIFFUSERS_FILENAME, strength=0.0), base)
    assert cfg.sampling.seed == 1234


@pytest.mark.parametrize("file", [DIFFUSERS_FILENAME, "my-lora.safetensors"])
def test_saved_files_reproduce_the_in_memory_lora(trained, file):
    assert np.abs(reload_image(trained, file) - final_sample(trained)).max() <= 1


def test_kohya_file_has_true_alpha_names_and_metadata(trained):
    with safe_open(str(trained / "final" / "my-lora.safetensors"), "pt") as f:
        keys = list(f.keys())
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert alphas == {8.0}  # the configured alpha, not the rank
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith("_attn1_to_q.lora_down.weight") for k in keys)
    meta = read_safetensors_metadata(trained / "final" / "my-lora.safetensors")
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.trigger_phrase"] == "ohwx"
    assert meta["ss_steps"] == "100" and meta["modelspec.resolution"] == "64x64"
    assert json.loads(meta["ss_tag_frequency"])["dataset"]["ohwx"] == 4


@pytest.mark.parametrize(
    "variant",
    [
        {"lora__use_rslora": True, "lora__rank": 4, "lora__alpha": 2.0},
        {"lora__use_dora": True},
        {"lora__train_text_encoder": True, "lora__text_encoder_lr": 5e-4, "lora__targets": "attention+ff"},
        {"lora__dropout": 0.5, "lora__train_text_encoder": True},
        {"lora__targets": "attention+ff+conv"},
        {"lora__targets": "image-side"},
    ],
    ids=["rslora", "dora", "text-encoder+ff", "dropout", "locon", "image-side"],
)
def test_variants_reload_exactly_in_both_formats(tmp_path, variant):
    run = run_training(tmp_path, sampling__every=10, **variant)
    # diffusers' kohya loader drops DoRA's dora_scale (it says so); ComfyUI reads it, so check its layout instead.
    files = [DIFFUSERS_FILENAME] if variant.get("lora__use_dora") else [DIFFUSERS_FILENAME, "my-lora.safetensors"]
    for file in files:
        assert np.abs(reload_image(run, file) - final_sample(run)).max() <= 1, file
    if variant.get("lora__use_dora"):
        with safe_open(str(run / "final" / "my-lora.safetensors"), "pt") as f:
            key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
            down, scale = f.get_tensor(f"{key}.lora_down.weight"), f.get_tensor(f"{key}.dora_scale")
            out_features = f.get_tensor(f"{key}.lora_up.weight").shape[0]
        assert scale.shape == (out_features, 1) and down.shape[0] == 4
    meta = json.loads((run / "final" / "lora_info.json").read_text())
    assert meta["use_rslora"] == variant.get("lora__use_rslora", False)
    if variant.get("lora__train_text_encoder"):
        with safe_open(str(run / "final" / "my-lora.safetensors"), "pt") as f:
            assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in f.keys())
            assert not any(k.startswith("lora_te1_") for k in f.keys())
    if variant.get("lora__targets") == "attention+ff+conv":  # LoCon: a 3x3 down, a 1x1 up, as kohya stores them
        with safe_open(str(run / "final" / "my-lora.safetensors"), "pt") as f:
            key = "lora_unet_down_blocks_0_resnets_0_conv1"
            down, up = f.get_tensor(f"{key}.lora_down.weight"), f.get_tensor(f"{key}.lora_up.weight")
        assert down.shape[0] == up.shape[1] == 4 and down.shape[2:] == (3, 3) and up.shape[2:] == (1, 1)
    if variant.get("lora__targets") == "image-side":  # LoCon less the layers that read the text: attn2's keys, values
        with safe_open(str(run / "final" / "my-lora.safetensors"), "pt") as f:
            modules = {k.split(".")[0] for k in f.keys()}
        assert any(m.endswith("_attn2_to_q") for m in modules) and any(m.endswith("_attn1_to_k") for m in modules)
        assert any(m.endswith("_resnets_0_conv1") for m in modules)
        assert not any(m.endswith(("_attn2_to_k", "_attn2_to_v")) for m in modules)


def test_sdxl_tiny_trains_saves_and_reloads(tmp_path):
    run = run_training(tmp_path, model__base="builtin:tiny-sdxl", sampling__every=10, lora__train_text_encoder=True)
    meta = read_safetensors_metadata(run / "final" / "my-lora.safetensors")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    with safe_open(str(run / "final" / "my-lora.safetensors"), "pt") as f:
        prefixes = {k.split("_text_model")[0] for k in f.keys() if k.startswith("lora_te")}
    assert prefixes == {"lora_te1", "lora_te2"}
    for file in (DIFFUSERS_FILENAME, "my-lora.safetensors"):
        assert np.abs(reload_image(run, file, base="builtin:tiny-sdxl") - final_sample(run)).max() <= 1, file


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "final" / DIFFUSERS_FILENAME)


def test_same_seed_gives_the_same_lora_on_cpu(tmp_path):
    images = make_images(tmp_path / "images")
    a = adapter_tensors(run_training(tmp_path, "a", images=images, data__flip=True, data__shuffle_captions=True))
    b = adapter_tensors(run_training(tmp_path, "b", images=images, data__flip=True, data__shuffle_captions=True))
    c = adapter_tensors(run_training(tmp_path, "c", images=images, data__flip=True, data__shuffle_captions=True, optim__seed=7))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# -- each training option proves its effect ---------------------------------------------------------------
def _stub_trainables(prediction_type: str = "epsilon"):
    """What compute_loss needs: a real DDPM forward process and a UNet stand-in that predicts half the input."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    return SimpleNamespace(
        noise_scheduler=DDPMScheduler(prediction_type=prediction_type),
        unet=lambda noisy, timesteps, embeds, **kwargs: (noisy * 0.5,),
    )


def _batch(n: int = 4):
    from lora_trainer.batch import Batch

    return Batch(latents=torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1)), embeds=torch.zeros(n, 77, 32))


def test_min_snr_weights_each_image_by_its_timestep():
    from diffusers.training_utils import compute_snr

    from lora_trainer.train import compute_loss

    t = _stub_trainables()
    plain = compute_loss(_batch(64), t, torch.Generator().manual_seed(0), config_mod.OptimSection())
    snr = compute_loss(_batch(64), t, torch.Generator().manual_seed(0), config_mod.OptimSection(min_snr_gamma=5.0))
    assert plain.weights is None and torch.equal(plain.step.timesteps, snr.step.timesteps)  # same draws, other weights
    expected = torch.clamp(compute_snr(t.noise_scheduler, snr.step.timesteps), max=5.0) / compute_snr(t.noise_scheduler, snr.step.timesteps)
    torch.testing.assert_close(snr.weights, expected)
    easy = snr.step.timesteps < 100  # little noise: a high signal-to-noise ratio, weighted down
    assert easy.any() and (snr.weights[easy] < 1).all() and (snr.weights[~easy] <= 1).all()
    torch.testing.assert_close(snr.value, (snr.per_sample * expected).mean())
    torch.testing.assert_close(plain.value, plain.per_sample.mean())


def test_noise_offset_shifts_each_image_channel_by_one_constant():
    from lora_trainer.train import sample_noise

    latents = torch.zeros(3, 4, 8, 8)
    plain = sample_noise(latents, torch.Generator().manual_seed(0), 0.0)
    offset = sample_noise(latents, torch.Generator().manual_seed(0), 0.1)
    shift = offset - plain
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift))  # constant over each channel's pixels
    assert 0.01 < shift[..., 0, 0].abs().mean() < 0.3  # about 0.1 x a standard normal


def test_v_prediction_targets_the_velocity_and_an_unknown_type_is_refused():
    from lora_trainer.errors import ModelLoadError
    from lora_trainer.train import check_prediction_type, compute_loss

    t = _stub_trainables("v_prediction")
    loss = compute_loss(_batch(), t, torch.Generator().manual_seed(0), config_mod.OptimSection())
    velocity = t.noise_scheduler.get_velocity(_batch().latents, loss.step.noise, loss.step.timesteps)
    assert torch.equal(loss.step.target, velocity) and not torch.equal(loss.step.target, loss.step.noise)
    with pytest.raises(ModelLoadError, match="predicts 'sample'"):
        check_prediction_type("sample", "someone/model")
    with pytest.raises(ModelLoadError, match="unknown prediction_type 'sample'"):
        compute_loss(_batch(), _stub_trainables("sample"), torch.Generator().manual_seed(0), config_mod.OptimSection())


def test_extra_loss_terms_are_added_and_reported():
    from lora_trainer.train import compute_loss

    terms = {"preservation": lambda batch, t, step: step.pred.float().pow(2).mean()}
    plain = compute_loss(_batch(), _stub_trainables(), torch.Generator().manual_seed(0), config_mod.OptimSection())
    more = compute_loss(_batch(), _stub_trainables(), torch.Generator().manual_seed(0), config_mod.OptimSection(), terms)
    torch.testing.assert_close(more.value, plain.value + more.terms["preservation"])


def test_cosine_schedule_shapes_the_learning_rate_after_warmup(tmp_path):
    import math

    images = make_images(tmp_path / "images")
    cosine = run_training(tmp_path, "cosine", images=images, optim__lr_scheduler="cosine", optim__warmup_steps=3)
    constant = run_training(tmp_path, "constant", images=images)
    lr = 1e-3
    expected = [lr * k / 3 for k in range(1, 4)] + [lr * 0.5 * (1 + math.cos(math.pi * (k - 3) / 7)) for k in range(4, 11)]
    # The event of step k reports the rate the next step will use (the scheduler has stepped k times).
    assert [e["lr"] for e in events_of(cosine, "step")] == pytest.approx(expected, rel=1e-6)
    assert {e["lr"] for e in events_of(constant, "step")} == {lr}


def test_gradient_checkpointing_gives_the_same_lora(tmp_path):
    images = make_images(tmp_path / "images")
    plain = adapter_tensors(run_training(tmp_path, "plain", images=images, optim__batch_size=2))
    checkpointed = adapter_tensors(run_training(tmp_path, "ckpt", images=images, optim__batch_size=2, optim__gradient_checkpointing=True))
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=0, atol=1e-6, msg=key)


def test_bf16_reproduces_itself_and_differs_from_fp32(tmp_path):
    images = make_images(tmp_path / "images")
    a = adapter_tensors(run_training(tmp_path, "a", images=images, optim__mixed_precision="bf16"))
    b = adapter_tensors(run_training(tmp_path, "b", images=images, optim__mixed_precision="bf16"))
    fp32 = adapter_tensors(run_training(tmp_path, "fp32", images=images))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in a.values())  # LoRA weights stay fp32
    assert not all(torch.allclose(a[k], fp32[k], atol=1e-6) for k in a)  # the frozen weights really were bf16


def test_latent_caching_does_not_change_what_is_learned(tmp_path):
    images = make_images(tmp_path / "images")
    cached = adapter_tensors(run_training(tmp_path, "cached", images=images, data__flip=True))
    uncached_run = run_training(tmp_path, "uncached", images=images, data__flip=True, data__cache_latents=False)
    assert events_of(uncached_run, "started")[0]["plan"]["cache_latents"] is False
    for key, value in adapter_tensors(uncached_run).items():
        torch.testing.assert_close(value, cached[key], rtol=0, atol=1e-5, msg=key)


def test_prodigy_trains_its_own_step_size(tmp_path):
    images = make_images(tmp_path / "images")
    prodigy = adapter_tensors(run_training(tmp_path, "prodigy", images=images, optim__optimizer="prodigy", optim__learning_rate=1.0))
    adamw = adapter_tensors(run_training(tmp_path, "adamw", images=images))
    assert all(torch.isfinite(v).all() for v in prodigy.values())
    assert any(v.abs().sum() > 0 for k, v in prodigy.items() if "lora_B" in k or "lora.up" in k)  # lora_B starts at zero
    assert not all(torch.allclose(prodigy[k], adamw[k]) for k in prodigy)


def test_a_failing_listener_never_stops_training(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(make_images(tmp_path / "images"), optim__steps=3)
    config_mod.save(cfg, run)
    seen = []

    def broken(event):
        seen.append(event["type"])
        raise RuntimeError("a listener bug")

    assert train(run, cfg, listeners=[broken])["status"] == "finished"
    assert seen[0] == "started" and seen[-1] == "finished" and seen.count("step") == 3
    assert [e["type"] for e in read_events(run / "events.jsonl")[0]][-1] == "finished"


def test_caching_is_turned_off_where_it_would_be_wrong(tmp_path):
    run = run_training(tmp_path, lora__train_text_encoder=True, data__flip=True)
    plan = events_of(run, "started")[0]["plan"]
    assert plan["cache_text_embeddings"] is False and plan["cache_latents"] is True


def test_a_nan_loss_fails_with_a_hint_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import torch.nn.functional as F

    calls = {"n": 0}
    real = F.mse_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 5 else loss

    monkeypatch.setattr(F, "mse_loss", poisoned)
    with pytest.raises(TrainingFailed) as err:
        run_training(tmp_path, output__save_every=2)
    assert "loss became nan at step 6" in str(err.value) and "checkpoints/step-000004" in str(err.value)
    assert "learning_rate" in err.value.hint
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-000004" / DIFFUSERS_FILENAME).exists()
    assert not (run / "final").exists()


def test_adamw8bit_on_cpu_says_what_to_use_instead(tmp_path):
    with pytest.raises(config_mod.ConfigError, match="adamw8bit' needs a CUDA GPU"):
        run_training(tmp_path, optim__optimizer="adamw8bit")
