"""Checkpoints off the box: a training run pushes its checkpoints, a fresh folder resumes from the Hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_images, tiny_config
from fake_hub import WRITE_TOKEN, FakeHub

from lora_trainer import config as config_mod
from lora_trainer.events import read_events

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def hub_env(tmp_path):
    with FakeHub() as server:
        env = {
            **os.environ, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": server.url, "HF_TOKEN": WRITE_TOKEN,
            "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"),
        }
        yield server, env


def trainer(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lora_trainer", "train", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_checkpoints_are_pushed_during_training_and_a_fresh_folder_resumes_from_them(tmp_path, hub_env):
    server, env = hub_env
    run = tmp_path / "first-machine"
    cfg = tiny_config(make_images(tmp_path / "images"), optim__steps=6, output__save_every=3, output__keep_checkpoints=1,
                      output__push_checkpoints_to="alice/my-lora-ckpts")
    config_mod.save(cfg, run)
    result = trainer(env, str(run), "--images", cfg.data.images)  # intake copies them into the run's dataset/
    assert config_mod.load(run).data.images == "dataset"
    assert result.returncode == 0, result.stderr[-2000:]
    stored = server.repos["alice/my-lora-ckpts"].files
    for step in ("step-000003", "step-000006"):
        assert f"checkpoints/{step}/trainer_state.json" in stored
        assert f"checkpoints/{step}/state/optimizer.pt" in stored
        local = run / "checkpoints" / step / "state" / "adapter.safetensors"
        if local.exists():
            assert stored[f"checkpoints/{step}/state/adapter.safetensors"] == local.read_bytes()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000006"]  # pruned after its push
    for image in (run / "dataset").iterdir():
        assert stored[f"dataset/{image.name}"] == image.read_bytes()  # the images travel with the checkpoints

    # A fresh machine: a longer run continues from the newest pushed checkpoint instead of step 0.
    fresh = tmp_path / "second-machine"
    result = trainer(env, str(fresh), "--resume-from", "hub:alice/my-lora-ckpts", "--steps", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    started = [e for e in read_events(fresh / "events.jsonl")[0] if e["type"] == "started"]
    assert started[0]["resumed"] and started[0]["step"] == 6 and started[0]["total_steps"] == 8
    assert config_mod.load(fresh).output.push_checkpoints_to == "alice/my-lora-ckpts"
    assert sorted(p.name for p in (fresh / "dataset").iterdir()) == sorted(p.name for p in (run / "dataset").iterdir())
    assert (fresh / "final" / "pytorch_lora_weights.safetensors").exists()
    for path in fresh.rglob("*"):
        if path.is_file():
            assert WRITE_TOKEN.encode() not in path.read_bytes(), path
