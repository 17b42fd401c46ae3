"""Training methods beyond plain LoRA: LoRA+, timestep sampling, EMA, guidance-sized preservation. Each changes
what it claims, on real runs of the tiny built-in models (guidance-sized training on the toy world:
test_toy_sizing.py), and a run using them all resumes to exactly the weights of an uninterrupted one."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_images, tiny_config
from safetensors.torch import load_file

from lora_trainer import config as config_mod
from lora_trainer.ema import decay_at
from lora_trainer.events import read_events
from lora_trainer.formats import DIFFUSERS_FILENAME
from lora_trainer.timesteps import sample_timesteps

ROOT = Path(__file__).resolve().parents[1]
SDXL = {"model__base": "builtin:tiny-sdxl", "lora__train_text_encoder": True}
ALL_METHODS = {"optim__lora_plus_ratio": 16.0, "optim__timestep_sampling": "logit_normal", "optim__ema_decay": 0.9}
SIZED = {"optim__preservation_weight": 1.0, "optim__train_guidance": 3.0}  # guidance-sized output preservation


def run_training(tmp_path: Path, name: str, images: Path, listeners=(), **overrides) -> Path:
    from accelerate.state import AcceleratorState

    from lora_trainer.train import train

    run = tmp_path / name
    cfg = tiny_config(images, **overrides)
    if not (run / "config.toml").exists():
        config_mod.save(cfg, run)
    try:
        train(run, cfg, listeners=listeners)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return run


def state_of(run: Path, step: int, file: str = "adapter.safetensors") -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:06d}" / "state" / file)


def mean_abs(tensors: list[torch.Tensor]) -> float:
    return torch.cat([t.flatten() for t in tensors]).abs().mean().item()


# -- LoRA+ --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [{}, SDXL], ids=["sd", "sdxl+text-encoders"])
def test_lora_plus_trains_the_b_matrices_in_their_own_groups_at_ratio_times_the_rate(tmp_path, settings):
    images = make_images(tmp_path / "images")
    run = run_training(tmp_path, "run", images, optim__steps=1, output__save_every=1, lora__text_encoder_lr=5e-4,
                       optim__lora_plus_ratio=16.0, **settings)
    groups = torch.load(run / "checkpoints" / "step-000001" / "state" / "optimizer.pt", weights_only=True)["param_groups"]
    adapter = state_of(run, 1)
    expected = []
    for model in ("unet", "text_encoder", "text_encoder_2")[: 1 + 2 * bool(settings)]:
        lr = 1e-3 if model == "unet" else 5e-4
        a = sum(k.startswith(f"{model}.") and ".lora_A." in k for k in adapter)
        b = sum(k.startswith(f"{model}.") and ".lora_B." in k for k in adapter)
        expected += [(lr, a), (lr * 16, b)]
    assert [len(g["params"]) for g in groups] == [count for _, count in expected]
    assert [g["lr"] for g in groups] == pytest.approx([lr for lr, _ in expected])


def test_lora_plus_moves_b_more_relative_to_a_than_plain_lora(tmp_path):
    images = make_images(tmp_path / "images")

    def b_over_a(run: Path) -> float:
        """How far B moved against how far A moved, from step 1 to step 4 (A starts random, B at zero)."""
        first, last = state_of(run, 1), state_of(run, 4)
        moved = {k: last[k] - first[k] for k in last}
        return mean_abs([v for k, v in moved.items() if ".lora_B." in k]) / mean_abs([v for k, v in moved.items() if ".lora_A." in k])

    plain = b_over_a(run_training(tmp_path, "plain", images, optim__steps=4, output__save_every=1))
    plus = b_over_a(run_training(tmp_path, "plus", images, optim__steps=4, output__save_every=1, optim__lora_plus_ratio=16.0))
    assert plus > 4 * plain, (plain, plus)


# -- timestep sampling -----------------------------------------------------------------------------------
def _draw(method: str = "uniform", n: int = 20000, seed: int = 0, **fields) -> torch.Tensor:
    opt = config_mod.OptimSection(timestep_sampling=method, **fields)
    return sample_timesteps(n, 1000, torch.Generator().manual_seed(seed), "cpu", opt)


def test_uniform_timesteps_are_the_draws_the_trainer_always_made():
    today = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)).long()
    assert torch.equal(_draw(n=64, seed=3), today)
    assert torch.equal(sample_timesteps(64, 1000, torch.Generator().manual_seed(3), "cpu", None), today)


@pytest.mark.parametrize(
    "method, fields, middle_share, high_share",
    [
        ("uniform", {}, (0.31, 0.36), (0.48, 0.52)),
        ("logit_normal", {}, (0.48, 0.54), (0.48, 0.52)),  # P(|N(0,1)| < ln 2) = 0.51 of the steps in the middle third
        ("logit_normal", {"logit_std": 0.3}, (0.97, 1.0), (0.48, 0.52)),
        ("logit_normal", {"logit_mean": 1.0}, (0.3, 0.5), (0.8, 0.87)),  # P(N(1, 1) > 0) = 0.84
        ("shifted", {}, (0.2, 0.3), (0.73, 0.77)),  # shift 3: t/T > 1/2 for u > 1/4
        ("shifted", {"timestep_shift": 1 / 3}, (0.2, 0.3), (0.23, 0.27)),
    ],
)
def test_timestep_sampling_puts_the_steps_where_it_says(method, fields, middle_share, high_share):
    t = _draw(method, **fields)
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    middle = ((t >= 333) & (t < 667)).float().mean().item()
    high = (t >= 500).float().mean().item()
    assert middle_share[0] <= middle <= middle_share[1], middle
    assert high_share[0] <= high <= high_share[1], high


@pytest.mark.parametrize("method", ["logit_normal", "shifted"])
def test_timestep_sampling_is_seeded(method):
    assert torch.equal(_draw(method, seed=5), _draw(method, seed=5))
    assert not torch.equal(_draw(method, seed=5), _draw(method, seed=6))


def test_the_loss_trains_on_the_configured_timesteps():
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from lora_trainer.batch import Batch
    from lora_trainer.loss import compute_loss

    t = SimpleNamespace(noise_scheduler=DDPMScheduler(), unet=lambda noisy, timesteps, embeds, **kw: (noisy * 0.5,))
    batch = Batch(latents=torch.randn(256, 4, 8, 8, generator=torch.Generator().manual_seed(1)), embeds=torch.zeros(256, 77, 32))
    uniform = compute_loss(batch, t, torch.Generator().manual_seed(0), config_mod.OptimSection()).step.timesteps
    shifted = compute_loss(batch, t, torch.Generator().manual_seed(0), config_mod.OptimSection(timestep_sampling="shifted")).step.timesteps
    assert shifted.float().mean() > uniform.float().mean() + 100  # shift 3: mean t/T = 0.68 against 0.5


# -- EMA -----------------------------------------------------------------------------------------------------
def test_decay_ramps_up_to_the_configured_value():
    assert decay_at(1, 0.999) == pytest.approx(2 / 11)
    assert decay_at(100, 0.999) == pytest.approx(101 / 110)
    assert decay_at(10**6, 0.999) == 0.999
    assert decay_at(10, 0.3) == 0.3


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ema")
    return run_training(tmp, "ema", make_images(tmp / "images"), optim__steps=6, output__save_every=1, optim__ema_decay=0.3)


def test_the_ema_is_the_moving_average_of_the_raw_weights(ema_run):
    """Each step's average = decay x the previous average + (1 - decay) x that step's raw weights."""
    for step in range(2, 7):
        raw, before, after = state_of(ema_run, step), state_of(ema_run, step - 1, "ema.safetensors"), state_of(ema_run, step, "ema.safetensors")
        d = decay_at(step, 0.3)
        assert len(after) == len(raw) > 0
        for key, value in after.items():
            torch.testing.assert_close(value, d * before[key] + (1 - d) * raw[key.replace(".default", "")], rtol=0, atol=1e-7)
        assert not all(torch.equal(after[k], raw[k.replace(".default", "")]) for k in after)  # not the raw weights


def test_the_saved_lora_files_are_the_ema_weights(ema_run):
    from diffusers.utils import convert_state_dict_to_diffusers

    def as_saved(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # peft names -> the diffusers file's
        unet = {k.removeprefix("unet.").replace(".default", ""): v for k, v in state.items()}
        return {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(unet).items()}

    ema, raw = as_saved(state_of(ema_run, 6, "ema.safetensors")), as_saved(state_of(ema_run, 6))
    for folder in (ema_run / "final", ema_run / "checkpoints" / "step-000006"):
        saved = load_file(folder / DIFFUSERS_FILENAME)
        assert saved.keys() == ema.keys() == raw.keys()
        for key, value in saved.items():
            torch.testing.assert_close(value, ema[key], rtol=0, atol=0, msg=key)
        assert not all(torch.equal(value, raw[key]) for key, value in saved.items())
    info = json.loads((ema_run / "final" / "lora_info.json").read_text())
    assert info["ema_decay"] == 0.3 and info["weights"] == "ema"


def test_samples_render_with_the_ema_weights(tmp_path):
    """Plain and EMA runs train the same raw weights; only the samples (and files) of the EMA run differ."""
    images = make_images(tmp_path / "images")
    runs = {decay: run_training(tmp_path, f"ema-{decay}", images, optim__steps=4, output__save_every=4, sampling__every=4,
                                optim__ema_decay=decay) for decay in (0.0, 0.5)}
    raw = [state_of(run, 4) for run in runs.values()]
    assert all(torch.equal(raw[0][k], raw[1][k]) for k in raw[0])
    last = [(run / "samples" / "step-000004" / "0.png").read_bytes() for run in runs.values()]
    assert last[0] != last[1]


# -- resume, SDXL and several processes ---------------------------------------------------------------------
def stop_at(step: int):
    """A listener that asks for a stop (SIGTERM, as the app's Stop button sends it) once `step` is done."""
    def listener(event):
        if event["type"] == "step" and event["step"] == step:
            signal.raise_signal(signal.SIGTERM)
    return listener


@pytest.mark.parametrize("settings", [{}, {**SDXL, "lora__trigger_vectors": 1}, SIZED],
                         ids=["sd", "sdxl+text-encoders+pivotal", "sd+guidance-sized-preservation"])
def test_a_stopped_run_with_every_method_resumes_to_the_uninterrupted_weights(tmp_path, settings):
    images = make_images(tmp_path / "images")
    common = {"optim__steps": 6, **ALL_METHODS, **settings}
    reference = load_file(run_training(tmp_path, "reference", images, **common) / "final" / DIFFUSERS_FILENAME)

    run = run_training(tmp_path, "stopped", images, listeners=[stop_at(3)], **common)
    assert not (run / "final").exists() and (run / "checkpoints" / "step-000003" / "state" / "ema.safetensors").exists()
    resumed = load_file(run_training(tmp_path, "stopped", images, **common) / "final" / DIFFUSERS_FILENAME)
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=key)


def test_the_saved_ema_is_what_makes_the_resume_exact(tmp_path):
    """Without its saved average a resumed run starts averaging afresh: other final weights (so the test above
    would fail if the EMA state were not saved and restored)."""
    images = make_images(tmp_path / "images")
    common = {"optim__steps": 6, "optim__ema_decay": 0.9}
    reference = load_file(run_training(tmp_path, "reference", images, **common) / "final" / DIFFUSERS_FILENAME)
    run = run_training(tmp_path, "stopped", images, listeners=[stop_at(3)], **common)
    checkpoint = run / "checkpoints" / "step-000003"
    (checkpoint / "state" / "ema.safetensors").unlink()
    (checkpoint / "manifest.json").unlink()  # else the checkpoint counts as damaged
    resumed = load_file(run_training(tmp_path, "stopped", images, **common) / "final" / DIFFUSERS_FILENAME)
    assert not all(torch.allclose(resumed[k], reference[k], atol=1e-6) for k in reference)


def test_changing_the_lora_plus_ratio_of_a_run_is_refused_by_name(tmp_path):
    images = make_images(tmp_path / "images")
    run_training(tmp_path, "run", images, optim__steps=2, optim__lora_plus_ratio=16.0)
    with pytest.raises(config_mod.ConfigError, match="optim.lora_plus_ratio was 16.0, now 0.0"):
        run_training(tmp_path, "run", images, optim__steps=4)


def test_two_processes_train_sdxl_with_every_method(tmp_path):
    run = tmp_path / "run"
    config_mod.save(tiny_config(make_images(tmp_path / "images"), optim__steps=4, optim__batch_size=1, lora__trigger_vectors=2,
                                lora__embedding_lr=5e-2, **ALL_METHODS, **SDXL), run)
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lora_trainer", "train", str(run)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(run / "events.jsonl")[0]
    assert [e["processes"] for e in events if e["type"] == "started"] == [2]  # only the main process writes events
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4]
    assert sorted(load_file(run / "final" / "my-lora_emb.safetensors")) == ["clip_g", "clip_l"]  # pivotal tuning too
    ema, raw = state_of(run, 4, "ema.safetensors"), state_of(run, 4)
    assert {k.split(".")[0] for k in ema} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(math.isfinite(v.abs().sum().item()) for v in ema.values())
    assert not all(torch.equal(v, raw[k.replace(".default", "")]) for k, v in ema.items())
    final = load_file(run / "final" / DIFFUSERS_FILENAME)
    assert any(v.abs().sum() > 0 for k, v in final.items() if "lora.up" in k or "lora_B" in k)
