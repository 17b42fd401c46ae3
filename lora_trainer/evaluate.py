"""Measure every checkpoint of a run and recommend one.

For the base model (no LoRA, the reference) and each checkpoint (`checkpoints/step-N/`, `final/`):

  val_loss    denoising loss on a fixed set of the run's images, noise and timesteps (validation.py)
  adherence   CLIP cosine between each image generated WITH the trigger ("ohwx, a house by a lake")
              and its prompt without the trigger; the evaluation prompts are not training captions
  style       mean CLIP (or DINOv2) image-embedding cosine of those images to the training images
  leak        the same style similarity for the same prompts and seeds WITHOUT the trigger
  diversity   mean pairwise cosine distance between the images of one prompt over the seeds
  kid         KID against the training images on the same features, only with >= kid_min_images
              training images (else skipped, and the notes say so)
  judged_*    on the toy base, the toy world's judge: the fraction of images in the training images'
              style (with and without the trigger) and the fraction whose content matches the prompt

The recommendation rule (`recommend`), on the judge's rates when every row has them, else on the
CLIP scores:
  1. A checkpoint is *eligible* when its adherence stays within `adherence_margin` (a fraction of
     the base's adherence) of the base's, it leaks little (its leak rises over the base's leak by at
     most `leak_ratio` times its style gain), and it has taken the style: its style gain over the base
     is at least half the largest gain of the checkpoints that leak little (an early step that shows the
     style on one picture in eight is no pick when later ones show it on all).
  2. The pick is the eligible checkpoint with the most style (ties: the one that leaks least, then keeps
     the most adherence, then, on the judge's rates, whose pictures are closest to the training images by
     the continuous style score, then the earlier step).
  3. If none is eligible, the pick is the best trade-off: style gain minus the adherence lost beyond
     the margin minus the leak beyond the allowance (ties as in 2); the reason says what no checkpoint
     satisfied.
  Without scores (no metric model) there is no recommendation; validation loss alone cannot pick,
  since on the training images it keeps falling as the LoRA overcooks.

Results: `RUN/evaluation.json` (settings, every row, the recommendation, notes) and the pick copied
to `RUN/best/` (both LoRA files and lora_info.json, as in final/, plus best/evaluation.json with
its scores and the reason). `final/` stays the last step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import EvalSection
from .errors import ConfigError, LoraStudioError
from .formats import DIFFUSERS_FILENAME, INFO_FILENAME
from .fsutil import atomic_write_text, replace_dir

log = logging.getLogger("lora_trainer.evaluate")

EVALUATION_FILENAME = "evaluation.json"
BEST_DIR = "best"
TOY_BASE = "builtin:toy"
DEFAULT_PROMPTS = [
    "a house by a lake", "a portrait of an old man", "a bowl of fruit on a table", "a city street at night",
    "a cat sitting on a chair", "a mountain landscape at sunset", "a red car on a road", "a bird on a branch",
]


EvalSettings = EvalSection  # the [eval] section of config.toml


def settings_from(values: dict[str, Any] | None = None) -> EvalSettings:
    """EvalSettings from {field: value} (strings allowed, as a CLI --set gives them), validated."""
    settings = EvalSettings()
    hints = {f.name: f for f in dataclasses.fields(EvalSettings)}
    for name, value in (values or {}).items():
        if name not in hints:
            raise ConfigError(f"unknown evaluation setting '{name}'; known: {', '.join(hints)}")
        default = getattr(settings, name)
        try:
            if isinstance(default, list):
                value = [v.strip() for v in value.split("|")] if isinstance(value, str) else list(value)
            elif isinstance(default, bool):
                value = str(value).lower() in ("1", "true", "yes", "on")
            else:
                value = type(default)(value)
        except (TypeError, ValueError):
            raise ConfigError(f"eval.{name}: expected {type(default).__name__}, got {value!r}. {hints[name].metadata['help']}") from None
        setattr(settings, name, value)
    for f in dataclasses.fields(EvalSettings):
        value, meta = getattr(settings, f.name), f.metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"eval.{f.name} = {value!r}: choose one of {', '.join(meta['choices'])}")
        if "min" in meta and not meta["min"] <= value <= meta["max"]:
            raise ConfigError(f"eval.{f.name} = {value!r} is out of range; allowed [{meta['min']}, {meta['max']}]")
    return settings


def runs_after_training(settings: EvalSettings, base: str, has_gpu: bool) -> bool:
    """Whether the trainer should evaluate when it finishes (after_training = auto: cheap enough)."""
    if settings.after_training == "auto":
        return base == TOY_BASE or has_gpu
    return settings.after_training == "on"


@dataclass
class Row:
    name: str  # "base", "step-000250", "final"
    step: int  # 0 for the base model
    val_loss: float | None = None
    adherence: float | None = None
    style: float | None = None
    leak: float | None = None
    diversity: float | None = None
    kid: float | None = None
    judged_style_rate: float | None = None
    judged_adherence_rate: float | None = None
    judged_leak_rate: float | None = None
    seconds: float = 0.0


@dataclass
class Recommendation:
    name: str
    step: int
    reason: str
    source: str  # "judge" or "clip": which scores the rule used
    eligible: bool  # False: no checkpoint met the rule, this is the best trade-off


# -- which adapters --------------------------------------------------------------------------------------
def adapters(run_dir: Path, which: str | list[str] = "all") -> list[tuple[str, int, Path | None]]:
    """(name, step, folder) to evaluate: the base first (folder None), then checkpoints, then final.

    `which`: "all", "final", or a list of steps (ints or strings). `final/` is left out when a
    checkpoint of the same step exists (the trainer saves both at the end; they are the same LoRA).
    """
    from .checkpoints import checkpoint_dirs

    found = [(p.name, int(p.name.split("-")[1]), p) for p in checkpoint_dirs(run_dir) if (p / DIFFUSERS_FILENAME).exists()]
    final = run_dir / "final"
    if (final / DIFFUSERS_FILENAME).exists():
        step = lora_info(final).get("steps", 0)
        if step not in {s for _, s, _ in found}:
            found.append(("final", int(step), final))
    found.sort(key=lambda a: a[1])
    if which == "final" or which == ["final"]:
        found = found[-1:]  # final/, or the checkpoint of the same step
    elif which != "all" and which != ["all"]:
        wanted = {int(s) for s in which}
        missing = wanted - {s for _, s, _ in found}
        if missing:
            raise LoraStudioError(f"{run_dir} has no checkpoint at step(s) {', '.join(map(str, sorted(missing)))}; "
                                  f"it has {', '.join(str(s) for _, s, _ in found) or 'none'}")
        found = [a for a in found if a[1] in wanted]
    if not found:
        raise LoraStudioError(f"{run_dir} has no checkpoints to evaluate; train first (output.save_every saves them)")
    return [("base", 0, None), *found]


def lora_info(folder: Path) -> dict[str, Any]:
    """A LoRA folder's lora_info.json ({} if unreadable)."""
    try:
        return json.loads((folder / INFO_FILENAME).read_text())
    except (OSError, ValueError):
        return {}


# -- evaluation ---------------------------------------------------------------------------------------------
def evaluate_run(
    run_dir: str | Path, settings: EvalSettings | None = None, checkpoints: str | list[str] = "all", *,
    notes: list[str] | None = None, progress: Callable[[float, str], None] | None = None, device: str | None = None,
) -> list[Row]:
    """Every row (base first). Scores the metric models cannot give stay None, with a line in `notes`."""
    from . import config as config_mod
    from .eval_scores import Scorer

    run_dir = Path(run_dir)
    settings = settings or EvalSettings()
    notes = notes if notes is not None else []
    progress = progress or (lambda fraction, text: None)
    cfg = config_mod.load(run_dir)
    todo = adapters(run_dir, checkpoints)
    scorer = Scorer(run_dir, cfg, settings, notes, device=device)
    rows = []
    for k, (name, step, folder) in enumerate(todo):
        progress(k / len(todo), f"evaluating {name} ({k + 1}/{len(todo)})")
        started = time.perf_counter()
        row = Row(name, step)
        lora = None if folder is None else folder / DIFFUSERS_FILENAME
        row.val_loss = scorer.validation_loss(lora)
        for key, value in scorer.scores(lora, name).items():
            setattr(row, key, value)
        row.seconds = round(time.perf_counter() - started, 2)
        rows.append(row)
        log.info("%s: %s", name, {k: v for k, v in dataclasses.asdict(row).items() if v is not None})
    progress(1.0, "done")
    return rows


# -- the rule ----------------------------------------------------------------------------------------------
def _scores(row: Row, source: str) -> tuple[float | None, float | None, float | None]:
    if source == "judge":
        return row.judged_style_rate, row.judged_adherence_rate, row.judged_leak_rate
    return row.style, row.adherence, row.leak


def recommend(rows: list[Row], settings: EvalSettings | None = None) -> Recommendation | None:
    """The checkpoint to keep, by the rule in the module docstring; None without scores."""
    settings = settings or EvalSettings()
    base = next((r for r in rows if r.name == "base"), None)
    others = [r for r in rows if r.name != "base"]
    if base is None or not others:
        return None
    source = "judge" if all(None not in _scores(r, "judge") for r in rows) else "clip"
    if None in _scores(base, source) or any(None in _scores(r, source) for r in others):
        return None
    b_style, b_adh, b_leak = _scores(base, source)
    floor = b_adh - settings.adherence_margin * abs(b_adh)

    def judged(row: Row) -> dict[str, float]:
        style, adh, leak = _scores(row, source)
        gain = style - b_style
        allowed_leak = settings.leak_ratio * max(gain, 0.0)
        return {"gain": gain, "adh": adh, "leak_gain": leak - b_leak, "allowed_leak": allowed_leak,
                "trade": gain - max(0.0, floor - adh) - max(0.0, leak - b_leak - allowed_leak)}

    facts = {r.name: judged(r) for r in others}

    def ties(row: Row) -> tuple:
        # Between equal picks: the one that leaks least, keeps more adherence, then (on the judge's rates, which a few
        # pictures leave equal at many late checkpoints) whose pictures are closest to the training images, then the
        # earlier one.
        closer = row.style if source == "judge" and row.style is not None else 0.0
        return -facts[row.name]["leak_gain"], facts[row.name]["adh"], closer, -row.step

    def leaks_little(row: Row) -> bool:
        return facts[row.name]["leak_gain"] <= facts[row.name]["allowed_leak"]

    taken = max((facts[r.name]["gain"] for r in others if leaks_little(r)), default=0.0) / 2
    eligible = [r for r in others if facts[r.name]["gain"] > 0 and facts[r.name]["gain"] >= taken
                and facts[r.name]["adh"] >= floor and leaks_little(r)]
    what = "judged rates" if source == "judge" else "CLIP scores"
    if eligible:
        pick = max(eligible, key=lambda r: (facts[r.name]["gain"], *ties(r)))
        f = facts[pick.name]
        reason = (f"{_label(pick)} has the most style among the checkpoints that keep prompt adherence within "
                  f"{settings.adherence_margin:.0%} of the base model's ({f['adh']:.3f} vs base {b_adh:.3f}) and leak "
                  f"little (style +{f['gain']:.3f} with the trigger, {f['leak_gain']:+.3f} without); {what}")
        later = [r for r in others if r.step > pick.step and facts[r.name]["gain"] > f["gain"]]
        if later:
            worse = later[-1]
            reason += (f". Later {_label(worse)} has more style (+{facts[worse.name]['gain']:.3f}) but "
                       + ("loses prompt adherence" if facts[worse.name]["adh"] < floor else "leaks into prompts without the trigger"))
        return Recommendation(pick.name, pick.step, reason, source, True)
    pick = max(others, key=lambda r: (facts[r.name]["trade"], *ties(r)))
    f = facts[pick.name]
    why = []
    if all(facts[r.name]["gain"] <= 0 for r in others):
        why.append("no checkpoint shows more of the training style than the base model")
    if all(facts[r.name]["adh"] < floor for r in others):
        why.append(f"every checkpoint loses more than {settings.adherence_margin:.0%} of the base model's prompt adherence")
    if not why and all(facts[r.name]["gain"] < taken for r in others if facts[r.name]["adh"] >= floor and leaks_little(r)):
        why.append(f"the checkpoints that keep prompt adherence show little of the style (less than half the "
                   f"+{2 * taken:.3f} the others reach)")
    if not why:
        why.append("no checkpoint both keeps prompt adherence and keeps its style to the trigger")
    reason = (f"{'; '.join(why)}; {_label(pick)} is the best trade-off (style {f['gain']:+.3f}, adherence "
              f"{f['adh']:.3f} vs base {b_adh:.3f}, leak {f['leak_gain']:+.3f}); {what}")
    return Recommendation(pick.name, pick.step, reason, source, False)


def _label(row: Row) -> str:
    return f"step {row.step}" + (" (final)" if row.name == "final" else "")


# -- results on disk ---------------------------------------------------------------------------------------
def save_evaluation(
    run_dir: str | Path, rows: list[Row], recommendation: Recommendation | None, settings: EvalSettings,
    notes: list[str], seconds: float,
) -> dict[str, Any]:
    """RUN/evaluation.json, and RUN/best/ for the pick (removed when there is none)."""
    run_dir = Path(run_dir)
    data = {
        "version": 1, "time": round(time.time(), 3), "seconds": round(seconds, 2),
        "settings": dataclasses.asdict(settings), "rows": [dataclasses.asdict(r) for r in rows],
        "recommendation": dataclasses.asdict(recommendation) if recommendation else None, "notes": notes,
    }
    atomic_write_text(run_dir / EVALUATION_FILENAME, json.dumps(data, indent=2))
    best = run_dir / BEST_DIR
    if recommendation is None:
        shutil.rmtree(best, ignore_errors=True)
        return data
    source = run_dir / "final" if recommendation.name == "final" else run_dir / "checkpoints" / recommendation.name
    tmp = run_dir / f".tmp-{BEST_DIR}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for path in source.iterdir():  # the LoRA files, not the training state
        if path.is_file() and (path.suffix == ".safetensors" or path.name == INFO_FILENAME):
            shutil.copy2(path, tmp / path.name)
    row = next(r for r in rows if r.name == recommendation.name)
    base = next((r for r in rows if r.name == "base"), None)
    atomic_write_text(tmp / EVALUATION_FILENAME, json.dumps({
        "checkpoint": recommendation.name, "step": recommendation.step, "reason": recommendation.reason,
        "source": recommendation.source, "eligible": recommendation.eligible, "scores": dataclasses.asdict(row),
        "base": dataclasses.asdict(base) if base else None,
    }, indent=2))
    replace_dir(tmp, best)
    return data


def load_evaluation(run_dir: str | Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(run_dir) / EVALUATION_FILENAME).read_text())
    except (OSError, ValueError):
        return None


def evaluate(
    run_dir: str | Path, settings: EvalSettings | None = None, checkpoints: str | list[str] = "all", *,
    progress: Callable[[float, str], None] | None = None, device: str | None = None,
) -> dict[str, Any]:
    """evaluate_run + recommend + save_evaluation: what the CLI, the UI and the trainer call."""
    settings = settings or EvalSettings()
    started, notes = time.perf_counter(), []
    rows = evaluate_run(run_dir, settings, checkpoints, notes=notes, progress=progress, device=device)
    recommendation = recommend(rows, settings)
    if recommendation is None and not notes:
        notes.append("no recommendation: the base model and at least one checkpoint need scores")
    return save_evaluation(run_dir, rows, recommendation, settings, notes, time.perf_counter() - started)


__all__ = ["EvalSettings", "Recommendation", "Row", "evaluate", "evaluate_run", "recommend"]
