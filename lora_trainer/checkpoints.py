"""Checkpoints in a run folder: what a resume needs, written atomically, pruned, pushed off the box.

`checkpoints/step-NNNNNN/` holds both LoRA files (usable on their own) plus `state/` (the
adapter in peft layout, the optimizer and LR-scheduler state) and `trainer_state.json`. A folder
counts as a checkpoint once `trainer_state.json` exists; it is written last, inside a temp folder
that is renamed into place, so a kill leaves either the old or the new complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_text

log = logging.getLogger("lora_trainer.checkpoints")

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / TRAINER_STATE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def write_training_state(dest: Path, adapters: dict[str, dict[str, Any]], optimizer, lr_scheduler, meta: dict[str, Any]) -> None:
    """Adapter tensors ({model: peft state dict}), optimizer and scheduler state, then trainer_state.json."""
    import torch
    from safetensors.torch import save_file

    (dest / STATE_DIR).mkdir(parents=True, exist_ok=True)
    flat = {f"{model}.{k}": v.detach().to("cpu").contiguous() for model, state in adapters.items() for k, v in state.items()}
    save_file(flat, dest / STATE_DIR / "adapter.safetensors")
    torch.save(optimizer.state_dict(), dest / STATE_DIR / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), dest / STATE_DIR / "scheduler.pt")
    atomic_write_text(dest / TRAINER_STATE, json.dumps(meta))


def read_training_state(checkpoint: Path, model_names: list[str], optimizer, lr_scheduler) -> tuple[int, dict[str, dict[str, Any]]]:
    """Restore optimizer and scheduler in place; return the step and the adapter state dict per model."""
    import torch
    from safetensors.torch import load_file

    flat = load_file(checkpoint / STATE_DIR / "adapter.safetensors")
    adapters = {name: {k[len(name) + 1 :]: v for k, v in flat.items() if k.startswith(f"{name}.")} for name in model_names}
    optimizer.load_state_dict(torch.load(checkpoint / STATE_DIR / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(checkpoint / STATE_DIR / "scheduler.pt", weights_only=True))
    return json.loads((checkpoint / TRAINER_STATE).read_text())["step"], adapters


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_model_card(run_dir: Path, name: str) -> None:
    """README.md in the run folder: the model card a push would publish. Never fails the run."""
    try:
        from .modelcard import render_model_card

        atomic_write_text(run_dir / "README.md", render_model_card(run_dir, name))
    except Exception as e:  # noqa: BLE001 - a card is a courtesy; the LoRA is already saved
        log.warning("could not write README.md: %s", e)


def push_in_background(run_dir: Path, checkpoint: Path, repo: str, then=None) -> threading.Thread:
    """Push a checkpoint to the Hub without blocking training; a failure is logged, never raised.

    `then` runs after the push (pruning waits for it, so no checkpoint is deleted mid-upload).
    """

    def push():
        from . import hub

        error = hub.push_checkpoint_safely(run_dir, checkpoint, repo, token=os.environ.get("HF_TOKEN"))
        if error:
            log.warning("checkpoint push to %s failed: %s", repo, error)
        else:
            log.info("pushed %s to %s", checkpoint.name, repo)
        if then:
            then()

    thread = threading.Thread(target=push, name=f"push-{checkpoint.name}", daemon=True)
    thread.start()
    return thread
