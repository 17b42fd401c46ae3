"""Prior preservation with regularization images: every batch gains as many class images, their loss weighed by
optim.prior_loss_weight; they come in through the CLI and kohya's is_reg subsets, and a run with them resumes
exactly, on SD and SDXL."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_images
from safetensors.torch import load_file
from test_methods import run_training, stop_at

from lora_trainer import cli
from lora_trainer import dataset as ds
from lora_trainer.config import ConfigError
from lora_trainer.events import read_events
from lora_trainer.formats import DIFFUSERS_FILENAME
from lora_trainer.prior import RegStream, global_batch, scan_reg

SQUARE = ((80, 80),)  # class images as a base renders them; the training images come in three aspect ratios


def reg_folder(tmp_path: Path, count: int = 3) -> Path:
    return make_images(tmp_path / "reg", count, captions=False, sizes=SQUARE)


def step_events(run: Path) -> list[dict]:
    return [e for e in read_events(run / "events.jsonl")[0] if e["type"] == "step"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "final" / DIFFUSERS_FILENAME)


# -- what the loop trains ----------------------------------------------------------------------------------
def test_reg_images_change_the_lora_and_each_step_event_carries_the_prior_term(tmp_path):
    images, reg = make_images(tmp_path / "images"), reg_folder(tmp_path)
    common = {"optim__steps": 3, "optim__batch_size": 2}
    plain = run_training(tmp_path, "plain", images, **common)
    prior = run_training(tmp_path, "prior", images, data__reg_images=str(reg), data__reg_caption="a shape", **common)
    assert any(not torch.allclose(weights(prior)[k], v, atol=1e-6) for k, v in weights(plain).items())
    assert all("prior_loss" not in e for e in step_events(plain))
    events = step_events(prior)
    assert [e["step"] for e in events] == [1, 2, 3]
    assert all(0 < e["prior_loss"] < e["loss"] for e in events)  # the loss is the instance loss plus this term


def test_a_prior_loss_weight_of_zero_trains_what_no_reg_images_train(tmp_path):
    """The regularization images still go through the UNet, beside the training images, but add nothing: the
    training images keep their noise and timesteps, and the weights end where they end without them."""
    images, reg = make_images(tmp_path / "images"), reg_folder(tmp_path)
    common = {"optim__steps": 3, "optim__batch_size": 2}
    plain = weights(run_training(tmp_path, "plain", images, **common))
    zero = run_training(tmp_path, "zero", images, data__reg_images=str(reg), data__reg_caption="a shape",
                        optim__prior_loss_weight=0.0, **common)
    assert all(e["prior_loss"] == 0 for e in step_events(zero))
    for key, value in plain.items():
        torch.testing.assert_close(weights(zero)[key], value, rtol=0, atol=1e-6, msg=key)


# -- which images join which batch --------------------------------------------------------------------------
def planned(tmp_path: Path, batch_size: int = 2) -> tuple[list[ds.Item], ds.Plan, RegStream]:
    items = ds.scan(make_images(tmp_path / "images", 5), "ohwx")
    ds.assign_buckets(items, 64, 16, True)
    plan = ds.make_plan(items, batch_size, 1, 1, 20, 0)
    return items, plan, RegStream(scan_reg(reg_folder(tmp_path), "a shape"), seed=3, flip=True, batch_size=batch_size)


def test_each_batch_gains_as_many_reg_images_at_its_own_bucket_and_the_set_repeats(tmp_path):
    items, plan, reg = planned(tmp_path)
    batches = ds.micro_batches(items, 2, 3, True, plan, start_step=0, rank=0, processes=1)
    drawn = []
    for g in range(3 * plan.batches_per_epoch):  # three epochs of the training images
        batch = next(batches)
        samples = reg.samples(g, len(batch), items[batch[0][0]].bucket)
        assert len(samples) == len(batch) and {s[2] for s in samples} == {items[batch[0][0]].bucket}
        drawn += [s[0] for s in samples]
    assert len({items[i].bucket for i in range(len(items))}) > 1  # several buckets: the crops differ per batch
    assert len(drawn) == 3 * sum(i.repeats for i in items)  # one for every training image seen
    assert sorted(set(drawn)) == [0, 1, 2] and min(drawn.count(i) for i in range(3)) >= 2  # the 3 repeat


def test_two_processes_take_the_reg_images_of_their_own_batches(tmp_path):
    """Process r's k-th micro-batch is global batch k * processes + r: together they draw what one process draws."""
    items, plan, reg = planned(tmp_path)
    one = ds.micro_batches(items, 2, 3, True, plan, start_step=0, rank=0, processes=1)
    alone = [reg.samples(g, len(b), items[b[0][0]].bucket) for g, b in zip(range(8), one, strict=False)]
    shares = []
    for rank in (0, 1):
        mine = ds.micro_batches(items, 2, 3, True, plan, start_step=0, rank=rank, processes=2)
        shares.append([reg.samples(global_batch(k, 0, 1, rank, 2), len(b), items[b[0][0]].bucket)
                       for k, b in zip(range(4), mine, strict=False)])
    assert [s for pair in zip(*shares, strict=True) for s in pair] == alone


def test_a_reg_image_without_a_caption_needs_the_class_prompt(tmp_path):
    reg = reg_folder(tmp_path)
    with pytest.raises(ConfigError, match="data.reg_caption"):
        scan_reg(reg, "")
    assert {i.caption for i in scan_reg(reg, "a shape")} == {"a shape"}
    (reg / "img000.txt").write_text("a red square")
    assert sorted(i.caption for i in scan_reg(reg, "a shape")) == ["a red square", "a shape", "a shape"]


# -- resume, SDXL -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [{"data__cache_latents": False, "data__flip": True}, {"model__base": "builtin:tiny-sdxl"}],
                         ids=["sd-uncached-flipped", "sdxl"])
def test_a_stopped_run_with_reg_images_resumes_to_the_uninterrupted_weights(tmp_path, settings):
    images, reg = make_images(tmp_path / "images"), reg_folder(tmp_path)
    common = {"optim__steps": 5, "optim__batch_size": 2, "data__reg_images": str(reg), "data__reg_caption": "a shape",
              **settings}
    reference = run_training(tmp_path, "reference", images, **common)
    run = run_training(tmp_path, "stopped", images, listeners=[stop_at(2)], **common)
    assert not (run / "final").exists()
    run_training(tmp_path, "stopped", images, **common)
    assert [e["prior_loss"] for e in step_events(run)] == [e["prior_loss"] for e in step_events(reference)]
    for key, value in weights(reference).items():
        torch.testing.assert_close(weights(run)[key], value, rtol=0, atol=1e-6, msg=key)


# -- intake: the CLI and kohya's is_reg subsets -------------------------------------------------------------
def kohya_with_reg(tmp_path: Path) -> Path:
    make_images(tmp_path / "train" / "5_ohwx", 2)
    make_images(tmp_path / "class" / "1_shape", 3, captions=False, sizes=SQUARE)
    toml = tmp_path / "dataset.toml"
    toml.write_text("""
[general]
flip_aug = true
[[datasets]]
  [[datasets.subsets]]
  image_dir = "train/5_ohwx"
  [[datasets.subsets]]
  image_dir = "class/1_shape"
  is_reg = true
  num_repeats = 2
  class_tokens = "a shape"
  flip_aug = false
""", encoding="utf-8")
    return toml


def test_a_kohya_is_reg_subset_lands_in_run_reg_and_check_counts_it(tmp_path, capsys):
    toml = kohya_with_reg(tmp_path)
    run = tmp_path / "run"
    assert cli.main(["check", "--images", str(toml), "--out", str(run), "--resolution", "64", "--set", "data.bucket_step=16"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*.png")) == [
        "dataset/5_ohwx/img000.png", "dataset/5_ohwx/img001.png",
        "reg/2_shape/img000.png", "reg/2_shape/img001.png", "reg/2_shape/img002.png",
    ]
    assert "Regularization images (is_reg subsets, for prior preservation):" in out
    assert "3 regularization images added" in out
    assert f"regularization images: 3 from {run / 'reg'}" in out
    assert "data.flip = True" in out and "data.reg_caption = 'a shape'" in out  # the reg subset's flip_aug is not taken


def test_reg_images_flag_takes_a_zip_into_run_reg(tmp_path, capsys):
    import zipfile

    reg = reg_folder(tmp_path)
    with zipfile.ZipFile(tmp_path / "class.zip", "w") as zf:
        for image in sorted(reg.glob("*.png")):
            zf.write(image, image.name)
    images, run = make_images(tmp_path / "images"), tmp_path / "run"
    args = ["check", "--images", str(images), "--reg-images", str(tmp_path / "class.zip"), "--out", str(run),
            "--resolution", "64", "--set", "data.bucket_step=16", "--set", "data.reg_caption=a shape"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert len(list((run / "reg").glob("*.png"))) == 3
    assert f"regularization images: 3 from {run / 'reg'} (prior preservation at weight 1" in out


def test_without_a_reg_folder_a_dataset_toml_reg_subset_is_left_out_with_a_warning(tmp_path):
    from lora_trainer.intake import ingest

    report = ingest([kohya_with_reg(tmp_path)], tmp_path / "dest", resolution=64)
    assert len(report.images) == 2 and report.reg is None
    assert any("is_reg" in w.message and "subset ignored" in w.message for w in report.warnings)
