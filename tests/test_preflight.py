"""The pre-flight check the CLI and the Check button share: plan and estimate, no model loaded."""

from __future__ import annotations

import pytest
from conftest import make_images, tiny_config

from lora_trainer.models import guess_kind
from lora_trainer.preflight import format_duration, preflight


def test_preflight_plans_like_the_trainer_and_estimates_the_tiny_model(tmp_path):
    cfg = tiny_config(make_images(tmp_path / "images"), optim__steps=100, sampling__every=50)
    report = preflight(tmp_path, cfg, gpu=False)
    assert (report.images, report.plan.total_steps, report.plan.steps_per_epoch) == (4, 100, 4)
    assert sum(n for _, _, n in report.buckets) == 4
    assert report.estimate_seconds is not None and 10 < report.estimate_seconds < 60
    text = report.format()
    assert "plan: 100 steps" in text and "estimated time: about" in text


def test_preflight_predicts_the_steps_epochs_and_buckets_the_trainer_runs(tmp_path):
    from lora_trainer import config as config_mod
    from lora_trainer.events import read_events
    from lora_trainer.train import train

    make_images(tmp_path / "images", 3)
    make_images(tmp_path / "images" / "2_more", 2, sizes=((96, 64),))  # kohya repeats and a second bucket
    cfg = tiny_config(tmp_path / "images", optim__epochs=2, optim__batch_size=2)
    run = tmp_path / "run"
    config_mod.save(cfg, run)
    report = preflight(run, cfg, gpu=False)
    train(run, cfg)
    events = read_events(run / "events.jsonl")[0]
    started = next(e for e in events if e["type"] == "started")
    assert started["total_steps"] == report.plan.total_steps == sum(e["type"] == "step" for e in events)
    assert started["plan"]["steps_per_epoch"] == report.plan.steps_per_epoch
    assert started["plan"]["epochs"] == report.plan.epochs == 2
    assert started["plan"]["buckets"] == [[w, h] for w, h, _ in report.buckets] and len(report.buckets) > 1
    assert started["plan"]["repeats"] == report.per_epoch == 3 + 2 * 2


@pytest.mark.parametrize("gpu, expect_estimate", [(False, False), (True, True)])
def test_a_real_model_is_only_estimated_with_a_gpu(tmp_path, gpu, expect_estimate):
    cfg = tiny_config(make_images(tmp_path / "images"), model__base="stabilityai/stable-diffusion-xl-base-1.0", data__resolution=1024)
    report = preflight(tmp_path, cfg, gpu=gpu)
    assert (report.estimate_seconds is not None) == expect_estimate
    assert ("days without a GPU" in report.format()) != expect_estimate
    assert len(report.small) == 4  # 64-96 px images for a 1024 px run: each is named


@pytest.mark.parametrize(
    "base, kind",
    [("builtin:tiny-sdxl", "sdxl"), ("stable-diffusion-v1-5/stable-diffusion-v1-5", "sd"), ("someone/my-xl-finetune", "sdxl"), ("someone/dreamshaper", "sd")],
)
def test_the_model_family_is_known_without_a_download(base, kind):
    assert guess_kind(base) == kind


@pytest.mark.parametrize("seconds, text", [(None, "—"), (59.6, "1:00"), (3725, "1:02:05")])
def test_durations_read_like_a_clock(seconds, text):
    assert format_duration(seconds) == text
