"""Publish a finished run to the Hub, and fetch LoRAs back for the Generate tab.

Every public function checks what a user can get wrong (token, namespace, repo name, missing files)
and raises `HubError` with a message that says what to do (client.py owns the token, the timeouts,
the retries and the messages).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from huggingface_hub import HfApi, hf_hub_download

from .. import config as config_mod
from ..formats import DIFFUSERS_FILENAME
from .checkpoints import pending_uploads, retry_pending_uploads
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
)
from .modelcard import (
    LOSS_CURVE,
    PICK_FILE,
    RunNotReadyError,
    default_checkpoint,
    loss_curve_png,
    publishable_checkpoints,
    read_run,
    render_model_card,
    sample_files,
)

log = logging.getLogger("lora_trainer.hub")
__all__ = ["default_checkpoint", "download_lora", "lora_candidates", "publishable_checkpoints", "push_run"]
Progress = Callable[[str], None]


# -- publish a run --------------------------------------------------------------------------------
def push_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
    progress: Progress | None = None,
    checkpoint: str | None = None,
) -> PushResult:
    """Publish a finished run to `repo_id` in one commit and return where it went.

    `checkpoint` is the LoRA folder published: "best" (the checkpoint the evaluation recommends, with
    its scores and reason in evaluation.json) or "final" (the last step); None takes best/ when the
    run has one, else final/. Uploads both LoRA files of that folder (and lora_info.json), every
    sample image, config.toml, a model card (README.md, saying which checkpoint and why) and the loss
    curve (loss.png). Creates the repo if needed (`private` only applies
    then). `repo_id` may be a bare name, which goes to the token owner's namespace. Pushing the same
    run again changes nothing. Sample images of an older push that this run does not have are
    deleted, so the card's gallery matches the files. Checkpoints the trainer could not push to its
    checkpoint repo (upload_pending.json) are pushed again afterwards. Nothing else in the run folder is written.
    """
    say = progress or (lambda message: None)
    run_dir = Path(run_dir)
    try:
        checkpoint = checkpoint or default_checkpoint(run_dir)
        run = read_run(run_dir, checkpoint)
    except RunNotReadyError as e:
        raise HubError(str(e)) from None
    if "/" in repo_id:
        repo_id = check_repo_id(repo_id)
    namespace = repo_id.split("/")[0] if "/" in repo_id else None
    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(token, f"pushing to {repo_id}", repo_id, note="Nothing in the run folder was changed."):
        say("checking the token")
        user = check_token(token, namespace, endpoint)
        repo_id = check_repo_id(repo_id if "/" in repo_id else f"{user}/{repo_id}")

        # Everything is read and rendered before the first write, so a bad run fails before the repo exists.
        files: dict[str, Path | bytes] = {
            p.name: p for p in sorted((run_dir / checkpoint).iterdir()) if p.is_file() and not p.name.startswith(".")
        }
        files.update({p.relative_to(run_dir).as_posix(): p for p in sample_files(run_dir)})
        if (run_dir / config_mod.CONFIG_FILENAME).is_file():
            files[config_mod.CONFIG_FILENAME] = run_dir / config_mod.CONFIG_FILENAME
        if any(e["type"] == "step" for e in run.events):
            files[LOSS_CURVE] = loss_curve_png(run.events)
        files["README.md"] = render_model_card(run_dir, repo_id, checkpoint).encode("utf-8")

        say(f"creating {repo_id} (if needed)")
        retrying(f"creating {repo_id}", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
        existing = retrying(f"listing {repo_id}", lambda: api.list_repo_files(repo_id))
        # Samples the run no longer has, and the pick's scores when the last step replaces an earlier pick.
        stale = sorted(p for p in existing if (p.startswith("samples/") or p == PICK_FILE) and p not in files)
        size = sum(len(s) if isinstance(s, bytes) else s.stat().st_size for s in files.values())
        say(f"publishing {checkpoint}/ (step {run.steps})")
        say(f"uploading {len(files)} files ({size / 1e6:.1f} MB)")
        info = commit_files(api, repo_id, files, stale, f"Publish {run.name} from LoRA Studio")
    url = f"{api.endpoint}/{repo_id}"
    say(f"published: {url}")
    if pending_uploads(run_dir):
        say("pushing the checkpoints that did not upload during training")
        if left := retry_pending_uploads(run_dir, token=token, endpoint=endpoint):
            say(f"{len(left)} checkpoint(s) still not uploaded ({', '.join(left)}): they stay recorded for the next try")
    return PushResult(url=url, files=sorted(files), commit_url=getattr(info, "commit_url", None))


# -- LoRAs for the Generate tab -------------------------------------------------------------------
def lora_candidates(files: list[str]) -> list[str]:
    """.safetensors files of a repo, the most likely LoRA first."""
    intermediate = re.compile(r"[-_](e|ep|epoch|step|s)?\d{2,}$", re.IGNORECASE)

    def rank(path: str) -> tuple:
        stem = Path(path).stem
        return (
            Path(path).name != DIFFUSERS_FILENAME,  # diffusers' own name: what load_lora_weights looks for
            path.startswith("checkpoints/"),  # training checkpoints last
            path.count("/"),  # files at the top before files in folders
            bool(intermediate.search(stem)),  # name-000004.safetensors is an epoch, name.safetensors the result
            len(stem),
            path,
        )

    return sorted((f for f in files if f.endswith(".safetensors")), key=rank)


def download_lora(
    repo_id: str,
    *,
    token: str | bool | None = None,
    endpoint: str | None = None,
    filename: str | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Download a LoRA file from any Hub repo and return its local path.

    Without `filename`, takes pytorch_lora_weights.safetensors if present, otherwise the most likely
    .safetensors (top level, not an intermediate epoch). Files are cached (huggingface_hub's cache,
    or `cache_dir`), so a second call does not download again. `token=False` reads anonymously
    (public repos only), ignoring HF_TOKEN and any stored login.
    """
    repo_id = parse_spec(repo_id)
    token = resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(token, f"downloading a LoRA from {repo_id}", repo_id):
        files = retrying(f"listing {repo_id}", lambda: api.list_repo_files(repo_id))
        candidates = lora_candidates(files)
        if filename is not None:
            if filename not in files:
                raise HubError(
                    f"'{repo_id}' has no file '{filename}'. Its .safetensors files: {', '.join(candidates) or 'none'}."
                )
            chosen = filename
        elif "model_index.json" in files:
            raise HubError(f"'{repo_id}' is a full diffusion model, not a LoRA: use it as the base model instead.")
        elif not candidates:
            raise HubError(f"'{repo_id}' has no .safetensors file, so there is no LoRA to load from it.")
        else:
            chosen = candidates[0]
        # hf_hub_download retries timeouts and dropped connections itself (and resumes): not wrapped again.
        local = hf_hub_download(repo_id, chosen, token=token, endpoint=api.endpoint, cache_dir=cache_dir)
    return Path(local)


# -- command line -----------------------------------------------------------------------------------
