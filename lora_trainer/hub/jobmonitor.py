"""Follow a run that trains on Hugging Face Jobs, from any machine that has its run folder.

`follow` reads the job's log stream (huggingface_hub's fetch_job_logs, which reconnects by itself):
lines with events.LOG_PREFIX are the trainer's events and go into the run's events.jsonl as they
are, every other line goes into train.log, so the page shows a job exactly as a local run. When
the job ends, the newest pushed checkpoint (and, for a finished run, the LoRA files as final/, and the
evaluation after training with its pick, evaluation.json and best/) and the samples come back into the
run folder, and only then are `evaluation` and `finished` / `stopped` written, so whatever reacts to
them finds the files. A job that died without the trainer saying why is continued
by a new job from the last pushed checkpoint, up to the run's max_attempts.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, hf_hub_download

from .. import config as config_mod
from ..checkpoints import write_model_card
from ..evaluate import EVALUATION_FILENAME
from ..events import EVENTS_FILENAME, LOG_PREFIX, EventWriter, last_event
from ..fsutil import replace_dir
from .checkpoints import fetch_evaluation, fetch_run
from .client import HubError, resolve_token, retrying, scrub
from .jobs import JobState, cancel, request_stop, require_state, start_attempt, stop_requested

STOP_WAIT = 300.0  # seconds a stop request gets (a step, a checkpoint, its push) before the job is cancelled
STOP_WAIT_ENV = "LORA_STUDIO_JOB_STOP_WAIT"
STATUS_POLL = 5.0  # seconds between looks at the job's stage while its log is quiet
TAIL_LINES = 25  # log lines an error message quotes
TERMINAL = ("COMPLETED", "CANCELED", "ERROR", "DELETED")
_END = object()
Say = Callable[[str], None]


class JobFailed(HubError):
    """The job ended without finishing the run (and will not be continued); the message says why and where."""


class _RunWriter:
    """Writes what the job's log says into the run folder; keeps the last lines for error messages."""

    def __init__(self, run_dir: Path, token: str | bool | None):
        self.run_dir, self.token = run_dir, token
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.last_event: dict[str, Any] | None = None
        self.held: dict[str, Any] | None = None  # finished / stopped: written once the files are here
        self.evaluation: dict[str, Any] | None = None  # the evaluation after training: likewise (evaluation.json, best/)

    def line(self, text: str, replay: bool = False) -> dict[str, Any] | None:
        """Write one log line into the run (an event, or a train.log line); `replay`: already written, only read it."""
        text = scrub(text.rstrip("\n"), self.token)
        at = text.find(LOG_PREFIX)
        if at >= 0:
            try:
                event = json.loads(text[at + len(LOG_PREFIX):])
            except ValueError:
                event = None
            if isinstance(event, dict) and "type" in event:
                self.last_event = event
                if event["type"] in ("finished", "stopped"):
                    self.held = event
                elif event["type"] == "evaluation" and event.get("file"):
                    self.evaluation = event
                elif not replay:
                    self.write_event(event)
                return event
        self.tail.append(text)
        if replay:
            return None
        with open(self.run_dir / "train.log", "a", encoding="utf-8") as log:
            log.write(text + "\n")
        return None

    def write_held(self) -> None:
        """The evaluation (when its files came back) and the finished / stopped event, unless an earlier follower
        wrote them already."""
        assert self.held is not None
        held = [self.held]
        if self.evaluation is not None and (self.run_dir / EVALUATION_FILENAME).is_file():
            held.insert(0, self.evaluation)
        for event in held:
            if last_event(self.run_dir / EVENTS_FILENAME, event["type"]) != event:
                self.write_event(event)

    def write_event(self, event: dict[str, Any]) -> None:
        with open(self.run_dir / EVENTS_FILENAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(event) + "\n")

    def note(self, text: str) -> None:
        """A line of our own in train.log (continuations, stop requests)."""
        with open(self.run_dir / "train.log", "a", encoding="utf-8") as log:
            log.write(f"[jobs] {text}\n")


def stop_wait() -> float:
    try:
        return float(os.environ.get(STOP_WAIT_ENV, STOP_WAIT))
    except ValueError:
        return STOP_WAIT


def follow(
    run_dir: str | Path, *, token: str | None = None, stop: threading.Event | None = None, say: Say | None = None
) -> JobState:
    """Follow the run's job (and the jobs that continue it) until the run finishes, stops or fails.

    Setting `stop` asks the job to save and stop (then cancels it if it has not within STOP_WAIT).
    Returns the final state (status "finished" or "stopped"); raises JobFailed with the job's last
    log lines and its page when the run failed, and HubError when the Hub cannot be reached.
    """
    run_dir, say = Path(run_dir), say or (lambda message: None)
    state = require_state(run_dir)
    token = resolve_token(token)
    api = HfApi(endpoint=state.endpoint, token=token)
    writer = _RunWriter(run_dir, token)
    if state.status in ("finished", "stopped", "failed") and state.current.stage in TERMINAL:
        if state.status == "failed":
            raise JobFailed(state.error or f"The run failed on job {state.current.id}: {state.current.url}")
        return state  # nothing left to follow
    while True:
        job = state.current
        say(f"following job {job.id} on {state.flavor}: {job.url}")
        stage, message = _follow_one(api, state, run_dir, writer, stop, token, say)
        outcome = _after(api, state, run_dir, writer, stage, message, token, say)
        if outcome is not None:
            return outcome


def _follow_one(api: HfApi, state: JobState, run_dir: Path, writer: _RunWriter,
                stop: threading.Event | None, token: Any, say: Say) -> tuple[str, str | None]:
    """Stream one job's log into the run folder until the job reaches a terminal stage."""
    job = state.current
    lines: queue.Queue = queue.Queue()

    def stream() -> None:
        try:
            for line in api.fetch_job_logs(job_id=job.id, namespace=state.namespace, follow=True, token=token):
                lines.put(line)
        except Exception as e:  # noqa: BLE001 - reported below; the stage decides what happens next
            lines.put(e)
        lines.put(_END)

    seen, streaming, stop_sent = 0, True, None
    threading.Thread(target=stream, name=f"job-log-{job.id}", daemon=True).start()
    next_look = time.monotonic() + STATUS_POLL
    while True:
        try:
            item = lines.get(timeout=0.5)
        except queue.Empty:
            item = None
        if isinstance(item, str):
            seen += 1
            event = writer.line(item, replay=seen <= job.lines_seen)  # a reattach replays the log from its start
            if seen > job.lines_seen:
                job.lines_seen = seen
                if event is not None:
                    state.save(run_dir)
                    if event["type"] == "checkpoint":
                        _sync_samples(api, state, run_dir, token)
        elif item is _END:
            streaming = False
        elif isinstance(item, Exception):
            writer.note(f"the log stream broke ({type(item).__name__}); following the job's stage")
        if stop_sent is None and stop is not None and stop.is_set() and not stop_requested(run_dir, state):
            say("asking the job to save a checkpoint and stop")
            writer.note("stop requested")
            request_stop(run_dir, token=token)
        if stop_sent is None and stop_requested(run_dir, state):  # by us, or by another process
            stop_sent = time.monotonic()
        if stop_sent is not None and time.monotonic() - stop_sent > stop_wait() and job.stage not in TERMINAL:
            say(f"the job did not stop within {stop_wait():g} s: cancelling it")
            cancel(run_dir, token=token)
            stop_sent = float("inf")  # cancelled once
        if not streaming or time.monotonic() >= next_look:
            info = retrying("reading the job's stage", lambda: api.inspect_job(job_id=job.id, namespace=state.namespace))
            job.stage, job.message = str(getattr(info.status.stage, "value", info.status.stage)), info.status.message
            state.save(run_dir)
            next_look = time.monotonic() + STATUS_POLL
            if job.stage in TERMINAL and (not streaming or lines.empty()):
                if streaming:  # the stream still open: let its last lines arrive
                    time.sleep(1.0)
                    if not lines.empty():
                        continue
                return job.stage, job.message
            if not streaming:  # the stream gave up while the job runs: follow it again (the replay is skipped)
                seen, streaming = 0, True
                threading.Thread(target=stream, name=f"job-log-{job.id}", daemon=True).start()


def _after(api: HfApi, state: JobState, run_dir: Path, writer: _RunWriter, stage: str, message: str | None,
           token: Any, say: Say) -> JobState | None:
    """What a job's end means for the run: done (a state), or continued by a new job (None)."""
    job, verdict = state.current, (writer.last_event or {}).get("type")
    if writer.held is not None:  # the trainer finished or stopped on request, and said so
        finished = writer.held["type"] == "finished"
        checkpoint = sync_results(api, state, run_dir, token, finished=finished, step=writer.held.get("step"),
                                  evaluated=writer.evaluation is not None)
        if _step_of(checkpoint) == writer.held.get("step"):
            writer.write_held()
            state.status = "finished" if finished else "stopped"
            state.save(run_dir)
            say(f"{state.status}: the files are in {run_dir} and in {state.endpoint}/{state.repo}")
            return state
        # Its last checkpoint never reached the repo (and the job's disk is gone): as good as died there.
        writer.note(f"job {job.id} {writer.held['type']} at step {writer.held.get('step')} but the repo's newest "
                    f"checkpoint is {checkpoint.name if checkpoint else 'none'}")
        writer.held, writer.evaluation, verdict = None, None, None
    where = f"Its page: {job.url}. The checkpoints pushed so far are in {state.endpoint}/{state.repo}."
    if verdict == "failed":  # the trainer's own verdict (already in events.jsonl): another job would fail the same way
        error = writer.last_event or {}
        return _fail(state, run_dir, writer, f"The run failed on job {job.id}: {error.get('error')}. {where}",
                     error.get("hint") or "fix the setting named above, then submit again", emit=False)
    if stop_requested(run_dir, state):  # cancelled after a stop request it did not honour in time
        checkpoint = sync_results(api, state, run_dir, token, finished=False)
        stopped = {"type": "stopped", "time": round(time.time(), 3), "step": _step_of(checkpoint),
                   "checkpoint": str(checkpoint.relative_to(run_dir)) if checkpoint else None}
        writer.write_event(stopped)
        state.status = "stopped"
        state.save(run_dir)
        return state
    if re.search(r"time.?out|timed out|time limit", message or "", re.IGNORECASE):
        return _fail(state, run_dir, writer, f"Job {job.id} reached its time limit ({state.timeout or 'the default'}): "
                     f"{message}. {where}", "run the same command again with a longer --timeout: it continues "
                     "from the last pushed checkpoint")
    if len(state.jobs) < state.max_attempts:
        note = (f"job {job.id} ended {stage} ({message or 'no message'}) without finishing: continuing with a new "
                f"job from the last pushed checkpoint (attempt {len(state.jobs) + 1} of {state.max_attempts})")
        say(note)
        writer.note(note)
        start_attempt(run_dir, state, token)
        return None
    return _fail(state, run_dir, writer, f"Job {job.id} ended {stage} ({message or 'no message'}) without finishing, "
                 f"{len(state.jobs)} time(s) in all. {where}", "run the same command again to continue from the last "
                 "pushed checkpoint; if it keeps dying, try another flavour")


def _fail(state: JobState, run_dir: Path, writer: _RunWriter, error: str, hint: str, emit: bool = True) -> JobState:
    tail = "\n".join(writer.tail)
    state.status, state.error = "failed", error
    state.save(run_dir)
    if emit:
        events = EventWriter(run_dir / EVENTS_FILENAME)
        events.emit("failed", error=error, hint=hint)
        events.close()
    raise JobFailed(f"{error}\nhint: {hint}" + (f"\nThe job's last log lines:\n{tail}" if tail else ""))


def _step_of(checkpoint: Path | None) -> int | None:
    return int(checkpoint.name.split("-")[1]) if checkpoint is not None else None


# -- files back from the repo ---------------------------------------------------------------------
def sync_results(api: HfApi, state: JobState, run_dir: Path, token: Any, *, finished: bool, step: int | None = None,
                 evaluated: bool = False) -> Path | None:
    """Bring the newest pushed checkpoint and the samples into the run; a finished run's LoRA files as final/
    (only from the checkpoint of the finished step) and, when the job `evaluated` the run after training, its
    evaluation.json and recommended checkpoint best/ (what the job's runner pushed), as after a local run."""
    checkpoint = fetch_run(state.repo, run_dir, token=token, endpoint=state.endpoint)
    _sync_samples(api, state, run_dir, token)
    if finished and checkpoint is not None and (step is None or _step_of(checkpoint) == step):
        tmp = run_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in checkpoint.iterdir():  # the checkpoint holds both LoRA files and lora_info.json, as final/ does
            if f.is_file() and f.name != "trainer_state.json":
                shutil.copy2(f, tmp / f.name)
        replace_dir(tmp, run_dir / "final")
        if evaluated and not fetch_evaluation(state.repo, run_dir, token=token, endpoint=state.endpoint):
            (run_dir / "train.log").open("a").write(
                f"[jobs] the job evaluated the run but {state.repo} holds no evaluation.json: "
                f"run `python -m lora_trainer evaluate {run_dir}` to score its checkpoints here\n")
        write_model_card(run_dir, config_mod.load(run_dir).output.name)  # after the evaluation: its table is in the card
    return checkpoint


def _sync_samples(api: HfApi, state: JobState, run_dir: Path, token: Any) -> None:
    """Sample images pushed so far that the run folder lacks (best effort: a later sync catches up)."""
    try:
        listing = retrying(f"listing {state.repo}", lambda: api.list_repo_files(state.repo))
        missing = [p for p in listing if p.startswith("samples/") and not (run_dir / p).exists()]
        if not missing:
            return
        with tempfile.TemporaryDirectory(prefix=".samples-", dir=run_dir) as staging:
            for path in missing:
                hf_hub_download(state.repo, path, local_dir=staging, token=token, endpoint=state.endpoint)
                (run_dir / path).parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(staging) / path, run_dir / path)
    except Exception as e:  # noqa: BLE001 - samples are a view; the run goes on without them
        (run_dir / "train.log").open("a").write(f"[jobs] could not fetch samples: {scrub(str(e), token)}\n")
