"""Publish a run to the Hugging Face Hub and fetch LoRAs back (checkpoints off the box: hub_checkpoints.py).

Every public function checks what a user can get wrong (token, namespace, repo name, missing files)
and raises `HubError` with a message that says what to do. Network and server hiccups (timeouts,
dropped connections, 429, 5xx) are retried with exponential backoff before giving up.

The token is only ever handed to huggingface_hub: it is never written to the run folder, a log
or an event, and it is scrubbed from every message this module produces.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx2  # huggingface_hub's HTTP client: its exceptions are what a dropped connection raises
from huggingface_hub import (
    CommitInfo,
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    get_token,
    hf_hub_download,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from . import config as config_mod
from .errors import LoraStudioError
from .modelcard import (
    DIFFUSERS_WEIGHTS,
    LOSS_CURVE,
    RunNotReadyError,
    loss_curve_png,
    read_run,
    render_model_card,
    sample_files,
)

__all__ = [  # render_model_card and loss_curve_png live in modelcard.py; they are part of this API too
    "HubError", "PushResult", "add_push_arguments", "check_token", "download_lora",
    "loss_curve_png", "push_command", "push_run", "render_model_card",
]  # checkpoint pushes and fetches: hub_checkpoints.py

# Retries of network/server errors: attempts in all, and the first pause (doubled each time).
# Tests set RETRY_BASE_DELAY to 0.
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY = 1.0
TOKENS_PAGE = "https://huggingface.co/settings/tokens"
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_REPO_ID = config_mod.REPO_ID
_WRITE_ROLES = ("admin", "write", "contributor")  # org roles that may create and push repos

T = TypeVar("T")
Progress = Callable[[str], None]


class HubError(LoraStudioError):
    """Talking to the Hub failed in a way the user can fix; the message says how."""


@dataclass(frozen=True)
class PushResult:
    """Where a push went: the repo's web page, the files it holds from this push, the commit."""

    url: str
    files: list[str]
    commit_url: str | None = None


# -- token ----------------------------------------------------------------------------------------
def _resolve_token(token: str | bool | None) -> str | bool | None:
    """Explicit token, then HF_TOKEN, then the token `hf auth login` stored; False means anonymous."""
    if token is False:
        return False  # huggingface_hub then sends no token at all (public repos only)
    for candidate in (token, os.environ.get("HF_TOKEN")):
        if candidate and candidate.strip():
            return candidate.strip()
    return get_token()


def check_token(token: str | None, namespace: str | None = None, endpoint: str | None = None) -> str:
    """Check that `token` may write (to `namespace`, a user or org name, when given); return the username.

    The token is `token`, else the HF_TOKEN environment variable, else the one `hf auth login` stored.
    Raises HubError saying what is wrong: no token, an invalid one, a read-only one, or one that may
    not write to `namespace`.
    """
    token = _resolve_token(token)
    if not token:
        raise HubError(
            "No Hugging Face token: paste one into the token field (CLI: --token) or set the HF_TOKEN "
            f"environment variable. Create a token with 'Write' access at {TOKENS_PAGE}."
        )
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(token, "checking the token"):
        try:
            info = _retrying("checking the token", lambda: api.whoami(token=token))
        except HfHubHTTPError as e:
            if _status(e) != 401:
                raise
            source = " (from the HF_TOKEN environment variable)" if token == os.environ.get("HF_TOKEN") else ""
            raise HubError(
                f"The Hub rejected this token{source} (401 Unauthorized): it is mistyped, expired or revoked. "
                f"Create a new one with 'Write' access at {TOKENS_PAGE}."
            ) from None
    user = info.get("name", "")
    access = (info.get("auth") or {}).get("accessToken") or {}
    role, label = access.get("role"), f"'{access.get('displayName')}'" if access.get("displayName") else ""
    if role == "read":
        raise HubError(
            f"This token {label} is read-only, so it cannot create repos or upload files. "
            f"Create a token with 'Write' access at {TOKENS_PAGE} and use that one."
        )
    if namespace is None or namespace == user:
        if role == "fineGrained" and not _fine_grained_can_write(access, user):
            raise HubError(_fine_grained_message(label, user, "your personal namespace"))
        return user
    orgs = {org.get("name"): org.get("roleInOrg") for org in info.get("orgs") or []}
    if namespace not in orgs:
        yours = ", ".join(sorted(o for o in orgs if o)) or "none"
        raise HubError(
            f"User '{user}' cannot write to '{namespace}': it is neither your user name nor an organization "
            f"you belong to (yours: {yours}). Push to '{user}/<name>' instead, or ask an admin of "
            f"'{namespace}' to add you with the 'write' role."
        )
    if orgs[namespace] is not None and orgs[namespace] not in _WRITE_ROLES:
        raise HubError(
            f"You are a member of '{namespace}' with the '{orgs[namespace]}' role, which cannot upload. "
            f"Ask an admin of '{namespace}' for the 'write' role, or push to '{user}/<name>' instead."
        )
    if role == "fineGrained" and not _fine_grained_can_write(access, namespace):
        raise HubError(_fine_grained_message(label, namespace, f"the '{namespace}' organization"))
    return user


def _fine_grained_can_write(access: dict, namespace: str) -> bool:
    fine = access.get("fineGrained") or {}
    if "repo.write" in (fine.get("global") or []):
        return True
    return any(
        (scope.get("entity") or {}).get("name") == namespace and "repo.write" in (scope.get("permissions") or [])
        for scope in fine.get("scoped") or []
    )


def _fine_grained_message(label: str, namespace: str, where: str) -> str:
    return (
        f"This fine-grained token {label} has no write permission for '{namespace}'. Edit it at {TOKENS_PAGE} "
        f"and tick 'Write access to contents/settings of all repos' for {where}, or use a 'Write' token."
    )


# -- errors and retries ---------------------------------------------------------------------------
def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(error: BaseException) -> bool:
    """A timeout, a dropped connection or a busy/failing server, anywhere in the exception chain."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, httpx2.TimeoutException | httpx2.NetworkError | httpx2.RemoteProtocolError):
            return True
        if isinstance(seen, HfHubHTTPError) and _status(seen) in _RETRY_STATUS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _retrying(what: str, call: Callable[[], T]) -> T:
    """call(), again after a pause that doubles each time if the network or the server fails."""
    delay = RETRY_BASE_DELAY
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return call()
        except Exception as e:
            if not _is_transient(e):
                raise
            if attempt == RETRY_ATTEMPTS:
                status = _status(e)
                problem = f"the Hub answered {status}" if status else f"the connection failed ({type(e).__name__})"
                raise HubError(
                    f"Gave up {what} after {attempt} tries: {problem}. The Hub may be down or unreachable: "
                    "check your connection and https://status.huggingface.co, then try again."
                ) from e
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _scrub(text: str, token: str | bool | None) -> str:
    return text.replace(token, "hf_***") if isinstance(token, str) and token else text


@contextmanager
def _hub_errors(token: str | None, what: str, repo_id: str | None = None, note: str = "") -> Iterator[None]:
    """Turn huggingface_hub's exceptions into a HubError saying what to do (and `note`), without the token."""
    try:
        yield
    except Exception as e:
        message = _explain(e, what, f"'{repo_id}'" if repo_id else "the repo")
        if message is None:
            raise
        raise HubError(_scrub(f"{message} {note}".strip(), token)) from (e if isinstance(e, HubError) else None)


def _explain(e: Exception, what: str, repo: str) -> str | None:
    """What went wrong and what to do, for the exceptions huggingface_hub raises; None for the others."""
    if isinstance(e, HubError):
        return str(e)
    if isinstance(e, GatedRepoError):
        return f"{repo} is gated: accept its conditions on its Hub page with this account first."
    if isinstance(e, RepositoryNotFoundError):
        return (
            f"{repo} was not found while {what}: check the name (user/name), or, if it is private, use a token "
            "of an account that can read it."
        )
    if isinstance(e, RevisionNotFoundError):
        return f"{repo} has no 'main' branch yet while {what}: push to it first."
    if isinstance(e, RemoteEntryNotFoundError):
        return f"A file is missing from {repo} while {what}: {str(e).splitlines()[-1]}"
    if isinstance(e, LocalEntryNotFoundError):  # a download that failed for a reason other than the network
        return f"Could not download from {repo} while {what}: {e}"
    if isinstance(e, OfflineModeIsEnabled):
        return "The Hub is switched off here (HF_HUB_OFFLINE is set): unset it to reach the Hub."
    if isinstance(e, HfHubHTTPError):
        status = _status(e)
        if status == 401:
            hint = f"the token is invalid or expired: create a new one with 'Write' access at {TOKENS_PAGE}"
        elif status == 403:
            hint = f"this token may not do that to {repo}: use a 'Write' token of an account that owns it"
        else:
            hint = "try again later"
        return f"The Hub refused {what} ({status}): {e.server_message or e}. Fix: {hint}."
    if isinstance(e, httpx2.TransportError):
        return f"Could not reach the Hub while {what}: {e}. Check the connection and any proxy settings."
    if isinstance(e, ValueError):  # huggingface_hub's answer to metadata the Hub rejects or a malformed repo id
        return f"The request was rejected while {what}: {e}"
    return None


def _check_repo_id(repo_id: str) -> str:
    repo_id = repo_id.strip()
    if not _REPO_ID.match(repo_id):
        raise HubError(
            f"'{repo_id}' is not a repo id: write it as user/name (or org/name) using letters, digits, '-', '_' and '.'."
        )
    return repo_id


def _commit(api: HfApi, repo_id: str, files: dict[str, Path | bytes], deletions: list[str], message: str) -> CommitInfo:
    """One commit with every file; operations are rebuilt per attempt (huggingface_hub mutates them)."""

    def attempt():
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src) for p, src in sorted(files.items())]
        ops += [CommitOperationDelete(path_in_repo=p) for p in deletions]
        return api.create_commit(repo_id, ops, commit_message=message)

    return _retrying(f"uploading to {repo_id}", attempt)


# -- publish a run --------------------------------------------------------------------------------
def push_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
    progress: Progress | None = None,
) -> PushResult:
    """Publish a finished run to `repo_id` in one commit and return where it went.

    Uploads both LoRA files of final/ (and lora_info.json), every sample image, config.toml, a model
    card (README.md) and the loss curve (loss.png). Creates the repo if needed (`private` only applies
    then). `repo_id` may be a bare name, which goes to the token owner's namespace. Pushing the same
    run again changes nothing. Sample images of an older push that this run does not have are
    deleted, so the card's gallery matches the files. Nothing in the run folder is written.
    """
    say = progress or (lambda message: None)
    run_dir = Path(run_dir)
    try:
        run = read_run(run_dir)
    except RunNotReadyError as e:
        raise HubError(str(e)) from None
    if "/" in repo_id:
        repo_id = _check_repo_id(repo_id)
    namespace = repo_id.split("/")[0] if "/" in repo_id else None
    token = _resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(token, f"pushing to {repo_id}", repo_id, note="Nothing in the run folder was changed."):
        say("checking the token")
        user = check_token(token, namespace, endpoint)
        repo_id = _check_repo_id(repo_id if "/" in repo_id else f"{user}/{repo_id}")

        # Everything is read and rendered before the first write, so a bad run fails before the repo exists.
        files: dict[str, Path | bytes] = {
            p.name: p for p in sorted((run_dir / "final").iterdir()) if p.is_file() and not p.name.startswith(".")
        }
        files.update({p.relative_to(run_dir).as_posix(): p for p in sample_files(run_dir)})
        if (run_dir / config_mod.CONFIG_FILENAME).is_file():
            files[config_mod.CONFIG_FILENAME] = run_dir / config_mod.CONFIG_FILENAME
        if any(e["type"] == "step" for e in run.events):
            files[LOSS_CURVE] = loss_curve_png(run.events)
        files["README.md"] = render_model_card(run_dir, repo_id).encode("utf-8")

        say(f"creating {repo_id} (if needed)")
        _retrying(f"creating {repo_id}", lambda: api.create_repo(repo_id, private=private, exist_ok=True))
        existing = _retrying(f"listing {repo_id}", lambda: api.list_repo_files(repo_id))
        stale = sorted(p for p in existing if p.startswith("samples/") and p not in files)
        size = sum(len(s) if isinstance(s, bytes) else s.stat().st_size for s in files.values())
        say(f"uploading {len(files)} files ({size / 1e6:.1f} MB)")
        info = _commit(api, repo_id, files, stale, f"Publish {run.name} from LoRA Studio")
    url = f"{api.endpoint}/{repo_id}"
    say(f"published: {url}")
    return PushResult(url=url, files=sorted(files), commit_url=getattr(info, "commit_url", None))


def _parse_spec(spec: str) -> str:
    return _check_repo_id(spec.removeprefix("hub:"))


# -- LoRAs for the Generate tab -------------------------------------------------------------------
def _lora_candidates(files: list[str]) -> list[str]:
    """.safetensors files of a repo, the most likely LoRA first."""
    intermediate = re.compile(r"[-_](e|ep|epoch|step|s)?\d{2,}$", re.IGNORECASE)

    def rank(path: str) -> tuple:
        stem = Path(path).stem
        return (
            Path(path).name != DIFFUSERS_WEIGHTS,  # diffusers' own name: what load_lora_weights looks for
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
    repo_id = _parse_spec(repo_id)
    token = _resolve_token(token)
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(token, f"downloading a LoRA from {repo_id}", repo_id):
        files = _retrying(f"listing {repo_id}", lambda: api.list_repo_files(repo_id))
        candidates = _lora_candidates(files)
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
        local = _retrying(
            f"downloading {chosen}",
            lambda: hf_hub_download(repo_id, chosen, token=token, endpoint=api.endpoint, cache_dir=cache_dir),
        )
    return Path(local)


# -- command line -----------------------------------------------------------------------------------
def add_push_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of `python -m lora_trainer push RUN --repo user/name [--private] [--token T]`."""
    parser.add_argument("run", metavar="RUN", help="Run folder with a finished final/ LoRA.")
    parser.add_argument("--repo", required=True, help="Hub repo to publish to: user/name or org/name (created if missing).")
    parser.add_argument("--private", action="store_true", help="Create the repo private (an existing repo keeps its visibility).")
    # No default value here: a default would print the token in --help. It is read when pushing.
    parser.add_argument(
        "--token",
        default=None,
        help="Hub token with write access; default: the HF_TOKEN environment variable (safer than this flag, "
        "which other users of the machine can see in the process list), then `hf auth login`'s token.",
    )
    parser.add_argument("--endpoint", default=None, help="Hub URL; default: HF_ENDPOINT or https://huggingface.co.")
    return parser


def push_command(args: argparse.Namespace) -> int:
    """Run `push` from parsed arguments: print the repo URL and return 0, or print the problem and return 1."""
    try:
        result = push_run(
            args.run,
            args.repo,
            token=args.token,
            private=args.private,
            endpoint=getattr(args, "endpoint", None),
            progress=lambda message: print(message, file=sys.stderr),
        )
    except LoraStudioError as e:  # HubError, or ConfigError for a broken config.toml
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.url)
    return 0
