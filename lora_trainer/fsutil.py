"""Atomic file writes: a kill never leaves a half-written file or folder behind.

A full disk is told as such (`DiskFullError`: where, and how much is free), never as a raw
OSError, and what was half-written is removed.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import DiskFullError

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
# What writers that raise no OSError say about a full disk: torch's zip writer (RuntimeError, when a write
# comes up short) and safetensors (SafetensorError wrapping Rust's io::Error: "... (os error 28)").
_FULL_DISK_WORDS = ("unexpected pos", "file write failed", "no space left", "os error 28", "storagefull",
                    "disk quota exceeded", "os error 122")


def free_bytes(path: str | Path) -> int:
    """Free space on the disk holding `path` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in _DISK_FULL
    if not isinstance(error, RuntimeError) and type(error).__name__ != "SafetensorError":
        return False
    text = str(error).lower()
    return any(s in text for s in _FULL_DISK_WORDS)


def disk_full_error(path: str | Path, needed: int | None = None) -> DiskFullError:
    need = f"; about {needed / 2**20:.0f} MB is needed" if needed else ""
    return DiskFullError(f"the disk holding {path} is full ({free_bytes(path) / 2**20:.0f} MB free{need})")


def disk_full_from(error: BaseException, default: str | Path) -> DiskFullError | None:
    """The DiskFullError to raise instead of `error` where it is a full disk (naming the folder written to,
    else `default`), or None where it is something else."""
    if not is_disk_full(error):
        return None
    where = Path(error.filename).parent if isinstance(error, OSError) and error.filename else Path(default)
    return disk_full_error(where)


def ensure_free(path: str | Path, needed: int, what: str) -> None:
    """Refuse before writing `what` (about `needed` bytes) where the disk cannot hold it."""
    free = free_bytes(path)
    if free < needed:
        raise DiskFullError(
            f"the disk holding {path} is too full for {what}: {free / 2**20:.0f} MB free, about {needed / 2**20:.0f} MB needed"
        )


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(e):
            raise disk_full_error(path.parent, len(data)) from None
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(tmp_dir: Path, final_dir: Path) -> Path:
    """Move a fully written `tmp_dir` into place as `final_dir`, replacing any old one.

    The old folder is renamed aside first, so at every instant either the old or the new
    complete folder exists under a name a reader trusts.
    """
    final_dir = Path(final_dir)
    for path in Path(tmp_dir).rglob("*"):  # on disk before the name says "complete", even after a power cut
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    old = final_dir.with_name(f".{final_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)
    return final_dir


def write_dir(final_dir: Path, write, needed: int = 0) -> Path:
    """Write a folder atomically: `write(tmp)` fills a temp folder next to `final_dir`, which then replaces it.

    On any failure the temp folder is removed (a full disk raises DiskFullError naming the disk).
    """
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(f".tmp-{final_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        return replace_dir(tmp, final_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full_error(final_dir.parent, needed) from None
        raise


def remove_partial_dirs(folder: Path) -> list[Path]:
    """Clean up after a writer killed mid-way in `folder`: `.tmp-*` folders are removed; a `.NAME.old` whose
    NAME is missing (killed between replace_dir's two renames) is the only complete copy, so it is put back."""
    if not Path(folder).is_dir():
        return []
    cleaned = []
    for path in sorted(Path(folder).iterdir()):
        if not path.is_dir():
            continue
        if path.name.startswith(".tmp-"):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(".") and path.name.endswith(".old"):
            final = path.with_name(path.name[1:-4])
            if final.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.replace(path, final)
        else:
            continue
        cleaned.append(path)
    return cleaned
