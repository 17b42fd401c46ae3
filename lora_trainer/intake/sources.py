"""Find the images and captions in a source (folder, zip, loose files) and pair them up.

Walking a source yields `SourceFile`s (a path inside the source, a label for the report, a way to
read it); `plan` then pairs each image with its caption and its kohya repeats and reports every
file it cannot use. Nothing here decodes images; `ingest` does that one image at a time.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import stat
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .images import IMAGE_EXTS, UNSUPPORTED_IMAGE_EXTS, Rejected
from .report import IntakeLimits, IntakeReport

CAPTION_EXTS = (".txt", ".caption")  # in order of preference when an image has both
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")  # Hugging Face ImageFolder captions
ARCHIVE_EXTS = {".zip", ".7z", ".rar", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".zst"}
SYSTEM_FILES = {"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"}
REPEATS_RE = re.compile(r"^(\d+)_(.+)$")  # kohya: a folder "10_ohwx woman" repeats its images 10 times
MAX_REPEATS = 1000  # "2023_holiday" is a date, not 2023 repeats
MAX_METADATA_BYTES = 64 * 2**20


@dataclass
class SourceFile:
    rel: str  # posix path inside its source root
    label: str  # how the report names it
    size: int
    open: Callable[[], BinaryIO]  # raises Rejected when the bytes cannot be read


@dataclass
class ImageJob:
    file: SourceFile
    caption_file: SourceFile | None = None
    caption_text: str | None = None  # from metadata.jsonl, used when there is no caption file
    group: str | None = None  # output sub-folder "N_name" (kohya repeats); None = top level


def is_hidden(rel: str) -> bool:
    parts = rel.split("/")
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1].lower() in SYSTEM_FILES


# -- walking sources ----------------------------------------------------------------------------
def walk_folder(root: Path, label: str, report: IntakeReport, exclude: Path | None = None) -> list[SourceFile]:
    """Every regular file under `root`, hidden ones reported.

    Symlinked files are read (a local dataset may be built of links); symlinked folders are not
    followed, since they can loop.
    """
    files: list[SourceFile] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rel_dir = here.relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        for d in sorted(dirnames):
            full = here / d
            rel = posixpath.join(rel_dir, d)
            if exclude is not None and full.resolve() == exclude:
                dirnames.remove(d)  # the destination inside a source folder: never read our own output
            elif is_hidden(rel):
                dirnames.remove(d)
                report.skip(f"{label}/{rel}/", "hidden or system folder", "hidden")
            elif full.is_symlink():
                report.skip(f"{label}/{rel}/", "symbolic link to a folder (not followed)", "symlink")
        dirnames.sort()
        for name in sorted(filenames):
            full = here / name
            rel = posixpath.join(rel_dir, name)
            if is_hidden(rel):
                report.skip(f"{label}/{rel}", "hidden or system file", "hidden")
                continue
            try:
                st = full.stat()
            except OSError:
                report.skip(f"{label}/{rel}", "broken symbolic link", "symlink")
                continue
            if not stat.S_ISREG(st.st_mode):
                report.skip(f"{label}/{rel}", "not a regular file", "not-image")
                continue
            files.append(SourceFile(rel, f"{label}/{rel}", st.st_size, _file_opener(full)))
    return files


def loose_files(paths: list[Path]) -> list[SourceFile]:
    """Files given one by one (a browser upload puts each in its own temp folder): paired by name."""
    return [SourceFile(p.name, p.name, p.stat().st_size, _file_opener(p)) for p in paths]


def _file_opener(path: Path) -> Callable[[], BinaryIO]:
    def open_file() -> BinaryIO:
        try:
            return open(path, "rb")
        except OSError as e:
            raise Rejected("not-found", f"cannot be read: {e.strerror}") from None

    return open_file


def open_zip(path: Path, label: str, limits: IntakeLimits, report: IntakeReport) -> zipfile.ZipFile | None:
    """The opened zip, or None (reported) when it is damaged or over the zip-bomb limits."""
    try:
        zf = zipfile.ZipFile(path)
        members = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        report.skip(label, f"not a readable zip ({e}); re-create the zip and upload it again", "zip-corrupt")
        return None
    if len(members) > limits.max_zip_members:
        zf.close()
        report.skip(label, f"{len(members)} members, over the limit of {limits.max_zip_members}; split the zip", "zip-bomb")
        return None
    total = sum(m.file_size for m in members)
    if total > limits.max_zip_total_bytes:
        zf.close()
        report.skip(
            label, f"unpacks to {total / 2**30:.1f} GiB, over the limit of {limits.max_zip_total_bytes / 2**30:.1f} GiB",
            "zip-bomb",
        )
        return None
    return zf


def walk_zip(zf: zipfile.ZipFile, label: str, limits: IntakeLimits, report: IntakeReport) -> list[SourceFile]:
    """The safe members of an open zip; unsafe ones are reported. Members are never extracted to disk."""
    files: list[SourceFile] = []
    for info in zf.infolist():
        if info.is_dir():
            continue
        name = info.filename.replace("\\", "/")  # some Windows tools write backslashes
        where = f"{label}:{name}"
        parts = name.split("/")
        if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in parts:
            report.skip(where, "path escapes the zip (absolute or '..'); member ignored", "zip-unsafe-path")
        elif stat.S_ISLNK(info.external_attr >> 16):
            report.skip(where, "symbolic link inside the zip; member ignored", "zip-symlink")
        elif is_hidden(name):
            report.skip(where, "hidden or system file", "hidden")
        elif info.flag_bits & 0x1:
            report.skip(where, "password-protected; re-create the zip without a password", "zip-encrypted")
        elif (info.file_size > limits.zip_ratio_min_bytes
              and info.file_size > limits.max_zip_ratio * max(info.compress_size, 1)):
            ratio = info.file_size / max(info.compress_size, 1)
            report.skip(where, f"compression ratio {ratio:.0f}:1 is over the limit of {limits.max_zip_ratio:.0f}:1", "zip-bomb")
        else:
            rel = posixpath.normpath(name)
            files.append(SourceFile(rel, where, info.file_size, _member_opener(zf, info, limits)))
    return files


def _member_opener(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: IntakeLimits) -> Callable[[], BinaryIO]:
    def open_member() -> BinaryIO:
        try:
            with zf.open(info) as f:
                # zipfile stops at the declared size, so a lying header cannot make this grow
                return io.BytesIO(f.read(limits.max_file_bytes + 1))
        except NotImplementedError as e:
            raise Rejected("zip-corrupt", f"unsupported zip compression ({e}); re-create the zip with deflate") from None
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, ValueError) as e:
            raise Rejected("zip-corrupt", f"damaged zip member ({e})") from None

    return open_member


# -- pairing ------------------------------------------------------------------------------------
def plan(
    files: list[SourceFile],
    report: IntakeReport,
    *,
    root_name: str | None = None,
    forced_group: str | None = None,
    caption_ext: str | None = None,
) -> list[ImageJob]:
    """Pair images with captions (same folder, same name) and repeats; report what cannot be used.

    `root_name` is the source folder's own name (it may itself be a kohya `N_name` folder);
    `forced_group` puts every image in one `N_name` group (a dataset.toml subset);
    `caption_ext` is a dataset.toml caption extension, preferred over .txt / .caption.
    """
    caption_exts = tuple(dict.fromkeys(([caption_ext.lower()] if caption_ext else []) + list(CAPTION_EXTS)))
    images: dict[tuple[str, str], list[SourceFile]] = defaultdict(list)
    captions: dict[tuple[str, str], list[SourceFile]] = defaultdict(list)
    metadata: list[SourceFile] = []
    for f in files:
        folder, name = posixpath.split(f.rel)
        stem, ext = posixpath.splitext(name)
        ext = ext.lower()
        if name.lower() in METADATA_NAMES:
            metadata.append(f)
        elif ext in caption_exts:
            captions[(folder, stem)].append(f)
        elif ext in IMAGE_EXTS:
            images[(folder, stem)].append(f)
        elif ext in UNSUPPORTED_IMAGE_EXTS:
            report.skip(f.label, f"{ext} images cannot be read here; export it as PNG or JPEG", "unsupported-format")
        elif ext in ARCHIVE_EXTS:
            report.skip(f.label, "an archive inside a folder or zip; upload it on its own", "zip-nested")
        else:
            report.skip(f.label, f"not an image ({ext or 'no extension'})", "not-image")

    meta_captions = _read_metadata(metadata, {f.rel for group in images.values() for f in group}, report)
    jobs: list[ImageJob] = []
    for key, group in images.items():
        found = sorted(captions.pop(key, []), key=lambda c: caption_exts.index(posixpath.splitext(c.rel)[1].lower()))
        caption = found[0] if found else None
        for extra in found[1:]:
            report.skip(extra.label, f"{posixpath.basename(caption.rel)} is used as the caption instead", "extra-caption")
        if caption is not None and len(group) > 1:
            names = ", ".join(posixpath.basename(f.rel) for f in group)
            report.skip(caption.label, f"could belong to any of {names}; rename them so each image has its own caption",
                        "ambiguous-caption")
            caption = None
        for f in group:
            jobs.append(ImageJob(f, caption, meta_captions.get(f.rel), forced_group or _group_for(f.rel, root_name)))
    for group in captions.values():
        for c in group:
            report.skip(c.label, "no image with the same name next to it", "orphan-caption")
    return jobs


def _group_for(rel: str, root_name: str | None) -> str | None:
    """The nearest enclosing kohya `N_name` folder as an output folder name, or None."""
    folders = ([root_name] if root_name else []) + rel.split("/")[:-1]
    for folder in reversed(folders):
        m = REPEATS_RE.match(folder)
        if m and 1 <= int(m[1]) <= MAX_REPEATS:
            return repeats_folder(int(m[1]), m[2])
    return None


def repeats_folder(repeats: int, name: str) -> str:
    return f"{repeats}_{safe_name(name, 'images')}"


def safe_name(name: str, fallback: str) -> str:
    """A file/folder name that is safe everywhere: letters (any script), digits, '-', '_', '.'."""
    name = re.sub(r"[^\w.\-]+", "_", name.strip()).strip("._")[:80]
    return name or fallback


def _read_metadata(files: list[SourceFile], image_rels: set[str], report: IntakeReport) -> dict[str, str]:
    """`metadata.jsonl` / `.csv` captions keyed by image path; `file_name` is relative to the metadata file."""
    captions: dict[str, str] = {}
    for f in files:
        folder = posixpath.dirname(f.rel)
        try:
            with f.open() as fp:
                raw = fp.read(MAX_METADATA_BYTES + 1)
            if len(raw) > MAX_METADATA_BYTES:
                raise Rejected("bad-metadata", f"larger than {MAX_METADATA_BYTES // 2**20} MiB")
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            report.skip(f.label, "not UTF-8 text; re-save it as UTF-8", "bad-metadata")
            continue
        except Rejected as r:
            report.skip(f.label, r.reason, r.kind)
            continue
        rows = _metadata_rows(f, text, report)
        for line, row in rows:
            file_name, caption = row.get("file_name"), row.get("text", row.get("caption"))
            where = f"{f.label} line {line}"
            if not isinstance(file_name, str) or not isinstance(caption, str):
                report.skip(where, "needs a 'file_name' and a 'text' string", "bad-metadata")
                continue
            rel = posixpath.normpath(posixpath.join(folder, file_name.replace("\\", "/")))
            if rel not in image_rels:
                report.skip(f"{where} ({file_name})", "caption for an image that is not in the upload", "orphan-caption")
                continue
            captions[rel] = caption
    return captions


def _metadata_rows(f: SourceFile, text: str, report: IntakeReport) -> list[tuple[int, dict]]:
    if f.rel.lower().endswith(".csv"):
        return [(i + 2, row) for i, row in enumerate(csv.DictReader(io.StringIO(text)))]
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            report.skip(f"{f.label} line {i}", f"not valid JSON ({e.msg})", "bad-metadata")
            continue
        if isinstance(row, dict):
            rows.append((i, row))
        else:
            report.skip(f"{f.label} line {i}", "not a JSON object", "bad-metadata")
    return rows


def read_caption(f: SourceFile, max_bytes: int) -> str:
    """A caption file's text, cleaned; raises Rejected for non-UTF-8 or oversized files."""
    if f.size > max_bytes:
        raise Rejected("caption-too-large", f"{f.size} bytes; a caption is at most {max_bytes} bytes")
    with f.open() as fp:
        raw = fp.read(max_bytes + 1)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Rejected("caption-not-utf8", "not UTF-8 text; re-save it as UTF-8 (the image is kept without it)") from None
    if "\x00" in text:
        raise Rejected("caption-not-utf8", "binary data, not text (the image is kept without it)")
    return clean_caption(text)


def clean_caption(text: str) -> str:
    """One line: kohya and the trainer read a caption as a single line of text."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    return ", ".join(line for line in lines if line)
