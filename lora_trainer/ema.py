"""An exponential moving average of the LoRA weights, kept on the CPU.

The average of the last few hundred steps' weights is smoother than the last step's (less of the
last batches' noise), the way diffusers' EMAModel and kohya's EMA do it. The optimizer keeps
training the raw weights; the average is what the run saves as its LoRA (final/, each checkpoint's
LoRA files) and renders its samples with, by swapping it into the models for that moment
(`applied`). A checkpoint's state/ keeps both: the raw adapter and optimizer to train on, and the
average (`state_dict`) so a resumed run averages exactly as the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any


def decay_at(step: int, decay: float) -> float:
    """The decay of the update after optimizer step `step` (1-based): it ramps up as (1 + step) / (10 + step)
    (diffusers' EMAModel warm-up), so the first steps' weights, with LoRA B still near zero, fade out quickly
    instead of holding the average back for 1 / (1 - decay) steps."""
    return min(decay, (1 + step) / (10 + step))


class LoraEma:
    """The averaged copy of every LoRA tensor (A, B, DoRA magnitude) of the trained models, in fp32 on the CPU.

    The trigger's learned embedding (pivotal tuning) is not averaged: it is saved, and resumes, as trained."""

    def __init__(self, models: dict[str, Any], decay: float):
        # {model name: the module itself (not accelerate's DDP wrapper)}: parameter names stay those of peft.
        self.decay = decay
        self.params = {
            f"{model_name}.{name}": p
            for model_name, model in models.items()
            for name, p in getattr(model, "module", model).named_parameters()
            if p.requires_grad and ".lora_" in name  # LoRA tensors only: a pivotal embedding resumes from its saved file
        }
        self.restart()

    def restart(self) -> None:
        """The average starts from the models' current weights."""
        self.shadow = {key: p.detach().to("cpu", dtype=_fp32(), copy=True) for key, p in self.params.items()}

    def update(self, step: int) -> None:
        """Blend the weights after optimizer step `step` into the average."""
        import torch

        weight = 1.0 - decay_at(step, self.decay)
        with torch.no_grad():
            for key, p in self.params.items():
                self.shadow[key].lerp_(p.detach().to("cpu", dtype=torch.float32), weight)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The models hold the averaged weights inside the block, their exact raw weights again after it."""
        import torch

        raw = {key: p.detach().to("cpu", copy=True) for key, p in self.params.items()}
        try:
            with torch.no_grad():
                for key, p in self.params.items():
                    p.copy_(self.shadow[key])
            yield
        finally:
            with torch.no_grad():
                for key, p in self.params.items():
                    p.copy_(raw[key])

    def state_dict(self) -> dict[str, Any]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the average a checkpoint saved; a tensor missing from it (or of another shape) is an error."""
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"the saved EMA lacks {len(missing)} tensors, e.g. {missing[0]}")
        for key in self.shadow:
            if state[key].shape != self.shadow[key].shape:
                raise ValueError(f"the saved EMA's {key} has shape {tuple(state[key].shape)}, not {tuple(self.shadow[key].shape)}")
            self.shadow[key] = state[key].to("cpu", dtype=_fp32()).clone()


def for_run(decay: float, trained: dict[str, Any], accelerator) -> LoraEma | None:
    """The run's EMA, or None when it is off. Only the main process keeps one: it alone saves LoRA files and
    renders samples, and every process holds the same weights after each step."""
    if not decay or not accelerator.is_main_process:
        return None
    return LoraEma(trained, decay)


def applied(ema: LoraEma | None):
    """`ema.applied()`, or nothing to do when there is no EMA."""
    return nullcontext() if ema is None else ema.applied()


def _fp32():
    import torch

    return torch.float32
