"""How close the trainer's step time is to the floor: prints seconds per step and their ratio.

trainer: steady-state seconds per step of `lora_trainer.train` (tiny model, caching on, no
         sampling or checkpoints), measured from the `step` events' timestamps after a warm-up.
floor:   UNet forward + backward + optimizer step on one cached batch, nothing else.
ratio:   trainer / floor (target <= 1.10).

The two are measured alternately `--repeats` times and the fastest of each is compared: on a shared
machine the minimum is the least disturbed measurement of either.

    python bench/train_step.py [--base builtin:tiny-sd] [--steps 300] [--repeats 3] [--resolution 64] [--batch-size 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def trainer_seconds_per_step(images: Path, args) -> tuple[float, dict]:
    from conftest import tiny_config

    from lora_trainer import config as config_mod
    from lora_trainer.events import read_events
    from lora_trainer.train import train

    run = Path(tempfile.mkdtemp()) / "run"
    cfg = tiny_config(
        images, model__base=args.base, optim__steps=args.steps, data__resolution=args.resolution,
        optim__batch_size=args.batch_size, data__buckets=False, optim__max_grad_norm=args.max_grad_norm,
    )
    config_mod.save(cfg, run)
    train(run, cfg)
    steps = [e for e in read_events(run / "events.jsonl")[0] if e["type"] == "step"]
    warm = steps[len(steps) // 4]
    last = steps[-1]
    return (last["time"] - warm["time"]) / (last["step"] - warm["step"]), last


def floor_seconds_per_step(images: Path, args) -> float:
    import torch
    import torch.nn.functional as F

    from lora_trainer import dataset as ds
    from lora_trainer import models
    from lora_trainer.batch import encode_text

    base = models.resolve(args.base)
    pipe = models.load_pipeline(base)
    unet = pipe.unet.requires_grad_(False)
    models.attach_lora(unet, models.lora_config(4, 16.0, 0.0, ["to_q", "to_k", "to_v", "to_out.0"], use_dora=False, use_rslora=False), "UNet")
    items = ds.scan(images, "ohwx")
    ds.assign_buckets(items, args.resolution, 16, enabled=False)
    with torch.no_grad():
        pixels = torch.stack([ds.load_pixels(items[i % len(items)], False)[0] for i in range(args.batch_size)])
        latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
        embeds, pooled = encode_text(["ohwx, stripes"] * args.batch_size, models.tokenizers(pipe), models.text_encoders(pipe), base.kind, "cpu")
    noise = torch.randn_like(latents)
    timesteps = torch.full((args.batch_size,), 500)
    noisy = pipe.scheduler.add_noise(latents, noise, timesteps) if hasattr(pipe.scheduler, "add_noise") else latents + noise
    added = None
    if base.kind == "sdxl":
        size = args.resolution
        added = {"text_embeds": pooled, "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * args.batch_size, dtype=embeds.dtype)}
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    unet.train()

    def step():
        pred = unet(noisy, timesteps, embeds, added_cond_kwargs=added, return_dict=False)[0]
        F.mse_loss(pred.float(), noise.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(max(10, args.steps // 4)):
        step()
    started = time.perf_counter()
    n = args.steps - args.steps // 4
    for _ in range(n):
        step()
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="builtin:tiny-sd")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from accelerate.state import AcceleratorState
    from conftest import make_images

    images = make_images(Path(tempfile.mkdtemp()) / "images", 4, sizes=((args.resolution, args.resolution),))
    trainer_runs, floor_runs = [], []
    for _ in range(args.repeats):
        trainer_runs.append(trainer_seconds_per_step(images, args)[0])
        AcceleratorState._reset_state(reset_partial_state=True)
        floor_runs.append(floor_seconds_per_step(images, args))
    trainer, floor = min(trainer_runs), min(floor_runs)
    ms = lambda runs: ", ".join(f"{r * 1000:.2f}" for r in runs)  # noqa: E731
    print(f"model: {args.base}  resolution: {args.resolution}  batch: {args.batch_size}  torch threads: {torch.get_num_threads()}")
    print(f"trainer: {trainer * 1000:.2f} ms/step (steady state over the last {args.steps - args.steps // 4} steps; runs: {ms(trainer_runs)})")
    print(f"floor:   {floor * 1000:.2f} ms/step (UNet forward + backward + AdamW step, one cached batch; runs: {ms(floor_runs)})")
    print(f"ratio:   {trainer / floor:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
