"""What a run is doing, read from its folder: events.jsonl (incrementally) plus the job registry.

`RunMonitor.update()` reads only the bytes appended since the last call (`read_events(path,
offset)`), so a browser polling every second costs a file stat and a few lines. A fresh monitor
(a reloaded page) rebuilds the whole picture from offset 0: that is how a page reattaches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..events import EVENTS_FILENAME, read_events, smooth_losses
from . import jobs

MAX_PLOT_POINTS = 1500  # raw points sent to the plot; longer runs are thinned evenly
VALIDATION_SERIES = "validation"
CLI_ERROR = "error: "  # how `python -m lora_trainer` prints a problem the user can fix (cli.main, hub/jobcli.py)


@dataclass
class RunMonitor:
    run_dir: Path
    offset: int = 0
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (a re-done step overwrites)
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss (`validation` events)
    samples: dict[int, list[tuple[str, str]]] = field(default_factory=dict)  # step -> [(path, prompt)]
    checkpoints: list[int] = field(default_factory=list)
    started: dict[str, Any] | None = None
    last_step: dict[str, Any] | None = None
    terminal: dict[str, Any] | None = None  # the newest stopped / finished / failed after the newest started

    def update(self) -> bool:
        """Read new events; True if anything changed."""
        path = self.run_dir / EVENTS_FILENAME
        if self.offset and (not path.exists() or path.stat().st_size < self.offset):
            self.__init__(self.run_dir)  # the file was replaced (a fresh start of the run): read it anew
        events, self.offset = read_events(path, self.offset)
        for event in events:
            kind = event.get("type")
            if kind == "started":
                self.started, self.terminal, self.last_step = event, None, None
            elif kind == "step" and isinstance(event.get("loss"), int | float):
                self.losses[int(event["step"])] = float(event["loss"])
                self.last_step = event
            elif kind == "validation" and isinstance(event.get("val_loss"), int | float):
                self.val_losses[int(event.get("step", 0))] = float(event["val_loss"])
            elif kind == "sample":
                prompts = event.get("prompts") or []
                images = event.get("images") or []
                self.samples[int(event.get("step", 0))] = [
                    (str(self.run_dir / rel), prompts[i] if i < len(prompts) else "") for i, rel in enumerate(images)
                ]
            elif kind == "checkpoint":
                self.checkpoints.append(int(event.get("step", 0)))
            elif kind in ("stopped", "finished", "failed"):
                self.terminal = event
        return bool(events)

    # -- views ------------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int | None:
        for event in (self.last_step, self.started):
            if event and event.get("total_steps"):
                return int(event["total_steps"])
        return None

    @property
    def step(self) -> int:
        if self.terminal and "step" in self.terminal:
            return int(self.terminal["step"])
        if self.last_step:
            return int(self.last_step["step"])
        return int(self.started.get("step", 0)) if self.started else 0

    def loss_rows(self) -> list[tuple[int, float, str]]:
        """(step, loss, series) rows: the raw losses (thinned), their smoothed curve, and the validation loss.

        Validation loss is measured every few hundred steps on fixed images, noise and timesteps, so its points
        are few and not smoothed: unlike the training loss it is comparable from one point to the next.
        """
        steps = sorted(self.losses)
        raw = [self.losses[s] for s in steps]
        smooth = smooth_losses(raw)
        every = max(1, math.ceil(len(steps) / MAX_PLOT_POINTS))
        keep = [i for i in range(len(steps)) if i % every == 0 or i == len(steps) - 1]
        return ([(steps[i], raw[i], "raw") for i in keep] + [(steps[i], smooth[i], "smoothed") for i in keep]
                + [(s, self.val_losses[s], VALIDATION_SERIES) for s in sorted(self.val_losses)])

    def sample_items(self, max_steps: int = 6) -> list[tuple[str, str]]:
        """Gallery items, newest step first, each captioned 'step N · prompt'."""
        items = []
        for step in sorted(self.samples, reverse=True)[:max_steps]:
            items += [(path, f"step {step} · {prompt}") for path, prompt in self.samples[step] if Path(path).exists()]
        return items


@dataclass(frozen=True)
class Status:
    state: str  # new | queued | running | stopping | finished | stopped | failed | interrupted
    queue_position: int | None = None
    error: str = ""
    hint: str = ""
    exiting: bool = False  # the trainer reported how it ended and its process is still closing

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running", "stopping") or self.exiting


def run_status(monitor: RunMonitor, manager: jobs.JobManager) -> Status:
    """The run's state, from its job if this process started one, else from its events alone."""
    job = manager.get(monitor.run_dir)
    if job is not None and job.state == jobs.QUEUED:
        return Status("queued", queue_position=manager.position(monitor.run_dir))
    terminal = monitor.terminal
    if job is not None and job.state == jobs.RUNNING:
        # A terminal event older than this job is the previous attempt's (a resumed run, still loading); a newer
        # one is how this attempt ended, while its process finishes (uploads, closing files): show that end.
        if terminal is None or float(terminal.get("time", 0)) < job.submitted:
            return Status("stopping" if job.stop_requested else "running")
        return replace(_ended(terminal), exiting=True)
    if terminal is not None:
        return _ended(terminal)
    if job is not None and job.state == jobs.ENDED and job.returncode not in (0, None):
        tail = console_tail(monitor.run_dir)
        # The command line refused before training (a Hugging Face job the Hub would not start: no credit, no
        # Jobs permission, an unknown flavour): its one-line message says what to do.
        said = next((line for line in reversed(tail.splitlines()) if line.startswith(CLI_ERROR)), None)
        if said is not None:
            return Status("failed", error=said.removeprefix(CLI_ERROR), hint=tail if job.remote else "")
        # Died without a `failed` event (killed, out of memory, an import error): show its last words.
        return Status("failed", error=f"the trainer exited with status {job.returncode} before reporting why",
                      hint=tail)
    if monitor.started is not None:
        return Status("interrupted")
    return Status("new")


def _ended(terminal: dict[str, Any]) -> Status:
    if terminal["type"] == "failed":
        return Status("failed", error=str(terminal.get("error", "")), hint=str(terminal.get("hint", "")))
    return Status(terminal["type"])


def console_tail(run_dir: Path, lines: int = 25) -> str:
    path = Path(run_dir) / jobs.CONSOLE_LOG
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 16_384))
        text = f.read().decode("utf-8", errors="replace")
    # tqdm redraws with carriage returns: keep only what the last redraw of each line shows
    shown = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join([line for line in shown if line.strip()][-lines:])


