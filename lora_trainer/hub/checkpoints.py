"""Checkpoints off the box: push a run's checkpoints to a Hub repo while it trains (`Uploader`, in a
background thread), fetch the newest one on a fresh machine (with the run's config and images) to resume from.

Uses client.py's token checks, retries and error messages; publishing a finished run is publish.py.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, hf_hub_download

from .. import config as config_mod
from ..checkpoints import TRAINER_STATE, prune
from ..errors import LoraStudioError
from ..evaluate import BEST_DIR, EVALUATION_FILENAME
from ..fsutil import atomic_write_text, replace_dir
from .client import (
    HubError,
    PushResult,
    check_repo_id,
    check_token,
    commit_files,
    hub_errors,
    parse_spec,
    resolve_token,
    retrying,
    scrub,
)
from .modelcard import sample_files

log = logging.getLogger("lora_trainer.checkpoints")

DATASET_DIR = "dataset"  # a run's own copy of its images and captions (intake writes it)
PENDING_FILE = "upload_pending.json"  # in the run folder: checkpoints not on the Hub yet, and why
UPLOAD_WAIT = 30.0  # seconds a stop or the end of training waits for uploads still running
UPLOAD_WAIT_ENV = "LORA_STUDIO_UPLOAD_WAIT"  # overrides UPLOAD_WAIT, e.g. for tests
_STEP_DIR = re.compile(r"^checkpoints/step-(\d+)/(.+)$")


def push_checkpoint(
    run_dir: str | Path,
    checkpoint_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Upload a checkpoint folder (adapters, trainer_state.json, state/) to checkpoints/step-NNNNNN/.

    Also uploads the run's config.toml, its samples so far and its dataset/ folder (images and captions, when the run
    trains on its own copy), so `fetch_checkpoint` can resume on a fresh machine; files already on
    the Hub are not uploaded again. The repo is created private if it does not exist. Raises
    HubError; see `push_checkpoint_safely`.
    """
    run_dir, checkpoint = Path(run_dir), Path(checkpoint_dir)
    if not checkpoint.is_absolute() and not checkpoint.is_dir():  # a path inside the run (checkpoints/step-N)
        checkpoint = run_dir / checkpoint
    match = re.fullmatch(r"step-(\d+)", checkpoint.name)
    if not checkpoint.is_dir() or not match:
        raise HubError(f"{checkpoint} is not a checkpoint folder (expected checkpoints/step-NNNNNN/ in the run).")
    repo_id = check_repo_id(repo_id)
    check_token(token, repo_id.split("/")[0], endpoint)
    token = resolve_token(token)

    prefix = f"checkpoints/step-{int(match.group(1)):06d}"
    relative = (p.relative_to(checkpoint) for p in sorted(checkpoint.rglob("*")) if p.is_file())
    files: dict[str, Path | bytes] = {
        f"{prefix}/{rel.as_posix()}": checkpoint / rel
        for rel in relative
        if not any(part.startswith(".") for part in rel.parts)  # half-written temp files
    }
    if (run_dir / config_mod.CONFIG_FILENAME).is_file():
        files[config_mod.CONFIG_FILENAME] = run_dir / config_mod.CONFIG_FILENAME
    files.update(_dataset_files(run_dir))
    # The samples so far, so a machine that follows the run from elsewhere (hub/jobs.py) can show them.
    files.update({p.relative_to(run_dir).as_posix(): p for p in sample_files(run_dir)})
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(token, f"pushing a checkpoint to {repo_id}", repo_id):
        retrying(f"creating {repo_id}", lambda: api.create_repo(repo_id, private=True, exist_ok=True))
        info = commit_files(api, repo_id, files, [], f"Checkpoint {prefix.split('/')[1]}")
    return PushResult(url=f"{api.endpoint}/{repo_id}", files=sorted(files), commit_url=getattr(info, "commit_url", None))


def _dataset_files(run_dir: Path) -> dict[str, Path]:
    """The run's own dataset/ (what intake wrote), as repo paths; nothing when it trains on an outside folder."""
    dataset = run_dir / DATASET_DIR
    try:
        if Path(config_mod.load(run_dir).data.images).is_absolute():
            return {}
    except LoraStudioError:
        return {}
    return {
        f"{DATASET_DIR}/{p.relative_to(dataset).as_posix()}": p
        for p in sorted(dataset.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(dataset).parts)
    }


def push_checkpoint_safely(
    run_dir: str | Path,
    checkpoint_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    endpoint: str | None = None,
) -> str | None:
    """`push_checkpoint` for the trainer's background thread: never raises, returns an error message or None."""
    try:
        push_checkpoint(run_dir, checkpoint_dir, repo_id, token=token, endpoint=endpoint)
    except Exception as e:  # a failed upload must never take training down
        message = str(e) if isinstance(e, HubError) else f"pushing the checkpoint failed: {type(e).__name__}: {e}"
        return scrub(message, resolve_token(token))
    return None


def fetch_checkpoint(spec: str, run_dir: str | Path, *, token: str | None = None, endpoint: str | None = None) -> Path:
    """Download the newest checkpoints/step-*/ of `spec` ("hub:user/name" or "user/name") into the run.

    The checkpoint lands in <run_dir>/checkpoints/step-NNNNNN/ complete or not at all (it is
    downloaded into a hidden folder and renamed). config.toml and the dataset/ folder are fetched too
    when the run has none. Returns the local checkpoint folder; HubError if the repo holds none.
    """
    checkpoint = fetch_run(spec, run_dir, token=token, endpoint=endpoint, require_checkpoint=True)
    assert checkpoint is not None
    return checkpoint


def fetch_run(
    spec: str, run_dir: str | Path, *, token: str | None = None, endpoint: str | None = None, require_checkpoint: bool = False
) -> Path | None:
    """`fetch_checkpoint`, for a repo that may hold a run (config.toml, dataset/) and no checkpoint yet.

    Returns the local checkpoint folder, or None when the repo has no checkpoint (the run then starts
    at step 0). HubError if the repo holds neither a checkpoint nor a config.toml (or no checkpoint,
    with `require_checkpoint`), before anything is downloaded.
    """
    repo_id, run_dir = parse_spec(spec), Path(run_dir)
    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(token, f"fetching a checkpoint from {repo_id}", repo_id):
        listing = retrying(f"listing {repo_id}", lambda: api.list_repo_files(repo_id))
        steps: dict[int, list[str]] = {}
        for path in listing:
            if m := _STEP_DIR.match(path):
                steps.setdefault(int(m.group(1)), []).append(path)
        complete = [s for s, paths in steps.items() if any(p.endswith("/trainer_state.json") for p in paths)]
        if not complete and require_checkpoint:
            raise HubError(f"'{repo_id}' holds no checkpoint (no checkpoints/step-*/trainer_state.json) to resume from.")
        if not complete and config_mod.CONFIG_FILENAME not in listing:
            raise HubError(f"'{repo_id}' holds no run: no checkpoints/step-*/trainer_state.json and no config.toml.")
        target = run_dir / "checkpoints" / f"step-{max(complete):06d}" if complete else None
        need_config = not (run_dir / config_mod.CONFIG_FILENAME).exists() and config_mod.CONFIG_FILENAME in listing
        dataset = [p for p in listing if p.startswith(f"{DATASET_DIR}/")] if not (run_dir / DATASET_DIR).exists() else []
        # A checkpoint folder that is already here is complete (every write is atomic): keep it.
        fetch_target = target is not None and not target.is_dir()
        wanted = (steps[max(complete)] if fetch_target else []) + ([config_mod.CONFIG_FILENAME] if need_config else []) + dataset
        if not wanted:
            return target

        run_dir.mkdir(parents=True, exist_ok=True)
        for leftover in [*run_dir.glob(".fetch-*"), *run_dir.glob("checkpoints/.fetch-*")]:  # from a killed fetch
            shutil.rmtree(leftover, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=run_dir))
        try:
            for path in wanted:  # hf_hub_download retries timeouts and dropped connections itself
                hf_hub_download(repo_id, path, local_dir=staging, token=token, endpoint=api.endpoint)
            if need_config:
                os.replace(staging / config_mod.CONFIG_FILENAME, run_dir / config_mod.CONFIG_FILENAME)
            if dataset:
                os.replace(staging / DATASET_DIR, run_dir / DATASET_DIR)
            if fetch_target:
                target.parent.mkdir(exist_ok=True)
                os.replace(staging / "checkpoints" / target.name, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


# -- the evaluation after training: evaluation.json and the recommended checkpoint, best/ ---------------
def evaluation_files(run_dir: str | Path) -> dict[str, Path]:
    """The run's evaluation.json and best/ (its LoRA files and the pick's scores), as repo paths: the run's own
    layout. Nothing when the run has no evaluation.json."""
    run_dir = Path(run_dir)
    if not (run_dir / EVALUATION_FILENAME).is_file():
        return {}
    files = {EVALUATION_FILENAME: run_dir / EVALUATION_FILENAME}
    best = run_dir / BEST_DIR
    if best.is_dir():
        files.update({f"{BEST_DIR}/{p.name}": p for p in sorted(best.iterdir()) if p.is_file() and not p.name.startswith(".")})
    return files


def push_evaluation(run_dir: str | Path, repo_id: str, *, token: str | None = None, endpoint: str | None = None) -> list[str]:
    """Upload the run's evaluation.json and best/ to the repo, in one commit that also deletes a best/ file the new
    evaluation no longer has (no pick: no best/). Returns the repo paths uploaded ([] without an evaluation)."""
    files = evaluation_files(run_dir)
    if not files:
        return []
    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(token, f"pushing the evaluation to {repo_id}", repo_id):
        listing = retrying(f"listing {repo_id}", lambda: api.list_repo_files(repo_id))
        stale = [p for p in listing if p.startswith(f"{BEST_DIR}/") and p not in files]
        commit_files(api, repo_id, files, stale, "The evaluation after training and its recommended checkpoint (best/)")
    return sorted(files)


def fetch_evaluation(spec: str, run_dir: str | Path, *, token: str | None = None, endpoint: str | None = None) -> bool:
    """Bring the repo's evaluation.json and best/ into the run, as `evaluate` leaves them: best/ complete or not at
    all, and no best/ where the repo's evaluation has none. False (and nothing changed) when the repo has no
    evaluation.json."""
    repo_id, run_dir = parse_spec(spec), Path(run_dir)
    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(token, f"fetching the evaluation from {repo_id}", repo_id):
        listing = retrying(f"listing {repo_id}", lambda: api.list_repo_files(repo_id))
        if EVALUATION_FILENAME not in listing:
            return False
        wanted = [EVALUATION_FILENAME] + [p for p in listing if p.startswith(f"{BEST_DIR}/")]
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=run_dir))
        try:
            for path in wanted:
                hf_hub_download(repo_id, path, local_dir=staging, token=token, endpoint=api.endpoint)
            if (staging / BEST_DIR).is_dir():
                replace_dir(staging / BEST_DIR, run_dir / BEST_DIR)
            else:
                shutil.rmtree(run_dir / BEST_DIR, ignore_errors=True)
            os.replace(staging / EVALUATION_FILENAME, run_dir / EVALUATION_FILENAME)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return True


# -- the uploader: pushes while training, never holds up a stop or the end for long ----------------
def upload_wait() -> float:
    """UPLOAD_WAIT, or the LORA_STUDIO_UPLOAD_WAIT environment variable (seconds) when it is a number >= 0."""
    try:
        value = float(os.environ.get(UPLOAD_WAIT_ENV, ""))
    except ValueError:
        return UPLOAD_WAIT
    return value if value >= 0 else UPLOAD_WAIT


def pending_uploads(run_dir: str | Path) -> dict[str, Any] | None:
    """What the run's last uploader could not push: {"repo", "checkpoints": [run-relative paths], "message"}."""
    try:
        record = json.loads((Path(run_dir) / PENDING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("checkpoints"), list):
        return None
    return record


def retry_pending_uploads(run_dir: str | Path, *, token: str | None = None, endpoint: str | None = None) -> list[str]:
    """Push the checkpoints a run recorded as not uploaded (to the repo it recorded); return those still not pushed.

    Never raises: what fails stays recorded, with the reason, for the next try.
    """
    run_dir = Path(run_dir)
    record = pending_uploads(run_dir)
    if not record:
        return []
    left, reason = [], ""
    for rel in record["checkpoints"]:
        if not (run_dir / rel / TRAINER_STATE).is_file():
            continue  # pruned or deleted since: nothing to push
        error = push_checkpoint_safely(run_dir, run_dir / rel, record["repo"], token=token, endpoint=endpoint)
        if error:
            left.append(rel)
            reason = error
    _write_pending(run_dir, record["repo"], left, reason)
    return left


def _write_pending(run_dir: Path, repo: str, checkpoints: list[str], message: str) -> None:
    path = run_dir / PENDING_FILE
    if checkpoints:
        atomic_write_text(path, json.dumps({"repo": repo, "checkpoints": checkpoints, "message": message}, indent=1))
    else:
        path.unlink(missing_ok=True)


class Uploader:
    """Pushes checkpoints to a Hub repo one at a time, in a background thread, without blocking training.

    Every checkpoint not yet on the Hub (queued, uploading, or failed) is recorded in the run's
    upload_pending.json as it changes, so even a killed trainer leaves the record; a new Uploader on
    the same run (a resume) pushes those first. `close` waits at most `wait` seconds (UPLOAD_WAIT,
    30 s by default) and reports what is still not uploaded through `on_pending` (the trainer emits
    it as an `upload_pending` event). A failed push is logged, never raised. Pruning (keep the newest
    `keep`) happens after each push and spares checkpoints still queued.
    """

    def __init__(
        self,
        run_dir: Path,
        repo: str,
        keep: int = 0,
        *,
        wait: float | None = None,
        on_pending: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.run_dir, self.repo, self.keep = Path(run_dir), repo, keep
        self.wait = upload_wait() if wait is None else wait
        self.on_pending = on_pending
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._lock = threading.Lock()
        self._queued: set[Path] = set()  # queued or uploading: spared by pruning
        self._failed: dict[Path, str] = {}  # checkpoint -> why its push failed
        self._thread: threading.Thread | None = None
        for rel in (pending_uploads(self.run_dir) or {}).get("checkpoints", []):
            if (self.run_dir / rel / TRAINER_STATE).is_file():
                log.info("pushing %s again: it was not uploaded before", rel)
                self.submit(self.run_dir / rel)

    def submit(self, checkpoint: Path) -> None:
        with self._lock:
            self._queued.add(checkpoint)
            self._failed.pop(checkpoint, None)
            self._save()
        self._queue.put(checkpoint)
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="checkpoint-uploader", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while (checkpoint := self._queue.get()) is not None:
            error = push_checkpoint_safely(self.run_dir, checkpoint, self.repo, token=os.environ.get("HF_TOKEN"))
            if error:
                log.warning("checkpoint push to %s failed: %s", self.repo, error)
            else:
                log.info("pushed %s to %s", checkpoint.name, self.repo)
            with self._lock:
                self._queued.discard(checkpoint)
                if error:
                    self._failed[checkpoint] = error
                self._save()
                protect = set(self._queued)
            if self.keep:
                prune(self.run_dir, self.keep, protect=protect)

    def not_uploaded(self) -> list[str]:
        """Run-relative paths of the checkpoints not on the Hub yet (queued, uploading or failed), oldest first."""
        with self._lock:
            paths = [p for p in self._queued | set(self._failed) if (p / TRAINER_STATE).is_file()]
        return sorted(p.relative_to(self.run_dir).as_posix() for p in paths)

    def _save(self) -> None:  # with self._lock held
        paths = sorted(p for p in self._queued | set(self._failed) if (p / TRAINER_STATE).is_file())
        reason = next(reversed(self._failed.values()), "") if self._failed else ""
        try:
            _write_pending(self.run_dir, self.repo, [p.relative_to(self.run_dir).as_posix() for p in paths], reason)
        except OSError as e:  # a full disk must not take training down; the uploads go on regardless
            log.warning("could not record pending uploads: %s", e)

    def close(self) -> list[str]:
        """Wait up to `wait` seconds for queued pushes; report and return what is still not uploaded."""
        if self._thread is not None:
            with self._lock:
                busy = len(self._queued)
            if busy:
                log.info("waiting up to %g s for %d checkpoint upload(s) to finish", self.wait, busy)
            self._queue.put(None)
            self._thread.join(self.wait)
            if not self._thread.is_alive():
                self._thread = None
        left = self.not_uploaded()
        if left:
            with self._lock:
                still_uploading = bool(self._queued)
                reason = next(reversed(self._failed.values()), "") if self._failed else ""
            why = f"still uploading after {self.wait:g} s" if still_uploading else f"the push failed: {reason.rstrip('.')}"
            message = (
                f"{len(left)} checkpoint(s) not uploaded to {self.repo} ({', '.join(Path(p).name for p in left)}): "
                f"{why}. They are kept and recorded in {PENDING_FILE}, and pushed again when this run resumes "
                "or publishes; nothing local is lost."
            )
            log.warning("%s", message)
            if self.on_pending is not None:
                try:
                    self.on_pending({"repo": self.repo, "checkpoints": left, "message": message})
                except Exception as e:  # noqa: BLE001 - a failing listener never takes training down
                    log.warning("upload_pending listener failed: %s", e)
        return left
