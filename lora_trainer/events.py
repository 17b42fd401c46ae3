"""The events contract: the trainer appends one JSON object per line to `events.jsonl`.

Types and their fields (every event also has `type` and `time`, seconds since the epoch):
  started     step (0 or the resumed step), total_steps, base, kind (sd|sdxl), resumed (bool), resumed_from,
              plan {images, repeats, buckets, epochs, steps_per_epoch, batch_size, cache_latents,
              cache_text_embeddings, num_workers, gradient_checkpointing}, device, processes,
              warnings [settings that train, probably not as meant]
  step        step, total_steps, loss, lr, sec_per_step, eta_seconds, memory {rss_gb, gpu_gb?},
              eta_parts {training, samples?, evaluation?, validation?}: eta_seconds' parts (timing.py;
              the renders' once a set of samples has been timed), and each extra loss term inside `loss`
              as <name>_loss (prior_loss: prior preservation; preservation_loss)
  sample      step, images [paths relative to the run folder], prompts, seed
  checkpoint  step, path (relative to the run folder)
  stopped     step, checkpoint (path, or null)       -- a stop request honoured: state saved; with
              before_training: true it came while the model loaded (checkpoint: what a restart resumes)
  finished    step, final (path), files [paths]
  failed      step, error, hint                       -- the run cannot go on; `hint` says what to change

The UI only reads this file; `read_events` tolerates a half-written last line.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

EVENTS_FILENAME = "events.jsonl"
EVENT_TYPES = (
    "started", "step", "validation", "sample", "checkpoint", "upload_pending", "evaluation", "stopped", "finished", "failed",
)
# With LORA_STUDIO_EVENTS_TO_STDOUT=1 each event is also printed as LOG_PREFIX + its JSON line: on
# Hugging Face Jobs the log stream is how they reach the machine that follows the run (hub/jobs.py).
ECHO_ENV, LOG_PREFIX = "LORA_STUDIO_EVENTS_TO_STDOUT", "@lora-studio-event "


def make_event(type: str, /, **fields: Any) -> dict[str, Any]:
    """An event of a known type, stamped with the time."""
    if type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    return {"type": type, "time": round(time.time(), 3), **fields}


class EventWriter:
    """Appends events; a failure to write never takes training down (the run matters more).

    Callable with an event, so it can be one of a recorder's listeners.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def emit(self, type: str, /, **fields: Any) -> dict[str, Any]:
        event = make_event(type, **fields)
        self(event)
        return event

    def __call__(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, default=str) + "\n"
        if os.environ.get(ECHO_ENV) == "1":
            print(LOG_PREFIX + line, end="", flush=True)
        try:
            self._file.write(line)
            self._file.flush()
        except (OSError, ValueError):  # ValueError: written after close
            pass

    def close(self) -> None:
        self._file.close()


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events from byte `offset` on, and the offset to continue from.

    Only complete lines are consumed: a line still being written is left for the next call.
    Lines that are not valid JSON are skipped.
    """
    path = Path(path)
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for line in data[: end + 1].splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "type" in event:
            events.append(event)
    return events, offset + end + 1


def smooth_losses(values: list[float]) -> list[float]:
    """The smoothed loss curve the app and the model card draw: a debiased exponential moving average
    (TensorBoard's), whose window grows with the run so a short run is not flattened."""
    weight = min(0.99, max(0.0, 1 - 20 / max(len(values), 1)))
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i) if weight else v)
    return out


def last_event(path: str | Path, *types: str) -> dict[str, Any] | None:
    """The newest event (of the given types, if any)."""
    events, _ = read_events(path)
    for event in reversed(events):
        if not types or event["type"] in types:
            return event
    return None
