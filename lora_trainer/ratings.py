"""Human ratings of a run's checkpoints: blind images and pairs, stored append-only, exported with a report.

    RUN/ratings/manifest.json   the rating set: fixed prompts x seeds x variants (the base model, i.e.
                                LoRA off, and checkpoints), each image under an opaque id
    RUN/ratings/images/<id>.png the images (their names say nothing about the variant)
    RUN/ratings/ratings.jsonl   one rating per line, appended atomically (one write of one line, fsynced)
    RUN/ratings/ratings.csv, ratings.json, report.html    exports

A rating is either `single` (one image, 1-5 per criterion) or `pair` (two images of the same prompt
and seed from two variants, left / right / same per criterion). For the summary both become points
in [0, 1] per variant: a single score s gives (s - 1) / 4; a pair gives 1 to the preferred side, 0
to the other, 0.5 each for "same". Agreement with the automatic scores is Spearman's rank
correlation across variants (needs 3 or more variants with both).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import itertools
import json
import os
import random
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from .errors import LoraStudioError
from .fsutil import atomic_write_text

RATINGS_DIR = "ratings"
MANIFEST = "manifest.json"
RATINGS_FILE = "ratings.jsonl"
CRITERIA = {"style": "style match", "detail": "detail", "expressiveness": "expressiveness"}
PAIR_CHOICES = ("left", "same", "right")
MAX_CHECKPOINTS = 5  # besides LoRA off: more than this is too many for people to tell apart
AUTOMATIC = ("style", "adherence", "leak", "diversity", "val_loss", "judged_style_rate", "judged_adherence_rate")
_APPEND_LOCK = threading.Lock()


def folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / RATINGS_DIR


def load_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder(run_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _spread(items: list, n: int) -> list:
    """`n` items evenly spread over `items`, always with the last."""
    if len(items) <= n:
        return items
    return [items[round(k * (len(items) - 1) / (n - 1))] for k in range(n)] if n > 1 else items[-1:]


def prepare(run_dir: str | Path, settings=None, *, progress=None) -> dict[str, Any]:
    """Generate the rating set (replacing an old one; earlier ratings stay in ratings.jsonl but no longer match)."""
    from . import config as config_mod
    from .eval_scores import content_prompts, with_trigger
    from .evaluate import EvalSettings, adapters
    from .formats import DIFFUSERS_FILENAME
    from .inference import Generator, LoraSpec

    run_dir = Path(run_dir)
    settings = settings or EvalSettings()
    progress = progress or (lambda fraction, text: None)
    cfg = config_mod.load(run_dir)
    found = adapters(run_dir)
    variants = [found[0], *_spread(found[1:], MAX_CHECKPOINTS)]
    prompts = [with_trigger(p, cfg.data.trigger.strip()) for p in content_prompts(settings, cfg.model.base, [], cfg.data.trigger)]
    seeds = [settings.seed + k for k in range(settings.seeds)]
    gen = Generator(cfg.model.base)
    images_dir = folder(run_dir) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    entries, total = [], len(variants) * len(prompts) * len(seeds)
    for name, step, path in variants:
        loras = [] if path is None else [LoraSpec(str(path / DIFFUSERS_FILENAME), settings.strength)]
        for p, prompt in enumerate(prompts):
            for seed in seeds:
                progress(len(entries) / total, f"rating images: {name}, prompt {p + 1}")
                image = gen.generate(prompt, loras, seed=seed, steps=settings.steps, guidance=settings.guidance, size=cfg.data.resolution)
                image_id = secrets.token_hex(8)
                image.save(images_dir / f"{image_id}.png")
                entries.append({"id": image_id, "variant": name, "step": step, "prompt": p, "seed": seed})
    manifest = {"version": 1, "set": secrets.token_hex(4), "time": round(time.time(), 3), "prompts": prompts,
                "seeds": seeds, "variants": [v[0] for v in variants], "images": entries}
    atomic_write_text(folder(run_dir) / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def image_path(run_dir: str | Path, image_id: str) -> Path:
    """The file of an image of the current rating set (ids come from the manifest, never from a page)."""
    manifest = load_manifest(run_dir) or {}
    if image_id not in {e["id"] for e in manifest.get("images", [])}:
        raise LoraStudioError("That image is not part of this run's rating set; reload the rating page.")
    return folder(run_dir) / "images" / f"{image_id}.png"


def rater_id(secret: str) -> str:
    """A rater's public name: a hash of their session secret (the secret itself is never stored)."""
    return "rater-" + hashlib.sha256(f"rater:{secret}".encode()).hexdigest()[:10]


# -- tasks ---------------------------------------------------------------------------------------------
def tasks(manifest: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    """Every task of a mode: single images, or pairs of variants for the same prompt and seed."""
    if mode == "single":
        return [{"mode": "single", "images": [e["id"]]} for e in manifest["images"]]
    if mode != "pair":
        raise LoraStudioError(f"unknown rating mode {mode!r}; use single or pair")
    by_case: dict[tuple, list[dict]] = {}
    for e in manifest["images"]:
        by_case.setdefault((e["prompt"], e["seed"]), []).append(e)
    return [{"mode": "pair", "images": [a["id"], b["id"]]}
            for case in by_case.values() for a, b in itertools.combinations(case, 2)]


def next_task(run_dir: str | Path, rater: str, mode: str) -> tuple[dict[str, Any] | None, int, int]:
    """(the next task for this rater or None when done, how many they did, how many there are).

    The order is shuffled per rater, and each pair's sides too, so position says nothing.
    """
    manifest = load_manifest(run_dir)
    if manifest is None:
        raise LoraStudioError("This run has no rating images yet: its owner prepares them on the Rate tab first.")
    todo = tasks(manifest, mode)
    done = {tuple(sorted(r["images"])) for r in read_ratings(run_dir)
            if r["rater"] == rater and r["mode"] == mode and r.get("set") == manifest["set"]}
    rng = random.Random(f"{rater}:{manifest['set']}:{mode}")
    rng.shuffle(todo)
    left = [t for t in todo if tuple(sorted(t["images"])) not in done]
    if not left:
        return None, len(todo) - len(left), len(todo)
    task = left[0]
    if mode == "pair" and rng.random() < 0.5:
        task = {**task, "images": task["images"][::-1]}
    return task, len(todo) - len(left), len(todo)


def add_rating(run_dir: str | Path, rater: str, task: dict[str, Any], answers: dict[str, Any]) -> dict[str, Any]:
    """Validate and append one rating (one line, one write, fsynced: never half a record among whole ones)."""
    manifest = load_manifest(run_dir) or {}
    ids = {e["id"] for e in manifest.get("images", [])}
    if not task or not set(task.get("images", [])) <= ids:
        raise LoraStudioError("This rating set changed since the images were shown; reload the rating page.")
    answers = {k: answers.get(k) for k in CRITERIA}
    if task["mode"] == "single":
        if not all(isinstance(v, int | float) and 1 <= v <= 5 for v in answers.values()):
            raise LoraStudioError("Give every criterion a score from 1 to 5.")
        answers = {k: int(v) for k, v in answers.items()}
    elif not all(v in PAIR_CHOICES for v in answers.values()):
        raise LoraStudioError("Pick left, same or right for every criterion.")
    record = {"time": round(time.time(), 3), "set": manifest["set"], "rater": rater, "mode": task["mode"],
              "images": list(task["images"]), "answers": answers}
    path = folder(run_dir) / RATINGS_FILE
    line = (json.dumps(record) + "\n").encode()
    with _APPEND_LOCK:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    return record


def read_ratings(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete rating line (a line still being written is not one)."""
    try:
        data = (folder(run_dir) / RATINGS_FILE).read_bytes()
    except OSError:
        return []
    out = []
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and {"rater", "mode", "images", "answers"} <= record.keys():
            out.append(record)
    return out


# -- analysis -----------------------------------------------------------------------------------------------
def human_scores(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{variant: {criterion: mean points in [0, 1], "n": contributions, "raters": count}} for the current set."""
    manifest = load_manifest(run_dir) or {"images": [], "set": None, "variants": []}
    variant = {e["id"]: e["variant"] for e in manifest["images"]}
    points: dict[str, dict[str, list[float]]] = {v: {c: [] for c in CRITERIA} for v in manifest["variants"]}
    raters: dict[str, set[str]] = {v: set() for v in manifest["variants"]}
    for r in read_ratings(run_dir):
        if r.get("set") != manifest["set"] or not all(i in variant for i in r["images"]):
            continue
        names = [variant[i] for i in r["images"]]
        for criterion in CRITERIA:
            answer = r["answers"].get(criterion)
            if r["mode"] == "single":
                points[names[0]][criterion].append((answer - 1) / 4)
            else:
                left = {"left": 1.0, "same": 0.5, "right": 0.0}[answer]
                points[names[0]][criterion].append(left)
                points[names[1]][criterion].append(1.0 - left)
        for name in names:
            raters[name].add(r["rater"])
    return {v: {**{c: (sum(p) / len(p) if p else None) for c, p in crit.items()},
                "n": len(crit["style"]), "raters": len(raters[v])} for v, crit in points.items()}


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho (average ranks for ties); None with fewer than 3 pairs or no variation."""
    if len(x) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if sxx == 0 or syy == 0 else sxy / (sxx * syy) ** 0.5


def agreement(run_dir: str | Path) -> dict[str, dict[str, tuple[float | None, int]]]:
    """{automatic metric: {criterion: (Spearman rho, number of variants)}} over variants that have both."""
    from .evaluate import load_evaluation

    people = human_scores(run_dir)
    rows = {r["name"]: r for r in (load_evaluation(run_dir) or {}).get("rows", [])}
    out: dict[str, dict[str, tuple[float | None, int]]] = {}
    for metric in AUTOMATIC:
        out[metric] = {}
        for criterion in CRITERIA:
            pairs = [(rows[v][metric], s[criterion]) for v, s in people.items()
                     if v in rows and rows[v].get(metric) is not None and s[criterion] is not None]
            out[metric][criterion] = (spearman([a for a, _ in pairs], [b for _, b in pairs]), len(pairs))
        if all(n == 0 for _, n in out[metric].values()):
            del out[metric]
    return out


# -- exports --------------------------------------------------------------------------------------------------
def export(run_dir: str | Path) -> dict[str, Path]:
    """ratings.csv, ratings.json (ratings unblinded, the summary, the agreement) and report.html."""
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    if manifest is None:
        raise LoraStudioError("No rating set in this run yet: prepare the rating images first.")
    entry = {e["id"]: e for e in manifest["images"]}
    ratings = [r for r in read_ratings(run_dir) if r.get("set") == manifest["set"]]
    out = folder(run_dir)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["time", "rater", "mode", "left_variant", "right_variant", "prompt", "seed", *CRITERIA])
    for r in ratings:
        first = entry[r["images"][0]]
        second = entry[r["images"][1]]["variant"] if r["mode"] == "pair" else ""
        writer.writerow([r["time"], r["rater"], r["mode"], first["variant"], second, manifest["prompts"][first["prompt"]],
                         first["seed"], *(r["answers"][c] for c in CRITERIA)])
    summary, agree = human_scores(run_dir), agreement(run_dir)
    unblinded = [{**r, "variants": [entry[i]["variant"] for i in r["images"]]} for r in ratings]
    paths = {"csv": out / "ratings.csv", "json": out / "ratings.json", "html": out / "report.html"}
    atomic_write_text(paths["csv"], buffer.getvalue())
    atomic_write_text(paths["json"], json.dumps({"manifest": manifest, "ratings": unblinded, "summary": summary,
                                                 "agreement": {m: {c: {"rho": v[0], "n": v[1]} for c, v in cs.items()}
                                                               for m, cs in agree.items()}}, indent=2))
    atomic_write_text(paths["html"], report_html(run_dir, manifest, unblinded, summary, agree))
    return paths


def _img(path: Path, width: int = 128) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" width="{width}" style="image-rendering:pixelated">'


def _num(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def report_html(run_dir: Path, manifest: dict, ratings: list[dict], summary: dict, agree: dict) -> str:
    e = html.escape
    raters = sorted({r["rater"] for r in ratings})
    parts = [f"<!doctype html><meta charset=utf-8><title>Ratings: {e(run_dir.name)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:center}</style>",
             f"<h1>Human ratings of {e(run_dir.name)}</h1>",
             f"<p>{len(ratings)} ratings by {len(raters)} rater(s): {e(', '.join(raters))}. Scores are points in [0, 1] "
             "(single images: (score − 1) / 4; pairs: 1 for the preferred image, 0.5 each for “same”).</p>",
             "<h2>Per checkpoint</h2><table><tr><th>variant</th>"
             + "".join(f"<th>{e(label)}</th>" for label in CRITERIA.values()) + "<th>ratings</th><th>raters</th></tr>"]
    for variant, s in summary.items():
        label = "LoRA off (base)" if variant == "base" else variant
        parts.append(f"<tr><td>{e(label)}</td>" + "".join(f"<td>{_num(s[c])}</td>" for c in CRITERIA)
                     + f"<td>{s['n']}</td><td>{s['raters']}</td></tr>")
    parts.append("</table><h2>Agreement of the automatic scores with people</h2>"
                 "<p>Spearman's rank correlation across checkpoints (n = checkpoints with both); – where n &lt; 3.</p>"
                 "<table><tr><th>automatic score</th>" + "".join(f"<th>{e(v)}</th>" for v in CRITERIA.values()) + "</tr>")
    for metric, by_criterion in agree.items():
        parts.append(f"<tr><td>{e(metric)}</td>" + "".join(f"<td>{_num(rho)} (n={n})</td>" for rho, n in by_criterion.values()) + "</tr>")
    parts.append("</table><h2>The images</h2><table><tr><th>prompt, seed</th>"
                 + "".join(f"<th>{e(v)}</th>" for v in manifest["variants"]) + "</tr>")
    cell = {(x["variant"], x["prompt"], x["seed"]): x["id"] for x in manifest["images"]}
    for p, prompt in enumerate(manifest["prompts"]):
        for seed in manifest["seeds"]:
            parts.append(f"<tr><td>{e(prompt)}<br>seed {seed}</td>" + "".join(
                f"<td>{_img(folder(run_dir) / 'images' / (cell[(v, p, seed)] + '.png'))}</td>" for v in manifest["variants"]) + "</tr>")
    parts.append("</table><h2>Every rating</h2><table><tr><th>rater</th><th>mode</th><th>images</th>"
                 + "".join(f"<th>{e(v)}</th>" for v in CRITERIA.values()) + "</tr>")
    for r in ratings:
        parts.append(f"<tr><td>{e(r['rater'])}</td><td>{e(r['mode'])}</td><td>{e(' vs '.join(r['variants']))}</td>"
                     + "".join(f"<td>{e(str(r['answers'][c]))}</td>" for c in CRITERIA) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)
