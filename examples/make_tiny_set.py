"""Regenerate examples/tiny-set: six small captioned images for the quick start (committed, a few KB)."""

from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent / "tiny-set"
SCENES = [
    ("a red circle on a blue field", (200, 40, 40), (30, 60, 160), "ellipse", (96, 96)),
    ("a yellow square on a green field", (230, 200, 40), (40, 130, 60), "rectangle", (96, 96)),
    ("a white circle on a black field", (240, 240, 240), (15, 15, 15), "ellipse", (128, 96)),
    ("an orange square on a purple field", (240, 140, 30), (90, 40, 140), "rectangle", (96, 128)),
    ("a pink circle on a teal field", (240, 120, 180), (20, 130, 130), "ellipse", (112, 112)),
    ("a blue square on a sand field", (40, 80, 200), (210, 190, 140), "rectangle", (128, 96)),
]


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for i, (caption, fg, bg, shape, size) in enumerate(SCENES):
        image = Image.new("RGB", size, bg)
        draw = ImageDraw.Draw(image)
        w, h = size
        for k in range(0, w, 12):  # the shared "style": diagonal hatching
            draw.line([(k, 0), (k + h // 2, h)], fill=tuple(min(255, c + 40) for c in bg), width=2)
        getattr(draw, shape)([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=fg, outline=(0, 0, 0), width=3)
        image.save(OUT / f"shape-{i}.png", optimize=True)
        (OUT / f"shape-{i}.txt").write_text(f"ohwx, {caption}\n")


if __name__ == "__main__":
    main()
