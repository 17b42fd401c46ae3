"""The dataset folder as the trainer and the Captions tab see it: images with same-named `.txt` captions."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import atomic_write_text
from .images import IMAGE_EXTS
from .sources import clean_caption


@dataclass(frozen=True)
class CaptionEntry:
    image: Path
    caption: str  # "" when the image has no caption file (it trains with the trigger word alone)


def iter_images(folder: str | Path) -> Iterator[Path]:
    """Images under `folder`, recursively, in a stable order; hidden files and folders are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).parts
        if path.suffix.lower() in IMAGE_EXTS and not any(p.startswith(".") for p in rel) and path.is_file():
            yield path


def caption_path(image: Path) -> Path:
    return Path(image).with_suffix(".txt")


def read_caption_file(image: Path) -> str:
    """The caption of a dataset image, or "" when it has none (undecodable bytes are replaced, not fatal)."""
    try:
        return clean_caption(caption_path(image).read_text(encoding="utf-8-sig", errors="replace"))
    except FileNotFoundError:
        return ""


def scan_captions(dest: str | Path) -> list[CaptionEntry]:
    """Every image in the dataset folder with its caption."""
    return [CaptionEntry(image, read_caption_file(image)) for image in iter_images(dest)]


def write_caption(image: Path, text: str) -> Path:
    """Write an image's caption atomically (one line, UTF-8); an empty text removes the caption file."""
    path = caption_path(image)
    text = clean_caption(text)
    if text:
        atomic_write_text(path, text)
    else:
        path.unlink(missing_ok=True)
    return path
