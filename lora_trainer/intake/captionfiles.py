"""The dataset folder as the trainer and the Captions tab see it: images with same-named `.txt` captions.

The one caption reader: the trainer, the pre-flight and the Captions tab all read captions here, so
they cannot disagree. A caption is the `.txt` next to the image, else a kohya-style `.caption` (the
same preference intake applies to a source folder; intake writes `.txt` only), decoded as UTF-8 with a
byte-order mark stripped, as one line. Writing a caption writes the `.txt` and removes a `.caption`,
so the edited text is the one every reader sees.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..fsutil import atomic_write_text
from .images import IMAGE_EXTS
from .sources import CAPTION_EXTS, clean_caption


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
    for ext in CAPTION_EXTS:
        try:
            return clean_caption(Path(image).with_suffix(ext).read_text(encoding="utf-8-sig", errors="replace"))
        except (FileNotFoundError, IsADirectoryError):
            continue
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
    for ext in CAPTION_EXTS:  # an older caption in another format must not come back in its place
        if ext != path.suffix:
            Path(image).with_suffix(ext).unlink(missing_ok=True)
    return path
