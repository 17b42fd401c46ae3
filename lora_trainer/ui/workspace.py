"""The only owner of paths: one folder per browser session, one folder per run inside it.

    <LORA_STUDIO_WORKSPACE or ./workspace>/<session-dir>/<run-id>/{dataset/, config.toml, events.jsonl, ...}
    <...>/<session-dir>/loras/          LoRA files this session uploaded or fetched from the Hub

A session is a `Session` object kept server-side in a `gr.State`. Its token is made here
(`secrets.token_urlsafe`, 256 bits); the browser keeps it in a `gr.BrowserState` so a reload
finds the same folder. The folder name is a hash of the token, so neither a directory listing
nor a URL reveals it. Ids that come from the page (a run id, a LoRA file name) are checked
against a strict pattern and looked up inside this session's folder only: no client value is
ever used as a path.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from ..errors import LoraStudioError

TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{43}$")
RUN_ID_PATTERN = re.compile(r"^\d{8}-\d{6}-[a-z0-9]{4}$")
LORA_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.safetensors$")
DATASET = "dataset"
THUMBS = "thumbs"
LORAS = "loras"
THUMB_SIDE = 192


class WorkspaceError(LoraStudioError):
    """A run or file id that this session does not have."""


def root() -> Path:
    return Path(os.environ.get("LORA_STUDIO_WORKSPACE") or "workspace").resolve()


class Session:
    """One browser session's workspace. Starts empty; the token is made on first use.

    gr.State deep-copies its initial value per browser session, so every visitor gets their own.
    """

    def __init__(self) -> None:
        self.token: str | None = None
        self.current_run: str | None = None
        self.cache: dict = {}  # per-session UI memory (event monitors, last rendered state); never paths from the page

    # -- identity ------------------------------------------------------------------------------
    def no_run(self, message: str) -> str:
        """`message`, plus what to do if this page outlived a server restart (its session is then empty, with no
        token, while the page still shows the old one; the page reloads itself within seconds)."""
        if self.token is None:
            return message + " If the server restarted while this page was open, reload the page: your runs are kept."
        return message

    def ensure(self) -> str:
        if self.token is None:
            self.token = secrets.token_urlsafe(32)
        return self.token

    def adopt(self, token: object) -> bool:
        """Take over the workspace of a token the browser kept (page reload); False if it is not one of ours."""
        if not isinstance(token, str) or not TOKEN_PATTERN.match(token):
            return False
        if token != self.token:
            self.token, self.current_run, self.cache = token, None, {}
        return True

    @property
    def dir(self) -> Path:
        digest = hashlib.sha256(self.ensure().encode()).hexdigest()[:32]
        path = root() / digest
        path.mkdir(parents=True, exist_ok=True)
        return path

    # -- runs ------------------------------------------------------------------------------------
    def runs(self) -> list[str]:
        """Run ids of this session, newest first."""
        if self.token is None:
            return []
        return sorted((p.name for p in self.dir.iterdir() if p.is_dir() and RUN_ID_PATTERN.match(p.name)), reverse=True)

    def new_run(self, copy_dataset_from: str | None = None) -> str:
        """Create a run folder (optionally with the images and captions of another run) and make it current."""
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + "".join(secrets.choice("abcdefghijkmnpqrstuvwxyz23456789") for _ in range(4))
        path = self.dir / run_id
        if copy_dataset_from:
            shutil.copytree(self.run_dir(copy_dataset_from) / DATASET, path / DATASET)
        (path / DATASET).mkdir(parents=True, exist_ok=True)
        self.current_run = run_id
        return run_id

    def run_dir(self, run_id: str | None = None) -> Path:
        """The folder of `run_id` (default: the current run) in this session; WorkspaceError if there is none."""
        run_id = run_id or self.current_run
        if not run_id:
            raise WorkspaceError(self.no_run("No run yet: upload some images first (Upload tab)."))
        if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id) or not (self.dir / run_id).is_dir():
            raise WorkspaceError(f"This session has no run '{str(run_id)[:40]}'. Pick one of your runs from the list.")
        return self.dir / run_id

    def select(self, run_id: str) -> str:
        self.run_dir(run_id)
        self.current_run = run_id
        return run_id

    def current(self, *, create: bool = False) -> Path | None:
        """The current run folder: the chosen one, else the newest; a new one if `create` and none exists."""
        if self.current_run and self.token and (self.dir / self.current_run).is_dir():
            return self.dir / self.current_run
        existing = self.runs()
        if existing:
            self.current_run = existing[0]
            return self.dir / existing[0]
        if create:
            return self.run_dir(self.new_run())
        return None

    def dataset_dir(self, *, create: bool = False) -> Path | None:
        run = self.current(create=create)
        return None if run is None else run / DATASET

    def dataset_image(self, relative: str) -> Path:
        """A dataset image of the current run named by its path relative to dataset/ (as the page shows it)."""
        dataset = self.dataset_dir()
        if dataset is None or not isinstance(relative, str) or not relative:
            raise WorkspaceError("No such image in this run.")
        candidate = (dataset / relative).resolve()
        if not candidate.is_relative_to(dataset.resolve()) or not candidate.is_file():
            raise WorkspaceError(f"No image '{relative[:80]}' in this run; reload the page.")
        return candidate

    # -- LoRA files ------------------------------------------------------------------------------
    @property
    def loras_dir(self) -> Path:
        path = self.dir / LORAS
        path.mkdir(exist_ok=True)
        return path

    def add_lora(self, source: Path, name: str) -> str:
        """Copy a LoRA file into this session under a safe, unique name; returns that name."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).stem).strip("-.") or "lora"
        stem = stem[:100]
        candidate, n = f"{stem}.safetensors", 2
        while (self.loras_dir / candidate).exists():
            candidate, n = f"{stem}-{n}.safetensors", n + 1
        shutil.copyfile(source, self.loras_dir / candidate)
        return candidate

    def loras(self) -> list[str]:
        if self.token is None:
            return []
        return sorted(p.name for p in self.loras_dir.glob("*.safetensors"))

    def lora_file(self, name: str) -> Path:
        if not isinstance(name, str) or not LORA_NAME_PATTERN.match(name) or not (self.loras_dir / name).is_file():
            raise WorkspaceError(f"This session has no LoRA file '{str(name)[:80]}'; upload it again.")
        return self.loras_dir / name


# -- what the page may be sent -------------------------------------------------------------------
def servable(path: Path) -> str:
    """A path gradio will agree to copy into its cache and serve.

    Gradio hands out files under the working directory or the temp dir (and copies them into its
    own cache, named by a hash of the content). A workspace elsewhere (e.g. /data on a Space with
    persistent storage) is copied into the temp dir first; the workspace itself is never served.
    """
    path = Path(path).resolve()
    for allowed in (Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve()):
        if path.is_relative_to(allowed) and not path.name.startswith("."):
            return str(path)
    stamp = hashlib.sha256(f"{path}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:24]
    copy = Path(tempfile.gettempdir()) / "lora-studio-serve" / stamp / path.name.lstrip(".")
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
    return str(copy)


def thumbnail(image: Path, run_dir: Path) -> str:
    """A small JPEG of a dataset image (so 300 images stay light in the browser), made once."""
    from PIL import Image, ImageOps

    rel = image.relative_to(run_dir / DATASET).as_posix()
    stat = image.stat()
    name = hashlib.sha1(f"{rel}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:20] + ".jpg"
    thumb = run_dir / THUMBS / name
    if not thumb.exists():
        thumb.parent.mkdir(exist_ok=True)
        try:
            with Image.open(image) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
                im.thumbnail((THUMB_SIDE, THUMB_SIDE))
                tmp = thumb.with_name(f"tmp-{os.getpid()}-{thumb.name}")
                im.save(tmp, "JPEG", quality=85)
                os.replace(tmp, thumb)
        except OSError:
            return servable(image)
    return servable(thumb)
