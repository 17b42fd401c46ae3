"""What intake tells the user: limits it enforces, files it left out and why, warnings, a summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Why a file was left out. Each kind has a heading for the grouped report; `Skipped.reason`
# carries the specific detail (sizes, limits, the other file's name).
SKIP_KINDS: dict[str, str] = {
    "not-found": "missing or unreadable files and folders",
    "not-image": "not an image",
    "unsupported-format": "image formats that cannot be used (convert them to PNG or JPEG)",
    "empty-file": "empty files (0 bytes)",
    "corrupt-image": "damaged images",
    "truncated-image": "truncated images (the upload or copy was cut short)",
    "decompression-bomb": "images with too many pixels",
    "too-small": "images that are too small",
    "too-large": "files that are too large",
    "duplicate": "duplicates of another image",
    "orphan-caption": "captions without an image",
    "caption-not-utf8": "captions that are not UTF-8 text",
    "caption-too-large": "caption files that are too large",
    "ambiguous-caption": "captions shared by several images with the same name",
    "extra-caption": "second caption files for one image",
    "hidden": "hidden and system files",
    "symlink": "symbolic links (not followed)",
    "zip-corrupt": "damaged zip files or members",
    "zip-unsafe-path": "zip members with unsafe paths",
    "zip-symlink": "symbolic links inside zips",
    "zip-encrypted": "password-protected zip members",
    "zip-bomb": "zips over the size, count or compression-ratio limits",
    "zip-nested": "archives inside archives",
    "bad-metadata": "unreadable metadata.jsonl / dataset.toml entries",
}


@dataclass(frozen=True)
class IntakeLimits:
    """Safety limits on what intake accepts; the defaults suit a real dataset with room to spare."""

    min_side: int = 64  # refuse images whose shorter side is below this (pixels); less for small bases (ingest)
    max_pixels: int = 100_000_000  # width x height above this is a decompression bomb, refused before decoding
    max_file_bytes: int = 200 * 2**20  # one image file
    max_caption_bytes: int = 64 * 2**10  # one caption file
    max_side: int = 4096  # longer output side; larger images are downscaled (the trainer works far below this)
    max_zip_members: int = 20_000
    max_zip_total_bytes: int = 8 * 2**30  # sum of the declared uncompressed sizes of a zip's members
    max_zip_ratio: float = 200.0  # uncompressed / compressed size of one member ...
    zip_ratio_min_bytes: int = 2**20  # ... checked for members larger than this (small files compress freely)


@dataclass(frozen=True)
class Skipped:
    """One input left out: `source` names it (a path, or `archive.zip:member`), `reason` says why."""

    source: str
    reason: str
    kind: str = "not-image"  # a key of SKIP_KINDS, for grouping and for tests


@dataclass(frozen=True)
class IntakeWarning:
    """Something usable but worth knowing (upscaled later, animated, renamed, a setting ignored)."""

    source: str
    message: str


@dataclass
class IntakeReport:
    images: list[Path] = field(default_factory=list)  # images written to dest by this call
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[IntakeWarning] = field(default_factory=list)
    captions_found: int = 0  # images written with a caption
    config_overrides: dict[str, Any] = field(default_factory=dict)  # from a kohya dataset.toml
    dest: Path | None = None
    dest_counts: dict[str, int] = field(default_factory=dict)  # images in dest per folder ("" = top level)
    kind: str = "dataset"  # or "reg": regularization images (prior preservation)
    reg: IntakeReport | None = None  # a dataset.toml's is_reg subsets, taken into their own folder

    def skip(self, source: str, reason: str, kind: str) -> None:
        self.skipped.append(Skipped(source, reason, kind))

    def warn(self, source: str, message: str) -> None:
        self.warnings.append(IntakeWarning(source, message))

    def skipped_by_kind(self) -> dict[str, list[Skipped]]:
        groups: dict[str, list[Skipped]] = {}
        for s in self.skipped:
            groups.setdefault(s.kind, []).append(s)
        return groups

    def format(self, max_listed: int = 10) -> str:
        """A plain-text report: what will train, and why each other file was left out, by reason."""
        what = "regularization image" if self.kind == "reg" else "image"
        lines = [f"{_plural(len(self.images), what)} added ({self.captions_found} with captions)."]
        if self.dest_counts:
            total = sum(self.dest_counts.values())
            parts = [f"{n} x{_repeats(folder)} in {folder or 'the top folder'}" for folder, n in sorted(self.dest_counts.items())]
            holder = f"The regularization set ({self.dest})" if self.kind == "reg" else "The dataset"
            lines.append(f"{holder} now holds {_plural(total, what)} that will train: {'; '.join(parts)}.")
        if self.skipped:
            lines.append(f"Left out {_plural(len(self.skipped), 'file')}:")
            for kind, items in self.skipped_by_kind().items():
                lines.append(f"  {SKIP_KINDS.get(kind, kind)} ({len(items)}):")
                lines += [f"    - {s.source}: {s.reason}" for s in items[:max_listed]]
                if len(items) > max_listed:
                    lines.append(f"    ... and {len(items) - max_listed} more")
        if self.warnings:
            lines.append(f"{_plural(len(self.warnings), 'warning')}:")
            lines += [f"  - {w.source}: {w.message}" for w in self.warnings[:max_listed * 3]]
            if len(self.warnings) > max_listed * 3:
                lines.append(f"  ... and {len(self.warnings) - max_listed * 3} more")
        if self.config_overrides:
            lines.append("Settings taken from dataset.toml: "
                         + ", ".join(f"{k} = {v!r}" for k, v in self.config_overrides.items()))
        if self.reg is not None and (self.reg.images or self.reg.skipped or self.reg.warnings):
            lines.append("Regularization images (is_reg subsets, for prior preservation):")
            lines += ["  " + line for line in self.reg.format(max_listed).splitlines()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": [str(p) for p in self.images],
            "skipped": [{"source": s.source, "reason": s.reason, "kind": s.kind} for s in self.skipped],
            "warnings": [{"source": w.source, "message": w.message} for w in self.warnings],
            "captions_found": self.captions_found,
            "config_overrides": dict(self.config_overrides),
            "dest": str(self.dest) if self.dest else None,
            "dest_counts": dict(self.dest_counts),
            "kind": self.kind,
            "reg": self.reg.to_dict() if self.reg is not None else None,
        }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _repeats(folder: str) -> int:
    head = folder.split("_", 1)[0]
    return int(head) if "_" in folder and head.isdigit() else 1
