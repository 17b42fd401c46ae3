"""Captioning a folder: caption files, styles, templates, stopping, bulk edits, tokenizer checks, the CLI.

The captioners themselves are tested in test_captioners.py.

Nothing downloads: the captioners are built from configs with tokenizers written to tmp (tiny_captioners.py),
the CLIP tokenizer is the built-in tiny one, and the Hub is switched to offline mode.
"""

from __future__ import annotations

import argparse

import huggingface_hub.constants
import pytest
from badinputs import noise
from PIL import Image
from tiny_captioners import build_tiny_blip, build_tiny_florence2, build_tiny_qwen_vl
from transformers import CLIPTokenizer

from lora_trainer import captioners, cli
from lora_trainer.captioning import (
    BlipCaptioner,
    append_to_captions,
    caption_folder,
    clean_generated,
    compose_caption,
    prepend_to_captions,
    replace_in_captions,
    strip_style_words,
)
from lora_trainer.errors import DatasetError, LoraStudioError, ModelLoadError
from lora_trainer.intake import scan_captions, write_caption
from lora_trainer.tiny import tiny_model_path
from lora_trainer.trigger import CAPTION_TOKEN_LIMIT, analyse_trigger, caption_length, check_caption_lengths


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A randomly initialised BLIP captioner with tiny configs, saved like a Hub model."""
    folder = tmp_path_factory.mktemp("tiny-blip")
    model, processor = build_tiny_blip(folder)
    return folder, model, processor


@pytest.fixture(scope="module")
def tiny_florence2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-florence2")
    build_tiny_florence2(folder)
    return folder


@pytest.fixture(scope="module", params=["2.5", "3"], ids=["qwen2.5-vl", "qwen3-vl"])
def tiny_qwen_vl(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-qwen{request.param}-vl")
    build_tiny_qwen_vl(folder, request.param)
    return folder


@pytest.fixture
def captioner(tiny_blip):
    _, model, processor = tiny_blip
    return BlipCaptioner(model, processor, batch_size=2, max_new_tokens=8, num_beams=1)


@pytest.fixture(scope="module")
def clip_tokenizer():
    return CLIPTokenizer.from_pretrained(tiny_model_path("builtin:tiny-sd"), subfolder="tokenizer")


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "dataset"
    (folder / "10_ohwx").mkdir(parents=True)
    for i in range(3):
        noise(48, 40, i).save(folder / f"img{i}.png")
    noise(40, 48, 9).save(folder / "10_ohwx" / "deep.png")
    return folder


class FixedCaptioner:
    """A Captioner that always says the same thing (a random BLIP says gibberish)."""

    def __init__(self, text: str):
        self.text, self.calls = text, 0

    def caption(self, images: list[Image.Image]) -> list[str]:
        self.calls += 1
        return [self.text] * len(images)


# -- captioning a folder ------------------------------------------------------------------------
def test_caption_folder_writes_one_caption_per_image_with_the_trigger_placed(dataset, captioner):
    calls = []
    result = caption_folder(dataset, captioner, trigger="ohwx", progress=lambda d, t: calls.append((d, t)))
    entries = scan_captions(dataset)
    assert len(result.written) == len(entries) == 4
    for entry in entries:
        assert entry.caption.startswith("ohwx")  # "{trigger}, {caption}": the trigger comes first
        assert entry.caption == result.written[entry.image]
    assert calls[0] == (0, 4) and calls[-1] == (4, 4)


def test_template_and_suffix_place_the_trigger(dataset):
    caption_folder(dataset, FixedCaptioner("a cat"), trigger="ohwx", style="full", template="{caption}, {trigger}",
                   suffix="in the style of {trigger}")
    assert {e.caption for e in scan_captions(dataset)} == {"a cat, ohwx, in the style of ohwx"}


@pytest.mark.parametrize("style, expected", [
    ("sparse", "ohwx, a cat on a table"),
    ("full", "ohwx, a watercolor painting of a cat on a table, digital art"),
    ("trigger", "ohwx"),
])
def test_caption_styles(style, expected, dataset):
    captioner = FixedCaptioner("a watercolor painting of a cat on a table, digital art")
    caption_folder(dataset, captioner, trigger="ohwx", style=style)
    assert {e.caption for e in scan_captions(dataset)} == {expected}
    assert captioner.calls == (0 if style == "trigger" else 1)  # batch_size 8: one call for 4 images


def test_existing_captions_survive_without_overwrite(dataset, captioner):
    write_caption(dataset / "img1.png", "my careful caption")
    result = caption_folder(dataset, captioner, trigger="ohwx")
    assert (dataset / "img1.txt").read_text(encoding="utf-8") == "my careful caption"
    assert result.kept == [dataset / "img1.png"] and len(result.written) == 3


def test_overwrite_replaces_existing_captions(dataset):
    write_caption(dataset / "img1.png", "my careful caption")
    result = caption_folder(dataset, FixedCaptioner("a dog"), trigger="ohwx", overwrite=True)
    assert (dataset / "img1.txt").read_text(encoding="utf-8") == "ohwx, a dog"
    assert result.kept == [] and len(result.written) == 4


def test_trigger_style_needs_no_model(dataset):
    result = caption_folder(dataset, None, trigger="zwx", style="trigger")
    assert set(result.written.values()) == {"zwx"}


@pytest.mark.parametrize("kwargs, message", [
    ({"style": "poetic", "trigger": "x"}, "unknown"),
    ({"style": "trigger", "trigger": " "}, "needs a trigger word"),
    ({"style": "sparse", "trigger": "x"}, "needs a captioning model"),
])
def test_caption_folder_rejects_impossible_requests(kwargs, message, dataset):
    with pytest.raises(LoraStudioError, match=message):
        caption_folder(dataset, None, **kwargs)


def test_an_unreadable_image_fails_alone(dataset):
    (dataset / "broken.png").write_bytes(b"not a png")
    result = caption_folder(dataset, FixedCaptioner("a cat"), trigger="ohwx")
    assert [p.name for p, _ in result.failed] == ["broken.png"]
    assert len(result.written) == 4
    assert "1 failed" in result.summary()


def test_an_empty_caption_is_reported_not_written(dataset):
    result = caption_folder(dataset, FixedCaptioner(""), trigger="", style="sparse")
    assert len(result.failed) == 4 and not result.written
    assert scan_captions(dataset)[0].caption == ""


def test_stopping_keeps_what_was_written_and_the_next_run_continues(dataset):
    captioner = FixedCaptioner("a cat")
    result = caption_folder(dataset, captioner, trigger="ohwx", batch_size=1, should_stop=lambda: captioner.calls >= 2)
    assert len(result.written) == 2 and result.left == 2
    assert "stopped with 2 images left uncaptioned" in result.summary()
    assert sum(bool(e.caption) for e in scan_captions(dataset)) == 2
    rest = caption_folder(dataset, FixedCaptioner("a dog"), trigger="ohwx")  # existing captions are kept
    assert len(rest.written) == 2 and len(rest.kept) == 2 and not rest.left


def test_empty_folder_says_to_add_images(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        caption_folder(tmp_path, FixedCaptioner("x"), trigger="ohwx")


# -- caption text -------------------------------------------------------------------------------
@pytest.mark.parametrize("caption, sparse", [
    ("a painting of a woman with red hair", "a woman with red hair"),
    ("an oil painting of a house by a lake", "a house by a lake"),
    ("a watercolor painting of a fox in the snow", "a fox in the snow"),
    ("a drawing of a cat sitting on a table", "a cat sitting on a table"),
    ("an illustration of an old castle on a hill", "an old castle on a hill"),
    ("a digital art of a dragon", "a dragon"),
    ("an anime girl with blue hair", "a girl with blue hair"),
    ("a woman in the style of van gogh", "a woman"),
    ("a cat, digital art", "a cat"),
    ("a cartoon dog wearing a hat", "a dog wearing a hat"),
    ("a black and white drawing of an old man", "an old man"),
    ("a man standing in a field, watercolor", "a man standing in a field"),
    ("a pencil sketch of a horse", "a horse"),
    ("a photo of a dog on the beach", "a dog on the beach"),
    ("a 3d render of a robot", "a robot"),
    ("a woman in anime style", "a woman"),
    ("an anime style illustration of an owl", "an owl"),
    ("a watercolor owl", "an owl"),
    ("a cat drawing", "a cat"),
    ("arafed woman in a red dress", "a woman in a red dress"),
    ("there is a arafed man standing on a bridge", "a man standing on a bridge"),
    # subject words that look like style words stay
    ("a woman holding a painting", "a woman holding a painting"),
    ("a man taking a photo of a woman", "a man taking a photo of a woman"),
    ("a man in a comic book store", "a man in a comic book store"),
    ("a pencil on a desk", "a pencil on a desk"),
    ("a painting of a painting", "a painting"),
    ("a mountain landscape at sunset", "a mountain landscape at sunset"),
    ("", ""),
])
def test_sparse_strips_style_and_medium_words(caption, sparse):
    assert strip_style_words(caption) == sparse


@pytest.mark.parametrize("raw, cleaned", [
    ("arafed painting of a woman in anime style", "a painting of a woman in anime style"),  # BLIP's artefact
    ("The image shows a cat sitting on a table.", "a cat sitting on a table"),  # Florence-2's opener
    ("A woman reading a book in a park.", "a woman reading a book in a park"),  # Qwen's sentence
    ("In this image, a dog runs on the beach.", "a dog runs on the beach"),
    ("This painting shows a fox", "This painting shows a fox"),  # the medium is a style word: sparse decides
    ("a cat\n\x07on a\ttable\ufffd", "a cat on a table"),  # one line, no control characters or broken bytes
])
def test_full_keeps_style_words_but_drops_the_models_fillers(raw, cleaned):
    assert clean_generated(raw) == cleaned


@pytest.mark.parametrize("caption, trigger, template, suffix, expected", [
    ("a cat", "ohwx", "{trigger}, {caption}", "", "ohwx, a cat"),
    ("a cat", "ohwx", "{caption}", "in the style of {trigger}", "a cat, in the style of ohwx"),
    ("", "ohwx", "{trigger}, {caption}", "", "ohwx"),
    ("a cat", "", "{trigger}, {caption}", "in the style of {trigger}", "a cat"),
    ("a cat", "ohwx", "photo of {trigger} {caption}", "", "photo of ohwx a cat"),
])
def test_compose_caption(caption, trigger, template, suffix, expected):
    assert compose_caption(caption, trigger, template, suffix) == expected


# -- bulk edits ---------------------------------------------------------------------------------
@pytest.fixture
def captioned(dataset):
    for image, text in zip(sorted(dataset.rglob("*.png")), ["a red cat", "a blue dog", "a red car", ""], strict=True):
        write_caption(image, text)
    return dataset


def test_replace_plain_text(captioned):
    assert replace_in_captions(captioned, "red", "green") == 2
    assert sorted(e.caption for e in scan_captions(captioned)) == ["", "a blue dog", "a green car", "a green cat"]


def test_replace_regex(captioned):
    assert replace_in_captions(captioned, r"a (\w+) (cat|dog)", r"one \2", regex=True) == 2
    assert "one cat" in {e.caption for e in scan_captions(captioned)}


def test_plain_replace_treats_backslashes_literally(captioned):
    replace_in_captions(captioned, "blue", r"\1 blue")
    assert r"a \1 blue dog" in {e.caption for e in scan_captions(captioned)}


def test_invalid_regex_is_a_user_error(captioned):
    with pytest.raises(LoraStudioError, match="not a valid regular expression"):
        replace_in_captions(captioned, "(unclosed", "x", regex=True)


def test_prepend_is_idempotent_and_fills_empty_captions(captioned):
    assert prepend_to_captions(captioned, "ohwx") == 4
    assert prepend_to_captions(captioned, "ohwx") == 0
    assert sorted(e.caption for e in scan_captions(captioned)) == [
        "ohwx", "ohwx, a blue dog", "ohwx, a red car", "ohwx, a red cat"]


def test_append(captioned):
    assert append_to_captions(captioned, "in the style of ohwx") == 4
    assert "a red cat, in the style of ohwx" in {e.caption for e in scan_captions(captioned)}


# -- tokenizer checks ---------------------------------------------------------------------------
def test_long_caption_is_flagged_with_its_token_count(clip_tokenizer):
    long = ", ".join(["a red cat sitting on a table"] * 12)
    result = caption_length(long, clip_tokenizer)
    assert result.too_long and result.tokens > CAPTION_TOKEN_LIMIT
    assert result.tokens == len(clip_tokenizer(long, add_special_tokens=False)["input_ids"])
    assert result.overflow and str(result.tokens) in result.message()
    assert "</w>" not in result.message()


def test_a_long_caption_shows_the_words_that_are_cut_as_words(clip_tokenizer):
    words = [f"word{i}" if i % 2 else "cat" for i in range(120)]
    caption = " ".join(words)
    cut = caption_length(caption, clip_tokenizer).overflow
    assert caption.endswith(cut) and cut.split()[-1] == "word119"  # the tail of the caption, as typed
    kept = caption[: len(caption) - len(cut)]
    assert len(clip_tokenizer.tokenize(kept)) == CAPTION_TOKEN_LIMIT  # exactly what CLIP still reads
    assert not caption_length("ohwx, a red cat", clip_tokenizer).too_long


def test_caption_lengths_over_a_folder(captioned, clip_tokenizer):
    write_caption(captioned / "img0.png", " ".join(["mountains"] * 80))
    checks = check_caption_lengths(scan_captions(captioned), clip_tokenizer)
    assert [c.image.name for c in checks if c.too_long] == ["img0.png"]


@pytest.mark.parametrize("word, flagged, hint", [
    ("sks", True, "rifle"),
    ("dog", True, "common word"),
    ("woman", True, "common word"),
    ("picasso", True, "artist"),
    ("ohwx", False, ""),
    ("zwx", False, ""),
    ("tiger,cat", True, "comma"),
])
def test_trigger_analysis(word, flagged, hint, clip_tokenizer):
    result = analyse_trigger(word, clip_tokenizer)
    assert result.ok is not flagged
    assert hint in " ".join(result.warnings)
    assert result.tokens == [t.removesuffix("</w>") for t in clip_tokenizer.tokenize(word)]
    if flagged:
        assert result.suggestions and word not in result.suggestions
        assert all(len(clip_tokenizer.tokenize(s)) <= 2 for s in result.suggestions)


def test_trigger_analysis_shows_how_a_word_splits(clip_tokenizer):
    result = analyse_trigger("xqzv", clip_tokenizer)
    assert len(result.tokens) > 3 and "splits into" in result.warnings[0]


# -- command line -------------------------------------------------------------------------------
def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["caption", *argv])


def test_cli_trigger_style(dataset, capsys):
    assert cli.cmd_caption(parse(str(dataset), "--trigger", "ohwx", "--style", "trigger")) == 0
    assert {e.caption for e in scan_captions(dataset)} == {"ohwx"}
    assert "4 captions written" in capsys.readouterr().out


def test_cli_with_a_local_blip(dataset, tiny_blip, capsys):
    args = parse(str(dataset), "--trigger", "ohwx", "--weights", str(tiny_blip[0]), "--batch-size", "4", "--overwrite",
                 "--suffix", "in the style of {trigger}")
    assert cli.cmd_caption(args) == 0
    assert all(e.caption.startswith("ohwx") and e.caption.endswith("in the style of ohwx") for e in scan_captions(dataset))


def test_cli_with_a_local_florence2_and_a_task(dataset, tiny_florence2, capsys):
    args = parse(str(dataset), "--trigger", "ohwx", "--model", "florence2", "--weights", str(tiny_florence2),
                 "--detail", "detailed", "--style", "full")
    assert cli.cmd_caption(args) == 0
    assert len([e for e in scan_captions(dataset) if e.caption.startswith("ohwx, ")]) == 4


def test_cli_with_a_local_qwen_vl_and_an_instruction(dataset, tiny_qwen_vl, capsys):
    args = parse(str(dataset), "--trigger", "ohwx", "--model", "qwen-vl", "--weights", str(tiny_qwen_vl),
                 "--instruction", "Name the subject.", "--batch-size", "3")
    assert cli.cmd_caption(args) == 0
    assert "4 captions written" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "blip", "--detail", "short"], "--model florence2"),
    (["--model", "florence2", "--instruction", "Say it"], "--model qwen-vl"),
])
def test_cli_refuses_an_option_its_captioner_would_ignore(argv, message, dataset):
    with pytest.raises(LoraStudioError, match=message):
        cli.cmd_caption(parse(str(dataset), "--trigger", "ohwx", *argv))


def test_cli_offers_each_captioner(capsys):
    with pytest.raises(SystemExit):
        parse("x", "--model", "tags")
    assert "choose from 'blip', 'florence2', 'qwen-vl'" in capsys.readouterr().err


@pytest.mark.parametrize("kind", captioners.KINDS)
def test_captioning_without_weights_changes_nothing_on_disk(kind, dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    write_caption(dataset / "img1.png", "my careful caption")
    before = {p: p.read_bytes() for p in dataset.rglob("*")  if p.is_file()}
    with pytest.raises(ModelLoadError, match=f"'{captioners.CAPTIONERS[kind].model}'"):
        cli.cmd_caption(parse(str(dataset), "--trigger", "ohwx", "--model", kind, "--overwrite"))
    assert {p: p.read_bytes() for p in dataset.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "hub-cache").exists()
