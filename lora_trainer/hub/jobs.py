"""Train on Hugging Face Jobs: a run's config and images go to a private Hub repo of the user's, a job
on a GPU flavour trains it with the same CLI, and this machine follows it (jobmonitor.py).

The public API (the CLI uses it; a UI can too):
- `list_flavors(token)`: the Hub's job hardware, with its price per minute as the Hub states it;
- `submit(run_dir, flavor, ...)`: upload the run (and this package's code) and start a job; the job id
  and where it runs are kept in <run>/hf_job.json (never the token);
- `jobmonitor.follow(run_dir, ...)`: parse the job's log stream into the run's events.jsonl and
  train.log, continue a job that died with a new one from the last pushed checkpoint (up to
  max_attempts), bring the LoRA files back when it ends; `--attach` reattaches by the stored job id;
- `request_stop(run_dir)`: ask the job to save and stop (a file the job polls for), `cancel(run_dir)`;
- `job_state(run_dir)`: what hf_job.json says, without the network.

The user's token reaches the job only as its HF_TOKEN secret: never in its command, its environment,
a log line or a file of the run folder.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

import lora_trainer

from .. import config as config_mod
from ..fsutil import atomic_write_text
from .checkpoints import DATASET_DIR
from .client import (
    HubError,
    check_repo_id,
    check_token,
    commit_files,
    hub_errors,
    resolve_token,
    retrying,
    status_of,
)
from .jobrunner import stop_file
from .modelcard import sample_files

STATE_FILE = "hf_job.json"  # in the run folder: the job(s) training it, and how to reach them
STOP_MARKER = "hf_job.stop"  # in the run folder: a stop was asked of the job whose attempt id it holds
# A public CUDA image (the one huggingface_hub's own Jobs docs use); the project's pinned
# requirements are installed on top of it when the job starts. A Space's image ("hf.co/spaces/you/app")
# already has them, so the job starts faster: pass it as `image`.
DEFAULT_IMAGE = "pytorch/pytorch:2.6.0-cuda12.4-cudnn9-devel"
DEFAULT_ATTEMPTS = 3
BILLING_PAGE = "https://huggingface.co/settings/billing"
PRICING_PAGE = "https://huggingface.co/pricing"
TOKENS_PAGE = "https://huggingface.co/settings/tokens"
PUBLIC_HUB = "https://huggingface.co"  # jobs there reach it without being told; others get HF_ENDPOINT
CODE_DIR = "code"  # in the repo: this package and requirements.txt, what the job runs
RUN_DIR_IN_JOB = "run"  # the run folder inside the job's working directory

# Runs inside the job before the trainer: install the client, fetch the code from the repo, install
# the pinned requirements, then exec the jobrunner command given as the script's arguments ("$@").
BOOTSTRAP = """set -eu
work="${TMPDIR:-/tmp}/lora-studio"; mkdir -p "$work"; cd "$work"
pip() { python -m pip install --quiet --disable-pip-version-check "$@"; }
pip "huggingface_hub==$LORA_STUDIO_HUB_VERSION"
python -c 'import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1], allow_patterns=[sys.argv[2] + "/**"], local_dir=".")' "$LORA_STUDIO_REPO" code
if [ -f code/requirements.txt ]; then pip -r code/requirements.txt; fi
export PYTHONPATH="$work/code${PYTHONPATH:+:$PYTHONPATH}"
exec "$@"
"""


@dataclass
class Flavor:
    """A job hardware flavour as the Hub lists it."""

    name: str
    pretty_name: str
    gpus: int
    gpu: str  # e.g. "L4", "" for CPU flavours
    unit_cost_usd: float  # per unit_label, as the Hub states it
    unit_label: str

    def describe(self) -> str:
        price = f"${self.unit_cost_usd:g}/{self.unit_label}" if self.unit_label else "price: see the pricing page"
        return f"{self.name} ({self.pretty_name}, {price})"


@dataclass
class JobAttempt:
    id: str
    url: str
    attempt: str  # the id the job's stop request names (jobrunner.stop_file)
    resumed_from_checkpoint: bool
    stage: str = "SCHEDULING"
    message: str | None = None
    lines_seen: int = 0  # log lines already written into the run folder (a reattach skips them)


@dataclass
class JobState:
    """<run>/hf_job.json: which Hub repo holds the run, which jobs trained it, how it ended."""

    repo: str
    namespace: str
    endpoint: str
    flavor: str
    gpus: int
    image: str
    timeout: str | None
    max_attempts: int
    jobs: list[JobAttempt] = field(default_factory=list)
    status: str = "running"  # running | finished | stopped | failed
    error: str | None = None

    @property
    def current(self) -> JobAttempt:
        return self.jobs[-1]

    def save(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / STATE_FILE, json.dumps(asdict(self), indent=1))


def job_state(run_dir: str | Path) -> JobState | None:
    """The run's hf_job.json, or None when it never ran on Jobs."""
    try:
        data = json.loads((Path(run_dir) / STATE_FILE).read_text(encoding="utf-8"))
        data["jobs"] = [JobAttempt(**job) for job in data.get("jobs", [])]
        return JobState(**data)
    except (OSError, ValueError, TypeError):
        return None


# -- flavours -------------------------------------------------------------------------------------
def list_flavors(token: str | None = None, endpoint: str | None = None) -> list[Flavor]:
    """The Hub's job hardware flavours (GET /api/jobs/hardware), cheapest first within CPU, then GPU."""
    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(token, "listing the Jobs hardware"):
        listing = retrying("listing the Jobs hardware", lambda: api.list_jobs_hardware(token=token))
    flavors = []
    for hw in listing:
        accel = hw.accelerator
        gpus = int(accel.quantity) if accel is not None and str(accel.quantity).isdigit() else 0
        flavors.append(Flavor(hw.name, hw.pretty_name, gpus, accel.model if accel else "", hw.unit_cost_usd, hw.unit_label))
    return sorted(flavors, key=lambda f: (f.gpus > 0, f.unit_cost_usd, f.name))


def _check_flavor(flavor: str, token: str, endpoint: str | None) -> Flavor:
    flavors = list_flavors(token, endpoint)
    for known in flavors:
        if known.name == flavor:
            return known
    gpu = [f.describe() for f in flavors if f.gpus]
    raise HubError(
        f"'{flavor}' is not a Jobs hardware flavour. GPU flavours the Hub offers now: {'; '.join(gpu) or 'none'}. "
        f"Prices: {PRICING_PAGE}."
    )


# -- submitting -----------------------------------------------------------------------------------
def default_repo(user: str, run_dir: Path) -> str:
    """user/lora-studio-<run folder name>, in the characters a repo name allows."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(run_dir).resolve().name).strip("-.") or "run"
    return f"{user}/lora-studio-{name}"[:96]


def _code_files() -> dict[str, Path]:
    """This package's source and the pinned requirements.txt beside it, as repo paths under code/."""
    package = Path(lora_trainer.__file__).resolve().parent
    files = {
        f"{CODE_DIR}/lora_trainer/{p.relative_to(package).as_posix()}": p
        for p in sorted(package.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    }
    requirements = package.parent / "requirements.txt"
    if requirements.is_file():
        files[f"{CODE_DIR}/requirements.txt"] = requirements
    return files


def _run_files(run_dir: Path, cfg: config_mod.TrainConfig, repo: str) -> dict[str, Path | bytes]:
    """config.toml (pushing its checkpoints to `repo`), the dataset and samples: what the job trains on."""
    if Path(cfg.data.images).is_absolute() or not (run_dir / DATASET_DIR).is_dir():
        raise HubError(
            f"This run trains on {cfg.data.images}, outside its run folder: a job cannot reach it. "
            "Take the images in with --images (they are copied into the run's dataset/ folder), then submit."
        )
    cfg.set("output.push_checkpoints_to", repo)
    files: dict[str, Path | bytes] = {config_mod.CONFIG_FILENAME: config_mod.dumps(cfg).encode("utf-8")}
    dataset = run_dir / DATASET_DIR
    for p in sorted(dataset.rglob("*")):
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(dataset).parts):
            files[f"{DATASET_DIR}/{p.relative_to(dataset).as_posix()}"] = p
    files.update({p.relative_to(run_dir).as_posix(): p for p in sample_files(run_dir)})
    return files


def job_command(repo: str, attempt: str, processes: int, resume: bool) -> list[str]:
    """The job's command: the bootstrap script, then the jobrunner with the trainer's own arguments."""
    train = ["train", RUN_DIR_IN_JOB] + (["--resume-from", f"hub:{repo}"] if resume else [])
    runner = ["python", "-m", "lora_trainer.hub.jobrunner", "--repo", repo, "--attempt", attempt,
              "--processes", str(processes), "--", *train]
    return ["bash", "-c", BOOTSTRAP, "lora-studio-job", *runner]


def _has_checkpoint(api: HfApi, repo: str) -> bool:
    files = retrying(f"listing {repo}", lambda: api.list_repo_files(repo))
    return any(re.fullmatch(r"checkpoints/step-\d+/trainer_state\.json", f) for f in files)


def submit(
    run_dir: str | Path,
    flavor: str,
    *,
    timeout: str | None = None,
    max_attempts: int = DEFAULT_ATTEMPTS,
    repo: str | None = None,
    image: str = DEFAULT_IMAGE,
    token: str | None = None,
    endpoint: str | None = None,
) -> JobState:
    """Upload the run to a private repo and start a job that trains it; return the state saved in hf_job.json.

    `flavor` is a Jobs hardware name (see `list_flavors`), `timeout` the job's time limit ("90m",
    "2h"; the Hub's default otherwise). A flavour with several GPUs trains data-parallel. Raises
    HubError for what the user must fix: no or a read-only token, a token without the Jobs
    permission, no payment method or credit (402), an unknown flavour. Nothing local changes on error.
    """
    run_dir = Path(run_dir)
    cfg = config_mod.load(run_dir)
    token = resolve_token(token)
    user = check_token(token, repo.split("/")[0] if repo else None, endpoint)
    repo = check_repo_id(repo or default_repo(user, run_dir))
    chosen = _check_flavor(flavor, token, endpoint)
    api = HfApi(endpoint=endpoint, token=token)
    state = JobState(repo=repo, namespace=user, endpoint=api.endpoint, flavor=chosen.name, gpus=max(chosen.gpus, 1),
                     image=image, timeout=timeout, max_attempts=max(1, max_attempts))
    with hub_errors(token, f"uploading the run to {repo}", repo):
        retrying(f"creating {repo}", lambda: api.create_repo(repo, private=True, exist_ok=True))
        files = {**_run_files(run_dir, cfg, repo), **_code_files()}
        commit_files(api, repo, files, [], "The run, and the code that trains it, for Hugging Face Jobs")
    start_attempt(run_dir, state, token)
    return state


def start_attempt(run_dir: Path, state: JobState, token: str | bool | None) -> JobAttempt:
    """Start one job for the run (the first, or one that continues from the newest pushed checkpoint)."""
    api = HfApi(endpoint=state.endpoint, token=token)
    attempt = secrets.token_hex(6)
    with hub_errors(token, f"starting a job on {state.flavor}", state.repo):
        resume = _has_checkpoint(api, state.repo)
        env = {"LORA_STUDIO_REPO": state.repo, "LORA_STUDIO_HUB_VERSION": huggingface_hub.__version__,
               "PYTHONUNBUFFERED": "1"}
        if state.endpoint.rstrip("/") != PUBLIC_HUB:
            env["HF_ENDPOINT"] = state.endpoint  # a private Hub deployment (or a test's fake Hub)
        try:
            # Not retried: a create that timed out may have started a job, and a second would cost twice.
            info = api.run_job(
                image=state.image, command=job_command(state.repo, attempt, state.gpus, resume), env=env,
                secrets={"HF_TOKEN": token}, flavor=state.flavor, timeout=state.timeout, namespace=state.namespace,
                labels={"app": "lora-studio"}, token=token,
            )
        except HfHubHTTPError as e:
            raise HubError(_refusal(e, state)) from None
    job = JobAttempt(id=info.id, url=info.url, attempt=attempt, resumed_from_checkpoint=resume, stage=str(info.status.stage))
    state.jobs.append(job)
    state.status, state.error = "running", None
    (run_dir / STOP_MARKER).unlink(missing_ok=True)
    state.save(run_dir)
    return job


def _refusal(e: HfHubHTTPError, state: JobState) -> str:
    """Why the Hub would not start the job, and what to do; nothing was started."""
    status, said = status_of(e), (e.server_message or str(e)).strip()
    if status == 402:
        return (f"Hugging Face Jobs needs a payment method or prepaid credit on '{state.namespace}' (402: {said}). "
                f"Add one at {BILLING_PAGE} (prices per flavour: {PRICING_PAGE}), then submit again. No job was started.")
    if status in (401, 403):
        return (f"This token may not run Jobs for '{state.namespace}' ({status}: {said}). Sign in again and allow "
                f"'jobs', or create a token with the Jobs permission (or a 'Write' token) at {TOKENS_PAGE}.")
    if status in (400, 422) and "flavor" in said.lower():
        return f"The Hub has no '{state.flavor}' hardware for Jobs now ({said}). Pick another flavour."
    return f"The Hub refused to start the job ({status}: {said}). Nothing was started; try again later."


# -- stopping -------------------------------------------------------------------------------------
def request_stop(run_dir: str | Path, *, token: str | None = None) -> JobState:
    """Ask the run's job to save a checkpoint, push it and stop (it looks every few seconds); the job ends COMPLETED.

    Works from any process: one following the job (`jobmonitor.follow`) sees the request too, and
    cancels the job if it has not stopped within its STOP_WAIT.
    """
    state = require_state(run_dir)
    token = resolve_token(token)
    api = HfApi(endpoint=state.endpoint, token=token)
    atomic_write_text(Path(run_dir) / STOP_MARKER, state.current.attempt)
    with hub_errors(token, "asking the job to stop", state.repo):
        commit_files(api, state.repo, {stop_file(state.current.attempt): b"stop\n"}, [], "Stop requested")
    return state


def cancel(run_dir: str | Path, *, token: str | None = None) -> None:
    """Cancel the run's job at once (what was not pushed yet is lost: prefer `request_stop`)."""
    state = require_state(run_dir)
    token = resolve_token(token)
    api = HfApi(endpoint=state.endpoint, token=token)
    atomic_write_text(Path(run_dir) / STOP_MARKER, state.current.attempt)  # a cancelled job is not continued
    with hub_errors(token, f"cancelling job {state.current.id}", state.repo):
        retrying("cancelling the job", lambda: api.cancel_job(job_id=state.current.id, namespace=state.namespace, token=token))


def stop_requested(run_dir: str | Path, state: JobState) -> bool:
    """Whether a stop (or cancel) was asked of the run's current job."""
    try:
        return (Path(run_dir) / STOP_MARKER).read_text().strip() == state.current.attempt
    except OSError:
        return False


def require_state(run_dir: str | Path) -> JobState:
    state = job_state(run_dir)
    if state is None or not state.jobs:
        raise HubError(f"{run_dir} has no Hugging Face job ({STATE_FILE} is missing): submit it first.")
    return state


def job_summary(state: JobState) -> dict[str, Any]:
    """Plain data for a page: the current job, its stage and page, the attempts made."""
    job = state.current
    return {"job_id": job.id, "url": job.url, "stage": job.stage, "flavor": state.flavor, "repo": state.repo,
            "attempts": len(state.jobs), "max_attempts": state.max_attempts, "status": state.status, "error": state.error}
