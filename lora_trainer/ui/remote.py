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

import gradio as gr

from ..errors import LoraStudioError
from . import jobs, system
from .common import user_errors

LOCAL, HF_JOBS = "local", "hf-jobs"
WHERE_CHOICES = [("This machine", LOCAL), ("Hugging Face Jobs (a GPU on your account, billed to it)", HF_JOBS)]
DEFAULT_TIMEOUT = "2h"
TIMEOUT_PATTERN = re.compile(r"^\d+(\.\d+)?[smhd]?$")  # what huggingface_hub's run_job accepts: 90m, 2h, 3600
THIS_MACHINE = "this machine"  # the owner of jobs started with this machine's own token (off a Space)
SIGN_IN = "Sign in with Hugging Face (Publish tab) to train on Hugging Face Jobs: the jobs run on your account."


class JobsSettingError(LoraStudioError):
    """A Jobs choice on the Train tab that cannot start a job (no hardware picked, a bad time limit, no sign-in)."""


def owner(username: str | None) -> str:
    """Whose account a job runs on: the signed-in user, else this machine's token (off a Space)."""
    return username or THIS_MACHINE


def flavor_choices(token: str | None) -> list[tuple[str, str]]:
    """(label with the Hub's price, name) of the GPU flavours the Hub offers for Jobs, cheapest first."""
    from ..hub import jobs as hub_jobs

    return [(f.describe(), f.name) for f in hub_jobs.list_flavors(token, system.hub_endpoint()) if f.gpus]


def controls() -> tuple[gr.Radio, gr.Dropdown, gr.Textbox]:
    """Where to train, the hardware and the time limit (a row shown only where Jobs is offered); where Jobs is
    turned on but the Space's sign-in may not ask for `jobs`, a line that says how to fix it instead."""
    gr.Markdown(system.JOBS_SCOPE_MISSING, visible=system.jobs_scope_missing(), elem_id="jobs-scope-missing",
                elem_classes=["notice"])
    with gr.Row(equal_height=True, visible=system.jobs_offered(), elem_id="jobs-controls"):
        where = gr.Radio(WHERE_CHOICES, value=LOCAL, label="Where to train", scale=2, elem_id="train-where",
                         info="Hugging Face Jobs trains on your account's GPU (billed per minute) while this page "
                              "follows it; on a Space, sign in first (Publish tab).")
        flavor = gr.Dropdown([], value=None, label="Hardware", scale=2, visible=False, elem_id="train-flavor",
                             info="The Hub's GPUs for Jobs, with its price per minute. Several GPUs train data-parallel.")
        timeout = gr.Textbox(DEFAULT_TIMEOUT, label="Time limit", scale=1, visible=False, elem_id="train-timeout",
                             info="90m, 2h, 1d: the job ends there (what it pushed is kept).")
    return where, flavor, timeout


@user_errors
def where_changed(where: str, oauth_token: gr.OAuthToken | None = None) -> tuple:
    """Hugging Face Jobs picked: list the Hub's GPU hardware (for this user's token) and show the time limit."""
    if where != HF_JOBS:
        return gr.update(visible=False), gr.update(visible=False)
    token = oauth_token.token if oauth_token else None
    if system.space_id() and token is None:
        raise JobsSettingError(SIGN_IN)
    choices = flavor_choices(token)
    return gr.update(choices=choices, value=choices[0][1] if choices else None, visible=True), gr.update(visible=True)


def start_args(where: str | None, flavor: str | None, timeout: str | None, token: str | None) -> list[str] | None:
    """The follower's arguments when the run goes to Hugging Face Jobs; None to train on this machine."""
    if where != HF_JOBS:
        return None
    if system.jobs_scope_missing():
        raise JobsSettingError(system.JOBS_SCOPE_MISSING.replace("**", ""))
    if not system.jobs_offered():
        raise JobsSettingError("This app does not offer Hugging Face Jobs (LORA_STUDIO_JOBS is not set).")
    if system.space_id() and token is None:
        raise JobsSettingError(SIGN_IN)
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
