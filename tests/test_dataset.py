"""The trainer's dataset reader, buckets and batch plan."""

from __future__ import annotations

import random

import pytest
from conftest import make_images

from lora_trainer import dataset as ds
from lora_trainer.errors import DatasetError


def test_scan_reads_captions_repeats_and_falls_back_to_the_trigger(tmp_path):
    make_images(tmp_path / "data", 2)
    make_images(tmp_path / "data" / "5_faces", 1, captions=False)
    items = ds.scan(tmp_path / "data", trigger="zwx")
    by_name = {i.image.relative_to(tmp_path / "data").as_posix(): i for i in items}
    assert by_name["img000.png"].caption == "ohwx, stripes number 0"
    assert by_name["img000.png"].repeats == 1
    assert by_name["5_faces/img000.png"].repeats == 5
    assert by_name["5_faces/img000.png"].caption == "zwx"


def test_scan_refuses_an_empty_folder_with_advice(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no usable images"):
        ds.scan(tmp_path / "empty", "ohwx")


def test_buckets_keep_area_and_follow_aspect_ratio(tmp_path):
    buckets = ds.make_buckets(512, 64)
    assert (512, 512) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    items = ds.scan(make_images(tmp_path / "d", 4), "t")
    ds.assign_buckets(items, 64, 16, enabled=True)
    shapes = {i.size: i.bucket for i in items}
    assert shapes[(96, 64)][0] > shapes[(96, 64)][1]  # landscape stays landscape
    assert shapes[(64, 96)][0] < shapes[(64, 96)][1]
    assert shapes[(64, 64)] == (64, 64)
    ds.assign_buckets(items, 64, 16, enabled=False)
    assert {i.bucket for i in items} == {(64, 64)}


def test_load_pixels_has_the_bucket_shape_and_range(tmp_path):
    items = ds.scan(make_images(tmp_path / "d", 2), "t")
    ds.assign_buckets(items, 64, 16, enabled=True)
    pixels, _ = ds.load_pixels(items[1], flip=False)
    flipped, _ = ds.load_pixels(items[1], flip=True)
    assert tuple(pixels.shape) == (3, items[1].bucket[1], items[1].bucket[0])
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert (flipped.flip(-1) == pixels).all()


def _items(tmp_path, n=6):
    items = ds.scan(make_images(tmp_path / "d", n), "t")
    ds.assign_buckets(items, 64, 16, enabled=True)
    return items


def test_a_resumed_plan_continues_with_the_same_batches(tmp_path):
    items = _items(tmp_path)
    plan = ds.make_plan(items, 2, 1, 1, steps=20, epochs=0)
    whole = ds.micro_batches(items, 2, 7, True, plan, start_step=0, rank=0, processes=1)
    first_run = [next(whole) for _ in range(20)]
    resumed = ds.micro_batches(items, 2, 7, True, plan, start_step=13, rank=0, processes=1)
    assert [next(resumed) for _ in range(7)] == first_run[13:]


def test_processes_share_each_step_without_overlap(tmp_path):
    items = _items(tmp_path)
    plan = ds.make_plan(items, 1, 1, 2, steps=10, epochs=0)
    single = ds.micro_batches(items, 1, 3, False, ds.make_plan(items, 1, 1, 1, 10, 0), start_step=0, rank=0, processes=1)
    global_order = [next(single) for _ in range(6)]
    r0 = ds.micro_batches(items, 1, 3, False, plan, start_step=0, rank=0, processes=2)
    r1 = ds.micro_batches(items, 1, 3, False, plan, start_step=0, rank=1, processes=2)
    assert [next(r0) for _ in range(3)] == global_order[0::2]
    assert [next(r1) for _ in range(3)] == global_order[1::2]


def test_epochs_count_repeats(tmp_path):
    make_images(tmp_path / "d" / "3_x", 2)
    items = ds.scan(tmp_path / "d", "t")
    ds.assign_buckets(items, 64, 16, enabled=False)
    plan = ds.make_plan(items, 1, 1, 1, steps=999, epochs=2)
    assert plan.steps_per_epoch == 6
    assert plan.total_steps == 12


@pytest.mark.parametrize(
    "caption, keep, expected_head",
    [("ohwx, red, blue, green, tall", 1, ["ohwx"]), ("ohwx, woman, red, blue, green", 2, ["ohwx", "woman"])],
)
def test_caption_shuffle_keeps_the_leading_tags(caption, keep, expected_head):
    outs = {ds.process_caption(caption, random.Random(s), shuffle=True, keep_tokens=keep, dropout=0) for s in range(20)}
    assert len(outs) > 1  # it does shuffle
    for out in outs:
        tags = out.split(", ")
        assert tags[:keep] == expected_head and sorted(tags) == sorted(caption.split(", "))


def test_caption_dropout_empties_some_captions():
    outs = [ds.process_caption("ohwx, a", random.Random(s), shuffle=False, keep_tokens=1, dropout=0.5) for s in range(200)]
    assert 50 < outs.count("") < 150 and outs.count("ohwx, a") + outs.count("") == 200


def test_a_rotated_phone_photo_is_bucketed_by_how_it_is_seen(tmp_path):
    from PIL import Image

    folder = tmp_path / "d"
    folder.mkdir()
    image = Image.new("RGB", (96, 64), "red")  # stored landscape, EXIF says: rotate to portrait
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(folder / "phone.jpg", exif=exif)
    items = ds.scan(folder, "t")
    ds.assign_buckets(items, 64, 16, enabled=True)
    assert items[0].size == (64, 96)
    assert items[0].bucket[0] < items[0].bucket[1]
    pixels, _ = ds.load_pixels(items[0], flip=False)
    assert pixels.shape[1] > pixels.shape[2]


def test_the_trainer_and_the_captions_tab_read_the_same_caption(tmp_path):
    from lora_trainer.intake import scan_captions, write_caption

    folder = make_images(tmp_path / "d", 3, captions=False)
    (folder / "img000.txt").write_bytes("\ufeffohwx, with a BOM\nand a second line".encode())
    (folder / "img001.caption").write_text("ohwx, kohya's other extension")
    (folder / "img002.txt").write_text("ohwx, the txt wins")
    (folder / "img002.caption").write_text("ohwx, not this one")
    trainer = {i.image.name: i.caption for i in ds.scan(folder, "zwx")}
    tab = {e.image.name: e.caption for e in scan_captions(folder)}
    assert trainer == tab == {
        "img000.png": "ohwx, with a BOM, and a second line", "img001.png": "ohwx, kohya's other extension",
        "img002.png": "ohwx, the txt wins",
    }
    write_caption(folder / "img001.png", "ohwx, edited")  # an edit wins everywhere: the .caption goes
    assert not (folder / "img001.caption").exists()
    assert {i.image.name: i.caption for i in ds.scan(folder, "zwx")}["img001.png"] == "ohwx, edited"


def test_data_repeats_repeats_every_image_times_its_folder_repeats(tmp_path):
    make_images(tmp_path / "d", 2)
    make_images(tmp_path / "d" / "3_more", 1)
    repeats = {i.image.relative_to(tmp_path / "d").as_posix(): i.repeats for i in ds.scan(tmp_path / "d", "t", repeats=2)}
    assert repeats == {"img000.png": 2, "img001.png": 2, "3_more/img000.png": 6}
