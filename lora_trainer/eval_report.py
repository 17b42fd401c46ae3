"""An evaluation shown to people: a text table (CLI), Markdown (model card, UI), a labelled checkpoint grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = [  # (row key, heading)
    ("val_loss", "val loss"), ("adherence", "adherence"), ("style", "style"), ("leak", "leak"),
    ("diversity", "diversity"), ("kid", "KID"), ("judged_style_rate", "judged style"),
    ("judged_adherence_rate", "judged adherence"), ("judged_leak_rate", "judged leak"),
]


def _columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Only the columns some row has a value for."""
    return [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in rows)]


def _cell(value: Any) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _pick(data: dict[str, Any]) -> str | None:
    return (data.get("recommendation") or {}).get("name")


def table_rows(data: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headings and cells: one row per evaluated adapter, the pick marked with ★."""
    rows = data.get("rows") or []
    columns = _columns(rows)
    pick = _pick(data)
    body = [[("★ " if r["name"] == pick else "") + r["name"], str(r["step"]), *(_cell(r.get(k)) for k, _ in columns)]
            for r in rows]
    return ["checkpoint", "step", *(h for _, h in columns)], body


def table_text(data: dict[str, Any]) -> str:
    head, body = table_rows(data)
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths, strict=True)) for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(recommendation_text(data))
    lines += [f"note: {n}" for n in data.get("notes") or []]
    lines.append(f"evaluated in {data.get('seconds', 0):.1f} s")
    return "\n".join(lines)


def recommendation_text(data: dict[str, Any]) -> str:
    rec = data.get("recommendation")
    if not rec:
        return "No recommendation: " + ("; ".join(data.get("notes") or []) or "no scores")
    kind = "Recommended" if rec.get("eligible") else "Best trade-off"
    return f"{kind}: {rec['name']} (step {rec['step']}), copied to best/. Why: {rec['reason']}."


def evaluation_markdown(run_dir: str | Path, published: str | None = None) -> str:
    """The model card's evaluation section ('' when the run was never evaluated).

    `published` names the checkpoint the card's repository holds (e.g. "best" or "final").
    """
    from .evaluate import load_evaluation

    data = load_evaluation(run_dir)
    if not data or not data.get("rows"):
        return ""
    head, body = table_rows(data)
    lines = ["## Evaluation", "",
             "Each checkpoint and the base model (no LoRA) generated the same evaluation prompts (not in the "
             "training captions) with the same seeds. *adherence*: CLIP similarity of the images made with the "
             "trigger to their prompts; *style*: similarity to the training images; *leak*: the same without the "
             "trigger; *diversity*: how different one prompt's images are across seeds; *val loss*: the denoising "
             "loss on fixed images, noise and timesteps.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines += ["", recommendation_text(data)]
    if published:
        rec = data.get("recommendation") or {}
        which = f"{rec['name']} (step {rec['step']})" if published == "best" and rec else published
        lines += ["", f"**This repository publishes: {which}.**"]
    return "\n".join(lines) + "\n"


def scores_label(row: dict[str, Any] | None) -> str:
    """'style .31 · adh .27 · leak .12' (judged rates on the toy base), or '' without scores."""
    if not row:
        return ""
    if row.get("judged_style_rate") is not None:
        keys = (("judged_style_rate", "style"), ("judged_adherence_rate", "adh"), ("judged_leak_rate", "leak"))
    else:
        keys = (("style", "style"), ("adherence", "adh"), ("leak", "leak"))
    return " · ".join(f"{label} {row[k]:.2f}" for k, label in keys if row.get(k) is not None)


def label_checkpoint_grid(sheet, run_dir: str | Path, names: list[str], prompts: list[str], min_cell: int = 160):
    """inference.Generator.checkpoint_grid's sheet with every cell labelled: its step and scores; the pick
    framed in orange and starred. Small cells (the toy's 32 px) are enlarged, pixels kept sharp."""
    from PIL import Image, ImageDraw, ImageFont

    from .evaluate import load_evaluation, lora_info

    data = load_evaluation(run_dir) or {}
    rows = data.get("rows") or []
    by_name = {r["name"]: r for r in rows}
    if "final" not in by_name:  # evaluated under its checkpoint's name (the same LoRA)
        final_step = lora_info(Path(run_dir) / "final").get("steps")
        by_name["final"] = next((r for r in rows if r["name"] != "base" and r["step"] == final_step), None)
    pick_row = by_name.get(_pick(data) or "")
    cols, n_rows = max(1, len(prompts)), max(1, len(names))
    cw, ch = sheet.width // cols, sheet.height // n_rows
    scale = max(1, -(-min_cell // max(cw, 1)))
    cw2, ch2, strip, header = cw * scale, ch * scale, 30, 18
    font = ImageFont.load_default()
    out = Image.new("RGB", (cw2 * cols, header + (ch2 + strip) * n_rows), "white")
    draw = ImageDraw.Draw(out)
    for x, prompt in enumerate(prompts[:cols]):
        draw.text((x * cw2 + 3, 3), _fit(draw, prompt, font, cw2 - 6), fill="black", font=font)
    for y, name in enumerate(names):
        row = by_name.get(name)
        step = row["step"] if row else (int(name.split("-")[1]) if name.startswith("step-") else "?")
        picked = row is not None and row is pick_row
        top = header + y * (ch2 + strip)
        for x in range(cols):
            cell = sheet.crop((x * cw, y * ch, (x + 1) * cw, (y + 1) * ch)).resize((cw2, ch2), Image.Resampling.NEAREST)
            out.paste(cell, (x * cw2, top))
            label = ("PICK · " if picked else "") + f"step {step}" + (" (final)" if name == "final" else "")
            draw.text((x * cw2 + 3, top + ch2 + 2), _fit(draw, label, font, cw2 - 6),
                      fill="#c2410c" if picked else "black", font=font)
            draw.text((x * cw2 + 3, top + ch2 + 15), _fit(draw, scores_label(row) or "not evaluated", font, cw2 - 6),
                      fill="#444", font=font)
            if picked:
                draw.rectangle((x * cw2, top, (x + 1) * cw2 - 1, top + ch2 + strip - 1), outline="#ea580c", width=3)
    return out


def _fit(draw, text: str, font, width: int) -> str:
    """`text` cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
