"""Prior preservation with regularization images (DreamBooth's class images, kohya's reg subsets).

Every micro-batch of training images is joined by an equal-size batch of regularization images:
images of the class the LoRA should not forget, captioned with the class prompt. Both go through
the UNet in one call (concatenated, as diffusers' DreamBooth does), and the loss is the training
images' loss plus `optim.prior_loss_weight` times the regularization images' (loss.py).

A regularization image is cropped to the bucket of the batch it joins (resize to cover, centre crop:
the training images' path), so the two halves share one latent shape. Which images join which batch
is a pure function of the batch's global number: an endless stream of seeded shuffles of the
regularization set (each image its folder's N_ repeats times) from which global micro-batch g takes
positions [g * batch_size, g * batch_size + its size). So the set repeats as often as the training
images need (kohya repeats it to match them), each process of a data-parallel run takes the images
of its own batches, and a run resumed at step k draws what the uninterrupted run would, with no
sampler state to save.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import dataset as ds
from .config import ConfigError

REG_FOLDER = "reg"  # where the CLI takes regularization images in, inside the run folder

RegSample = tuple[int, bool, tuple[int, int]]  # (regularization image index, flipped, the bucket it is cropped to)


def scan_reg(folder: Path, caption: str) -> list[ds.Item]:
    """The regularization images under `folder`, captioned by their .txt or `caption` (data.reg_caption)."""
    if not folder.is_dir():
        raise ConfigError(f"data.reg_images: {folder} is not a folder; give a folder of regularization images "
                          "(the CLI's --reg-images copies a folder or zip into RUN/reg), or leave it empty")
    items = ds.scan(folder, caption.strip())
    uncaptioned = [i.image.name for i in items if not i.caption]
    if uncaptioned:
        raise ConfigError(
            f"{len(uncaptioned)} regularization image(s) have no caption (e.g. {uncaptioned[0]}) and data.reg_caption "
            "is empty: set data.reg_caption to the class prompt (e.g. 'a painting') or give them .txt captions"
        )
    return items


def global_batch(step: int, micro: int, accumulation: int, rank: int, processes: int) -> int:
    """The global number of a process's micro-batch (dataset.micro_batches: global batch g goes to process
    g % processes, step s takes [s * per_step, (s + 1) * per_step))."""
    return (step * accumulation + micro) * processes + rank


class RegStream:
    """Which regularization images join each micro-batch."""

    def __init__(self, items: list[ds.Item], seed: int, flip: bool, batch_size: int):
        self.items, self.seed, self.flip, self.batch_size = items, seed, flip, batch_size
        self.per_epoch = sum(item.repeats for item in items)
        self._epoch: tuple[int, list[tuple[int, bool]]] | None = None

    def _pass(self, epoch: int) -> list[tuple[int, bool]]:
        """One pass over the set, each image its repeats times, shuffled; deterministic in (seed, epoch)."""
        if self._epoch is None or self._epoch[0] != epoch:
            rng = random.Random(f"reg:{self.seed}:{epoch}")  # its own stream: the training batches' draws don't move
            indices = [i for i, item in enumerate(self.items) for _ in range(item.repeats)]
            rng.shuffle(indices)
            self._epoch = (epoch, [(i, self.flip and rng.random() < 0.5) for i in indices])
        return self._epoch[1]

    def samples(self, global_index: int, count: int, bucket: tuple[int, int]) -> list[RegSample]:
        first = global_index * self.batch_size
        out = []
        for position in range(first, first + count):
            epoch, offset = divmod(position, self.per_epoch)
            index, flip = self._pass(epoch)[offset]
            out.append((index, flip, bucket))
        return out

    def needed(self, batches: Iterator[list[ds.Sample]], items: list[ds.Item], micro_batches: int, rank: int,
               processes: int) -> set[RegSample]:
        """Every regularization sample this process trains in its first `micro_batches` micro-batches
        (`batches`: dataset.micro_batches from step 0): what its latent cache must hold."""
        needed: set[RegSample] = set()
        for k in range(micro_batches):
            batch = next(batches)
            needed.update(self.samples(k * processes + rank, len(batch), items[batch[0][0]].bucket))
        return needed

    def join(self, pixels, latents, where: dict[str, list], global_index: int, items: list[ds.Item], cache: dict):
        """The micro-batch with its regularization images appended: (pixels, latents, where) as
        dataset.batch_source gives them, `where` gaining their captions, original sizes and crops."""
        import torch

        batch = where["samples"]
        reg = self.samples(global_index, len(batch), items[batch[0][0]].bucket)
        if cache:
            latents = torch.cat([latents, torch.stack([cache[s][0] for s in reg]).to(latents.dtype)])
            crops = [cache[s][1] for s in reg]
        else:
            loaded = [load_reg(self.items, s) for s in reg]
            pixels = torch.cat([pixels, torch.stack([p for p, _ in loaded])])
            crops = [c for _, c in loaded]
        where = {**where, "reg_captions": [self.items[i].caption for i, _, _ in reg],
                 "reg_sizes": [self.items[i].size for i, _, _ in reg], "reg_top_left": crops}
        return pixels, latents, where


def load_reg(items: list[ds.Item], sample: RegSample) -> tuple[Any, tuple[int, int]]:
    """A regularization image's pixels at the bucket of the batch it joins, and its crop's top-left."""
    index, flip, bucket = sample
    return ds.load_pixels_or_fail(dataclasses.replace(items[index], bucket=bucket), flip)
