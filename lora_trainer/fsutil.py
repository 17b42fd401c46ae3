"""Atomic file writes: a kill never leaves a half-written file or folder behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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
