"""Intake: messy uploads in, a clean dataset folder out, and a reason for every file left out."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from badinputs import (
    BAD,
    GOOD,
    hf_imagefolder,
    jpeg_bytes,
    kohya_dataset,
    make_zip,
    noise,
    png_bytes,
    write_bad,
    write_good,
)
from PIL import Image

from lora_trainer.errors import DatasetError
from lora_trainer.intake import (
    SKIP_KINDS,
    CaptionEntry,
    IntakeLimits,
    ingest,
    iter_images,
    scan_captions,
    write_caption,
)


def companion(folder: Path) -> Path:
    """One good image, so a source that yields nothing does not make ingest raise."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "companion.png"
    path.write_bytes(png_bytes(noise(64, 64, 999)))
    return path


def images_by_stem(report) -> dict[str, Path]:
    return {p.stem: p for p in report.images}


# -- every bad input gets its own reason ---------------------------------------------------------
@pytest.mark.parametrize("bad", BAD, ids=[b.name for b in BAD])
def test_bad_input_is_skipped_with_its_reason(bad, tmp_path):
    sources = bad.make(tmp_path / "in") + [companion(tmp_path / "ok")]
    report = ingest(sources, tmp_path / "dest", resolution=64)
    matching = [s for s in report.skipped if s.kind == bad.kind and bad.marker in s.source]
    assert matching, f"expected a '{bad.kind}' skip for {bad.marker}; got {report.skipped}"
    assert all(s.reason for s in matching)
    assert "companion" in images_by_stem(report)


def test_bad_input_table_covers_every_kind():
    covered = {b.kind for b in BAD} | {"symlink"}  # symlinked folders: tested below (needs os.symlink)
    assert covered == set(SKIP_KINDS)
    assert len(BAD) >= 20


def test_whole_corpus_at_once_keeps_the_good_and_explains_the_rest(tmp_path):
    sources = write_bad(tmp_path / "bad") + write_good(tmp_path / "good")
    report = ingest(sources, tmp_path / "dest", resolution=64)
    for bad in BAD:
        assert any(s.kind == bad.kind and bad.marker in s.source for s in report.skipped), bad.name
    written = images_by_stem(report)
    for good in GOOD:
        assert Path(good.name).stem in written, good.name
    text = report.format()
    assert f"{len(report.images)} images added" in text
    for kind in {b.kind for b in BAD}:
        assert SKIP_KINDS[kind] in text
    assert json.loads(json.dumps(report.to_dict()))["captions_found"] == report.captions_found


# -- good images arrive intact -------------------------------------------------------------------
@pytest.mark.parametrize("good", GOOD, ids=[g.name for g in GOOD])
def test_good_image_is_normalised_to_rgb(good, tmp_path):
    write_good(tmp_path / "in")
    report = ingest([tmp_path / "in" / good.name], tmp_path / "dest", resolution=64)
    (out,) = report.images
    assert out.suffix == good.ext
    with Image.open(out) as im:
        assert im.mode == "RGB"
        assert im.size == good.size
        assert good.check(im)


def test_exif_rotation_is_applied_and_swaps_dimensions(tmp_path):
    write_good(tmp_path / "in")
    with Image.open(tmp_path / "in" / "rotated.jpg") as original:
        assert original.size == (80, 120)
    (out,) = ingest([tmp_path / "in" / "rotated.jpg"], tmp_path / "dest", resolution=64).images
    with Image.open(out) as im:
        assert im.size == (120, 80)
        assert im.getexif().get(0x0112) is None  # metadata is not copied


def test_transparent_area_becomes_white(tmp_path):
    write_good(tmp_path / "in")
    (out,) = ingest([tmp_path / "in" / "rgba.png"], tmp_path / "dest", resolution=64).images
    with Image.open(out) as im:
        assert im.getpixel((0, 0)) == (255, 255, 255)


def test_originals_are_never_modified(tmp_path):
    sources = write_good(tmp_path / "good") + write_bad(tmp_path / "bad")
    files = [p for s in sources if s.exists() for p in ([s] if s.is_file() else sorted(s.rglob("*"))) if p.is_file()]
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.stat().st_size < 2**24}
    ingest(sources, tmp_path / "dest", resolution=64)
    assert before == {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before}


def test_large_images_are_downscaled_to_max_side(tmp_path):
    (tmp_path / "big.png").write_bytes(png_bytes(noise(300, 150, 1)))
    report = ingest([tmp_path / "big.png"], tmp_path / "dest", limits=IntakeLimits(max_side=200), resolution=64)
    with Image.open(report.images[0]) as im:
        assert im.size == (200, 100)
    assert any("downscaled" in w.message for w in report.warnings)


# -- captions -------------------------------------------------------------------------------------
def test_captions_pair_by_name_and_land_beside_the_image(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(png_bytes(noise(64, 64, 1)))
    (folder / "a.txt").write_text("first image\nsecond line", encoding="utf-8")
    (folder / "sub" / "b.jpg").write_bytes(jpeg_bytes(noise(64, 64, 2)))
    (folder / "sub" / "b.caption").write_text("\ufeffwith a BOM", encoding="utf-8")
    (folder / "c.png").write_bytes(png_bytes(noise(64, 64, 3)))
    report = ingest([folder], tmp_path / "dest", resolution=64)
    written = images_by_stem(report)
    assert written["a"].with_suffix(".txt").read_text(encoding="utf-8") == "first image, second line"
    assert written["b"].with_suffix(".txt").read_text(encoding="utf-8") == "with a BOM"
    assert not written["c"].with_suffix(".txt").exists()
    assert report.captions_found == 2


def test_non_utf8_caption_is_dropped_but_its_image_kept(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(png_bytes(noise(64, 64, 1)))
    (tmp_path / "in" / "x.txt").write_bytes(b"caf\xe9")
    report = ingest([tmp_path / "in"], tmp_path / "dest", resolution=64)
    assert [p.name for p in report.images] == ["x.png"]
    assert not (tmp_path / "dest" / "x.txt").exists()


def test_loose_files_pair_by_name_across_folders(tmp_path):
    # a browser upload puts every file in its own temporary folder
    (tmp_path / "u1").mkdir()
    (tmp_path / "u2").mkdir()
    (tmp_path / "u1" / "cat.png").write_bytes(png_bytes(noise(64, 64, 1)))
    (tmp_path / "u2" / "cat.txt").write_text("a cat", encoding="utf-8")
    report = ingest([tmp_path / "u1" / "cat.png", tmp_path / "u2" / "cat.txt"], tmp_path / "dest", resolution=64)
    assert (tmp_path / "dest" / "cat.txt").read_text(encoding="utf-8") == "a cat"
    assert report.captions_found == 1


def test_metadata_jsonl_captions_are_applied(tmp_path):
    report = ingest([hf_imagefolder(tmp_path)], tmp_path / "dest", resolution=64)
    written = images_by_stem(report)
    assert sorted(written) == ["h0", "h1", "h2"]
    for i in range(3):
        assert written[f"h{i}"].with_suffix(".txt").read_text(encoding="utf-8") == f"hub caption {i}"


def test_caption_file_wins_over_metadata_jsonl(tmp_path):
    folder = hf_imagefolder(tmp_path)
    (folder / "train" / "h0.txt").write_text("my own caption", encoding="utf-8")
    report = ingest([folder], tmp_path / "dest", resolution=64)
    assert images_by_stem(report)["h0"].with_suffix(".txt").read_text(encoding="utf-8") == "my own caption"


def test_zip_with_nested_folders_and_captions(tmp_path):
    data = make_zip({
        "holiday/day1/p1.jpg": jpeg_bytes(noise(64, 64, 1)),
        "holiday/day1/p1.txt": b"on the beach",
        "holiday/day2/p2.png": png_bytes(noise(64, 64, 2)),
    })
    (tmp_path / "phone.zip").write_bytes(data)
    report = ingest([tmp_path / "phone.zip"], tmp_path / "dest", resolution=64)
    assert sorted(p.name for p in report.images) == ["p1.jpg", "p2.png"]
    assert (tmp_path / "dest" / "p1.txt").read_text(encoding="utf-8") == "on the beach"


# -- kohya ----------------------------------------------------------------------------------------
def test_kohya_repeat_folders_are_preserved(tmp_path):
    report = ingest([kohya_dataset(tmp_path)], tmp_path / "dest", resolution=64)
    dest = tmp_path / "dest"
    assert sorted(p.relative_to(dest).as_posix() for p in report.images) == [
        "10_ohwx/k0.png", "10_ohwx/k1.png", "3_style/s0.jpg",
    ]
    assert (dest / "10_ohwx" / "k1.txt").read_text(encoding="utf-8") == "ohwx, picture 1"
    assert (dest / "3_style" / "s0.txt").read_text(encoding="utf-8") == "style image"
    assert report.dest_counts == {"10_ohwx": 2, "3_style": 1}
    assert "2 x10 in 10_ohwx" in report.format()


@pytest.mark.parametrize("folder, expected", [
    ("10_ohwx woman", "10_ohwx_woman"),
    ("2023_holiday", None),  # a year, not 2023 repeats
    ("0_empty", None),
    ("plain", None),
])
def test_which_folder_names_mean_repeats(folder, expected, tmp_path):
    (tmp_path / "in" / folder).mkdir(parents=True)
    (tmp_path / "in" / folder / "x.png").write_bytes(png_bytes(noise(64, 64, 1)))
    (image,) = ingest([tmp_path / "in"], tmp_path / "dest", resolution=64).images
    assert image.parent == (tmp_path / "dest" / expected if expected else tmp_path / "dest")


def test_dataset_toml_maps_to_overrides_and_repeats(tmp_path):
    train = kohya_dataset(tmp_path)
    (tmp_path / "dataset.toml").write_text(f"""
[general]
shuffle_caption = true
keep_tokens = 2
caption_extension = ".txt"
flip_aug = true

[[datasets]]
resolution = 768
caption_dropout_rate = 0.05

  [[datasets.subsets]]
  image_dir = "{(train / '10_ohwx').as_posix()}"
  num_repeats = 4

  [[datasets.subsets]]
  image_dir = "train/3_style"
  caption_extension = ".caption"
""", encoding="utf-8")
    report = ingest([tmp_path / "dataset.toml"], tmp_path / "dest", resolution=64)
    assert report.config_overrides == {
        "data.shuffle_captions": True, "data.keep_tokens": 2, "data.flip": True,
        "data.resolution": 768, "data.caption_dropout": 0.05,
    }
    dest = tmp_path / "dest"
    # num_repeats overrides the folder's own prefix; a subset without it keeps its folder's prefix
    assert sorted(p.relative_to(dest).as_posix() for p in report.images) == [
        "3_style/s0.jpg", "4_ohwx/k0.png", "4_ohwx/k1.png",
    ]
    assert (dest / "3_style" / "s0.txt").read_text(encoding="utf-8") == "style image"


def test_dataset_toml_invalid_values_are_warned_not_applied(tmp_path):
    kohya_dataset(tmp_path)
    (tmp_path / "d.toml").write_text("""
[general]
resolution = 500
keep_tokens = 1
[[datasets]]
  [[datasets.subsets]]
  image_dir = "train/10_ohwx"
  keep_tokens = 3
  [[datasets.subsets]]
  image_dir = "train/3_style"
  [[datasets.subsets]]
  image_dir = "train/missing"
""", encoding="utf-8")
    report = ingest([tmp_path / "d.toml"], tmp_path / "dest", resolution=64)
    assert "data.resolution" not in report.config_overrides
    assert report.config_overrides["data.keep_tokens"] == 3
    assert any("resolution" in w.message for w in report.warnings)
    assert any("keep_tokens differs" in w.message for w in report.warnings)
    assert any(s.kind == "not-found" and "train/missing" in s.source for s in report.skipped)


def test_dataset_toml_may_not_read_folders_outside_its_own(tmp_path):
    elsewhere = kohya_dataset(tmp_path / "elsewhere")
    (tmp_path / "upload").mkdir()
    toml = tmp_path / "upload" / "dataset.toml"
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{(elsewhere / "10_ohwx").as_posix()}"\n',
                    encoding="utf-8")
    with pytest.raises(DatasetError) as info:
        ingest([toml], tmp_path / "dest")
    assert any("outside the folder of dataset.toml" in s.reason for s in info.value.report.skipped)
    trusted = ingest([toml], tmp_path / "dest", trust_toml_paths=True)
    assert len(trusted.images) == 2


def test_dataset_toml_inside_a_zip_gives_its_settings(tmp_path):
    (tmp_path / "kohya.zip").write_bytes(make_zip({
        "dataset.toml": b'[general]\nflip_aug = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "/etc"\n',
        "5_subject/a.png": png_bytes(noise(64, 64, 1)),
    }))
    report = ingest([tmp_path / "kohya.zip"], tmp_path / "dest", resolution=64)
    assert report.config_overrides == {"data.flip": True}
    assert [p.relative_to(tmp_path / "dest").as_posix() for p in report.images] == ["5_subject/a.png"]


# -- adding to a dataset --------------------------------------------------------------------------
def test_second_upload_adds_and_renames_clashing_stems(tmp_path):
    dest = tmp_path / "dest"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(png_bytes(noise(64, 64, 1)))
    (tmp_path / "a" / "x.txt").write_text("first x", encoding="utf-8")
    (tmp_path / "b" / "X.jpg").write_bytes(jpeg_bytes(noise(64, 64, 2)))
    (tmp_path / "b" / "X.txt").write_text("second x", encoding="utf-8")
    ingest([tmp_path / "a"], dest, resolution=64)
    report = ingest([tmp_path / "b"], dest, resolution=64)
    assert [p.name for p in report.images] == ["X-2.jpg"]
    assert (dest / "x.txt").read_text(encoding="utf-8") == "first x"
    assert (dest / "X-2.txt").read_text(encoding="utf-8") == "second x"
    assert report.dest_counts == {"": 2}


def test_second_upload_of_the_same_images_is_all_duplicates(tmp_path):
    write_good(tmp_path / "in")
    first = ingest([tmp_path / "in"], tmp_path / "dest", resolution=64)
    second = ingest([tmp_path / "in"], tmp_path / "dest", resolution=64)
    assert second.images == []
    assert len([s for s in second.skipped if s.kind == "duplicate"]) == len(first.images)
    assert all("already in the dataset" in s.reason for s in second.skipped)


def test_images_placed_by_hand_are_deduplicated_too(tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "mine.png").write_bytes(png_bytes(noise(64, 64, 5)))  # no intake hash inside
    (tmp_path / "same.png").write_bytes(png_bytes(noise(64, 64, 5), compress_level=1))
    report = ingest([tmp_path / "same.png"], dest, resolution=64)
    assert [s.kind for s in report.skipped] == ["duplicate"]


def test_destination_inside_a_source_folder_is_not_read_back(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(noise(64, 64, 1)))
    report = ingest([tmp_path], tmp_path / "dataset", resolution=64)
    assert [p.name for p in report.images] == ["a.png"]
    assert ingest([tmp_path], tmp_path / "dataset", resolution=64).skipped[0].kind == "duplicate"


# -- sizes ----------------------------------------------------------------------------------------
def test_image_below_training_resolution_is_kept_with_a_warning(tmp_path):
    (tmp_path / "small.png").write_bytes(png_bytes(noise(100, 80, 1)))
    report = ingest([tmp_path / "small.png"], tmp_path / "dest", resolution=512)
    assert len(report.images) == 1
    assert any("below the training resolution 512" in w.message for w in report.warnings)


@pytest.mark.parametrize("min_side, kept", [(None, True), (90, False), (32, True)])
def test_min_side_sets_the_refusal_floor(min_side, kept, tmp_path):
    (tmp_path / "s.png").write_bytes(png_bytes(noise(100, 80, 1)))
    (tmp_path / "ok.png").write_bytes(png_bytes(noise(128, 128, 2)))
    report = ingest([tmp_path / "s.png", tmp_path / "ok.png"], tmp_path / "dest", min_side=min_side)
    assert ("s" in images_by_stem(report)) == kept


def test_zip_limits_are_configurable(tmp_path):
    (tmp_path / "z.zip").write_bytes(make_zip({f"i{i}.png": png_bytes(noise(64, 64, i)) for i in range(5)}))
    report = ingest([tmp_path / "z.zip", companion(tmp_path / "c")], tmp_path / "dest",
                    limits=IntakeLimits(max_zip_members=4))
    assert [s.kind for s in report.skipped] == ["zip-bomb"]


def test_symlinked_folder_is_not_followed(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "r.png").write_bytes(png_bytes(noise(64, 64, 1)))
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "s.png").write_bytes(png_bytes(noise(64, 64, 2)))
    (tmp_path / "src" / "loop").symlink_to(tmp_path / "src")
    report = ingest([tmp_path / "src"], tmp_path / "dest", resolution=64)
    assert [p.name for p in report.images] == ["s.png"]
    assert [s.kind for s in report.skipped] == ["symlink"]


# -- scale and failure ----------------------------------------------------------------------------
def test_three_hundred_image_folder_ingests_with_progress(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(300):
        noise(64, 64, i).save(folder / f"img{i:03d}.png")
        if i % 2:
            (folder / f"img{i:03d}.txt").write_text(f"caption {i}", encoding="utf-8")
    calls = []
    report = ingest([folder], tmp_path / "dest", resolution=64, progress=lambda done, total: calls.append((done, total)))
    assert len(report.images) == 300
    assert report.captions_found == 150
    assert calls[0] == (0, 300) and calls[-1] == (300, 300) and len(calls) == 301
    assert len(list(iter_images(tmp_path / "dest"))) == 300


def test_nothing_usable_raises_with_the_report_attached(tmp_path):
    sources = BAD[0].make(tmp_path) + BAD[2].make(tmp_path)
    with pytest.raises(DatasetError, match="No usable images") as info:
        ingest(sources, tmp_path / "dest")
    report = info.value.report
    assert {s.kind for s in report.skipped} == {"not-image", "corrupt-image"}
    assert "not an image" in str(info.value)


def test_a_bad_second_upload_does_not_raise_when_the_dataset_has_images(tmp_path):
    ingest([companion(tmp_path / "c")], tmp_path / "dest")
    report = ingest(BAD[0].make(tmp_path), tmp_path / "dest")
    assert report.images == [] and report.dest_counts == {"": 1}


# -- the Captions tab's view ----------------------------------------------------------------------
def test_scan_captions_lists_every_image_with_its_caption(tmp_path):
    ingest([kohya_dataset(tmp_path)], tmp_path / "dest", resolution=64)
    entries = scan_captions(tmp_path / "dest")
    assert [(e.image.name, e.caption) for e in entries] == [
        ("k0.png", "ohwx, picture 0"), ("k1.png", "ohwx, picture 1"), ("s0.jpg", "style image"),
    ]
    assert isinstance(entries[0], CaptionEntry)


def test_write_caption_replaces_atomically_and_empty_removes(tmp_path):
    image = tmp_path / "a.png"
    noise(64, 64, 1).save(image)
    write_caption(image, "  a new\ncaption ")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "a new, caption"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a.txt"]  # no temp file left behind
    write_caption(image, "")
    assert not (tmp_path / "a.txt").exists()
    assert scan_captions(tmp_path) == [CaptionEntry(image, "")]


def test_zip_is_read_without_extracting_to_disk(tmp_path):
    (tmp_path / "z.zip").write_bytes(make_zip({"../escape.png": png_bytes(noise(64, 64, 1)),
                                              "ok.png": png_bytes(noise(64, 64, 2))}))
    ingest([tmp_path / "z.zip"], tmp_path / "deep" / "dest", resolution=64)
    assert not (tmp_path / "deep" / "escape.png").exists()
    assert sorted(p.name for p in (tmp_path / "deep" / "dest").iterdir()) == ["ok.png"]
    shutil.rmtree(tmp_path / "deep")
    with zipfile.ZipFile(tmp_path / "z.zip") as zf:
        assert len(zf.infolist()) == 2  # the source zip is untouched


@pytest.mark.parametrize("resolution, side, kept", [(32, 32, True), (32, 15, False), (512, 60, False), (64, 40, True)])
def test_the_refusal_floor_follows_the_training_resolution(tmp_path, resolution, side, kept):
    (tmp_path / "s.png").write_bytes(png_bytes(noise(side, side, 1)))
    (tmp_path / "ok.png").write_bytes(png_bytes(noise(600, 600, 2)))
    report = ingest([tmp_path / "s.png", tmp_path / "ok.png"], tmp_path / "dest", resolution=resolution)
    assert ("s" in images_by_stem(report)) == kept


def test_a_disk_filling_up_mid_upload_says_how_far_it_got_and_the_same_upload_again_completes(tmp_path, monkeypatch):
    import lora_trainer.intake as intake
    from lora_trainer import fsutil
    from lora_trainer.errors import DiskFullError

    source = tmp_path / "in"
    source.mkdir()
    for i in range(5):
        (source / f"pic{i}.png").write_bytes(png_bytes(noise(64, 64, i)))
        (source / f"pic{i}.txt").write_text(f"caption {i}")
    dest = tmp_path / "dest"
    writes = []

    def fills_on_the_third_image(path, data):
        writes.append(path)
        if len(writes) == 3:  # what atomic_write_bytes raises when the write hits ENOSPC
            raise fsutil.disk_full_error(Path(path).parent, len(data))
        return fsutil.atomic_write_bytes(path, data)

    monkeypatch.setattr(intake, "atomic_write_bytes", fills_on_the_third_image)
    with pytest.raises(DiskFullError, match=r"is full .*: 2 of 5 images were added before it filled") as err:
        ingest([source], dest, resolution=64)
    assert "add the same files again" in err.value.hint
    assert sorted(p.name for p in dest.iterdir()) == ["pic0.png", "pic0.txt", "pic1.png", "pic1.txt"]  # no orphan caption
    monkeypatch.undo()
    report = ingest([source], dest, resolution=64)
    assert len(report.images) == 3 and len([s for s in report.skipped if s.kind == "duplicate"]) == 2
    assert sorted(p.stem for p in iter_images(dest)) == [f"pic{i}" for i in range(5)]
