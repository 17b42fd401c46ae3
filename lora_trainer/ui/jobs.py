"""Training jobs: the trainer runs as a subprocess, one at a time per machine, the rest wait in line.

A run on Hugging Face Jobs is a job here too (`remote`): its subprocess is the follower
(`train RUN --on hf-jobs ...`, hub/jobcli.py), which writes the remote trainer's events into the
run folder and turns SIGTERM into "save and stop" on the Hub. It takes no slot of this machine (the
GPU is the Hub's), so it starts at once; one user has one such job at a time.

`python -m lora_trainer train <run>` (an argument list, never a shell) with stdout and stderr
appended to `<run>/console.log`; the trainer writes its own train.log and events.jsonl. Stop
sends SIGTERM, which the trainer turns into "save a checkpoint and exit at the next step".

The registry is process-wide (`MANAGER`): every browser session sees the same queue, and a
reloaded page finds its job again by run folder. When the app exits, running trainers get
SIGTERM too, so they leave a checkpoint to resume from instead of dying mid-step.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LoraStudioError
from . import system

CONSOLE_LOG = "console.log"
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the lora_trainer package

QUEUED, RUNNING, ENDED, CANCELLED = "queued", "running", "ended", "cancelled"


def train_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "lora_trainer", "train", str(run_dir)]


def trainer_env(hub_token: str | None = None) -> dict[str, str]:
    """The trainer's environment: ours, unbuffered, able to import lora_trainer from a source checkout.

    On a shared Space the Space's own HF_TOKEN is withheld: a visitor's run must not push with
    the owner's token (output.push_checkpoints_to). `hub_token` (the visitor's own) is handed over
    in the environment only: never written to disk.
    """
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    if system.space_id():
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
            env.pop(name, None)
    if hub_token:
        env["HF_TOKEN"] = hub_token
    return env


@dataclass
class Job:
    run_dir: Path
    state: str = QUEUED
    submitted: float = field(default_factory=time.time)
    proc: subprocess.Popen | None = None
    returncode: int | None = None
    stop_requested: bool = False
    hub_token: str | None = field(default=None, repr=False)  # for checkpoint pushes; memory only
    args: list[str] = field(default_factory=list)  # after the train command (e.g. --on hf-jobs --flavor l4x1)
    remote: bool = False  # follows a Hugging Face job: takes no slot of this machine
    owner: str | None = None  # whose account a remote job runs on (one each)

    @property
    def active(self) -> bool:
        return self.state in (QUEUED, RUNNING)


class OneJobEach(LoraStudioError):
    """A user asked for a second Hugging Face job while one is still training."""


class JobManager:
    """A queue of training jobs with `slots` running at once (1: the GPU is the bottleneck)."""

    def __init__(self, slots: int = 1, command: Callable[[Path], list[str]] = train_command):
        self.slots = slots
        self.command = command
        self._lock = threading.RLock()
        self._jobs: dict[Path, Job] = {}  # the newest job of each run folder
        self._queue: list[Job] = []

    def submit(self, run_dir: Path, hub_token: str | None = None, *, args: list[str] | None = None,
               remote: bool = False, owner: str | None = None) -> Job:
        """Queue a training run of `run_dir` (starting it now if a slot is free); an active job is returned as is.

        A `remote` job (it follows a Hugging Face job) starts at once; raises OneJobEach when `owner` has
        another one active.
        """
        run_dir = Path(run_dir).resolve()
        with self._lock:
            job = self._jobs.get(run_dir)
            if job is not None and job.active:
                return job
            if remote:
                other = next((j for j in self._jobs.values() if j.active and j.remote and j.owner == owner), None)
                if other is not None:
                    raise OneJobEach(
                        f"You already train run {other.run_dir.name} on Hugging Face Jobs: one job per account at a "
                        "time. Stop it (open that run and press Stop) or wait for it to end, then start this one."
                    )
            job = Job(run_dir, hub_token=hub_token, args=list(args or []), remote=remote, owner=owner)
            self._jobs[run_dir] = job
            if remote:
                self._launch(job)
            else:
                self._queue.append(job)
                self._start_waiting()
            return job

    def stop(self, run_dir: Path) -> str:
        """Stop a run: a queued job leaves the line ("cancelled"), a running one gets SIGTERM ("stopping")."""
        with self._lock:
            job = self._jobs.get(Path(run_dir).resolve())
            if job is None or not job.active:
                return "idle"
            if job.state == QUEUED:
                self._queue.remove(job)
                job.state = CANCELLED
                return "cancelled"
            job.stop_requested = True
            if job.proc is not None and job.proc.poll() is None:
                job.proc.send_signal(signal.SIGTERM)
            return "stopping"

    def get(self, run_dir: Path) -> Job | None:
        with self._lock:
            return self._jobs.get(Path(run_dir).resolve())

    def position(self, run_dir: Path) -> int | None:
        """1-based place in the line of a queued run (1 = next to start)."""
        with self._lock:
            job = self._jobs.get(Path(run_dir).resolve())
            return self._queue.index(job) + 1 if job in self._queue else None

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._jobs.values() if j.state == RUNNING]

    def remote_job_of(self, owner: str | None) -> Job | None:
        """`owner`'s active Hugging Face job, if any."""
        with self._lock:
            return next((j for j in self._jobs.values() if j.active and j.remote and j.owner == owner), None)

    def wait(self, run_dir: Path, timeout: float | None = None) -> Job | None:
        """Block until the run's job has ended (for tests and shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(run_dir)
            if job is None or not job.active or (deadline is not None and time.monotonic() > deadline):
                return job
            time.sleep(0.1)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Empty the line and ask every running trainer to save and stop.

        A Hugging Face job is not stopped: it trains on without this app, and the page that next shows
        its run follows it again (`--attach`). Only its follower ends here.
        """
        with self._lock:
            for job in self._queue:
                job.state = CANCELLED
            self._queue.clear()
            running = [j for j in self.running() if not j.remote]
            for job in self.running():
                if job.remote:
                    self._detach(job)
            for job in running:
                self.stop(job.run_dir)
        deadline = time.monotonic() + timeout
        for job in running:
            if job.proc is not None:
                try:
                    job.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    job.proc.kill()

    def detach(self, run_dir: Path) -> bool:
        """End the follower of a run's Hugging Face job and forget it, as an app restart would; the job trains on."""
        with self._lock:
            job = self._jobs.get(Path(run_dir).resolve())
            if job is None or not job.remote or not job.active:
                return False
            self._detach(job)
            return True

    # -- internals (lock held) ---------------------------------------------------------------------
    def _detach(self, job: Job) -> None:
        """End a follower without touching its Hugging Face job. SIGKILL, since SIGTERM means "stop the job";
        an event line is appended in one write, so none is left half written."""
        if job.proc is not None and job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait()
        self._jobs.pop(job.run_dir, None)

    def _start_waiting(self) -> None:
        while self._queue and len([j for j in self.running() if not j.remote]) < self.slots:
            job = self._queue.pop(0)
            self._launch(job)

    def _launch(self, job: Job) -> None:
        job.run_dir.mkdir(parents=True, exist_ok=True)
        console = open(job.run_dir / CONSOLE_LOG, "ab")  # noqa: SIM115 - handed to the child, closed when it ends
        console.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting training ===\n".encode())
        console.flush()
        try:
            job.proc = subprocess.Popen(
                [*self.command(job.run_dir), *job.args], stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=PROJECT_ROOT, env=trainer_env(job.hub_token),
                start_new_session=True,  # Ctrl-C in the app's terminal must not kill the trainer mid-step
            )
        except OSError as e:
            console.write(f"could not start the trainer: {e}\n".encode())
            console.close()
            job.state, job.returncode = ENDED, -1
            return
        job.state = RUNNING
        threading.Thread(target=self._watch, args=(job, console), name=f"job-{job.run_dir.name}", daemon=True).start()

    def _watch(self, job: Job, console) -> None:
        returncode = job.proc.wait()
        console.close()
        with self._lock:
            job.returncode, job.state = returncode, ENDED
            self._start_waiting()


MANAGER = JobManager()
atexit.register(MANAGER.shutdown)
