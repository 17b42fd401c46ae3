"""Generate with a base model and LoRAs: cached pipelines, strengths, several LoRAs, LoRA off/on.

A LoRA is a `.safetensors` file in either format (diffusers/peft or kohya; diffusers' loader
tells them apart), a folder holding `pytorch_lora_weights.safetensors`, or a run folder (its
`final/`). Strength 0 gives exactly the base model's image.
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
_LOCK = threading.Lock()  # one generation at a time per pipeline (diffusers pipelines are not re-entrant)


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
        key = (self.base.spec, self.device)
        with _LOCK:
            if key not in _PIPELINES:
                dtype = torch.float16 if self.device == "cuda" else torch.float32
                _PIPELINES[key] = models.load_pipeline(self.base, dtype).to(self.device)
        self.pipe = _PIPELINES[key]
        self._recent = _RECENT.setdefault(key, [])
        if self.base.is_builtin:
            from .tiny import TINY_RESOLUTION

            self.default_size = TINY_RESOLUTION
        else:
            self.default_size = 1024 if self.base.kind == "sdxl" else 512

    def _adapter_name(self, path: Path) -> str:
        stat = path.stat()
        return "lora_" + hashlib.sha1(f"{path.resolve()}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:12]

    def _apply(self, loras: list[LoraSpec]) -> None:
        """Load any LoRA not yet loaded, then activate exactly these at their strengths."""
        active = [lora for lora in loras if lora.path]
        if not active:
            if self.pipe.get_list_adapters():
                self.pipe.disable_lora()
            return
        names = []
        for lora in active:
            path = resolve_lora_file(lora.path)
            name = self._adapter_name(path)
            loaded = {n for ns in self.pipe.get_list_adapters().values() for n in ns}
            if name not in loaded:
                try:
                    self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
                except Exception as e:  # noqa: BLE001 - a wrong LoRA for this base is a user error
                    raise LoraStudioError(
                        f"LoRA {path.name} does not fit base model '{self.base.spec}' ({self.base.kind}): "
                        f"{str(e).splitlines()[0][:200]}. Use a LoRA trained on the same model family"
                    ) from None
            names.append(name)
        self._forget_old_adapters(keep=set(names))
        self.pipe.enable_lora()
        self.pipe.set_adapters(names, adapter_weights=[lora.strength for lora in active])
        for module in (self.pipe.unet, *models.text_encoders(self.pipe)):
            module.eval()  # freshly loaded LoRA layers start in training mode: their dropout would be live

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
        import torch

        size = size or self.default_size
        with _LOCK:
            self._apply(loras or [])
            return self.pipe(
                prompt, negative_prompt=negative_prompt or None, num_inference_steps=steps, guidance_scale=guidance,
                height=size, width=size, generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]

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


def grid(rows: list[list]):
    """Paste PIL images into a grid (rows x columns), all cells the size of the first."""
    from PIL import Image

    w, h = rows[0][0].size
    sheet = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            sheet.paste(image.resize((w, h)), (x * w, y * h))
    return sheet
