"""The captioners: the real BLIP, Florence-2, Qwen2.5-VL and Qwen3-VL classes on tiny random models, their
dtypes, their one-line load failures, and the shared captioners that unload_all() frees.

Nothing downloads: the models are built from configs with tokenizers written to tmp (tiny_captioners.py).
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
from badinputs import noise
from PIL import Image
from tiny_captioners import build_tiny_blip, build_tiny_florence2, build_tiny_qwen_vl

from lora_trainer import captioners
from lora_trainer.captioning import (
    BlipCaptioner,
    Florence2Captioner,
    QwenVLCaptioner,
    caption_folder,
    shared_captioner,
    unload_all,
)
from lora_trainer.errors import LoraStudioError, ModelLoadError


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


@pytest.fixture
def dataset(tmp_path):
    folder = tmp_path / "dataset"
    (folder / "10_ohwx").mkdir(parents=True)
    for i in range(4):
        noise(48, 40, i).save((folder / "10_ohwx" if i == 3 else folder) / f"img{i}.png")
    return folder


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


def test_model_object_needs_its_processor(tiny_blip):
    with pytest.raises(LoraStudioError, match="BlipProcessor"):
        BlipCaptioner(tiny_blip[1])


# -- Florence-2 and Qwen-VL ---------------------------------------------------------------------
@pytest.mark.parametrize("detail", ["short", "detailed", "paragraph"])
def test_florence2_captions_a_batch_from_a_local_folder_with_each_caption_task(tiny_florence2, detail):
    seen = []
    captioner = Florence2Captioner(str(tiny_florence2), detail=detail, batch_size=2, max_new_tokens=6, num_beams=1,
                                   progress=lambda done, total: seen.append((done, total)))
    captions = captioner.caption([noise(48, 40, i) for i in range(3)])
    assert captioner.model.__class__.__name__ == "Florence2ForConditionalGeneration"
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert seen == [(2, 3), (3, 3)]


def test_florence2_tasks_are_the_models_own_prompts(tiny_florence2, monkeypatch):
    captioner = Florence2Captioner(str(tiny_florence2), max_new_tokens=4, num_beams=1).load()
    asked = []
    real = captioner.processor.__class__.__call__
    monkeypatch.setattr(captioner.processor.__class__, "__call__",
                        lambda self, text=None, **kw: asked.append(text) or real(self, text=text, **kw))
    for detail in ("short", "detailed", "paragraph"):
        captioner.detail = detail
        captioner.caption([noise(40, 40, 1)])
    assert asked == [["<CAPTION>"], ["<DETAILED_CAPTION>"], ["<MORE_DETAILED_CAPTION>"]]


def test_florence2_rejects_an_unknown_detail():
    with pytest.raises(LoraStudioError, match="short, detailed, paragraph"):
        Florence2Captioner("x/y", detail="epic")


def test_qwen_vl_answers_the_instruction_for_a_batch_of_different_sizes(tiny_qwen_vl):
    seen = []
    captioner = QwenVLCaptioner(str(tiny_qwen_vl), batch_size=2, max_new_tokens=6,
                                progress=lambda done, total: seen.append((done, total)))
    captions = captioner.caption([noise(48, 40, 0), noise(64, 32, 1), noise(40, 40, 2)])
    assert len(captions) == 3 and all(c.strip() for c in captions)
    assert seen == [(2, 3), (3, 3)]


def test_qwen_vl_prompt_carries_the_instruction_and_one_image_token_per_vision_token(tiny_qwen_vl, monkeypatch):
    captioner = QwenVLCaptioner(str(tiny_qwen_vl), instruction="Name the animal.", max_new_tokens=4).load()
    prompts = []
    tokenizer = captioner.processor.tokenizer
    real = tokenizer.__class__.__call__
    monkeypatch.setattr(tokenizer.__class__, "__call__", lambda self, text, **kw: prompts.append(text) or real(self, text, **kw))
    captioner.caption([noise(48, 40, 0)])
    grid = captioner.processor.image_processor(images=[noise(48, 40, 0)], return_tensors="pt")["image_grid_thw"][0]
    (prompt,) = prompts[0]
    assert "Name the animal." in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert prompt.count("<|image_pad|>") == int(grid.prod()) // 4  # 2x2 patches merge into one token


def test_qwen_vl_default_instruction_asks_for_content_not_style():
    instruction = QwenVLCaptioner("x/y").instruction.lower()
    assert "one sentence" in instruction and "style" in instruction and "not" in instruction


@pytest.fixture(scope="module", params=["blip", "florence2", "qwen2.5-vl", "qwen3-vl"])
def tiny_captioner(request, tmp_path_factory):
    """(kind, folder, the model class its folder loads as) for each captioner."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "blip":
        return "blip", folder, type(build_tiny_blip(folder)[0]).__name__
    if request.param == "florence2":
        return "florence2", folder, type(build_tiny_florence2(folder)[0]).__name__
    return "qwen-vl", folder, type(build_tiny_qwen_vl(folder, request.param[4:-3])[0]).__name__


def test_each_captioner_writes_a_folder_in_every_style(tiny_captioner, dataset):
    kind, folder, model_class = tiny_captioner
    captioner = captioners.make_captioner(kind, str(folder), max_new_tokens=6)
    for style in ("sparse", "full"):
        result = caption_folder(dataset, captioner, trigger="ohwx", style=style, overwrite=True,
                                template="photo of {trigger}, {caption}", suffix="in the style of {trigger}")
        assert len(result.written) == 4, result.summary()
        assert all(t.startswith("photo of ohwx") and t.endswith("in the style of ohwx") for t in result.written.values())
    assert type(captioner.model).__name__ == model_class


@pytest.mark.parametrize("kind, device, bf16, dtype", [
    ("blip", "cpu", True, "float32"),
    ("blip", "cuda", True, "float16"),
    ("florence2", "cuda:1", True, "float16"),
    ("qwen-vl", "cpu", True, "float32"),
    ("qwen-vl", "cuda", True, "bfloat16"),
    ("qwen-vl", "cuda", False, "float16"),  # a GPU without bf16
])
def test_half_precision_on_a_gpu_full_precision_on_a_cpu(kind, device, bf16, dtype, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    captioner = captioners.make_captioner(kind, "x/y", device=device)
    assert captioner._dtype(torch) == getattr(torch, dtype)


# -- loading without weights ----------------------------------------------------------------------
@pytest.mark.parametrize("kind, light", [
    ("blip", "blip-image-captioning-base"), ("florence2", "Florence-2-base"), ("qwen-vl", "Qwen3-VL-2B-Instruct")])
@pytest.mark.parametrize("model_id", ["nobody/no-such-captioner", "/definitely/not/a/folder"])
def test_a_load_failure_is_one_line_naming_the_model_and_what_to_do(kind, light, model_id):
    with pytest.raises(ModelLoadError) as info:
        captioners.make_captioner(kind, model_id).load()
    message = str(info.value)
    assert model_id in message and captioners.CAPTIONERS[kind].label in message and "\n" not in message
    assert light in message  # says what to try
    assert ("no such folder" if model_id.startswith("/") else "HF_HUB_OFFLINE") in message  # why, in words


@pytest.mark.parametrize("kind", captioners.KINDS)
def test_a_folder_without_the_model_says_so_without_the_raw_error(kind, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError) as info:
        captioners.make_captioner(kind, str(tmp_path)).load()
    message = str(info.value)
    assert message.startswith(f"Could not load the captioning model '{tmp_path}'") and "\n" not in message
    assert "does not hold a complete" in message
    assert "Error:" not in message and "Traceback" not in message  # no raw exception text, cut or whole


# -- shared captioners, freed before training ----------------------------------------------------
def test_shared_captioners_load_once_and_unload_all_frees_them(tiny_florence2):
    unload_all()
    first = shared_captioner("florence2", str(tiny_florence2), detail="detailed")
    second = shared_captioner("florence2", str(tiny_florence2), detail="short")
    assert first.model is second.model  # loaded once ...
    assert (first.detail, second.detail) == ("detailed", "short")  # ... options per request
    assert captioners.is_loaded("florence2", str(tiny_florence2))
    assert unload_all() == 1
    assert not captioners.is_loaded("florence2", str(tiny_florence2))
    assert shared_captioner("florence2", str(tiny_florence2)).model is not first.model  # loads again when asked
    unload_all()


def test_unload_all_lets_the_model_be_freed(tiny_florence2):
    import gc
    import weakref

    unload_all()
    model = weakref.ref(shared_captioner("florence2", str(tiny_florence2)).model)
    gc.collect()
    assert model() is not None  # kept for the next request ...
    unload_all()
    assert model() is None  # ... and gone after unload_all (its memory with it)


def test_unload_all_with_nothing_loaded_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, lora_trainer.captioning as c; c.unload_all(); print('torch' in sys.modules)"
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert done.stdout.strip() == "False"


def test_a_failed_load_is_not_kept():
    unload_all()
    with pytest.raises(ModelLoadError):
        shared_captioner("blip", "nobody/nothing")
    assert not captioners.is_loaded("blip", "nobody/nothing")


def test_options_for_a_kind_keep_only_what_it_understands():
    assert captioners.captioner_options("blip", detail="detailed", instruction="x") == {}
    assert captioners.captioner_options("florence2", detail="detailed", instruction="x") == {"detail": "detailed"}
    assert captioners.captioner_options("qwen-vl", detail="detailed", instruction=" Say it. ") == {"instruction": "Say it."}
