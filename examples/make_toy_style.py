"""Regenerate examples/toy-style: 16 toy-world pictures in the "stripes" style with trigger-word
captions (committed, a few KB): the bundled dataset of the quick start and of the app's example button."""

from pathlib import Path

from lora_trainer import toyworld

OUT = Path(__file__).resolve().parent / "toy-style"

if __name__ == "__main__":
    toyworld.make_style_dataset(OUT, "stripes", n=16, seed=0)
