"""A small local stand-in for the Hugging Face Hub, for tests.

It speaks the endpoints that the real huggingface_hub 2.4 client calls for whoami, create_repo,
create_commit (validate-yaml, preupload, commit), list_repo_files / list_repo_tree, repo_info and
hf_hub_download (HEAD and GET on /resolve/), so tests drive the real client against it through
`endpoint=`. Every file is answered as a "regular" (non-LFS) upload. Repos live in memory.

Tokens: WRITE_TOKEN (user alice, member of alice-org with the write role and of viewers-org with
the read role), READ_TOKEN (alice, read-only) and FINE_GRAINED_TOKEN (alice, may write to her own
namespace only). Any other token gets 401. `fail_next` makes the next requests answer 503;
`hang_next` makes the server read the next requests and never answer them (until it shuts down).

Jobs: create (POST /api/jobs/{ns}), inspect, the SSE log stream, cancel and the hardware list, as
huggingface_hub's run_job / inspect_job / fetch_job_logs / cancel_job / list_jobs_hardware call them.
A job runs its command here as a subprocess with the job's environment and secrets, in a folder of
its own; the command's bootstrap (`bash -c SCRIPT NAME python ...`: pip installs, code download) is
skipped and `python ...` runs with this checkout on PYTHONPATH. Only tokens in `job_tokens` may run
jobs (others: 403); `payment_required` answers 402; `kill_job` kills a job outright.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from fake_hub_jobs import HubHTTPError, Job, JobEndpointsMixin, JobsMixin

WRITE_TOKEN = "hf_fakeWRITEtokenForAlice0123456789"
READ_TOKEN = "hf_fakeREADtokenForAlice0123456789"
FINE_GRAINED_TOKEN = "hf_fakeFINEtokenForAlice0123456789"
WRITE_ORG_ROLES = ("admin", "write", "contributor")
def _identity(role: str, scoped: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A whoami-v2 answer for alice with a token of the given role."""
    access: dict[str, Any] = {"displayName": f"{role}-token", "role": role}
    if role == "fineGrained":
        access["fineGrained"] = {"canReadGatedRepos": False, "global": [], "scoped": scoped or []}
    return {
        "type": "user",
        "id": "0001",
        "name": "alice",
        "fullname": "Alice",
        "orgs": [
            {"type": "org", "name": "alice-org", "roleInOrg": "write"},
            {"type": "org", "name": "viewers-org", "roleInOrg": "read"},
        ],
        "auth": {"type": "access_token", "accessToken": access},
    }


def git_blob_sha1(data: bytes) -> str:
    """The oid git gives a regular file: what the Hub reports and the client compares to skip uploads."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=lambda: ["0" * 40])

    @property
    def head(self) -> str:
        return self.commits[-1]


class FakeHub(JobsMixin):
    """The server and its state: `repos`, `requests` (method, path) seen, and the failure switch."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.tokens = {
            WRITE_TOKEN: _identity("write"),
            READ_TOKEN: _identity("read"),
            FINE_GRAINED_TOKEN: _identity(
                "fineGrained", [{"entity": {"type": "user", "name": "alice"}, "permissions": ["repo.content.read", "repo.write"]}]
            ),
        }
        self.requests: list[tuple[str, str]] = []
        self._failures: list[list[Any]] = []  # [remaining, status, path substring]
        self._hangs: list[list[Any]] = []  # [remaining, path substring]
        self.hung: list[str] = []  # paths of the requests left without an answer
        self._released = threading.Event()  # set on shutdown: hung requests end (unanswered)
        self.jobs: dict[str, Job] = {}
        self.job_tokens = {WRITE_TOKEN}  # tokens with the Jobs permission
        self.payment_required = False
        self.job_env: dict[str, str] = {}  # extra environment for every job process (test knobs)
        self._jobs_dir = tempfile.mkdtemp(prefix="fake-hub-jobs-")
        self._lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False  # idle keep-alive connections must not hold up close()
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        for job in list(self.jobs.values()):
            self.kill_job(job.id, message="the fake Hub shut down")
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._jobs_dir, ignore_errors=True)

    def fail_next(self, count: int, status: int = 503, path_contains: str = "") -> None:
        """Answer the next `count` requests whose path contains `path_contains` with `status`."""
        with self._lock:
            self._failures.append([count, status, path_contains])

    def hang_next(self, count: int, path_contains: str = "") -> None:
        """Read the next `count` requests whose path contains `path_contains`, and never answer them."""
        with self._lock:
            self._hangs.append([count, path_contains])

    def answer_again(self) -> None:
        """Answer every request normally from now on (requests already hung stay unanswered)."""
        with self._lock:
            self._hangs.clear()
            self._failures.clear()

    def take_hang(self, path: str) -> bool:
        with self._lock:
            for hang in self._hangs:
                if hang[0] > 0 and hang[1] in path:
                    hang[0] -= 1
                    self.hung.append(path)
                    return True
        return False

    def wait_released(self) -> None:
        self._released.wait()

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False) -> Repo:
        """Seed a repo as if someone else had pushed it."""
        repo = self.repos[repo_id] = Repo(private=private, files=dict(files))
        repo.commits.append(hashlib.sha1(repr(sorted(files.items())).encode()).hexdigest())
        return repo

    # -- policy: who may read and write what --------------------------------------------------
    def can_read(self, who: dict | None, repo_id: str) -> bool:
        repo = self.repos.get(repo_id)
        if repo is None:
            return False
        namespace = repo_id.split("/")[0]
        members = {o["name"] for o in who["orgs"]} if who else set()
        return not repo.private or (who is not None and (namespace == who["name"] or namespace in members))

    def can_write(self, who: dict | None, namespace: str) -> bool:
        if who is None:
            return False
        access = who["auth"]["accessToken"]
        if access["role"] == "read":
            return False
        if access["role"] == "fineGrained":
            scoped = {s["entity"]["name"]: s["permissions"] for s in access["fineGrained"]["scoped"]}
            if "repo.write" not in scoped.get(namespace, []):
                return False
        roles = {o["name"]: o["roleInOrg"] for o in who["orgs"]}
        return namespace == who["name"] or roles.get(namespace) in WRITE_ORG_ROLES

    def take_failure(self, path: str) -> int | None:
        with self._lock:
            for failure in self._failures:
                if failure[0] > 0 and failure[2] in path:
                    failure[0] -= 1
                    return failure[1]
        return None


_REPO = r"(?P<repo>[^/]+/[^/]+)"
ROUTES = [
    ("GET", re.compile(r"/api/jobs/hardware"), "jobs_hardware"),
    ("POST", re.compile(r"/api/jobs/(?P<ns>[^/]+)"), "create_job"),
    ("GET", re.compile(r"/api/jobs/(?P<ns>[^/]+)/(?P<job_id>[^/]+)"), "inspect_job"),
    ("GET", re.compile(r"/api/jobs/(?P<ns>[^/]+)/(?P<job_id>[^/]+)/logs"), "job_logs"),
    ("POST", re.compile(r"/api/jobs/(?P<ns>[^/]+)/(?P<job_id>[^/]+)/cancel"), "cancel_job"),
    ("GET", re.compile(r"/api/whoami-v2"), "whoami"),
    ("POST", re.compile(r"/api/repos/create"), "create_repo"),
    ("POST", re.compile(r"/api/validate-yaml"), "validate_yaml"),
    ("POST", re.compile(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)"), "preupload"),
    ("POST", re.compile(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)"), "commit"),
    ("GET", re.compile(rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?"), "tree"),
    ("GET", re.compile(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?"), "info"),
    ("GET", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
    ("HEAD", re.compile(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), "resolve"),
]


class _Handler(JobEndpointsMixin, BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects
    timeout = 10  # close idle keep-alive connections
    disable_nagle_algorithm = True  # headers and body go out as separate writes: don't wait 40 ms between them

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- plumbing -------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.body = self._read_body()
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.hub.requests.append((method, url.path))
        if self.hub.take_hang(url.path):
            self.hub.wait_released()  # the request was accepted (its body read); no answer ever comes
            self.close_connection = True
            return None
        if (status := self.hub.take_failure(url.path)) is not None:
            return self._send(status, {"error": "Service temporarily unavailable (fake hub)"})
        try:
            for route_method, pattern, name in ROUTES:
                if route_method == method and (match := pattern.fullmatch(url.path)):
                    args = {k: unquote(v) if v else v for k, v in match.groupdict().items()}
                    return getattr(self, name)(self._who(), **args)
            raise HubHTTPError(404, f"no route for {method} {url.path}")
        except HubHTTPError as e:
            headers = {"X-Error-Code": e.code, **e.headers} if e.code else e.headers
            self._send(e.status, {"error": str(e)}, headers)

    def _read_body(self) -> bytes:
        # httpx sends every body huggingface_hub builds (bytes or JSON) with a Content-Length.
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        content_type = "application/octet-stream" if isinstance(body, bytes) else "application/json"
        for key, value in {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _who(self) -> dict | None:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return None
        who = self.hub.tokens.get(auth.removeprefix("Bearer "))
        if who is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return who

    def _repo(self, who: dict | None, repo_id: str, rev: str | None = "main", write: bool = False) -> Repo:
        if not self.hub.can_read(who, repo_id):
            raise HubHTTPError(404, "Repository not found", "RepoNotFound")
        if rev not in (None, "main"):
            raise HubHTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        if write and not self.hub.can_write(who, repo_id.split("/")[0]):
            raise HubHTTPError(403, "You don't have the rights to write to this repo")
        return self.hub.repos[repo_id]

    # -- endpoints ------------------------------------------------------------------------------
    def whoami(self, who: dict | None) -> None:
        if who is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        self._send(200, who)

    def create_repo(self, who: dict | None) -> None:
        payload = json.loads(self.body)
        namespace = payload.get("organization") or (who or {}).get("name")
        repo_id = f"{namespace}/{payload['name']}"
        if not self.hub.can_write(who, namespace):
            raise HubHTTPError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._send(409, {"error": "You already created this model repo", "url": url})
        self.hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self._send(200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def validate_yaml(self, who: dict | None) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def preupload(self, who: dict | None, repo: str, rev: str) -> None:
        stored = self._repo(who, repo, rev, write=True)
        files = [
            {
                "path": f["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(stored.files[f["path"]]) if f["path"] in stored.files else None,
            }
            for f in json.loads(self.body)["files"]
        ]
        self._send(200, {"files": files, "commitOid": stored.head})

    def commit(self, who: dict | None, repo: str, rev: str) -> None:
        stored = self._repo(who, repo, rev, write=True)
        files = dict(stored.files)  # applied all at once, or not at all
        for line in self.body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubHTTPError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            elif key != "header":
                raise HubHTTPError(400, f"the fake hub does not support '{key}' operations (only regular files)")
        oid = hashlib.sha1(f"{stored.head}{sorted(files.items())}".encode()).hexdigest()
        stored.files = files
        stored.commits.append(oid)
        commit_url = f"{self.hub.url}/{repo}/commit/{oid}"
        self._send(200, {"success": True, "commitOid": oid, "commitUrl": commit_url, "pullRequestUrl": None})

    def tree(self, who: dict | None, repo: str, rev: str, path: str | None) -> None:
        stored = self._repo(who, repo, rev)
        prefix = f"{path.strip('/')}/" if path else ""
        recursive = self.query.get("recursive", "false").lower() == "true"
        entries: dict[str, dict] = {}
        for name, data in sorted(stored.files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # the folders on the way
                folder = prefix + "/".join(parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())})
            if recursive or len(parts) == 1:
                entries[name] = {"type": "file", "path": name, "size": len(data), "oid": git_blob_sha1(data)}
        if path and not entries:
            raise HubHTTPError(404, f"{path} does not exist", "EntryNotFound")
        self._send(200, list(entries.values()))

    def info(self, who: dict | None, repo: str, rev: str | None) -> None:
        stored = self._repo(who, repo, rev)
        siblings = [{"rfilename": name} for name in sorted(stored.files)]
        self._send(200, {"id": repo, "sha": stored.head, "private": stored.private, "siblings": siblings})

    def resolve(self, who: dict | None, repo: str, rev: str, path: str) -> None:
        stored = self._repo(who, repo, rev)
        headers = {"X-Repo-Commit": stored.head}
        if path not in stored.files:
            raise HubHTTPError(404, "Entry not found", "EntryNotFound", headers)
        data = stored.files[path]
        headers["ETag"] = f'"{hashlib.sha256(data).hexdigest()}"'
        self._send(200, data, headers)


def wait_following_progress(proc, progress, idle_limit: float = 90.0, poll: float = 0.2) -> int:
    """Wait for `proc` to exit while `progress()` keeps changing; kill it and fail if it stalls.

    `progress` returns anything comparable (request counts, file sizes): a process that changes
    nothing for `idle_limit` seconds is hung, however loaded the machine is otherwise.
    """

    last, since = progress(), time.monotonic()
    while proc.poll() is None:
        time.sleep(poll)
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > idle_limit:
            proc.kill()
            proc.wait()
            raise AssertionError(f"the process made no progress for {idle_limit:g} s (last: {last!r}): it hangs")
    return proc.returncode


class Until:
    """A stand-in for a process, 'exited' once `condition()` holds: `wait_following_progress(Until(...), ...)`
    waits for a condition while progress is made, and fails instead of hanging when it stalls."""

    def __init__(self, condition):
        self.condition, self.returncode = condition, None

    def poll(self):
        if self.returncode is None and self.condition():
            self.returncode = 0
        return self.returncode

    def kill(self) -> None:
        pass

    def wait(self):
        return self.returncode
