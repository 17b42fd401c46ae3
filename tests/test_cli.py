"""The headless engine as a user drives it: `python -m lora_trainer ...` in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import config_only_model, make_images, tiny_config
from safetensors.torch import load_file

from lora_trainer import config as config_mod
from lora_trainer.events import read_events
from lora_trainer.formats import DIFFUSERS_FILENAME

ROOT = Path(__file__).resolve().parent.parent


# Timeouts here guard against a hang; they are no budget (a loaded machine is slow, and that is no defect).
def cli(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_trainer", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lora_trainer", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, limit: float = 1800) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if any(e["type"] == "step" and e["step"] >= step for e in read_events(run / "events.jsonl")[0]):
            return
        assert proc.poll() is None, f"trainer exited early: {proc.stderr.read()}"
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {limit}s")


def event_types(run: Path) -> list[str]:
    return [e["type"] for e in read_events(run / "events.jsonl")[0]]


def write_run(tmp_path: Path, name: str = "run", **overrides) -> Path:
    run = tmp_path / name
    config_mod.save(tiny_config(make_images(tmp_path / "images"), **overrides), run)
    return run


def train_here(run: Path) -> Path:
    """Train a saved run in this process, as `train RUN` would."""
    from lora_trainer.train import train

    train(run, config_mod.load(run))
    return run


def test_train_from_flags_writes_the_config_and_a_lora(tmp_path):
    images = make_images(tmp_path / "images")
    run = tmp_path / "run"
    result = cli(
        "train", "--base", "builtin:tiny-sd", "--images", str(images), "--trigger", "zwx", "--steps", "4", "--rank", "2",
        "--resolution", "64", "--set", "data.bucket_step=16", "--set", "sampling.every=0", "--out", str(run),
    )
    assert result.returncode == 0, result.stderr
    cfg = config_mod.load(run)
    assert (cfg.data.trigger, cfg.optim.steps, cfg.lora.rank) == ("zwx", 4, 2)
    assert (run / "final" / DIFFUSERS_FILENAME).exists() and (run / "final" / "my-lora.safetensors").exists()
    assert (run / "train.log").read_text().strip()
    assert (run / "README.md").read_text().count("zwx") >= 1


@pytest.mark.parametrize(
    "flags, field",
    [(["--rank", "0"], "lora.rank"), (["--set", "optim.optimizer=sgd"], "optim.optimizer"), (["--resolution", "100"], "data.resolution"),
     (["--set", "lora.rnak=4"], "lora.rnak")],
)
def test_bad_values_are_rejected_by_name_before_anything_loads(tmp_path, flags, field):
    result = cli("check", str(tmp_path / "run"), *flags)
    assert result.returncode == 1
    assert field in result.stderr and "Traceback" not in result.stderr


def test_check_prints_the_plan_without_loading_a_model(tmp_path):
    run = write_run(tmp_path, optim__steps=0 or 1, optim__epochs=3)
    sdxl = config_only_model(tmp_path / "sdxl", "sdxl")  # configs only: loading it would fail
    result = cli("check", str(run), "--set", f"model.base={sdxl}", "--resolution", "1024", "--set", "data.bucket_step=64")
    assert result.returncode == 0, result.stderr
    assert "images: 4 from" in result.stdout and "plan: 12 steps, 4 steps per epoch, 3.0 epochs" in result.stdout
    assert "buckets:" in result.stdout
    assert "peak:" in result.stdout and "not estimated" not in result.stdout  # the memory estimate reads the configs


def test_an_unknown_model_is_one_line_naming_it(tmp_path):
    run = write_run(tmp_path)
    result = cli("train", str(run), "--base", "./no/such/model")
    assert result.returncode == 1
    assert "base model './no/such/model' not found" in result.stderr and "Traceback" not in result.stderr
    failed = [e for e in read_events(run / "events.jsonl")[0] if e["type"] == "failed"]
    assert failed and "./no/such/model" in failed[0]["error"] and failed[0]["hint"]


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_stop_signal_saves_a_checkpoint_and_stops_cleanly(tmp_path, stop_signal):
    run = write_run(tmp_path, optim__steps=100000)
    proc = start("train", str(run))
    wait_for_step(run, 3, proc)
    proc.send_signal(stop_signal)
    assert proc.wait(timeout=120) == 0
    stopped = [e for e in read_events(run / "events.jsonl")[0] if e["type"] == "stopped"]
    assert stopped and event_types(run)[-1] == "stopped"
    ckpt = run / stopped[0]["checkpoint"]
    assert {"optimizer.pt", "scheduler.pt", "adapter.safetensors"} <= {p.name for p in (ckpt / "state").iterdir()}
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == stopped[0]["step"]


@pytest.mark.parametrize("cache_latents", [True, False], ids=["cached", "uncached"])
def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path, cache_latents):
    settings = dict(
        optim__steps=24, output__save_every=6, data__flip=True, data__shuffle_captions=True, lora__dropout=0.1,
        data__cache_latents=cache_latents,
    )
    reference = train_here(write_run(tmp_path, "reference", **settings))  # the uninterrupted run needs no subprocess

    run = write_run(tmp_path, "killed", **settings)
    proc = start("train", str(run))
    wait_for_step(run, 14, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (run / "final").exists() and (run / "checkpoints" / "step-000012").exists()
    result = cli("train", str(run))
    assert result.returncode == 0, result.stderr
    started = [e for e in read_events(run / "events.jsonl")[0] if e["type"] == "started"]
    assert started[-1]["resumed"] and started[-1]["step"] in (12, 18)

    expected, got = load_file(reference / "final" / DIFFUSERS_FILENAME), load_file(run / "final" / DIFFUSERS_FILENAME)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


def two_processes(*args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` of the CLI on two processes: --multi_gpu uses torch.distributed, gloo on a CPU box (accelerate's
    --cpu flag always starts one process)."""
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lora_trainer", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_two_processes_take_images_in_once_and_train(tmp_path):
    """SD 1.5 from --images on two processes (SDXL with every method on two processes: test_methods.py's
    test_two_processes_train_sdxl_with_every_method)."""
    run = tmp_path / "run"
    result = two_processes("train", str(run), "--images", str(make_images(tmp_path / "images", 3)), "--resolution", "64",
                           "--steps", "4", "--set", "sampling.every=0", "--set", "data.bucket_step=16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run / "dataset").iterdir()) == [f"img00{i}.{e}" for i in range(3) for e in ("png", "txt")]
    assert result.stdout.count("3 images added") == 1
    events = read_events(run / "events.jsonl")[0]
    started = [e for e in events if e["type"] == "started"]
    assert len(started) == 1 and started[0]["processes"] == 2  # only the main process writes events
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3, 4]
    weights = load_file(run / "final" / DIFFUSERS_FILENAME)
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)


def test_check_on_a_messy_zip_prints_the_intake_report_and_the_plan(tmp_path):
    import zipfile

    images = make_images(tmp_path / "images", 3, sizes=((96, 96),))
    archive = tmp_path / "phone.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in sorted(images.iterdir()):
            z.write(path, f"DCIM/{path.name}")
        z.writestr("DCIM/notes.png", b"this is text, not a png")
        z.writestr("../escape.png", (images / "img000.png").read_bytes())
        z.writestr("__MACOSX/DCIM/._img000.png", b"\0\5\26\7")
    result = cli("check", "--images", str(archive), "--resolution", "64")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "3 images will train" in out or "3 image" in out
    assert "notes.png" in out and "escape.png" in out
    assert "plan: 1000 steps" in out and "captions: 3 written" in out


def test_training_on_a_kohya_folder_honours_its_repeats(tmp_path):
    make_images(tmp_path / "kohya" / "10_ohwx style", 2, sizes=((64, 64),))
    make_images(tmp_path / "kohya" / "1_regular", 1, sizes=((80, 64),))
    run = tmp_path / "run"
    result = cli(
        "train", str(run), "--images", str(tmp_path / "kohya"), "--resolution", "64", "--steps", "2",
        "--set", "sampling.every=0", "--set", "data.bucket_step=16",
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (run / "dataset").iterdir() if p.is_dir()) == ["10_ohwx_style", "1_regular"]
    started = [e for e in read_events(run / "events.jsonl")[0] if e["type"] == "started"][0]
    assert started["plan"]["images"] == 3 and started["plan"]["repeats"] == 21
    assert config_mod.load(run).data.images == "dataset"


def test_changing_what_the_checkpoints_depend_on_is_refused_by_name(tmp_path):
    run = train_here(write_run(tmp_path, optim__steps=2))
    before = (run / "config.toml").read_text()
    result = cli("train", str(run), "--rank", "8", "--steps", "4")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "lora.rank was 4, now 8" in result.stderr and "new run folder" in result.stderr
    assert (run / "config.toml").read_text() == before  # the run's own config is kept
    assert cli("train", str(run), "--steps", "4").returncode == 0  # a longer run of the same settings resumes


def test_caption_with_the_trigger_style_writes_captions_from_the_command_line(tmp_path):
    images = make_images(tmp_path / "images", 2, captions=False)
    result = cli("caption", str(images), "--trigger", "zwx", "--style", "trigger")
    assert result.returncode == 0, result.stderr
    assert (images / "img000.txt").read_text() == "zwx" and "captioned 2/2" in result.stderr


def test_push_of_a_run_without_a_lora_is_one_line_naming_it(tmp_path):
    result = cli("push", str(tmp_path / "nothing"), "--repo", "someone/lora")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "There is no run folder" in result.stderr and str(tmp_path / "nothing") in result.stderr


def test_a_32px_base_trains_at_its_own_size_on_32px_images(tmp_path):
    from conftest import make_32px_model
    from PIL import Image

    model = make_32px_model(tmp_path / "model32")
    images = make_images(tmp_path / "images", 3, sizes=((32, 32), (48, 32), (32, 40)))
    run = tmp_path / "run"
    result = cli("train", str(run), "--base", str(model), "--images", str(images), "--steps", "2", "--set", "sampling.every=2",
                 "--set", "sampling.steps=2")
    assert result.returncode == 0, result.stderr
    assert "3 images added" in result.stdout  # none refused as too small
    started = [e for e in read_events(run / "events.jsonl")[0] if e["type"] == "started"][0]
    assert started["plan"]["buckets"] and all(w % 8 == 0 and h % 8 == 0 and w * h > 0 for w, h in started["plan"]["buckets"])
    assert config_mod.load(run).data.resolution == 0  # "native": 32 px for this base
    assert json.loads((run / "final" / "lora_info.json").read_text())["resolution"] == 32
    sample = [e for e in read_events(run / "events.jsonl")[0] if e["type"] == "sample"][-1]
    assert Image.open(run / sample["images"][0]).size == (32, 32)


@pytest.mark.parametrize(
    "base, message",
    [("/nonexistent/model", "base model '/nonexistent/model' not found"),
     ("nobody/does-not-exist", "base model 'nobody/does-not-exist' could not be loaded"),
     ("/etc/passwd", "is a suffix-less file; expected .safetensors or .ckpt")],
)
def test_check_resolves_the_base_like_train_does(tmp_path, base, message):
    run = write_run(tmp_path)
    result = cli("check", str(run), "--base", base)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert message in result.stderr
