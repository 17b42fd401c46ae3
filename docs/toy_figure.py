"""The README's toy-world picture from a run of its first command: `python docs/toy_figure.py RUN OUT.png`.

The first and last steps' samples (the base model's and the LoRA's, same seeds), labelled with their prompts.
"""

import sys
import textwrap
import tomllib
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lora_trainer.toyworld import sample_prompts as toy_prompts  # noqa: E402

run = Path(sys.argv[1])
out = Path(sys.argv[2])
steps = sorted((run / "samples").glob("step-*"))
first, last = steps[0], steps[-1]
imgs0 = sorted(first.glob("*.png"))
imgs1 = sorted(last.glob("*.png"))
cfg = tomllib.loads((run / "config.toml").read_text())
sample_prompts = cfg["sampling"]["prompts"] or toy_prompts()
trigger = cfg["data"]["trigger"]
texts = [p.replace("{trigger}", trigger) for p in sample_prompts]
cell, pad, left, top = 110, 10, 120, 30
font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", 11)
n = len(imgs0)
W, H = left + n * (cell + pad), top + 2 * (cell + pad) + 50
im = Image.new("RGB", (W, H), "white")
d = ImageDraw.Draw(im)
d.text((pad, 8), 'Toy world, Style preset on examples/toy-style ("stripes"), same seeds; last column: no trigger', fill="black", font=font)
for row, (label, files) in enumerate((("base (step 0)", imgs0), (f"LoRA (step {int(last.name[5:])})", imgs1))):
    y = top + row * (cell + pad)
    d.text((pad, y + cell // 2 - 6), label, fill="black", font=font)
    for k, f in enumerate(files):
        im.paste(Image.open(f).convert("RGB").resize((cell, cell), Image.NEAREST), (left + k * (cell + pad), y))
for k, t in enumerate(texts[:n]):
    d.multiline_text((left + k * (cell + pad), top + 2 * (cell + pad)), "\n".join(textwrap.wrap(t, 20)), fill="black", font=font)
im.save(out)
print(out, im.size)
