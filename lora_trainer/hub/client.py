"""Talking to the Hub: the token, timeouts, bounded retries and error messages a user can act on.

Every other module of this package reaches the Hub through these seams:
- `resolve_token` / `check_token`: which token, and may it write where we are going to write;
- `retrying`: a call again after a pause that doubles, for timeouts, dropped connections, 429 and 5xx,
  within RETRY_ATTEMPTS tries and RETRY_BUDGET seconds; calls huggingface_hub already retries itself
  (hf_hub_download, the preupload step of a commit) are not wrapped again;
- `hub_errors`: huggingface_hub's exceptions -> HubError with a message that says what to do, token scrubbed;
- connect and read timeouts on every request (huggingface_hub's shared HTTP client has none by default,
  so a Hub that accepts a request and never answers would block its caller forever).

The token is only ever handed to huggingface_hub: never written to a run folder, a log or an event.
"""

from __future__ import annotations

import os
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
    set_client_factory,
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
from huggingface_hub.utils import (
    _http as hf_http,  # default_client_factory: the client huggingface_hub builds
)

from ..config import REPO_ID
from ..errors import LoraStudioError

# Retries of network/server errors: attempts in all, the first pause (doubled each time), and no new
# attempt once this many seconds have gone by since the first. Tests set RETRY_BASE_DELAY to 0.
RETRY_ATTEMPTS = 4
RETRY_BASE_DELAY = 1.0
RETRY_BUDGET = 120.0
# Seconds to open a connection, and to wait for the next bytes of an answer. A commit of many files
# can keep the Hub busy for a while before it answers, hence the generous read timeout.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
TIMEOUT_ENV = "LORA_STUDIO_HUB_TIMEOUT"  # overrides READ_TIMEOUT (seconds), e.g. for tests of a hung Hub
TOKENS_PAGE = "https://huggingface.co/settings/tokens"
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_WRITE_ROLES = ("admin", "write", "contributor")  # org roles that may create and push repos

T = TypeVar("T")


class HubError(LoraStudioError):
    """Talking to the Hub failed in a way the user can fix; the message says how."""


@dataclass(frozen=True)
class PushResult:
    """Where a push went: the repo's web page, the files it holds from this push, the commit."""

    url: str
    files: list[str]
    commit_url: str | None = None


# -- timeouts -------------------------------------------------------------------------------------
def read_timeout() -> float:
    """READ_TIMEOUT, or the LORA_STUDIO_HUB_TIMEOUT environment variable when it is a positive number."""
    try:
        value = float(os.environ.get(TIMEOUT_ENV, ""))
    except ValueError:
        return READ_TIMEOUT
    return value if value > 0 else READ_TIMEOUT


def _client_with_timeouts() -> httpx2.Client:
    client = hf_http.default_client_factory()
    client.timeout = httpx2.Timeout(read_timeout(), connect=min(CONNECT_TIMEOUT, read_timeout()))
    return client


def use_timeouts() -> None:
    """Make huggingface_hub's shared HTTP client time out (it is built without any). Idempotent."""
    set_client_factory(_client_with_timeouts)


# Done on import: every Hub call of this package (and any other call through huggingface_hub's
# shared session in this process) must time out, wherever it is made from.
use_timeouts()


# -- token ----------------------------------------------------------------------------------------
def resolve_token(token: str | bool | None) -> str | bool | None:
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
    token = resolve_token(token)
    if not token:
        raise HubError(
            "No Hugging Face token: paste one into the token field (CLI: --token) or set the HF_TOKEN "
            f"environment variable. Create a token with 'Write' access at {TOKENS_PAGE}."
        )
    info = whoami(token, endpoint)
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


def whoami(token: str, endpoint: str | None = None) -> dict:
    """The Hub's whoami answer for `token` (user, orgs, token role and scopes); HubError on a rejected token."""
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(token, "checking the token"):
        try:
            return retrying("checking the token", lambda: api.whoami(token=token))
        except HfHubHTTPError as e:
            if status_of(e) != 401:
                raise
            source = " (from the HF_TOKEN environment variable)" if token == os.environ.get("HF_TOKEN") else ""
            raise HubError(
                f"The Hub rejected this token{source} (401 Unauthorized): it is mistyped, expired or revoked. "
                f"Create a new one with 'Write' access at {TOKENS_PAGE}."
            ) from None


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
def status_of(error: BaseException) -> int | None:
    """The HTTP status of a huggingface_hub error, if it has one."""
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def is_transient(error: BaseException) -> bool:
    """A timeout, a dropped connection or a busy/failing server, anywhere in the exception chain."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, httpx2.TimeoutException | httpx2.NetworkError | httpx2.RemoteProtocolError):
            return True
        if isinstance(seen, HfHubHTTPError) and status_of(seen) in RETRY_STATUS:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _timed_out(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, httpx2.TimeoutException):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def retrying(what: str, call: Callable[[], T]) -> T:
    """call(), again after a pause that doubles each time if the network or the server fails.

    At most RETRY_ATTEMPTS tries, and none started after RETRY_BUDGET seconds: with the read timeout,
    that bounds how long a Hub that never answers can hold the caller. Raises HubError then.
    """
    delay, started = RETRY_BASE_DELAY, time.monotonic()
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return call()
        except Exception as e:
            if not is_transient(e):
                raise
            elapsed = time.monotonic() - started
            if attempt == RETRY_ATTEMPTS or elapsed + delay > RETRY_BUDGET:
                status = status_of(e)
                if _timed_out(e):
                    problem = f"the Hub did not answer within {read_timeout():g} s"
                elif status:
                    problem = f"the Hub answered {status}"
                else:
                    problem = f"the connection failed ({type(e).__name__})"
                raise HubError(
                    f"Gave up {what} after {attempt} tries: {problem}. The Hub may be down or "
                    "unreachable: check your connection and https://status.huggingface.co, then try again."
                ) from e
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def scrub(text: str, token: str | bool | None) -> str:
    """`text` with `token` replaced by hf_***."""
    return text.replace(token, "hf_***") if isinstance(token, str) and token else text


@contextmanager
def hub_errors(token: str | bool | None, what: str, repo_id: str | None = None, note: str = "") -> Iterator[None]:
    """Turn huggingface_hub's exceptions into a HubError saying what to do (and `note`), without the token."""
    try:
        yield
    except Exception as e:
        message = _explain(e, what, f"'{repo_id}'" if repo_id else "the repo")
        if message is None:
            raise
        raise HubError(scrub(f"{message} {note}".strip(), token)) from (e if isinstance(e, HubError) else None)


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
        status = status_of(e)
        if status == 401:
            hint = f"the token is invalid or expired: create a new one with 'Write' access at {TOKENS_PAGE}"
        elif status == 403:
            hint = f"this token may not do that to {repo}: use a 'Write' token of an account that owns it"
        else:
            hint = "try again later"
        return f"The Hub refused {what} ({status}): {e.server_message or e}. Fix: {hint}."
    if isinstance(e, httpx2.TimeoutException):
        return f"The Hub did not answer within {read_timeout():g} s while {what}. Check the connection and try again."
    if isinstance(e, httpx2.TransportError):
        return f"Could not reach the Hub while {what}: {e}. Check the connection and any proxy settings."
    if isinstance(e, ValueError):  # huggingface_hub's answer to metadata the Hub rejects or a malformed repo id
        return f"The request was rejected while {what}: {e}"
    return None


# -- repos and commits ----------------------------------------------------------------------------
def looks_like_repo_id(text: str) -> bool:
    """user/name or org/name, in the characters the Hub allows."""
    return bool(REPO_ID.match(text))


def check_repo_id(repo_id: str) -> str:
    """`repo_id` stripped, or HubError saying how to write one."""
    repo_id = repo_id.strip()
    if not looks_like_repo_id(repo_id):
        raise HubError(
            f"'{repo_id}' is not a repo id: write it as user/name (or org/name) using letters, digits, '-', '_' and '.'."
        )
    return repo_id


def parse_spec(spec: str) -> str:
    """The repo id of "hub:user/name" or "user/name"."""
    return check_repo_id(spec.removeprefix("hub:"))


def commit_files(
    api: HfApi, repo_id: str, files: dict[str, Path | bytes], deletions: list[str], message: str
) -> CommitInfo:
    """One commit with every file, retried; operations are rebuilt per attempt (huggingface_hub mutates them)."""

    def attempt() -> CommitInfo:
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=src) for p, src in sorted(files.items())]
        ops += [CommitOperationDelete(path_in_repo=p) for p in deletions]
        return api.create_commit(repo_id, ops, commit_message=message)

    return retrying(f"uploading to {repo_id}", attempt)
