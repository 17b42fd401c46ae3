"""The Style preset's sweep on the toy world: `python bench/sweep.py [--lr 3e-4,1e-3,3e-3] [--rank 4,8,16]`.

Trains one LoRA per (learning rate, rank) on the same 16 pictures of a style, everything else the Style
preset's toy settings (batch 4, output preservation 1, 300 steps), saving a checkpoint every 100 steps;
the judge then scores every checkpoint (24 evaluation prompts, one picture each, trigger first), so the
step count is swept too at no extra training. Prints one row per (lr, rank, step): style, adherence with
and without the trigger, leak, and the training time; then the row the project's rule picks:

    the most style among rows whose untriggered adherence is at least 0.9 of the base's and whose leak is
    at most 0.1; ties to the fewer steps, then the lower rank (cheaper), then the lower learning rate.

The preset table in the README cites this sweep. `--preservation 0` sweeps without output preservation.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import train_variant  # noqa: E402

from lora_trainer import toyworld  # noqa: E402
from lora_trainer.presets import preset_settings  # noqa: E402
from lora_trainer.toyworld.scoring import lora_quality  # noqa: E402


def pick(rows: list[dict], base_untriggered: float) -> dict | None:
    """The rule in the module docstring."""
    ok = [r for r in rows if r["adherence_untriggered"] >= 0.9 * base_untriggered and r["leak"] <= 0.1]
    if not ok:
        return None
    return max(ok, key=lambda r: (r["style"], -r["step"], -r["rank"], -r["lr"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lr", default="3e-4,1e-3,3e-3")
    p.add_argument("--rank", default="4,8,16")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=100, help="checkpoint (and score) every this many steps")
    p.add_argument("--preservation", default="1.0")
    p.add_argument("--style", default="stripes", choices=toyworld.STYLES)
    p.add_argument("--keep", type=Path, help="keep the runs in this folder")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    preset = {k: str(v) for k, v in preset_settings("Style", toyworld.BASE_SPEC).items()}
    common = {**preset, "optim.steps": str(args.steps), "output.save_every": str(args.every), "sampling.every": "0",
              "eval.after_training": "off", "optim.preservation_weight": args.preservation, "optim.seed": "0"}
    base = lora_quality(None, args.style, strengths=(0.0,), seeds=(0,))[0]
    print(f"base model: adherence {base.adherence:.2f} with the trigger, {base.adherence_untriggered:.2f} without")
    print(f"{'lr':>7} {'rank':>4} {'step':>4} {'style':>5} {'adh':>5} {'leak':>5} {'adh no trig':>11} {'train s':>7}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lora-sweep-") as scratch:
        root = args.keep or Path(scratch)
        for lr, rank in itertools.product(args.lr.split(","), args.rank.split(",")):
            settings = {**common, "optim.learning_rate": lr, "lora.rank": rank, "lora.alpha": rank}
            run, seconds = train_variant(root, f"lr{lr}-r{rank}", args.style, 16, settings, 0, "first", toyworld.BASE_SPEC)
            folders = sorted((run / "checkpoints").glob("step-*"))
            for folder in folders:
                step = int(folder.name.split("-")[1])
                s = lora_quality(folder / "pytorch_lora_weights.safetensors", args.style, strengths=(1.0,), seeds=(0,))[0]
                row = {"lr": float(lr), "rank": int(rank), "step": step, **s.as_dict(), "seconds": seconds}
                rows.append(row)
                print(f"{lr:>7} {rank:>4} {step:>4} {s.style:>5.2f} {s.adherence:>5.2f} {s.leak:>5.2f} "
                      f"{s.adherence_untriggered:>11.2f} {seconds if folder == folders[-1] else 0:>7.1f}", flush=True)
    chosen = pick(rows, base.adherence_untriggered)
    if chosen is None:
        print("no row keeps 0.9 of the base's untriggered adherence with leak at most 0.1")
    else:
        print(f"pick: lr {chosen['lr']:g}, rank {chosen['rank']}, {chosen['step']} steps "
              f"(style {chosen['style']:.2f}, leak {chosen['leak']:.2f}, untriggered adherence {chosen['adherence_untriggered']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
