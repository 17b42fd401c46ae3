"""Checkpoints in a run folder: what a resume needs, written atomically, pruned, pushed off the box.

`checkpoints/step-NNNNNN/` holds both LoRA files (usable on their own) plus `state/` (the
adapter in peft layout, the optimizer and LR-scheduler state), `trainer_state.json` and
`manifest.json` (the size and sha256 of every other file). A folder counts as a checkpoint once
`trainer_state.json` exists; everything is written inside a temp folder that is renamed into place,
so a kill leaves either the old or the new complete checkpoint. What a kill cannot do, a disk or a
copy can: a resume verifies the manifest and falls back to the newest checkpoint that is intact,
naming the damaged file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .errors import ConfigError, TrainingFailed
from .fsutil import atomic_write_text

log = logging.getLogger("lora_trainer.checkpoints")

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
# What a resume reads; a checkpoint missing one of them cannot resume (scaler.pt is optional: fp16 only).
RESUME_FILES = (f"{STATE_DIR}/adapter.safetensors", f"{STATE_DIR}/optimizer.pt", f"{STATE_DIR}/scheduler.pt", TRAINER_STATE)

# Settings a checkpoint's tensors depend on: a resume with any of them changed cannot load it.
RESUME_SETTINGS = (
    "model.base", "lora.rank", "lora.alpha", "lora.targets", "lora.custom_targets", "lora.use_dora",
    "lora.use_rslora", "lora.train_text_encoder", "lora.trigger_vectors", "optim.optimizer", "optim.lora_plus_ratio",
)
EMA_FILE = f"{STATE_DIR}/ema.safetensors"  # the LoRA weights' moving average (optim.ema_decay > 0)


def resume_settings(cfg) -> dict[str, Any]:
    return {name: getattr(getattr(cfg, name.split(".")[0]), name.split(".")[1]) for name in RESUME_SETTINGS}


def check_resumable(run_dir: Path, cfg) -> Path | None:
    """The checkpoint a run resumes from: the newest intact one (damaged ones are skipped and logged), after
    checking the config still fits it. Raises TrainingFailed when checkpoints exist but none is intact."""
    return resumable_checkpoint(run_dir, cfg)[0]


def resumable_checkpoint(run_dir: Path, cfg) -> tuple[Path | None, list[str]]:
    """check_resumable, plus a note per damaged checkpoint that was passed over (the trainer logs them and puts
    them in its `started` event)."""
    checkpoint, damaged = newest_intact_checkpoint(run_dir)
    resumes = f"training resumes from {checkpoint.name} instead" if checkpoint else "no intact checkpoint is left"
    notes = [f"checkpoint {path.name} is damaged ({problem}); {resumes}" for path, problem in damaged]
    if checkpoint is None:
        if damaged:
            problems = "; ".join(f"{p.name}: {why}" for p, why in damaged)
            raise TrainingFailed(
                f"every checkpoint of this run is damaged ({problems}), so it cannot resume",
                hint=f"delete {Path(run_dir) / 'checkpoints'} to train this run from the start, or restore the files from a copy",
            )
        return None, notes
    saved = json.loads((checkpoint / TRAINER_STATE).read_text()).get("settings", {})
    now = resume_settings(cfg)
    if cfg.optim.memory == "auto" and (saved.get("optim.optimizer"), now["optim.optimizer"]) == ("adamw8bit", "adamw"):
        now["optim.optimizer"] = "adamw8bit"  # the memory plan chose it, and keeps it on resume (memory.plan_for_training)
    changed = [f"{k} was {saved[k]!r}, now {now[k]!r}" for k in RESUME_SETTINGS if k in saved and saved[k] != now[k]]
    if changed:
        raise ConfigError(
            f"this run's checkpoints ({checkpoint.name}) were trained with other settings: {'; '.join(changed)}. "
            "Set them back to resume, train into a new run folder to start fresh with the new settings, "
            f"or delete {checkpoint.parent} to start this run over"
        )
    return checkpoint, notes


def newest_intact_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint that verifies, [(newer damaged checkpoint, what is wrong)])."""
    damaged = []
    for checkpoint in reversed(checkpoint_dirs(run_dir)):
        problem = verify(checkpoint)
        if problem is None:
            return checkpoint, damaged
        damaged.append((checkpoint, problem))
    return None, damaged


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path) -> None:
    """manifest.json: size and sha256 of every file in `folder`, written last."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    atomic_write_text(folder / MANIFEST, json.dumps({"files": entries}, indent=1))


def verify(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint (naming the file), or None when it can resume.

    With a manifest every listed file must have its size and checksum; an older checkpoint without one
    is checked for its files and a readable trainer_state.json.
    """
    for name in RESUME_FILES:
        if not (checkpoint / name).is_file():
            return f"{name} is missing"
    manifest = checkpoint / MANIFEST
    if manifest.is_file():
        try:
            entries = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for name, entry in entries.items():
            path = checkpoint / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != entry.get("size"):
                return f"{name} has {path.stat().st_size} bytes, {entry.get('size')} were written (truncated or changed)"
            if _sha256(path) != entry.get("sha256"):
                return f"{name} does not match its checksum (the file changed after it was written)"
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text())
        int(state["step"])
    except (ValueError, KeyError, TypeError, OSError):
        return f"{TRAINER_STATE} is unreadable"
    return None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step-*") if (p / TRAINER_STATE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoint_dirs(run_dir)
    return found[-1] if found else None


def write_training_state(
    dest: Path, adapters: dict[str, dict[str, Any]], optimizer, lr_scheduler, meta: dict[str, Any], scaler=None,
    ema_state: dict[str, Any] | None = None,
) -> None:
    """Adapter tensors ({model: peft state dict}), optimizer, scheduler (and fp16 loss-scaler, EMA) state, then
    trainer_state.json."""
    import torch
    from safetensors.torch import save_file

    (dest / STATE_DIR).mkdir(parents=True, exist_ok=True)
    flat = {f"{model}.{k}": v.detach().to("cpu").contiguous() for model, state in adapters.items() for k, v in state.items()}
    save_file(flat, dest / STATE_DIR / "adapter.safetensors")
    torch.save(optimizer.state_dict(), dest / STATE_DIR / "optimizer.pt")
    torch.save(lr_scheduler.state_dict(), dest / STATE_DIR / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), dest / STATE_DIR / "scaler.pt")
    if ema_state is not None:
        save_file({k: v.contiguous() for k, v in ema_state.items()}, dest / EMA_FILE)
    atomic_write_text(dest / TRAINER_STATE, json.dumps(meta))
    write_manifest(dest)


def read_training_state(
    checkpoint: Path, model_names: list[str], optimizer, lr_scheduler, scaler=None
) -> tuple[int, dict[str, dict[str, Any]]]:
    """Restore optimizer and scheduler in place; return the step and the adapter state dict per model."""
    import torch
    from safetensors.torch import load_file

    flat = load_file(checkpoint / STATE_DIR / "adapter.safetensors")
    adapters = {name: {k[len(name) + 1 :]: v for k, v in flat.items() if k.startswith(f"{name}.")} for name in model_names}
    optimizer.load_state_dict(torch.load(checkpoint / STATE_DIR / "optimizer.pt", map_location="cpu", weights_only=True))
    lr_scheduler.load_state_dict(torch.load(checkpoint / STATE_DIR / "scheduler.pt", weights_only=True))
    if scaler is not None and (checkpoint / STATE_DIR / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(checkpoint / STATE_DIR / "scaler.pt", weights_only=True))
    return json.loads((checkpoint / TRAINER_STATE).read_text())["step"], adapters


def resume(
    run_dir: Path, checkpoint: Path, trained: dict[str, Any], optimizer, lr_scheduler, accelerator, ema=None
) -> tuple[int, Path]:
    """Load adapter weights (into `trained`, {name: prepared model}), optimizer, scheduler (and `ema`'s) state
    from `checkpoint`, or where it cannot be read from the newest older one that can; returns the step and
    the checkpoint it came from."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    candidates = [c for c in reversed(checkpoint_dirs(run_dir)) if checkpoint_step(c) <= checkpoint_step(checkpoint)]
    problems = []
    for candidate in candidates:
        if candidate != checkpoint and verify(candidate) is not None:
            continue
        try:
            step, adapters = read_training_state(candidate, list(trained), optimizer, lr_scheduler, accelerator.scaler)
            for name, model in trained.items():
                set_peft_model_state_dict(accelerator.unwrap_model(model), adapters[name])
            if ema is not None and (candidate / EMA_FILE).is_file():
                ema.load_state_dict(load_file(candidate / EMA_FILE))
            elif ema is not None:  # trained without EMA until now: the average starts from the resumed weights
                log.warning("checkpoint %s has no EMA weights; the moving average starts at step %d", candidate.name, step)
                ema.restart()
        except Exception as e:  # noqa: BLE001 - a file that verifies may still not load (written by another version)
            problems.append(f"{candidate.name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            log.warning("checkpoint %s cannot be loaded (%s); trying an older one", candidate.name, problems[-1])
            continue
        log.info("resumed from %s at step %d", candidate.name, step)
        return step, candidate
    raise TrainingFailed(
        f"no checkpoint of this run can be loaded ({'; '.join(problems)})",
        hint=f"delete {Path(run_dir) / 'checkpoints'} to train this run from the start, or restore the files from a copy",
    )


def prune(run_dir: Path, keep: int, protect: set[Path] = frozenset()) -> None:
    """Delete all but the newest `keep` checkpoints (never one in `protect`, e.g. waiting to upload)."""
    for old in checkpoint_dirs(run_dir)[:-keep]:
        if old not in protect:
            shutil.rmtree(old, ignore_errors=True)


def write_model_card(run_dir: Path, name: str) -> None:
    """README.md in the run folder: the model card a push would publish. Never fails the run."""
    try:
        from .hub.modelcard import render_model_card

        atomic_write_text(run_dir / "README.md", render_model_card(run_dir, name))
    except Exception as e:  # noqa: BLE001 - a card is a courtesy; the LoRA is already saved
        log.warning("could not write README.md: %s", e)
