"""Faults the trainer meets in the wild: damaged checkpoints, a full disk, vanished images, a stop at any moment."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from conftest import make_images, tiny_config

from lora_trainer import config as config_mod
from lora_trainer.checkpoints import verify
from lora_trainer.errors import DiskFullError, TrainingFailed
from lora_trainer.events import read_events
from lora_trainer.train import train


def new_run(tmp_path: Path, name: str = "run", **overrides) -> tuple[Path, config_mod.TrainConfig]:
    images = tmp_path / "images"
    if not images.exists():
        make_images(images)
    run = tmp_path / name
    cfg = tiny_config(images, **overrides)
    config_mod.save(cfg, run)
    return run, cfg


def events(run: Path, kind: str | None = None) -> list[dict]:
    return [e for e in read_events(run / "events.jsonl")[0] if kind is None or e["type"] == kind]


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# -- damaged checkpoints ----------------------------------------------------------------------------------
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "truncated optimizer": ("state/optimizer.pt", truncate, "state/optimizer.pt has"),
    "truncated adapter": ("state/adapter.safetensors", truncate, "state/adapter.safetensors has"),
    "broken trainer state": ("trainer_state.json", lambda p: p.write_text('{"step": 4, "tot'), "trainer_state.json has"),
    "missing scheduler": ("state/scheduler.pt", lambda p: p.unlink(), "state/scheduler.pt is missing"),
    "flipped byte in a LoRA file": ("my-lora.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\0"),
                                    "my-lora.safetensors does not match its checksum"),
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> Path:
    """A run stopped at step 4 with checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("ckpts")
    run, cfg = new_run(tmp, optim__steps=6, output__save_every=2)

    def stop_after_step_4(event):
        if event["type"] == "checkpoint" and event["step"] == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    assert train(run, cfg, listeners=[stop_after_step_4])["step"] == 5  # stops after the next step
    reset_accelerate()
    return run


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_checkpoint_is_named_and_the_newest_intact_one_resumes(two_checkpoints, tmp_path, damage, caplog):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    newest = sorted((run / "checkpoints").iterdir())[-1]
    file, harm, message = DAMAGE[damage]
    harm(newest / file)
    result = train(run, config_mod.load(run))
    assert result["status"] == "finished"
    started = events(run, "started")[-1]
    assert started["resumed_from"] == "checkpoints/step-000004"  # the one before the damaged step-000005
    assert any(newest.name in r.getMessage() and message in r.getMessage() for r in caplog.records), caplog.text
    note = f"checkpoint {newest.name} is damaged ({message}"
    assert any(w.startswith(note) and w.endswith("training resumes from step-000004 instead") for w in started["warnings"])


def test_an_older_checkpoint_without_a_manifest_that_fails_to_load_falls_back_too(two_checkpoints, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    newest = run / "checkpoints" / "step-000005"
    (newest / "manifest.json").unlink()  # as written before manifests existed: nothing to verify against
    truncate(newest / "state" / "optimizer.pt")
    assert train(run, config_mod.load(run))["status"] == "finished"
    assert events(run, "started")[-1]["step"] == 4
    assert any("step-000005 cannot be loaded" in r.getMessage() for r in caplog.records)
    assert "checkpoint step-000005 cannot be loaded (train.log says why); resumed from step-000004" in events(run, "started")[-1]["warnings"]


def test_when_every_checkpoint_is_damaged_the_cli_says_so_without_a_traceback(two_checkpoints, tmp_path):
    from test_cli import cli

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    for checkpoint in (run / "checkpoints").iterdir():
        truncate(checkpoint / "state" / "optimizer.pt")
    result = cli("train", str(run))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "every checkpoint of this run is damaged" in result.stderr and "step-000002: state/optimizer.pt has" in result.stderr
    assert "delete" in events(run, "failed")[-1]["hint"]


def test_every_checkpoint_lists_its_files_with_sizes_and_checksums(two_checkpoints):
    import hashlib

    checkpoint = two_checkpoints / "checkpoints" / "step-000004"
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    on_disk = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest) == on_disk and "state/optimizer.pt" in manifest
    for name, entry in manifest.items():
        data = (checkpoint / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# -- a full disk ------------------------------------------------------------------------------------------
Usage = namedtuple("Usage", "total used free")


def test_a_disk_without_room_for_a_checkpoint_is_refused_before_training(tmp_path, monkeypatch):
    run, cfg = new_run(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DiskFullError) as err:
        train(run, cfg)
    assert f"the disk holding {run} is too full" in str(err.value) and "MB needed" in str(err.value)
    assert not events(run, "step")


@pytest.mark.parametrize(
    "failure",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 492864 vs 492752")],
    ids=["ENOSPC", "torch-short-write"],
)
def test_a_disk_filling_up_at_a_checkpoint_says_so_and_leaves_no_partial_folder(tmp_path, monkeypatch, failure):
    run, cfg = new_run(tmp_path, optim__steps=6, output__save_every=2)
    real_save = torch.save
    calls = {"n": 0}

    def save_until_full(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (optimizer + scheduler) fits; the second does not
            raise failure
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(DiskFullError, match=re.escape(f"the disk holding {run / 'checkpoints'} is full")) as err:
        train(run, cfg)
    assert re.search(r"\d+ MB free; about \d+ MB is needed", str(err.value))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]  # no .tmp-step-000004
    assert verify(run / "checkpoints" / "step-000002") is None  # the previous checkpoint is whole


def full_disk_on(monkeypatch, target, name: str, where: str, failure: Exception) -> None:
    """`target.name` raises `failure` (what a full disk raises there) when its path contains `where`."""
    real = getattr(target, name)

    def write(obj, path, *args, **kwargs):
        if where in str(path):
            raise failure
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(target, name, write)


def test_a_disk_filling_up_at_the_final_lora_keeps_the_checkpoints_and_a_rerun_finishes(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    run, cfg = new_run(tmp_path, optim__steps=6, output__save_every=2)
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with monkeypatch.context() as m:
        full_disk_on(m, safetensors.torch, "save_file", ".tmp-final", full)
        with pytest.raises(DiskFullError, match=re.escape(f"the disk holding {run} is full")) as err:
            train(run, cfg)
    assert "MB is needed" in str(err.value) and "free space" in err.value.hint
    assert not (run / "final").exists() and not (run / ".tmp-final").exists()
    assert [verify(c) for c in sorted((run / "checkpoints").iterdir())] == [None, None]  # step 2 and step 4, whole
    reset_accelerate()
    assert train(run, config_mod.load(run))["status"] == "finished"  # space freed: nothing was lost
    assert events(run, "started")[-1]["resumed_from"] == "checkpoints/step-000004"
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_a_disk_filling_up_while_samples_are_saved_is_told_as_a_full_disk(tmp_path, monkeypatch):
    from PIL import Image

    run, cfg = new_run(tmp_path, optim__steps=6, output__save_every=2, sampling__every=2)
    with monkeypatch.context() as m:  # PIL's write fails; the OSError carries no file name
        full_disk_on(m, Image.Image, "save", "step-000004", OSError(errno.ENOSPC, "No space left on device"))
        with pytest.raises(DiskFullError, match=re.escape(f"the disk holding {run} is full")):
            train(run, cfg)
    assert verify(run / "checkpoints" / "step-000002") is None
    reset_accelerate()
    assert train(run, config_mod.load(run))["status"] == "finished"
    assert events(run, "started")[-1]["resumed_from"] == "checkpoints/step-000002"


def test_a_full_disk_while_writing_config_toml_is_one_clear_line(tmp_path, monkeypatch):
    import lora_trainer.fsutil as fsutil

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", no_space)
    with pytest.raises(DiskFullError, match=re.escape(f"the disk holding {tmp_path / 'run'} is full")):
        config_mod.save(config_mod.TrainConfig(), tmp_path / "run")
    assert [p.name for p in (tmp_path / "run").iterdir()] == []  # no temp file left behind


def test_what_a_killed_writer_left_is_cleaned_up_on_the_next_start(tmp_path):
    run, cfg = new_run(tmp_path, optim__steps=2)
    (run / "checkpoints" / ".tmp-step-000002" / "state").mkdir(parents=True)
    (run / ".tmp-final").mkdir()
    train(run, cfg)
    assert not list(run.glob(".tmp-*")) and not list((run / "checkpoints").glob(".tmp-*"))


# -- images removed mid-run ---------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_removed_while_training_without_a_cache_fails_clearly(tmp_path, workers):
    run, cfg = new_run(tmp_path, optim__steps=20, data__cache_latents=False, data__num_workers=workers)
    images = sorted((tmp_path / "images").glob("*.png"))

    def remove_images(event):
        if event["type"] == "step" and event["step"] == 1:
            for image in images:
                image.unlink()

    with pytest.raises(TrainingFailed, match="an image of the dataset can no longer be read: .*img00.\\.png \\(it was deleted or moved\\)") as err:
        train(run, cfg, listeners=[remove_images])
    assert "put the image back" in err.value.hint


# -- stop at any moment --------------------------------------------------------------------------------------
def sigterm_on_call(monkeypatch, target, name: str, calls: list) -> None:
    real = getattr(target, name)

    def wrapped(*args, **kwargs):
        calls.append(name)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # handled before this call returns
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapped)


@pytest.mark.parametrize("phase", ["loading the model", "caching latents", "caching text embeddings"])
def test_a_stop_while_the_model_loads_or_caches_fill_writes_stopped(tmp_path, monkeypatch, phase):
    from lora_trainer import dataset as ds
    from lora_trainer import models
    from lora_trainer import train as train_mod

    run, cfg = new_run(tmp_path, data__cache_text_embeddings=True)
    calls: list = []
    if phase == "loading the model":
        sigterm_on_call(monkeypatch, models, "load_pipeline", calls)
    elif phase == "caching latents":
        sigterm_on_call(monkeypatch, ds, "load_pixels", calls)
    else:
        sigterm_on_call(monkeypatch, train_mod, "encode_text", calls)
    result = train(run, cfg)
    assert result["status"] == "stopped"
    assert [e["type"] for e in events(run)] == ["stopped"] and events(run)[0]["before_training"] is True
    if phase != "loading the model":
        assert len(calls) == 1  # it stopped before the next image or caption, not after all of them


def test_a_damaged_image_found_while_caching_latents_fails_naming_it(tmp_path):
    from PIL import Image

    run, cfg = new_run(tmp_path, data__cache_latents=True)
    damaged = tmp_path / "images" / "img002.jpg"
    Image.open(damaged.with_suffix(".png")).save(damaged, quality=95)
    damaged.with_suffix(".png").unlink()
    damaged.write_bytes(damaged.read_bytes()[:700])  # a JPEG's header (and size) still reads; its pixels do not
    with pytest.raises(TrainingFailed, match=re.escape(f"an image of the dataset can no longer be read: {damaged} (")) as err:
        train(run, cfg)
    assert "put the image back" in err.value.hint


def test_a_stop_while_samples_render_interrupts_them_between_denoising_steps(tmp_path, monkeypatch):
    from diffusers import EulerDiscreteScheduler

    run, cfg = new_run(tmp_path, sampling__every=5, sampling__steps=40, sampling__prompts=["a", "b", "c"])
    denoising_steps = []
    real_step = EulerDiscreteScheduler.step

    def counting_step(self, *args, **kwargs):
        denoising_steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(EulerDiscreteScheduler, "step", counting_step)

    def stop_when_started(event):
        if event["type"] == "started":
            os.kill(os.getpid(), signal.SIGTERM)

    assert train(run, cfg, listeners=[stop_when_started])["status"] == "stopped"
    assert len(denoising_steps) <= 2  # of 3 x 40: the first step's callback interrupted the render
    assert events(run)[-1]["type"] == "stopped" and not events(run, "sample")
    assert not (run / "samples" / "step-000000").exists()  # no half set of samples


def test_a_stop_while_a_checkpoint_is_written_keeps_it_whole_and_stops_after_the_next_step(tmp_path, monkeypatch):
    run, cfg = new_run(tmp_path, optim__steps=8, output__save_every=2)
    calls: list = []
    sigterm_on_call(monkeypatch, torch, "save", calls)  # the first torch.save: step-000002's optimizer state
    result = train(run, cfg)
    assert result["status"] == "stopped" and result["step"] == 3
    assert [c.name for c in sorted((run / "checkpoints").iterdir())] == ["step-000002", "step-000003"]
    assert [verify(c) for c in sorted((run / "checkpoints").iterdir())] == [None, None]
    assert events(run)[-1]["type"] == "stopped"


class StopOnFirstScore:
    """Stands in for eval_scores.Scorer: scoring the first adapter sends SIGTERM (as Stop does)."""

    scored: list = []

    def __init__(self, *args, **kwargs):
        pass

    def validation_loss(self, lora):
        self.scored.append(lora)
        if len(self.scored) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return 0.1

    def scores(self, lora, name):
        return {}


def test_a_stop_during_the_evaluation_after_training_skips_the_rest_and_keeps_the_lora(tmp_path, monkeypatch):
    from lora_trainer import eval_scores

    run, cfg = new_run(tmp_path, optim__steps=4, output__save_every=2, eval__after_training="on")
    monkeypatch.setattr(eval_scores, "Scorer", StopOnFirstScore)
    StopOnFirstScore.scored = []
    assert train(run, cfg)["status"] == "finished"  # the last step was done: the LoRA is finished
    assert len(StopOnFirstScore.scored) == 1  # of base, step-000002, step-000004 and final
    evaluation = events(run, "evaluation")[-1]
    assert evaluation["reason"] == "skipped: a stop was requested" and evaluation["best"] is None
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file() and not (run / "evaluation.json").exists()


def test_an_image_that_cannot_be_read_at_all_is_left_out_with_a_warning(tmp_path):
    from lora_trainer.preflight import preflight

    run, cfg = new_run(tmp_path)
    (tmp_path / "images" / "img001.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    report = preflight(run, cfg, gpu=False)
    assert len(report.warnings) == 1
    assert report.warnings[0].startswith(f"1 image(s) cannot be read and are left out: {tmp_path / 'images' / 'img001.png'} (")
