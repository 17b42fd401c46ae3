"""The pre-flight check the CLI and the Check button share: plan and estimate, no model loaded."""

from __future__ import annotations

import pytest
from conftest import config_only_model, make_images, tiny_config

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
    sdxl = config_only_model(tmp_path / "sdxl", "sdxl")
    cfg = tiny_config(make_images(tmp_path / "images"), model__base=str(sdxl), data__resolution=1024, data__bucket_step=64)
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


@pytest.mark.parametrize("resolution, message", [(40, "must be a multiple of 16 px"), (8, "at least 16 px")])
def test_a_resolution_the_base_cannot_take_is_refused_with_its_native_one(tmp_path, resolution, message):
    from lora_trainer.errors import ConfigError

    cfg = tiny_config(make_images(tmp_path / "images"), data__resolution=resolution)
    with pytest.raises(ConfigError, match=message) as err:
        preflight(tmp_path, cfg, gpu=False)
    assert "native resolution is 64" in str(err.value) and "builtin:tiny-sd" in str(err.value)


def test_resolution_and_bucket_step_zero_mean_the_bases_own(tmp_path):
    cfg = tiny_config(make_images(tmp_path / "images"), data__resolution=0, data__bucket_step=0)
    report = preflight(tmp_path, cfg, gpu=False)
    assert report.resolution == 64 and all(w % 16 == 0 and h % 16 == 0 for w, h, _ in report.buckets)


@pytest.mark.parametrize(
    "settings, warning",
    [
        ({"optim__learning_rate": 5.0}, "optim.learning_rate = 5 is far outside the usual range for adamw (usually 1e-06 to 0.01)"),
        ({"optim__learning_rate": 1e-9}, "expect the LoRA to learn almost nothing"),
        ({"optim__optimizer": "prodigy", "optim__learning_rate": 1e-4}, "for prodigy (usually 1)"),
        ({"data__trigger": "my style"}, "data.trigger = 'my style' has spaces"),
    ],
)
def test_settings_that_train_but_probably_not_as_meant_are_warned_about(tmp_path, settings, warning, caplog):
    from lora_trainer import config as config_mod
    from lora_trainer.events import read_events
    from lora_trainer.train import train

    cfg = tiny_config(make_images(tmp_path / "images"), optim__steps=1, **settings)
    report = preflight(tmp_path, cfg, gpu=False)
    assert any(warning in w for w in report.warnings) and f"warning: {report.warnings[0]}" in report.format()
    config_mod.save(cfg, tmp_path / "run")
    train(tmp_path / "run", cfg)
    started = next(e for e in read_events(tmp_path / "run" / "events.jsonl")[0] if e["type"] == "started")
    assert started["warnings"] == report.warnings
    assert any(warning in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_a_usual_learning_rate_gets_no_warning(tmp_path):
    assert preflight(tmp_path, tiny_config(make_images(tmp_path / "images")), gpu=False).warnings == []


def test_an_empty_trigger_is_refused_where_an_image_has_no_caption(tmp_path):
    from lora_trainer.errors import ConfigError

    images = make_images(tmp_path / "images", 2)
    (images / "img001.txt").unlink()
    with pytest.raises(ConfigError, match=r"data.trigger is empty and 1 image\(s\) have no caption \(e.g. img001.png\)"):
        preflight(tmp_path, tiny_config(images, data__trigger=""), gpu=False)
    (images / "img001.txt").write_text("ohwx, a caption")
    report = preflight(tmp_path, tiny_config(images, data__trigger=""), gpu=False)  # every image captioned: a warning
    assert any("data.trigger is empty" in w for w in report.warnings)


# -- memory: the estimate and the plan's verdict, as check prints them ---------------------------------
GiB = 2**30


def published_model(folder, kind: str):
    """A diffusers folder with every published SD 1.5 / SDXL component config and no weights."""
    import json

    from lora_trainer.memory.published import PUBLISHED

    classes = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "text_encoder": "CLIPTextModel",
               "text_encoder_2": "CLIPTextModelWithProjection"}
    index = {"_class_name": "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"}
    for name, config in PUBLISHED[kind].items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config))
        index[name] = ["diffusers" if name in ("unet", "vae") else "transformers", classes[name]]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def check_output(tmp_path, capsys, kind: str, gib: float | None, **settings) -> tuple[int, str]:
    """`python -m lora_trainer check RUN [--gpu-memory GIB]` on a run of the published `kind` at its native size."""
    from lora_trainer import config as config_mod
    from lora_trainer.cli import main

    base = published_model(tmp_path / kind, kind)
    values = {"model__base": str(base), "data__resolution": 1024 if kind == "sdxl" else 512, "data__bucket_step": 64,
              "lora__rank": 32, "optim__mixed_precision": "bf16", "sampling__every": 100, **settings}
    config_mod.save(tiny_config(make_images(tmp_path / "images"), **values), tmp_path / "run")
    capsys.readouterr()
    code = main(["check", str(tmp_path / "run"), *(["--gpu-memory", str(gib)] if gib else [])])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("kind, gib, expected", [
    # SD 1.5 512 px rank 32 bf16: the UNet in bf16, encoders off the GPU, no concession needed on 6 GiB.
    ("sd", 6, ["UNet weights                        1.60 GiB  859.5M params, bf16", "LoRA weights",
               "text encoder weights                0.00 GiB  off the GPU (captions cached)",
               "gradient checkpointing off", "memory: fits: peak 3.", "system RAM while loading:"]),
    # SDXL 1024 px on 12 GiB: 8-bit AdamW is not enough (13.8 GiB), gradient checkpointing is.
    ("sdxl", 12, ["UNet weights                        4.78 GiB  2567.5M params, bf16", "would need 13.",
                  "gradient checkpointing on: activations are recomputed", "peak: 10.39 GiB (sample renders)",
                  "memory: fits:"]),
])
def test_check_prints_the_memory_estimate_and_the_plan(tmp_path, capsys, kind, gib, expected):
    code, out = check_output(tmp_path, capsys, kind, gib)
    assert code == 0
    assert f"memory plan for a GPU of {gib:.2f} GiB:" in out
    for line in expected:
        assert line in out, line


def test_check_refuses_a_run_that_cannot_fit_with_the_change_that_would(tmp_path, capsys):
    code, out = check_output(tmp_path, capsys, "sdxl", 8)
    assert code == 1
    assert "does not fit, the trainer would refuse it before loading: this run needs at least 10.13 GiB" in out
    assert "To fit: lower data.resolution to 256" in out


def test_memory_off_trains_the_settings_as_given_and_check_says_they_do_not_fit(tmp_path, capsys):
    code, out = check_output(tmp_path, capsys, "sd", 4, optim__batch_size=8, optim__memory="off")
    assert code == 0  # the user's call: the trainer does not refuse it
    assert "optim.memory = off: training with the settings as given" in out
    assert "batch 8 at 512x512" in out and "memory: DOES NOT FIT" in out


def test_the_memory_plan_changes_the_batch_check_reports(tmp_path):
    from lora_trainer import memory

    cfg = tiny_config(make_images(tmp_path / "images"), optim__batch_size=4)
    one, four = (memory.estimate(tiny_config(tmp_path / "images", optim__batch_size=b, optim__mixed_precision="bf16")).total
                 for b in (1, 4))
    card = int((one + four) / 2 / memory.plan.HEADROOM)  # batch 1 fits, batch 4 does not
    planned = preflight(tmp_path, cfg, gpu=False, gpu_memory=card)
    assert (planned.batch_size, planned.accumulation) != (4, 1)
    assert planned.batch_size * planned.accumulation == 4
    assert any("same 4 images per step" in r for r in planned.memory.plan)
    assert f"batch {planned.batch_size} x {planned.accumulation} accumulation" in planned.format()


def test_without_a_gpu_a_builtin_model_is_estimated_as_it_trains_here(tmp_path):
    report = preflight(tmp_path, tiny_config(make_images(tmp_path / "images")), gpu=False)
    text = report.format()
    assert report.memory.estimate.device == "cpu" and report.memory.estimate.total > 0
    assert "memory plan for no GPU found:" in text and "memory (training on the CPU), training step:" in text
    assert "CUDA context" not in text and "check --gpu-memory GB" in text
    assert report.to_dict()["memory"]["peak_bytes"] == report.memory.estimate.total


def test_the_time_estimate_says_what_it_is_based_on_and_counts_the_evaluation(tmp_path):
    images = make_images(tmp_path / "images")
    without = preflight(tmp_path, tiny_config(images, eval__after_training="off"), gpu=False)
    evaluated = preflight(tmp_path, tiny_config(images, eval__after_training="on"), gpu=False)
    slower = preflight(tmp_path, tiny_config(images, optim__gradient_checkpointing=True, eval__after_training="off"), gpu=False)
    assert evaluated.estimate_seconds > without.estimate_seconds
    assert slower.estimate_seconds > without.estimate_seconds
    assert "the tiny model's seconds per step on 2 CPU cores" in without.format()


# -- the time estimate: one rule for check and the live ETA (timing.py) -----------------------------------
@pytest.mark.parametrize("every, done, total, left", [
    (0, 0, 100, 0),  # no samples
    (50, 0, 100, 2),  # at step 50 and at the end
    (50, 50, 100, 1),  # step 50's set is done: the end's is left
    (30, 0, 100, 4),  # 30, 60, 90 and the end
    (10, 100, 100, 1),  # the last step's event comes before the final set
    (200, 0, 100, 1),  # only the end's
])
def test_sample_renders_left_counts_the_schedule_and_the_final_set(every, done, total, left):
    from lora_trainer.timing import sample_renders_left

    assert sample_renders_left(every, done, total) == left


@pytest.mark.parametrize("save_every, keep, trigger, total, images", [
    (0, 0, "ohwx", 300, 2 * 4 * 2 * 2),  # base + final; 4 prompts x 2 seeds, with and without the trigger
    (100, 0, "ohwx", 300, 4 * 4 * 2 * 2),  # base, steps 100 and 200, the last step
    (100, 2, "ohwx", 300, 3 * 4 * 2 * 2),  # only the newest 2 checkpoints are kept
    (100, 0, "", 250, 4 * 4 * 2),  # without a trigger each image is made once
])
def test_the_evaluation_renders_each_kept_checkpoints_prompts_and_seeds(tmp_path, save_every, keep, trigger, total, images):
    from lora_trainer.timing import evaluation_images

    cfg = tiny_config(make_images(tmp_path / "images"), output__save_every=save_every, output__keep_checkpoints=keep,
                      data__trigger=trigger, sampling__prompts=["a circle"])
    assert evaluation_images(cfg, total) == images


def test_the_estimate_is_loading_steps_renders_and_evaluation_at_the_rates(tmp_path):
    from lora_trainer.plan import plan_run
    from lora_trainer.preflight import estimate_seconds
    from lora_trainer.timing import Rates

    cfg = tiny_config(make_images(tmp_path / "images"), optim__steps=100, sampling__every=50, sampling__steps=3,
                      eval__after_training="on", eval__steps=5, sampling__prompts=["ohwx, a", "ohwx, b"])
    rates = Rates(step=0.5, denoise=0.1, decode=0.2, basis="test", load=7.0)
    renders = 3 * 2 * (3 * 0.1 + 0.2)  # the base's at step 0, at step 50 and at the end; 2 prompts each
    evaluation = (2 * 4 * 2 * 2) * (5 * 0.1 + 0.2)  # base + final, 4 prompts x 2 seeds x with/without trigger
    assert estimate_seconds(cfg, plan_run(cfg, tmp_path), False, rates) == pytest.approx(7.0 + 100 * 0.5 + renders + evaluation)


def test_check_times_a_few_real_steps_of_a_builtin_base(tmp_path):
    cfg = tiny_config(make_images(tmp_path / "images"), optim__steps=20, sampling__every=10)
    report = preflight(tmp_path, cfg, gpu=False, calibrate=True)
    assert "measured on this machine's CPU" in report.time_basis and "measured on" in report.format()
    table = preflight(tmp_path, cfg, gpu=False)
    assert "fixed table" in table.time_basis
    assert report.estimate_seconds > 0 and report.estimate_seconds != table.estimate_seconds


def test_the_live_eta_counts_the_renders_still_to_come(tmp_path):
    from lora_trainer import config as config_mod
    from lora_trainer.events import read_events
    from lora_trainer.timing import sample_renders_left
    from lora_trainer.train import train

    cfg = tiny_config(make_images(tmp_path / "images"), optim__steps=6, sampling__every=3, eval__after_training="off")
    run = tmp_path / "run"
    config_mod.save(cfg, run)
    train(run, cfg)
    steps = [e for e in read_events(run / "events.jsonl")[0] if e["type"] == "step"]
    assert [e["step"] for e in steps] == list(range(1, 7))
    for e in steps:
        parts = e["eta_parts"]
        assert e["eta_seconds"] == pytest.approx(sum(parts.values()), abs=0.3)
        assert parts["training"] == pytest.approx(e["sec_per_step"] * (6 - e["step"]), abs=0.1)
        assert parts["evaluation"] == 0  # eval.after_training = off
        assert sample_renders_left(3, e["step"], 6) >= 1 and parts["samples"] > 0  # the base's set at step 0 was timed
    last = steps[-1]
    assert last["eta_parts"]["training"] == 0 and last["eta_seconds"] > 0  # the final samples are still to come
