"""Training on Hugging Face Jobs from the Train tab: where to train, the hardware, following the job.

A Jobs run is a job of ui/jobs.py like a local one, whose subprocess is the follower
`python -m lora_trainer train RUN --on hf-jobs --flavor F` (hub/jobcli.py): it uploads the run to a
private repo of the user's, starts the job and writes the job's events (from its log stream) into the
run folder, so the page's loss plot, samples, ETA and memory work as for a local run. Stop is the same
SIGTERM, which the follower turns into "save, push and stop" on the Hub. The user's token reaches the
follower in its environment only (jobs.trainer_env) and the job as a secret: never a file or the page.

The job outlives the page and this app: hf_job.json in the run folder names it, and a page that shows
a run whose job still trains with no follower here (after a restart) starts one with `--attach`.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import LoraStudioError
from . import jobs, system

LOCAL, HF_JOBS = "local", "hf-jobs"
WHERE_CHOICES = [("This machine", LOCAL), ("Hugging Face Jobs (a GPU on your account, billed to it)", HF_JOBS)]
DEFAULT_TIMEOUT = "2h"
TIMEOUT_PATTERN = re.compile(r"^\d+(\.\d+)?[smhd]?$")  # what huggingface_hub's run_job accepts: 90m, 2h, 3600
THIS_MACHINE = "this machine"  # the owner of jobs started with this machine's own token (off a Space)


class JobsSettingError(LoraStudioError):
    """A Jobs choice on the Train tab that cannot start a job (no hardware picked, a bad time limit, no sign-in)."""


def owner(username: str | None) -> str:
    """Whose account a job runs on: the signed-in user, else this machine's token (off a Space)."""
    return username or THIS_MACHINE


def flavor_choices(token: str | None) -> list[tuple[str, str]]:
    """(label with the Hub's price, name) of the GPU flavours the Hub offers for Jobs, cheapest first."""
    from ..hub import jobs as hub_jobs

    return [(f.describe(), f.name) for f in hub_jobs.list_flavors(token, system.hub_endpoint()) if f.gpus]


def start_args(flavor: str | None, timeout: str | None) -> list[str]:
    """The follower's arguments for a new job."""
    if not flavor:
        raise JobsSettingError("Pick the hardware to train on (Hugging Face Jobs lists its GPUs with their prices).")
    timeout = (timeout or "").strip()
    if timeout and not TIMEOUT_PATTERN.match(timeout):
        raise JobsSettingError(f"Time limit {timeout!r}: write it as 90m, 2h or 1d (or leave it empty for the Hub's).")
    return ["--on", HF_JOBS, "--flavor", flavor] + (["--timeout", timeout] if timeout else [])


def state_of(run: Path):
    """The run's hf_job.json (None when it never trained on Jobs)."""
    from ..hub import jobs as hub_jobs

    return hub_jobs.job_state(run)


def resume_args(run: Path) -> list[str] | None:
    """For Resume: a run that trained on Jobs goes on there, on the same hardware (a new job from its last
    pushed checkpoint); None for a local run."""
    state = state_of(run)
    if state is None:
        return None
    return ["--on", HF_JOBS, "--flavor", state.flavor] + (["--timeout", state.timeout] if state.timeout else [])


def detached(run: Path, manager: jobs.JobManager) -> bool:
    """The run's Hugging Face job still trains, and nothing here follows it (the app restarted)."""
    job = manager.get(run)
    if job is not None and job.active:
        return False
    state = state_of(run)
    return state is not None and bool(state.jobs) and state.status == "running"


def reattach(run: Path, manager: jobs.JobManager, token: str | None, username: str | None) -> bool:
    """Follow a detached job again; False when it cannot be followed from here (no token on a Space)."""
    if not detached(run, manager) or (system.space_id() and token is None):
        return False
    try:
        manager.submit(run, hub_token=token, args=["--on", HF_JOBS, "--attach"], remote=True, owner=owner(username))
    except jobs.OneJobEach:
        return False
    return True


def status_line(run: Path) -> str:
    """Where the run trains, for the status box: the flavour, the job's stage and page, the attempt."""
    state = state_of(run)
    if state is None or not state.jobs:
        return ""
    job = state.current
    attempts = f" · attempt {len(state.jobs)} of {state.max_attempts}" if len(state.jobs) > 1 else ""
    return (f"**On Hugging Face Jobs**: `{state.flavor}` · job [{job.id}]({job.url}) · {job.stage.lower()}{attempts}"
            f" · checkpoints in `{state.repo}`")
