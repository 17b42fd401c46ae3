"""Intake: turn whatever the user brings into a clean dataset folder the trainer can read.

Sources: loose image files, zips (nested folders allowed), folders (recursively) with same-named
`.txt` / `.caption` captions, Hugging Face ImageFolder folders (`metadata.jsonl` / `metadata.csv`
with `file_name` and `text`), kohya folders (`N_name` sub-folders repeat N times) and kohya
`dataset.toml` files (whose settings come back as `report.config_overrides`; a dataset.toml inside
a zip or folder contributes its settings only, its folder names give the repeats). A dataset.toml's
`is_reg` subsets (regularization images, for prior preservation) go into `reg_dest` the same way,
reported in `report.reg`.

The dataset folder (`dest`), the contract with the trainer's dataset reader:
  - `<stem>.png`, or `<stem>.jpg` (quality 95, no chroma subsampling) when the source was a
    JPEG: a lossless PNG of a phone photo is 5-10x larger and no better. Images larger than
    `IntakeLimits.max_side` are downscaled to fit. EXIF/GPS metadata is not copied.
  - `<stem>.txt` next to it: the caption, one line of UTF-8; no file when there is none.
  - Images with kohya repeats go into `dest/N_<name>/` (N >= 1), all others into `dest/`.
  - Stems are unique across `dest` (case-insensitively): `x.png` arrives as `x-2.png` when an
    `x` exists, with its caption renamed alike. Ingesting into a non-empty `dest` adds to it.

Duplicates are judged by pixel content after normalisation (the same picture re-saved, renamed
or with other metadata is a duplicate; a re-encoded, resized copy is not), also against images
already in `dest`: their pixel hash is stored in the files intake writes. A caption file wins over
a metadata.jsonl caption for the same image. Images are processed one at a time, so memory stays
flat however many there are. Sources are never modified.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

from ..errors import DatasetError, DiskFullError
from ..fsutil import atomic_write_bytes, atomic_write_text
from .captionfiles import (
    CaptionEntry,
    caption_path,
    iter_images,
    read_caption_file,
    scan_captions,
    write_caption,
)
from .images import IMAGE_EXTS, Rejected, encode, open_normalised, pixel_hash, stored_hash
from .kohya import read_dataset_toml, toml_settings
from .report import SKIP_KINDS, IntakeLimits, IntakeReport, IntakeWarning, Skipped
from .sources import (
    ImageJob,
    SourceFile,
    clean_caption,
    loose_files,
    open_zip,
    plan,
    read_caption,
    safe_name,
    walk_folder,
    walk_zip,
)

__all__ = [
    "IMAGE_EXTS", "SKIP_KINDS", "CaptionEntry", "IntakeLimits", "IntakeReport", "IntakeWarning", "Skipped",
    "caption_path", "ingest", "iter_images", "read_caption_file", "scan_captions", "write_caption",
]

ASPECT_WARNING = 4.0  # wider or taller than 4:1 trains poorly in buckets
MAX_TOML_BYTES = 2**20


def ingest(
    sources: Sequence[str | Path],
    dest: str | Path,
    *,
    resolution: int = 512,
    min_side: int | None = None,
    limits: IntakeLimits | None = None,
    progress: Callable[[int, int], None] | None = None,
    trust_toml_paths: bool = False,
    reg_dest: str | Path | None = None,
    kind: str = "dataset",
) -> IntakeReport:
    """Copy the usable images (normalised) and captions of `sources` into the dataset folder `dest`.

    Every unusable file is skipped with a reason in the report, never raised. Images smaller than
    `resolution` are kept with a warning; below `min_side` refused. Its default is half the training
    resolution, at most `limits.min_side`: an image upscaled more than twice is mostly blur, while a
    32 px base (the toy world's) must still take its own 32 px images.
    Raises DatasetError (with `.report`) only when the dataset ends up with no image at all.

    A dataset.toml may only name image folders inside its own folder unless `trust_toml_paths`
    (for the command line on the user's own machine; never for uploads, which must not read the
    server's other files). Its `is_reg` subsets are taken into `reg_dest` (with their own report,
    `report.reg`), or left out with a warning where there is none. `kind` = "reg" reports the images
    as regularization images.
    """
    if isinstance(sources, str | Path):  # one path, not a sequence of characters
        sources = [sources]
    limits = limits or IntakeLimits()
    floor = min_side if min_side is not None else max(1, min(limits.min_side, resolution // 2))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    report = IntakeReport(dest=dest, kind=kind)
    if reg_dest is not None:
        report.reg = IntakeReport(dest=Path(reg_dest), kind="reg")
    with ExitStack() as open_zips:
        jobs, reg_jobs = _discover([Path(s) for s in sources], dest, limits, report, open_zips, trust_toml_paths)
        target = _Destination(dest)
        work = [(job, report, target) for job in jobs]
        if reg_jobs:
            report.reg.dest.mkdir(parents=True, exist_ok=True)
            reg_target = _Destination(report.reg.dest)
            work += [(job, report.reg, reg_target) for job in reg_jobs]
        total = len(work)
        if progress:
            progress(0, total)
        for done, (job, into, target) in enumerate(work, 1):
            try:
                _ingest_one(job, target, into, resolution=resolution, floor=floor, limits=limits)
            except DiskFullError as e:
                raise _disk_filled(e, len(report.images) + len(report.reg.images if report.reg else []), total) from None
            if progress:
                progress(done, total)

    _count_dest(report)
    if report.reg is not None and report.reg.dest.is_dir():
        _count_dest(report.reg)
    if not report.dest_counts:
        raise _nothing_usable(report, floor)
    return report


def _discover(sources: list[Path], dest: Path, limits: IntakeLimits, report: IntakeReport, stack: ExitStack,
              trust_toml_paths: bool) -> tuple[list[ImageJob], list[ImageJob]]:
    """(the training images' jobs, the regularization images' jobs)."""
    jobs: list[ImageJob] = []
    reg_jobs: list[ImageJob] = []
    loose: list[Path] = []
    dest_resolved = dest.resolve()
    for src in sources:
        label = src.name or str(src)
        if not src.exists():
            report.skip(str(src), "does not exist", "not-found")
        elif src.is_dir():
            files = _take_tomls(walk_folder(src, label, report, exclude=dest_resolved), report)
            jobs += plan(files, report, root_name=src.resolve().name)
        elif src.suffix.lower() == ".toml":
            subsets, overrides = read_dataset_toml(src, label, report, trust_toml_paths)
            report.config_overrides.update(overrides)
            for sub in subsets:
                into = report
                if sub.is_reg and report.reg is None:
                    report.warn(sub.label, "regularization images (is_reg) are taken in by the command line only "
                                "(into RUN/reg, for prior preservation); subset ignored")
                    continue
                if sub.is_reg:
                    into = report.reg
                    if sub.class_tokens and "data.reg_caption" not in report.config_overrides:
                        report.config_overrides["data.reg_caption"] = sub.class_tokens
                files = walk_folder(sub.image_dir, sub.label, into, exclude=dest_resolved)
                root_name = None if sub.group else sub.image_dir.resolve().name
                found = plan(files, into, root_name=root_name, forced_group=sub.group, caption_ext=sub.caption_extension)
                (reg_jobs if sub.is_reg else jobs).extend(found)
        elif src.suffix.lower() == ".zip":
            zf = open_zip(src, label, limits, report)
            if zf is not None:
                stack.enter_context(zf)
                jobs += plan(_take_tomls(walk_zip(zf, label, limits, report), report), report)
        elif src.name.startswith(".") or src.name.lower() in ("thumbs.db", "desktop.ini"):
            report.skip(label, "hidden or system file", "hidden")
        else:
            loose.append(src)
    if loose:
        jobs += plan(loose_files(loose), report)
    return jobs, reg_jobs


def _count_dest(report: IntakeReport) -> None:
    for image in iter_images(report.dest):
        rel = image.relative_to(report.dest).parts
        folder = rel[0] if len(rel) > 1 else ""
        report.dest_counts[folder] = report.dest_counts.get(folder, 0) + 1


def _take_tomls(files: list[SourceFile], report: IntakeReport) -> list[SourceFile]:
    """Apply the settings of any kohya .toml in an upload; the other files go on to pairing."""
    rest = []
    for f in files:
        if not f.rel.lower().endswith(".toml"):
            rest.append(f)
            continue
        try:
            with f.open() as fp:
                text = fp.read(MAX_TOML_BYTES + 1).decode("utf-8")
        except (Rejected, UnicodeDecodeError) as e:
            report.skip(f.label, f"not a readable TOML file ({e})", "bad-metadata")
            continue
        report.config_overrides.update(toml_settings(text, f.label, report))
    return rest


def _ingest_one(job: ImageJob, target: _Destination, report: IntakeReport, *, resolution: int, floor: int,
                limits: IntakeLimits) -> None:
    f = job.file
    if f.size == 0:
        report.skip(f.label, "empty file (0 bytes): the upload or copy failed", "empty-file")
        return
    if f.size > limits.max_file_bytes:
        report.skip(f.label, f"{f.size / 2**20:.0f} MiB, over the {limits.max_file_bytes / 2**20:.0f} MiB limit", "too-large")
        return
    try:
        with f.open() as fp:
            image = open_normalised(fp, min_side=floor, max_pixels=limits.max_pixels)
    except Rejected as r:
        report.skip(f.label, r.reason, r.kind)
        return
    duplicate_of = target.hashes.get(image.sha256)
    if duplicate_of is not None:
        report.skip(f.label, f"same pixels as {duplicate_of}", "duplicate")
        return

    caption = None
    if job.caption_file is not None:
        try:
            caption = read_caption(job.caption_file, limits.max_caption_bytes)
        except Rejected as r:
            report.skip(job.caption_file.label, r.reason, r.kind)
        if caption == "":
            report.warn(job.caption_file.label, "empty caption; the image trains with the trigger word alone")
            caption = None
    elif job.caption_text is not None:
        caption = clean_caption(job.caption_text) or None

    w, h = image.image.size
    if min(w, h) < resolution:
        report.warn(f.label, f"{w}x{h} px is below the training resolution {resolution}; it will be upscaled and look soft")
    if max(w, h) / min(w, h) > ASPECT_WARNING:
        report.warn(f.label, f"{w}x{h} px is a very long strip; most of it will be cropped away")
    for note in image.notes:
        report.warn(f.label, note)
    data, ext, downscaled = encode(image, limits.max_side)
    if downscaled:
        report.warn(f.label, f"{w}x{h} px downscaled to fit {limits.max_side} px")
    stem = Path(f.rel).stem
    report.images.append(target.write(stem, ext, data, caption, job.group, image.sha256, f.label))
    report.captions_found += caption is not None


class _Destination:
    """The dataset folder being added to: the stems and pixel hashes it already holds."""

    def __init__(self, root: Path):
        self.root = root
        self.stems: set[str] = set()
        self.hashes: dict[str, str] = {}
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                self.stems.add(path.stem.casefold())  # captions too: an orphan caption still claims its stem
        for image in iter_images(root):
            digest = stored_hash(str(image)) or _hash_file(image)
            if digest:
                self.hashes.setdefault(digest, f"{image.relative_to(root).as_posix()}, already in the dataset")

    def write(self, stem_hint: str, ext: str, data: bytes, caption: str | None, group: str | None, digest: str,
              source: str) -> Path:
        stem = base = safe_name(stem_hint, "image")
        n = 2
        while stem.casefold() in self.stems:
            stem, n = f"{base}-{n}", n + 1
        self.stems.add(stem.casefold())
        folder = self.root / group if group else self.root
        image = folder / f"{stem}{ext}"
        if caption:  # caption first: a kill in between leaves a harmless orphan caption, not a mis-captioned image
            atomic_write_text(caption_path(image), caption)
        try:
            atomic_write_bytes(image, data)
        except BaseException:
            caption_path(image).unlink(missing_ok=True)  # no orphan to claim the stem when the same file comes again
            raise
        self.hashes[digest] = source
        return image


def _hash_file(image: Path) -> str | None:
    """Pixel hash of an image intake did not write (placed by hand): decode it the way intake would."""
    try:
        return pixel_hash(open_normalised(str(image), min_side=1, max_pixels=IntakeLimits().max_pixels).image)
    except Rejected:
        return None


def _disk_filled(error: DiskFullError, added: int, total: int) -> DiskFullError:
    return DiskFullError(
        f"{error}: {added} of {total} images were added before it filled",
        hint="free space on that disk, then add the same files again: the images already added are skipped as duplicates",
    )


def _nothing_usable(report: IntakeReport, floor: int) -> DatasetError:
    groups = report.skipped_by_kind()
    why = "; ".join(f"{len(items)} {SKIP_KINDS.get(kind, kind)}" for kind, items in groups.items()) or "no files found"
    return DatasetError(
        f"No usable images ({why}). Upload PNG, JPEG or WebP images at least {floor} px on the shorter side: "
        "loose files, a zip, or a folder with optional same-named .txt captions.",
        report=report,
    )
