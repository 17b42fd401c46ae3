"""The captioning models: BLIP, Florence-2 and a Qwen vision-language model, all through transformers.

Each captioner turns a list of PIL images into one raw caption per image, in batches, fp16/bf16 on a
GPU and fp32 on the CPU. The caption text is tidied, styled and written by `captioning`.

  blip       short, generic captions ("a woman sitting on a bench"); the smallest and fastest
  florence2  transformers' own Florence2ForConditionalGeneration with its caption tasks: short
             (<CAPTION>), detailed (<DETAILED_CAPTION>) or a paragraph (<MORE_DETAILED_CAPTION>)
  qwen-vl    Qwen2.5-VL or Qwen3-VL answering an editable instruction (by default: the subject and
             content in one sentence, not the style, medium or colours)

A WD14-style tagger is not offered: the maintained package that serves one (dghs-imgutils) downloads
its ONNX models from the Hub when called and takes no local model, so its real path cannot run
without a network, and the taggers' own timm weights need torchvision, which this project does not use.

Loaded captioners are kept for reuse (`shared_captioner`); `unload_all()` frees them and the CUDA
cache, and must run before training starts in the same process's GPU.
"""

from __future__ import annotations

import copy
import gc
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from .errors import LoraStudioError, ModelLoadError

log = logging.getLogger(__name__)


class Captioner(Protocol):
    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per image, in order."""
        ...


@dataclass(frozen=True)
class CaptionerInfo:
    kind: str  # what --model and the Captions tab call it
    label: str
    model: str  # the default Hub id
    light: str  # a lighter Hub id of the same family
    size: str  # parameters and weights of the default, for the docs and the UI
    choose: str  # when to choose it (one line)


CAPTIONERS = {
    "blip": CaptionerInfo(
        "blip", "BLIP", "Salesforce/blip-image-captioning-large", "Salesforce/blip-image-captioning-base",
        "0.47B parameters, 0.9 GB in fp16 (base: 0.25B)",
        "short, generic captions; the smallest and fastest, and enough for a style LoRA's sparse captions"),
    "florence2": CaptionerInfo(
        "florence2", "Florence-2", "florence-community/Florence-2-large", "florence-community/Florence-2-base",
        "0.77B parameters, 1.6 GB in fp16 (base: 0.23B)",
        "names the content precisely (objects, people, setting); short or detailed captions; a good default"),
    "qwen-vl": CaptionerInfo(
        "qwen-vl", "Qwen-VL", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-2B-Instruct",
        "4.4B parameters, 8.9 GB in bf16 (2B: 2.1B); Qwen2.5-VL ids work too",
        "follows an instruction: describe only what you ask for (subject, pose, setting); the best captions, the slowest"),
}
KINDS = tuple(CAPTIONERS)
DETAILS = ("short", "detailed", "paragraph")
FLORENCE_TASKS = {"short": "<CAPTION>", "detailed": "<DETAILED_CAPTION>", "paragraph": "<MORE_DETAILED_CAPTION>"}
DEFAULT_INSTRUCTION = ("Describe the subject and content of this image in one sentence. "
                       "Do not mention the art style, the medium or the colours.")
QWEN_MAX_PIXELS = 1024 * 28 * 28  # ~900x900: enough to caption, and it bounds the image tokens per picture


class ModelCaptioner:
    """What the three captioners share: loading (with a one-line failure), device and dtype, batching, unloading.

    `model` is a Hub id or a local folder (loaded on first use, or by `load()`), or an already built
    transformers model, in which case `processor` must be given too. `device` defaults to the GPU when
    there is one. Subclasses say how to load (`_from_pretrained`) and how to caption a batch (`_generate`).
    """

    info: CaptionerInfo
    processor_name = "processor"
    gpu_dtype = "float16"  # halves memory and time on a GPU; CPUs want fp32
    default_max_new_tokens = 40
    default_num_beams = 3

    def __init__(self, model: Any = None, processor: Any = None, *, device: str | None = None, batch_size: int = 8,
                 max_new_tokens: int | None = None, num_beams: int | None = None,
                 progress: Callable[[int, int], None] | None = None):
        model = model or self.info.model
        if not isinstance(model, str) and processor is None:
            raise LoraStudioError(f"{type(self).__name__}: pass the {self.processor_name} together with a model object")
        self.name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or self.info.label
        self.model = None if isinstance(model, str) else model
        self.processor = processor
        self._owns_model = isinstance(model, str)  # loaded here, so unloading may drop it
        self.device = device
        self.batch_size = max(1, batch_size)
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams or self.default_num_beams
        self.progress = progress
        self._ready = False

    def load(self) -> ModelCaptioner:
        """Load the model now (it loads on first use otherwise); a failure is one line naming the model and the fix."""
        if self._ready:
            return self
        import torch

        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = self._dtype(torch)
        if self.model is None:
            check_available(self.name, self.info)
            try:
                self.model, self.processor = self._from_pretrained(dtype)
            except Exception as e:  # no network, unknown id, missing or broken files: one clear line, details in the log
                log.warning("loading the captioning model %s failed", self.name, exc_info=e)
                raise ModelLoadError(load_failure(self.name, self.info, e)) from None
        elif self.model.dtype != dtype and dtype != torch.float32:
            self.model = self.model.to(dtype)
        self.model = self.model.to(self.device).eval()
        self._ready = True
        return self

    def unload(self) -> None:
        """Give the model's memory back: drop a model loaded here, move a model that was handed in to the CPU."""
        if self.model is not None:
            self.model = None if self._owns_model else self.model.to("cpu")
        if self._owns_model:
            self.processor = None
        self._ready = False

    def with_options(self, **options: Any) -> ModelCaptioner:
        """A copy sharing the loaded model, with other per-request options (batch size, detail, instruction)."""
        clone = copy.copy(self)
        for key, value in options.items():
            if not hasattr(clone, key):
                raise TypeError(f"{type(self).__name__} has no option {key!r}")
            setattr(clone, key, value)
        return clone

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        self.load()
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start:start + self.batch_size]]
            with torch.inference_mode():
                captions += self._generate(batch)
            if self.progress:
                self.progress(len(captions), len(images))
        return captions

    def _dtype(self, torch):
        if not self.device.startswith("cuda"):
            return torch.float32
        if self.gpu_dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            return torch.float16  # pre-Ampere GPUs have no bf16
        return getattr(torch, self.gpu_dtype)

    def _from_pretrained(self, dtype) -> tuple[Any, Any]:
        raise NotImplementedError

    def _generate(self, batch: list[Image.Image]) -> list[str]:
        raise NotImplementedError


class BlipCaptioner(ModelCaptioner):
    """BLIP image captioning (BlipForConditionalGeneration)."""

    info = CAPTIONERS["blip"]
    processor_name = "BlipProcessor"

    def _from_pretrained(self, dtype):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        processor = self.processor or BlipProcessor.from_pretrained(self.name)
        return BlipForConditionalGeneration.from_pretrained(self.name, dtype=dtype), processor

    def _generate(self, batch):
        pixel_values = self.processor(images=batch, return_tensors="pt")["pixel_values"]
        ids = self.model.generate(pixel_values=pixel_values.to(self.model.device, self.model.dtype),
                                  max_new_tokens=self.max_new_tokens or self.default_max_new_tokens,
                                  num_beams=self.num_beams)
        return self.processor.batch_decode(ids, skip_special_tokens=True)


class Florence2Captioner(ModelCaptioner):
    """Florence-2 (transformers' Florence2ForConditionalGeneration) with one of its caption tasks.

    `detail`: short (<CAPTION>, a phrase), detailed (<DETAILED_CAPTION>, a sentence or two) or
    paragraph (<MORE_DETAILED_CAPTION>; usually longer than CLIP's 77 tokens).
    """

    info = CAPTIONERS["florence2"]
    processor_name = "Florence2Processor"
    max_tokens_for_detail = {"short": 40, "detailed": 96, "paragraph": 192}

    def __init__(self, model: Any = None, processor: Any = None, *, detail: str = "short", **kwargs: Any):
        super().__init__(model, processor, **kwargs)
        self.detail = detail
        check_detail(detail)

    def _from_pretrained(self, dtype):
        from transformers import Florence2ForConditionalGeneration, Florence2Processor

        processor = self.processor or Florence2Processor.from_pretrained(self.name)
        return Florence2ForConditionalGeneration.from_pretrained(self.name, dtype=dtype), processor

    def _generate(self, batch):
        check_detail(self.detail)
        inputs = self.processor(text=[FLORENCE_TASKS[self.detail]] * len(batch), images=batch, return_tensors="pt")
        ids = self.model.generate(
            input_ids=inputs["input_ids"].to(self.model.device),
            attention_mask=inputs["attention_mask"].to(self.model.device),
            pixel_values=inputs["pixel_values"].to(self.model.device, self.model.dtype),
            max_new_tokens=self.max_new_tokens or self.max_tokens_for_detail[self.detail],
            num_beams=self.num_beams, do_sample=False,
        )
        # the caption tasks' answers are plain text: decoding without special tokens is their post-processing
        return self.processor.batch_decode(ids, skip_special_tokens=True)


@dataclass
class QwenVLInputs:
    """The Qwen-VL tokenizer (left padding, for batched generation) and image processor."""

    tokenizer: Any
    image_processor: Any


class QwenVLCaptioner(ModelCaptioner):
    """Qwen2.5-VL or Qwen3-VL (AutoModelForImageTextToText) answering `instruction` for each image.

    The prompt is built here rather than by the model's AutoProcessor, which also loads a video
    processor that needs torchvision: it is the chat format the Qwen-VL templates produce for one
    image and one question (the image padded to its number of vision tokens).
    """

    info = CAPTIONERS["qwen-vl"]
    processor_name = "QwenVLInputs (tokenizer and image processor)"
    gpu_dtype = "bfloat16"  # the Qwen-VL weights are bf16; fp16 can overflow in their MLPs
    default_max_new_tokens = 77
    default_num_beams = 1

    def __init__(self, model: Any = None, processor: Any = None, *, instruction: str = DEFAULT_INSTRUCTION,
                 **kwargs: Any):
        super().__init__(model, processor, **kwargs)
        self.instruction = instruction

    def _from_pretrained(self, dtype):
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        processor = self.processor or QwenVLInputs(
            AutoTokenizer.from_pretrained(self.name, padding_side="left"),
            AutoImageProcessor.from_pretrained(self.name, backend="pil"))
        return AutoModelForImageTextToText.from_pretrained(self.name, dtype=dtype), processor

    def _generate(self, batch):
        tokenizer, images = self.processor.tokenizer, self.processor.image_processor
        size = dict(images.size)
        size["longest_edge"] = min(size.get("longest_edge", QWEN_MAX_PIXELS), QWEN_MAX_PIXELS)
        vision = images(images=batch, size=size, return_tensors="pt")
        image_token = tokenizer.convert_ids_to_tokens(self.model.config.image_token_id)
        instruction = " ".join((self.instruction or DEFAULT_INSTRUCTION).split())
        prompts = [
            f"<|im_start|>user\n<|vision_start|>{image_token * (int(grid.prod()) // images.merge_size ** 2)}"
            f"<|vision_end|>{instruction}<|im_end|>\n<|im_start|>assistant\n"
            for grid in vision["image_grid_thw"]
        ]
        text = tokenizer(prompts, return_tensors="pt", padding=True)
        device = self.model.device
        ids = self.model.generate(
            input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device),
            mm_token_type_ids=(text["input_ids"] == self.model.config.image_token_id).int().to(device),
            pixel_values=vision["pixel_values"].to(device, self.model.dtype),
            image_grid_thw=vision["image_grid_thw"].to(device),
            max_new_tokens=self.max_new_tokens or self.default_max_new_tokens, num_beams=self.num_beams,
            do_sample=False,
        )
        return tokenizer.batch_decode(ids[:, text["input_ids"].shape[1]:], skip_special_tokens=True)


CAPTIONER_CLASSES: dict[str, type[ModelCaptioner]] = {
    "blip": BlipCaptioner, "florence2": Florence2Captioner, "qwen-vl": QwenVLCaptioner}


def check_kind(kind: str) -> CaptionerInfo:
    if kind not in CAPTIONERS:
        raise LoraStudioError(f"captioner '{kind}' is unknown; use one of {', '.join(KINDS)}")
    return CAPTIONERS[kind]


def check_detail(detail: str) -> None:
    if detail not in DETAILS:
        raise LoraStudioError(f"caption detail '{detail}' is unknown; use one of {', '.join(DETAILS)}")


def make_captioner(kind: str, model: str | None = None, **options: Any) -> ModelCaptioner:
    """A captioner of `kind` ("blip", "florence2", "qwen-vl") for a Hub id or folder (the kind's default if empty)."""
    check_kind(kind)
    return CAPTIONER_CLASSES[kind]((model or "").strip() or CAPTIONERS[kind].model, **options)


def captioner_options(kind: str, *, detail: str | None = None, instruction: str | None = None,
                      batch_size: int | None = None) -> dict[str, Any]:
    """The per-request options that mean something to `kind`: detail for florence2, instruction for qwen-vl."""
    options: dict[str, Any] = {} if batch_size is None else {"batch_size": max(1, int(batch_size))}
    if kind == "florence2" and detail:
        check_detail(detail)
        options["detail"] = detail
    if kind == "qwen-vl" and instruction and instruction.strip():
        options["instruction"] = instruction.strip()
    return options


# -- failing clearly without the weights -----------------------------------------------------------
def check_available(name: str, info: CaptionerInfo) -> None:
    """Fail at once, in one line, when `name` is neither a folder, nor cached, nor downloadable."""
    from huggingface_hub import constants, try_to_load_from_cache

    from .models import ensure_downloadable

    if Path(name).expanduser().is_dir():
        return
    if _looks_like_a_path(name):
        raise ModelLoadError(load_failure(name, info, reason="there is no such folder"))
    if constants.HF_HUB_OFFLINE and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise ModelLoadError(load_failure(
            name, info, reason="it is not in this machine's Hugging Face cache and Hub downloads are off (HF_HUB_OFFLINE)"))
    ensure_downloadable(name, "config.json", f"{info.label} captioning model")


def load_failure(name: str, info: CaptionerInfo, error: BaseException | None = None, reason: str = "") -> str:
    """The one-line message for a captioning model that cannot load: which model, why in words, what to do."""
    reason = reason or _reason(name, info, error)
    return (f"Could not load the captioning model '{name}' ({info.label}): {reason}. Use a Hub id this machine "
            f"can download or has in its cache (e.g. {info.model}, or the lighter {info.light}) or a local folder "
            "with the model, or choose another captioner")


def _reason(name: str, info: CaptionerInfo, error: BaseException | None) -> str:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    chain = []
    while error is not None and len(chain) < 8:
        chain.append(error)
        error = error.__cause__ or error.__context__
    if any(isinstance(e, GatedRepoError) for e in chain):
        return "the model is gated: accept its terms on its Hub page and use a token that may read it"
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return "the Hub has no model of that name (or it is private)"
    if Path(name).expanduser().is_dir():
        return f"the folder does not hold a complete {info.label} model (config, weights and processor files)"
    kind = type(chain[0]).__name__ if chain else "an error"
    return f"its files could not be downloaded or read ({kind}; the log has the details)"


def _looks_like_a_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else the user typed was meant as a folder
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


# -- loaded captioners, shared and freed -----------------------------------------------------------
_LOADED: dict[tuple[str, str], ModelCaptioner] = {}
_LOCK = threading.Lock()


def shared_captioner(kind: str, model: str | None = None, **options: Any) -> ModelCaptioner:
    """A loaded captioner of `kind`, reused across calls (loading takes seconds to minutes); `options` per call.

    Raises ModelLoadError (one line) when the model cannot load; nothing is kept then.
    """
    check_kind(kind)
    name = (model or "").strip() or CAPTIONERS[kind].model
    with _LOCK:  # one load per model, even when two pages ask at once
        captioner = _LOADED.get((kind, name))
        if captioner is None:
            captioner = make_captioner(kind, name).load()
            _LOADED[(kind, name)] = captioner
    return captioner.with_options(**options)


def is_loaded(kind: str, model: str | None = None) -> bool:
    return (kind, (model or "").strip() or CAPTIONERS[kind].model) in _LOADED


def unload_all() -> int:
    """Free every shared captioner and empty the CUDA cache (call before training starts); returns how many."""
    with _LOCK:
        captioners = list(_LOADED.values())
        _LOADED.clear()
    for captioner in captioners:
        captioner.unload()
    gc.collect()
    torch = sys.modules.get("torch")  # never import torch just to free nothing
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(captioners)
