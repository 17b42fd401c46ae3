"""The training dataset: read a prepared folder, assign aspect-ratio buckets, plan the batches.

The folder (written by intake, or by hand) holds images with same-named `.txt` captions, read by
intake.captionfiles (the one caption reader); sub-folders named `N_name` (kohya layout) repeat
their images N times per epoch. An image without a caption is captioned with the trigger word alone.

The batch plan is a pure function of (items, seed, epoch): every epoch's order, every flip,
is derived from the seed, so a resumed run sees exactly the batches an uninterrupted run
would, and each process of a data-parallel run takes its own share.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError, TrainingFailed
from .intake.captionfiles import iter_images, read_caption_file
from .intake.sources import MAX_REPEATS, REPEATS_RE


@dataclass
class Item:
    image: Path
    caption: str
    repeats: int
    size: tuple[int, int]  # original (width, height)
    bucket: tuple[int, int] = (0, 0)  # training (width, height)


def _folder_repeats(image: Path, root: Path) -> int:
    repeats = 1
    for part in image.relative_to(root).parts[:-1]:
        match = REPEATS_RE.match(part)
        if match and 1 <= int(match.group(1)) <= MAX_REPEATS:  # "2023_holiday" is a date, not 2023 repeats
            repeats = int(match.group(1))
    return repeats


def scan(folder: str | Path, trigger: str, repeats: int = 1, unreadable: list[str] | None = None) -> list[Item]:
    """Every image under `folder` with its caption and repeat count, in a stable order.

    `repeats` (data.repeats) repeats every image, multiplying a kohya folder's own N_ count: like kohya's
    num_repeats for the dataset, and N_ folders weigh their images against the rest as before. An image that
    cannot be read is left out (named in `unreadable`, when given: intake keeps such files out of uploads, but
    a folder given as data.images may hold one)."""
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist; upload images first or set data.images")
    items = []
    for path in iter_images(root):
        try:
            with Image.open(path) as im:
                size = im.size
                if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientation: rotated 90 degrees
                    size = size[::-1]
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a damaged file
            if unreadable is not None:
                unreadable.append(_why_unreadable(path, e))
            continue
        items.append(Item(path, read_caption_file(path) or trigger, _folder_repeats(path, root) * repeats, size))
    if not items:
        raise DatasetError(f"no usable images in {root}; add .png/.jpg/.webp images (with optional .txt captions)")
    return items


# -- buckets -------------------------------------------------------------------------------------
def bucket_step_for(model_step: int, bucket_step: int) -> int:
    """The bucket step to train with: `bucket_step` (0 = the model's own) made a multiple of `model_step`, the
    pixels per cell of the UNet's deepest level (models.Geometry.bucket_step): other sides would not line up."""
    return max(bucket_step, model_step) // model_step * model_step


def make_buckets(resolution: int, step: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs, sides multiples of `step`, area at most resolution**2, ratio <= max_ratio."""
    area = resolution * resolution
    buckets = set()
    width = step
    while width <= resolution * max_ratio:
        height = (area // width) // step * step
        if height >= step and max(width / height, height / width) <= max_ratio:
            buckets.add((width, height))
        width += step
    buckets.add((resolution // step * step, resolution // step * step))
    return sorted(buckets)


def assign_buckets(items: list[Item], resolution: int, step: int, enabled: bool) -> list[tuple[int, int]]:
    """Give every item the bucket closest to its aspect ratio; return the buckets in use."""
    square = (resolution // step * step,) * 2
    buckets = make_buckets(resolution, step) if enabled else [square]
    for item in items:
        ratio = math.log(item.size[0] / item.size[1])
        item.bucket = min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
    return sorted({item.bucket for item in items})


def crop_box(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Resize-to-cover then centre-crop: returns ((resized_w, resized_h), (crop_left, crop_top))."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    resized = (max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale)))
    return resized, ((resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2)


def load_pixels(item: Item, flip: bool):
    """The image as a (3, H, W) tensor in [-1, 1] at its bucket size, plus SDXL's crop_top_left."""
    import numpy as np
    import torch
    from PIL import Image, ImageOps

    with Image.open(item.image) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        resized, (left, top) = crop_box(im.size, item.bucket)
        im = im.resize(resized, Image.Resampling.BICUBIC).crop((left, top, left + item.bucket[0], top + item.bucket[1]))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left)


def load_pixels_or_fail(item: Item, flip: bool):
    """load_pixels, where an image that cannot be read (deleted, moved or damaged since the scan) is a
    TrainingFailed naming it."""
    try:
        return load_pixels(item, flip)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a damaged file
        raise unreadable_image(_why_unreadable(item.image, e)) from None


def _why_unreadable(image: Path, error: Exception) -> str:
    why = "it was deleted or moved" if isinstance(error, FileNotFoundError) else f"{type(error).__name__}: {str(error)[:200]}"
    return f"{image} ({why})"


def unreadable_image(problem: str) -> TrainingFailed:
    return TrainingFailed(
        f"an image of the dataset can no longer be read: {problem}",
        hint="put the image back (or a readable copy), or remove it with its caption and start again (checkpoints are kept)",
    )


# -- the batch plan ------------------------------------------------------------------------------
Sample = tuple[int, bool]  # (item index, flipped)


def epoch_batches(items: list[Item], batch_size: int, seed: int, epoch: int, flip: bool) -> list[list[Sample]]:
    """One epoch: every item `repeats` times, grouped by bucket, shuffled; deterministic in (seed, epoch)."""
    rng = random.Random(seed * 1_000_003 + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(items):
        by_bucket.setdefault(item.bucket, []).extend([index] * item.repeats)
    batches = []
    for bucket in sorted(by_bucket):
        indices = by_bucket[bucket]
        rng.shuffle(indices)
        for start in range(0, len(indices), batch_size):
            batches.append([(i, flip and rng.random() < 0.5) for i in indices[start : start + batch_size]])
    rng.shuffle(batches)
    return batches


@dataclass
class Plan:
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: float
    micro_batches_per_step: int  # per process


def make_plan(items: list[Item], batch_size: int, accumulation: int, processes: int, steps: int, epochs: int) -> Plan:
    batches = len(epoch_batches(items, batch_size, 0, 0, False))
    per_step = accumulation * processes
    steps_per_epoch = max(1, math.ceil(batches / per_step))
    total = epochs * steps_per_epoch if epochs > 0 else steps
    return Plan(batches, steps_per_epoch, total, round(total / steps_per_epoch, 2), accumulation)


def micro_batches(
    items: list[Item], batch_size: int, seed: int, flip: bool, plan: Plan, *, start_step: int, rank: int, processes: int
) -> Iterator[list[Sample]]:
    """This process's micro-batches from optimizer step `start_step` on, epoch after epoch.

    Global micro-batch g goes to process g % processes; step s uses global micro-batches
    [s * per_step, (s + 1) * per_step).
    """
    g = start_step * plan.micro_batches_per_step * processes
    epoch, offset = divmod(g, plan.batches_per_epoch)
    while True:
        for batch in epoch_batches(items, batch_size, seed, epoch, flip)[offset:]:
            if g % processes == rank:
                yield batch
            g += 1
        epoch, offset = epoch + 1, 0


def process_caption(caption: str, rng: random.Random, *, shuffle: bool, keep_tokens: int, dropout: float) -> str:
    """Caption dropout (empty caption) and tag shuffling that keeps the first `keep_tokens` tags in place."""
    if dropout and rng.random() < dropout:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def batch_source(batches: Iterator[list[Sample]], items: list[Item], latent_cache: dict, num_workers: int):
    """What each micro-batch trains on: (pixels or None, cached latents or None, {"samples", "top_left"}).

    With a latent cache the latents are stacked from it; otherwise a DataLoader (with `num_workers`
    worker processes) loads and crops the images, in the plan's order.
    """
    import torch

    if latent_cache:
        for batch in batches:
            latents = torch.stack([latent_cache[s][0] for s in batch])
            yield None, latents, {"samples": batch, "top_left": [latent_cache[s][1] for s in batch]}
        return
    loader = torch.utils.data.DataLoader(
        _PixelDataset(items), batch_sampler=batches, num_workers=num_workers, collate_fn=_collate_pixels
    )
    for pixels, batch, crops, problem in loader:
        if problem:
            raise unreadable_image(problem)
        yield pixels, None, {"samples": batch, "top_left": crops}


class _PixelDataset:
    """Loads the plan's images; a file that cannot be read comes back as a message (also from a worker
    process, where an exception would reach the trainer as a traceback)."""

    def __init__(self, items):
        self.items = items

    def __getitem__(self, sample):
        index, flip = sample
        try:
            pixels, crop = load_pixels(self.items[index], flip)
        except Exception as e:  # noqa: BLE001 - deleted, moved or damaged since the run started
            return None, sample, None, _why_unreadable(self.items[index].image, e)
        return pixels, sample, crop, None

    def __len__(self):
        return len(self.items)


def _collate_pixels(rows):
    import torch

    problems = [r[3] for r in rows if r[3]]
    if problems:
        return None, [r[1] for r in rows], None, problems[0]
    return torch.stack([r[0] for r in rows]), [r[1] for r in rows], [r[2] for r in rows], None
