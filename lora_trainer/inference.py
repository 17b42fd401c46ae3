"""Generate with a base model and LoRAs: cached pipelines, strengths, several LoRAs, LoRA off/on.

A LoRA is a `.safetensors` file in either format (diffusers/peft or kohya; diffusers' loader
tells them apart), a folder holding `pytorch_lora_weights.safetensors`, or a run folder (its
`final/`). Strength 0 gives exactly the base model's image.

One LoRA at one strength is fused into the base weights (no LoRA layers to run each step); it is
unfused before anything else is applied. On a GPU the memory options (VAE tiling, model CPU
offload, attention slicing) are chosen from the memory free and the model's measured needs.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import models
from .errors import LoraStudioError
from .formats import DIFFUSERS_FILENAME

log = logging.getLogger(__name__)

_PIPELINES: dict[tuple[str, str], object] = {}
_RECENT: dict[tuple[str, str], list[str]] = {}  # per pipeline: adapter names, least recently used first
MAX_LOADED_LORAS = 8  # per pipeline; the least recently used ones beyond this are unloaded
_FUSED: dict[tuple[str, str], tuple[str, float]] = {}  # per pipeline: the (adapter, strength) fused into its weights
# Per pipeline: a CPU copy of each base weight a fused LoRA changed, taken before its first fuse. Unfusing
# subtracts the LoRA again, which in floating point is not exact; copying these back is.
_BASE_WEIGHTS: dict[tuple[str, str], dict] = {}
_OPTIONS: dict[tuple[str, str], MemoryOptions] = {}
_EMBEDDINGS: dict[tuple[str, str], dict[str, str]] = {}  # per pipeline: loaded trigger embeddings, file id -> trigger
_LOCK = threading.Lock()  # one generation at a time per pipeline (diffusers pipelines are not re-entrant)
INFERENCE_HEADROOM = 0.9  # of the free GPU memory: the allocator's slack and other processes


@dataclass(frozen=True)
class MemoryOptions:
    """How a pipeline saves GPU memory; the default (all off) is the fastest."""

    vae_tiling: bool = False  # decode (and encode) in overlapping tiles: flat memory at any image size
    cpu_offload: bool = False  # keep each model in RAM until it runs (accelerate's model offload)
    attention_slicing: bool = False  # heads in slices; only where fused attention (SDPA) is missing
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class InferenceNeed:
    """Bytes one image needs on the GPU: weights per model and the peaks above them (simulate.py)."""

    unet: int
    text_encoders: int
    vae: int
    denoise: int  # UNet step with classifier-free guidance (batch 2)
    decode: int
    decode_tiled: int

    @property
    def weights(self) -> int:
        return self.unet + self.text_encoders + self.vae


def choose_memory_options(need: InferenceNeed | None, free_bytes: int | None, *, fused_attention: bool = True) -> MemoryOptions:
    """The fastest options whose peak fits `free_bytes`; none without a GPU (need or free_bytes None)."""
    if need is None or free_bytes is None:
        return MemoryOptions(reasons=("no GPU: nothing to save",))
    budget = int(free_bytes * INFERENCE_HEADROOM)
    full = need.weights + max(need.denoise, need.decode)
    if full <= budget:
        return MemoryOptions(reasons=(f"everything fits ({full / 2**30:.2f} of {budget / 2**30:.2f} GiB)",))
    tiled = need.weights + max(need.denoise, need.decode_tiled)
    if tiled <= budget:
        return MemoryOptions(vae_tiling=True, reasons=(f"VAE tiling: a full decode would need {full / 2**30:.2f} GiB",))
    offloaded = max(need.unet + need.denoise, need.vae + need.decode_tiled, need.text_encoders)
    reasons = [f"model CPU offload: all models together need {tiled / 2**30:.2f} GiB, one at a time {offloaded / 2**30:.2f}"]
    slicing = not fused_attention
    if slicing:
        reasons.append("attention slicing: no fused attention on this setup")
    elif offloaded > budget:
        reasons.append(f"even one model at a time needs {offloaded / 2**30:.2f} GiB; expect out-of-memory at this size")
    return MemoryOptions(vae_tiling=True, cpu_offload=True, attention_slicing=slicing, reasons=tuple(reasons))


def inference_need(spec: str, size: int) -> InferenceNeed:
    """What generating one `size` x `size` image with `spec` needs in fp16, from its configs (no weights)."""
    from .memory import architecture
    from .memory.simulate import inference_peak

    arch = architecture(spec)
    unet, vae = arch.components["unet"], arch.components["vae"]
    return InferenceNeed(
        unet=2 * unet.params, text_encoders=2 * sum(t.params for t in arch.text_encoders), vae=2 * vae.params,
        denoise=inference_peak("unet", unet.config, 2, size, size, "fp16", "denoise"),
        decode=inference_peak("vae", vae.config, 1, size, size, "fp16", "decode"),
        decode_tiled=inference_peak("vae", vae.config, 1, size, size, "fp16", "decode", tiling=True),
    )


@dataclass(frozen=True)
class LoraSpec:
    path: str
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`path` or `path:strength` (a trailing number after the last colon is the strength)."""
        head, sep, tail = text.rpartition(":")
        if sep and head:
            try:
                return cls(head, float(tail))
            except ValueError:
                pass
        return cls(text, 1.0)


def resolve_lora_file(path: str | Path) -> Path:
    """The .safetensors file a user means by a file, an adapter folder or a run folder."""
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".safetensors":
            raise LoraStudioError(f"LoRA {p} is not a .safetensors file; load a LoRA saved as .safetensors")
        return p
    for candidate in (p / DIFFUSERS_FILENAME, p / "final" / DIFFUSERS_FILENAME):
        if candidate.is_file():
            return candidate
    if p.is_dir():
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
    raise LoraStudioError(f"no LoRA found at {p}: give a .safetensors file, an adapter folder or a finished run folder")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Generator:
    """A base model loaded once, and the LoRAs applied to it on demand."""

    def __init__(self, base: str = "builtin:tiny-sd", device: str | None = None):
        import torch

        self.base = models.resolve(base)
        self.device = device or default_device()
        self.key = key = (self.base.spec, self.device)
        self.default_size = models.geometry(self.base).default_resolution  # the base's native size
        with _LOCK:
            if key not in _PIPELINES:
                dtype = torch.float16 if self.device == "cuda" else torch.float32
                pipe = models.load_pipeline(self.base, dtype)
                options = self._memory_options(self.default_size)
                if options.cpu_offload:
                    pipe.enable_model_cpu_offload()
                else:
                    pipe.to(self.device)
                if options.attention_slicing:
                    pipe.enable_attention_slicing()
                _PIPELINES[key], _OPTIONS[key] = pipe, options
                if options.reasons:
                    log.info("generation memory: %s", "; ".join(options.reasons))
        self.pipe = _PIPELINES[key]
        self._recent = _RECENT.setdefault(key, [])
        self.fuse = self.device.startswith("cuda")

    def _memory_options(self, size: int) -> MemoryOptions:
        if not self.device.startswith("cuda"):
            return MemoryOptions()
        import torch

        free, _ = torch.cuda.mem_get_info()
        loaded = _OPTIONS.get(self.key)
        if loaded is not None and not loaded.cpu_offload:
            free += 2 * sum(p.numel() for m in _models(_PIPELINES[self.key]) for p in m.parameters())  # ours
        return choose_memory_options(inference_need(self.base.spec, size), free)

    def _set_vae_tiling(self, size: int) -> None:
        """Tile the decode when a larger image than planned for would not fit (cheap to switch)."""
        if not self.device.startswith("cuda"):
            return
        tiling = self._memory_options(size).vae_tiling if size > self.default_size else _OPTIONS[self.key].vae_tiling
        if tiling:
            self.pipe.vae.enable_tiling()
        else:
            self.pipe.vae.disable_tiling()

    def _adapter_name(self, path: Path) -> str:
        stat = path.stat()
        return "lora_" + hashlib.sha1(f"{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:12]

    def _apply(self, loras: list[LoraSpec]) -> None:
        """Load any LoRA not yet loaded, then activate exactly these at their strengths (one alone: fused)."""
        active = [lora for lora in loras if lora.path]
        self._apply_embeddings([resolve_lora_file(lora.path) for lora in active if lora.strength])
        if not active:
            self._unfuse()
            if self.pipe.get_list_adapters():
                self.pipe.disable_lora()
            return
        paths = [resolve_lora_file(lora.path) for lora in active]
        names = [self._adapter_name(path) for path in paths]
        # Fused on a GPU, where it saves time per step; on a CPU unfusing leaves float dust in the base weights.
        fuse = (names[0], active[0].strength) if len(active) == 1 and self.fuse else None
        if fuse is not None and _FUSED.get(self.key) == fuse:
            return  # already fused into the weights
        self._unfuse()  # before loading: a LoRA does not load into fused layers
        for path, name in zip(paths, names, strict=True):
            loaded = {n for ns in self.pipe.get_list_adapters().values() for n in ns}
            if name not in loaded:
                try:
                    from .pivotal import without_bundle

                    bundled = without_bundle(path)  # a kohya file with an embedding bundled: the LoRA part
                    if bundled is not None:
                        self.pipe.load_lora_weights(bundled, adapter_name=name)
                    else:
                        self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
                except Exception as e:  # noqa: BLE001 - a wrong LoRA for this base is a user error
                    raise LoraStudioError(
                        f"LoRA {path.name} does not fit base model '{self.base.spec}' ({self.base.kind}): "
                        f"{str(e).splitlines()[0][:200]}. Use a LoRA trained on the same model family"
                    ) from None
        self._forget_old_adapters(keep=set(names))
        self.pipe.enable_lora()
        self.pipe.set_adapters(names, adapter_weights=[lora.strength for lora in active])
        for module in _models(self.pipe):
            module.eval()  # freshly loaded LoRA layers start in training mode: their dropout would be live
        if fuse is not None:
            # Merged into the base weights, the LoRA costs nothing per step; its layers stay loaded (and skip).
            saved = _BASE_WEIGHTS.setdefault(self.key, {})
            for layer in _lora_layers(self.pipe, fuse[0]):
                if layer not in saved:
                    saved[layer] = layer.get_base_layer().weight.detach().to("cpu", copy=True)
            self.pipe.fuse_lora(components=_lora_components(self.pipe), lora_scale=1.0, adapter_names=[fuse[0]])
            _FUSED[self.key] = fuse

    def _apply_embeddings(self, lora_files: list[Path]) -> None:
        """The learned trigger embeddings that go with these LoRAs (pivotal tuning) loaded, any others unloaded:
        the LoRA off is the base model, whose tokenizer does not know the trigger."""
        from . import pivotal

        wanted: dict[str, tuple[str, dict]] = {}
        for lora in lora_files:
            found = pivotal.embeddings_for(lora)
            if found is not None and found[0] not in {t for t, _ in wanted.values()}:  # one embedding per word
                wanted[self._adapter_name(lora)] = found
        loaded = _EMBEDDINGS.setdefault(self.key, {})
        if set(wanted) == set(loaded):
            return
        for trigger in loaded.values():
            pivotal.unload_from_pipeline(self.pipe, trigger)
        loaded.clear()
        for name, (trigger, state) in wanted.items():
            try:
                pivotal.load_into_pipeline(self.pipe, state, trigger)
            except Exception as e:  # noqa: BLE001 - an embedding for another model family is a user error
                raise LoraStudioError(f"the trigger embedding of '{trigger}' does not fit base model '{self.base.spec}': "
                                      f"{str(e).splitlines()[0][:200]}. Use a LoRA trained on the same model family") from None
            loaded[name] = trigger

    def _unfuse(self) -> None:
        if self.key not in _FUSED:
            return
        name, _ = _FUSED.pop(self.key)
        self.pipe.unfuse_lora(components=_lora_components(self.pipe))
        saved = _BASE_WEIGHTS.get(self.key, {})
        with _no_grad():
            for layer in _lora_layers(self.pipe, name):
                weight = layer.get_base_layer().weight
                weight.copy_(saved[layer].to(weight.device))

    def _forget_old_adapters(self, keep: set[str]) -> None:
        """Unload the least recently used LoRAs beyond MAX_LOADED_LORAS (a checkpoint grid loads many)."""
        loaded = {n for ns in self.pipe.get_list_adapters().values() for n in ns}
        self._recent[:] = [n for n in self._recent if n in loaded and n not in keep] + sorted(keep)
        stale = self._recent[: max(0, len(loaded) - MAX_LOADED_LORAS)]
        if stale:
            self.pipe.delete_adapters(stale)
            del self._recent[: len(stale)]

    def generate(
        self, prompt: str, loras: list[LoraSpec] | None = None, *, seed: int = 0, steps: int = 25,
        guidance: float = 7.0, size: int = 0, negative_prompt: str = "",
    ):
        """One image; same seed and settings give the same image."""
        return self.generate_many([prompt], [seed], loras, steps=steps, guidance=guidance, size=size,
                                  negative_prompt=negative_prompt)[0]

    def generate_many(
        self, prompts: list[str], seeds: list[int], loras: list[LoraSpec] | None = None, *, steps: int = 25,
        guidance: float = 7.0, size: int = 0, negative_prompt: str = "",
    ) -> list:
        """One image per (prompt, seed), each the image generate() gives it (up to a unit of rounding), several
        per pipeline call (`batch_size`): the evaluation draws dozens of pictures per checkpoint."""
        import torch

        size = size or self.default_size
        per_call, images = self.batch_size(size), []
        with _LOCK:
            self._apply(loras or [])
            self._set_vae_tiling(size)
            for i in range(0, len(prompts), per_call):
                batch, batch_seeds = prompts[i : i + per_call], seeds[i : i + per_call]
                images += self.pipe(
                    batch, negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
                    num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                    generator=[torch.Generator("cpu").manual_seed(s) for s in batch_seeds],
                ).images
        return images

    def batch_size(self, size: int) -> int:
        """Images per pipeline call in generate_many: many on the built-in bases (at most 64 px, a batch of 32
        costs less memory than one picture of a real model), one on a real model, whose memory is planned
        for one picture (choose_memory_options)."""
        return 32 if self.base.is_builtin and size <= 64 else 1

    @contextmanager
    def using(self, loras: list[LoraSpec]):
        """Exactly these LoRAs active on `self.pipe` while the block runs its models directly (evaluation).

        Holds the pipeline's lock: don't call generate() inside the block.
        """
        with _LOCK:
            self._apply(loras)
            yield self.pipe

    def compare(self, prompt: str, loras: list[LoraSpec], **kwargs):
        """LoRA off and on, same seed, side by side."""
        return grid([[self.generate(prompt, [], **kwargs), self.generate(prompt, loras, **kwargs)]])

    def checkpoint_grid(self, run_dir: str | Path, prompts: list[str], *, strength: float = 1.0, **kwargs):
        """Rows: every saved checkpoint (then final); columns: prompts. Pick the step before it overcooks."""
        from .checkpoints import checkpoint_dirs

        run_dir = Path(run_dir)
        adapters = checkpoint_dirs(run_dir)
        if (run_dir / "final" / DIFFUSERS_FILENAME).exists():
            adapters.append(run_dir / "final")
        if not adapters:
            raise LoraStudioError(f"{run_dir} has no checkpoints yet; train first (checkpoints are saved every output.save_every steps)")
        rows = [[self.generate(p, [LoraSpec(str(a / DIFFUSERS_FILENAME), strength)], **kwargs) for p in prompts] for a in adapters]
        return grid(rows), [a.name for a in adapters]


def _models(pipe) -> list:
    return [pipe.unet, *models.text_encoders(pipe)]


def _lora_layers(pipe, adapter: str) -> list:
    """The peft LoRA layers of the pipeline's models that hold `adapter`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for model in _models(pipe) for m in model.modules()
            if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {})]


def _no_grad():
    import torch

    return torch.no_grad()


def _lora_components(pipe) -> list[str]:
    return [name for name in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None]


def grid(rows: list[list]):
    """Paste PIL images into a grid (rows x columns), all cells the size of the first."""
    from PIL import Image

    w, h = rows[0][0].size
    sheet = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            sheet.paste(image.resize((w, h)), (x * w, y * h))
    return sheet
