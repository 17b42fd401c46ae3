"""What evaluating one checkpoint costs: prints seconds (setup once, then per checkpoint) and images made.

Trains a short run (the tiny model, or the toy base once lora_trainer.toyworld is there), then
evaluates the base and the final LoRA with the default settings (--steps and --seeds change them)
and prints where the time went. On the tiny model the metric model is builtin:tiny-clip (random
weights: the cost is real, the scores are not); on builtin:toy it is the toy world's judge CLIP.

    python bench/eval_cost.py [--base builtin:tiny-sd|builtin:toy] [--steps 20] [--seeds 2] [--prompts 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="builtin:tiny-sd")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per evaluation image")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    # One thread by default: on a shared 2-core machine two torch threads spin against each other (~10x slower).
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch
    from conftest import tiny_config

    from lora_trainer import config as config_mod
    from lora_trainer.eval_metrics import TINY_CLIP
    from lora_trainer.eval_report import table_text
    from lora_trainer.evaluate import TOY_BASE, evaluate, settings_from
    from lora_trainer.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(tempfile.mkdtemp(prefix="eval-cost-")) / "run"
    toy = args.base == TOY_BASE
    if toy:
        from lora_trainer import toyworld

        images = toyworld.make_style_dataset(run.parent / "images", toyworld.STYLES[0]) or run.parent / "images"
    else:
        images = ROOT / "examples" / "tiny-set"
    resolution = 32 if toy else 64
    cfg = tiny_config(Path(images), model__base=args.base, optim__steps=10, data__resolution=resolution,
                      data__bucket_step=8 if toy else 16)
    config_mod.save(cfg, run)
    train(run, cfg)

    values = {"steps": args.steps, "seeds": args.seeds, "prompt_count": args.prompts}
    if not toy:
        values["clip_model"] = TINY_CLIP
    settings = settings_from(values)
    marks: list[tuple[float, str]] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    data = evaluate(run, settings, "final", progress=lambda fraction, text: marks.append((time.perf_counter(), text)))
    total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    setup = marks[0][0] - started if marks else 0.0
    per_row = {r["name"]: r["seconds"] for r in data["rows"]}
    images_per_checkpoint = settings.seeds * settings.prompt_count * 2
    print(table_text(data))
    print()
    print(f"base {args.base}, {resolution} px, {settings.steps} denoising steps, torch threads {torch.get_num_threads()}")
    print(f"setup (pipeline, validation set, metric model, training-image embeddings): {setup:.2f} s")
    for name, seconds in per_row.items():
        print(f"{name}: {seconds:.2f} s for {images_per_checkpoint} images + validation loss "
              f"({seconds / images_per_checkpoint:.3f} s per image)")
    checkpoint = max(v for k, v in per_row.items() if k != "base")
    print(f"total {total:.2f} s wall, {cpu:.2f} s CPU (wall >> CPU: the machine is busy); each further checkpoint adds about {checkpoint:.2f} s")


if __name__ == "__main__":
    main()
