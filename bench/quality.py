"""Judged quality of a toy-world style LoRA: `python bench/quality.py [--set FIELD=VALUE ...] [--compare FIELD=A,B]`.

Trains a LoRA on a toy-world style dataset (the trainer, in this process, on `builtin:toy`), then
draws the evaluation prompts (never in the training captions) with and without the trigger word at
each strength, and lets the world's judge say what every picture shows. Prints, per variant and
strength: style rate (triggered pictures in the style), adherence (pictures that show what the
prompt says), leak (untriggered pictures in the style), and the wall time of training.

Every variant starts from `--preset` (default: the Style preset's toy-world settings, what the app and
`--preset Style` train; `--preset none`: a plain 300-step run), then `--set`. `--compare lora.rank=4,16`
trains one LoRA per value, everything else equal (the same steps and batch: equal compute unless the field
itself changes the cost). `--checkpoints` scores every saved checkpoint too, to see where a run overcooks
(`--checkpoints 1000,1200`: those steps only). `--seeds N` draws each of the 24 prompts N times: a rate near
0.85 is +-0.07 (one standard error) on 24 pictures, +-0.04 on 72. The checkpoint the evaluation recommends
(`best/`) is scored whenever the run made one. The first row is the base model alone. `--make-reg DIR` first
writes regularization images for prior preservation (the base's own pictures of the scenes no evaluation
prompt names): `--make-reg /tmp/reg --compare data.reg_images=,/tmp/reg` measures it on versus off.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer import config as config_mod  # noqa: E402
from lora_trainer import toyworld  # noqa: E402
from lora_trainer.toyworld.scoring import lora_quality  # noqa: E402

QUICK = {  # a short run that still learns a style: the bench's default, overridable with --set
    "optim.steps": "300", "optim.batch_size": "4", "sampling.every": "0", "output.save_every": "0",
}


def train_variant(
    root: Path, name: str, style: str, images: int, settings: dict[str, str], seed: int, position: str, base: str
) -> tuple[Path, float]:
    from lora_trainer.train import train

    run = root / name
    toyworld.make_style_dataset(run / "dataset", style, n=images, seed=seed, position=position)
    cfg = config_mod.TrainConfig()
    cfg.set("model.base", base)
    cfg.set("data.trigger", toyworld.TRIGGER)
    for key, value in settings.items():
        cfg.set(key, value)
    config_mod.save(config_mod.validate(cfg), run)
    started = time.perf_counter()
    train(run)
    return run, time.perf_counter() - started


def make_reg_folder(folder: Path, base: str) -> Path:
    """Regularization images as DreamBooth makes them: the base model's own pictures (seed 0) of every scene
    whose caption is not an evaluation prompt, with those captions (so nothing the bench judges is in them)."""
    from lora_trainer.inference import Generator
    from lora_trainer.toyworld import SCENES, SIZE, split

    folder.mkdir(parents=True, exist_ok=True)
    gen = Generator(base)
    for i, scene in enumerate(s for s in SCENES if split(s) != "eval"):
        gen.generate(scene.caption, [], seed=0, steps=20, guidance=7.0, size=SIZE).save(folder / f"reg-{i:03d}.png")
        (folder / f"reg-{i:03d}.txt").write_text(scene.caption)
    return folder


def _checkpoints(run: Path, which: str) -> list[Path]:
    """The run's saved checkpoints: all of them, or those at the comma-separated steps `which`."""
    saved = sorted((run / "checkpoints").glob("step-*"))
    if which == "all":
        return saved
    steps = {int(step) for step in which.split(",")}
    return [folder for folder in saved if int(folder.name.split("-")[1]) in steps]


def _best_step(run: Path) -> str:
    import json

    info = json.loads((run / "best" / "lora_info.json").read_text())
    return f"step {info.get('steps', '?')}"


def _row(label: str, s, seconds: float | None) -> str:
    wall = f"{seconds:7.1f}" if seconds is not None else "      -"
    return f"{label:<28} {s.strength:>8.2f} {s.style:>6.2f} {s.adherence:>9.2f} {s.leak:>5.2f} {s.adherence_untriggered:>12.2f} {wall}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--style", default="stripes", choices=toyworld.STYLES)
    p.add_argument("--images", type=int, default=16, help="pictures in the style dataset")
    p.add_argument("--preset", default="Style", help="the preset every variant starts from (its toy settings), or 'none'")
    p.add_argument("--base", default=toyworld.BASE_SPEC, help="the toy base, or a folder of one (e.g. a build snapshot)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a config field for every variant")
    p.add_argument("--compare", action="append", default=[], metavar="FIELD=A,B", help="one variant per value")
    p.add_argument("--strengths", default="0.5,1.0")
    p.add_argument("--seeds", type=int, default=2, help="pictures per prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the dataset and of training")
    p.add_argument("--position", default="first", choices=["first", "last"], help="where the trigger goes in captions and prompts")
    p.add_argument("--checkpoints", nargs="?", const="all", default="", metavar="STEPS",
                   help="score every saved checkpoint as well as final/, or only these steps (e.g. 1000,1200)")
    p.add_argument("--keep", type=Path, help="keep the runs in this folder")
    p.add_argument("--make-reg", type=Path, metavar="DIR", help="first write regularization images (the base's pictures "
                   "of the scenes no evaluation prompt names) to DIR, for --set/--compare data.reg_images=DIR")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from lora_trainer.presets import preset_settings

    if args.make_reg:
        print(f"regularization images: {len(list(make_reg_folder(args.make_reg, args.base).glob('*.png')))} in {args.make_reg}")

    start = QUICK if args.preset == "none" else {k: str(v) for k, v in preset_settings(args.preset, toyworld.BASE_SPEC).items()}
    common = {**start, "optim.seed": str(args.seed)}
    common.update(dict(kv.split("=", 1) for kv in args.set))
    variants: list[tuple[str, dict[str, str]]] = [("default", common)]
    if args.compare:
        variants = []
        for spec in args.compare:
            key, values = spec.split("=", 1)
            variants += [(f"{key}={v}", {**common, key: v}) for v in values.split(",")]
    strengths = tuple(float(s) for s in args.strengths.split(","))
    seeds = tuple(range(args.seeds))

    print(f"style {args.style}, {args.images} images, settings {common}")
    print(f"{'variant':<28} {'strength':>8} {'style':>6} {'adherence':>9} {'leak':>5} {'adh. no trig':>12} {'train s':>7}")
    print(f"trigger {args.position}")
    for s in lora_quality(None, args.style, base=args.base, strengths=(0.0,), seeds=seeds, position=args.position):
        print(_row("base model", s, None))
    with tempfile.TemporaryDirectory(prefix="lora-quality-") as scratch:
        root = args.keep or Path(scratch)
        for name, settings in variants:
            folder_name = name.replace("=", "-").replace(".", "_")
            run, seconds = train_variant(
                root, folder_name, args.style, args.images, settings, args.seed, args.position, args.base)
            files = [run / "final"]
            if args.checkpoints:
                files = _checkpoints(run, args.checkpoints) + files
            if (run / "best").is_dir():
                files.append(run / "best")
            for folder in files:
                label = name if folder.name == "final" else f"{name} best ({_best_step(run)})" if folder.name == "best" \
                    else f"{name} @{folder.name}"
                lora = folder / "pytorch_lora_weights.safetensors"
                for s in lora_quality(lora, args.style, base=args.base, strengths=strengths, seeds=seeds, position=args.position):
                    print(_row(label, s, seconds if folder.name == "final" else None), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
