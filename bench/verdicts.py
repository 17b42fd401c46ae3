"""What the judge sees in a LoRA's pictures, prompt by prompt: `python bench/verdicts.py LORA [--guidance G] [--strength S]`.

Draws the evaluation prompts (or, with `--train-captions RUN`, the captions of RUN's dataset) with and
without the trigger, prints the judge's verdict for each picture (scene, style, confidence, OK when it
shows what was asked), the style and adherence rates, and writes the pictures as a grid (first row
triggered, second not) to `--grid`. `LORA none` draws the base alone. Used to diagnose why a LoRA loses
the prompt (README, "Quality"): which part of the scene goes wrong, and at which guidance or strength.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lora", help="a LoRA file (pytorch_lora_weights.safetensors), or 'none' for the base alone")
    p.add_argument("--style", default="stripes")
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--prompts", type=int, default=12, help="how many evaluation prompts")
    p.add_argument("--position", default="first", choices=["first", "last"])
    p.add_argument("--train-captions", type=Path, metavar="RUN", help="draw RUN/dataset's captions instead")
    p.add_argument("--negative", default="", help="negative prompt of the triggered pictures ({trigger}: the trigger)")
    p.add_argument("--base", default="builtin:toy")
    p.add_argument("--grid", type=Path, default=Path("verdicts.png"))
    args = p.parse_args(argv)

    from lora_trainer.inference import Generator, LoraSpec, grid
    from lora_trainer.toyworld import SIZE, TRIGGER, eval_prompts, judge, with_trigger
    from lora_trainer.toyworld.world import parse

    prompts = eval_prompts(args.prompts)
    if args.train_captions:
        texts = sorted(f.read_text().strip() for f in (args.train_captions / "dataset").glob("*.txt"))
        prompts = [parse(t).caption for t in texts if parse(t)][: args.prompts]
    gen = Generator(args.base)
    loras = [] if args.lora == "none" else [LoraSpec(args.lora, args.strength)]
    rows = []
    for triggered in (True, False):
        asked = [with_trigger(q, TRIGGER, args.position) if triggered else q for q in prompts]
        negative = args.negative.replace("{trigger}", TRIGGER) if triggered else ""
        images = [gen.generate(a, loras, seed=0, steps=20, guidance=args.guidance, size=SIZE, negative_prompt=negative)
                  for a in asked]
        rows.append(images)
        verdicts = judge(images)
        for q, v in zip(prompts, verdicts, strict=True):
            print(f"{'trigger' if triggered else 'plain  '}  {q:<40} -> {v.scene.caption:<40} {v.style or '-':<8} "
                  f"{v.confidence:.2f} {'OK' if v.matches(q) else ''}")
        style = sum(v.style == args.style for v in verdicts) / len(verdicts)
        adherence = sum(v.matches(q) for v, q in zip(verdicts, prompts, strict=True)) / len(verdicts)
        print(f"{'triggered' if triggered else 'untriggered'}: style {style:.2f}, adherence {adherence:.2f}")
    grid(rows).resize((SIZE * len(prompts) * 3, SIZE * 6)).save(args.grid)
    print(f"pictures: {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
