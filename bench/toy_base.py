"""How well the toy world's base draws its world: `python bench/toy_base.py [--per-scene 2]`.

Draws every scene of the grammar (72 captions) `--per-scene` times with the base model alone, lets
the world's judge name what each picture shows, and prints the share that shows what its caption
says (shape, colour and background all right) and the share judged to show any style (the base
never saw one). Targets: at least 0.95 and at most 0.05.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_trainer.toyworld import BASE_SPEC  # noqa: E402
from lora_trainer.toyworld.scoring import GUIDANCE, SAMPLE_STEPS, base_quality  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=BASE_SPEC, help="the toy base (or a folder of one, e.g. a build snapshot)")
    p.add_argument("--per-scene", type=int, default=2)
    p.add_argument("--steps", type=int, default=SAMPLE_STEPS)
    p.add_argument("--guidance", type=str, default=str(GUIDANCE), help="one value or several, comma-separated")
    args = p.parse_args(argv)
    for guidance in (float(g) for g in args.guidance.split(",")):
        started = time.perf_counter()
        q = base_quality(args.base, args.per_scene, steps=args.steps, guidance=guidance)
        print(
            f"guidance {guidance:4.1f}, {args.steps} steps: {q['images']} images, prompt followed {q['accuracy']:.3f}, "
            f"any style {q['style_rate']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
