"""Captioning: the real BLIP classes on a tiny random BLIP, caption files, bulk edits, tokenizer checks.

Nothing downloads: the BLIP is built from a config with a vocabulary written to tmp, the CLIP
tokenizer is the built-in tiny one, and the Hub is switched to offline mode.
"""

from __future__ import annotations

import argparse

import huggingface_hub.constants
import pytest
import torch
from badinputs import noise
from PIL import Image
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipProcessor,
    BlipTextConfig,
    BlipVisionConfig,
    CLIPTokenizer,
)
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from lora_trainer.captioning import (
    BlipCaptioner,
    add_caption_arguments,
    append_to_captions,
    caption_command,
    caption_folder,
    clean_blip,
    compose_caption,
    prepend_to_captions,
    replace_in_captions,
    strip_style_words,
)
from lora_trainer.errors import DatasetError, LoraStudioError, ModelLoadError
from lora_trainer.intake import scan_captions, write_caption
from lora_trainer.tiny import tiny_model_path
from lora_trainer.trigger import CAPTION_TOKEN_LIMIT, analyse_trigger, caption_length, check_caption_lengths

VOCAB = "[PAD] [UNK] [CLS] [SEP] [MASK] a an the of in on with and cat dog woman man red blue sitting standing table " \
        "painting drawing photo tree house sky".split()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A randomly initialised BLIP captioner with tiny configs, saved like a Hub model."""
    folder = tmp_path_factory.mktemp("tiny-blip")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(folder)
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer)
    ids = {"bos_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id,
           "eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}
    text = BlipTextConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=64, **ids)
    vision = BlipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                    projection_dim=32)).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


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


# -- BLIP ---------------------------------------------------------------------------------------
def test_blip_gives_one_caption_per_image_in_batches(captioner):
    seen = []
    captioner.progress = lambda done, total: seen.append((done, total))
    captions = captioner.caption([noise(40, 40, i) for i in range(3)] + [Image.new("L", (50, 30), 128)])
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    assert seen == [(2, 4), (4, 4)]


def test_blip_loads_from_a_local_folder_without_network(tiny_blip):
    folder, _, _ = tiny_blip
    captioner = BlipCaptioner(str(folder), max_new_tokens=5, num_beams=2).load()
    assert captioner.device in ("cpu", "cuda")
    assert len(captioner.caption([noise(40, 40, 1), noise(40, 40, 2)])) == 2


@pytest.mark.parametrize("model_id", ["nobody/no-such-captioner", "/definitely/not/a/folder"])
def test_blip_load_failure_is_one_line_naming_the_model(model_id):
    with pytest.raises(ModelLoadError) as info:
        BlipCaptioner(model_id).load()
    message = str(info.value)
    assert model_id in message and "\n" not in message
    assert "blip-image-captioning-base" in message  # says what to try


def test_model_object_needs_its_processor(tiny_blip):
    with pytest.raises(LoraStudioError, match="BlipProcessor"):
        BlipCaptioner(tiny_blip[1])


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


def test_full_keeps_style_words_but_drops_blip_artefacts():
    assert clean_blip("arafed painting of a woman in anime style") == "a painting of a woman in anime style"


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
    parser = argparse.ArgumentParser()
    add_caption_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_trigger_style(dataset, capsys):
    assert caption_command(parse(str(dataset), "--trigger", "ohwx", "--style", "trigger")) == 0
    assert {e.caption for e in scan_captions(dataset)} == {"ohwx"}
    assert "4 captions written" in capsys.readouterr().out


def test_cli_with_a_local_blip(dataset, tiny_blip, capsys):
    args = parse(str(dataset), "--trigger", "ohwx", "--model", str(tiny_blip[0]), "--batch-size", "4", "--overwrite",
                 "--suffix", "in the style of {trigger}")
    assert caption_command(args) == 0
    assert all(e.caption.startswith("ohwx") and e.caption.endswith("in the style of ohwx") for e in scan_captions(dataset))
