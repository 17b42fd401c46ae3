"""Read a kohya-ss `dataset.toml`: the image folders to ingest and the settings we can carry over.

kohya's layout: `[general]` options apply to everything, `[[datasets]]` options to one dataset,
`[[datasets.subsets]]` options (image_dir, num_repeats, caption_extension, ...) to one folder; the
more specific table wins. LoRA Studio has one setting for the whole dataset, so where subsets
disagree the first one is used and a warning says so. Subsets with `is_reg = true` are regularization
images (prior preservation): ingest takes them into their own folder (RUN/reg), and the first one's
`class_tokens` becomes data.reg_caption; their settings are not the training images'.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import TrainConfig, validate
from ..errors import ConfigError
from .report import IntakeReport
from .sources import REPEATS_RE, repeats_folder

# kohya option -> our dotted config field
KOHYA_TO_CONFIG = {
    "shuffle_caption": "data.shuffle_captions",
    "keep_tokens": "data.keep_tokens",
    "caption_dropout_rate": "data.caption_dropout",
    "resolution": "data.resolution",
    "flip_aug": "data.flip",
    "enable_bucket": "data.buckets",
    "bucket_reso_steps": "data.bucket_step",
}


@dataclass
class KohyaSubset:
    image_dir: Path
    group: str | None  # output folder "N_name" when num_repeats is given
    caption_extension: str | None
    label: str  # image_dir as written in the toml: how the report names its files
    is_reg: bool = False  # regularization images (prior preservation), not training images
    class_tokens: str | None = None  # kohya's caption of an image without a caption file


def read_dataset_toml(
    path: Path, label: str, report: IntakeReport, trust_paths: bool = False
) -> tuple[list[KohyaSubset], dict[str, Any]]:
    """The subsets to ingest and the config overrides; problems are reported, never raised.

    Unless `trust_paths`, an image_dir must lie in the toml's own folder tree: an uploaded toml
    must not make the server copy its other files (another user's dataset) into this one.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as e:
        report.skip(label, f"not a readable TOML file ({e})", "bad-metadata")
        return [], {}
    subsets: list[KohyaSubset] = []
    settings: dict[str, list[tuple[Any, str]]] = {}  # kohya key -> [(value, where)]
    for where, options in _subset_options(text, label, report):
        found = _subset(path, options, where, report, trust_paths)
        if found is not None:
            subsets.append(found)
            if not found.is_reg:  # the regularization subsets' options are not the training images'
                _collect(settings, options, where)
    return subsets, _overrides(settings, label, report)


def toml_settings(text: str, label: str, report: IntakeReport) -> dict[str, Any]:
    """Config overrides of a dataset.toml found inside a zip or folder; its image_dir paths are not followed."""
    settings: dict[str, list[tuple[Any, str]]] = {}
    for where, options in _subset_options(text, label, report):
        _collect(settings, options, where)
    if settings:
        report.warn(label, "settings applied; its image_dir paths are not followed (the N_name folders give repeats)")
    return _overrides(settings, label, report)


def _subset_options(text: str, label: str, report: IntakeReport) -> list[tuple[str, dict[str, Any]]]:
    """(where, effective options) per subset: [general] < [[datasets]] < [[datasets.subsets]]."""
    import tomllib  # local: keeps import sorting stable while pyproject's ruff target is py310 (tomllib is 3.11+)

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        report.skip(label, f"not a readable TOML file ({e})", "bad-metadata")
        return []
    general = data.get("general", {})
    datasets = data.get("datasets")
    if not isinstance(general, dict) or not isinstance(datasets, list) or not datasets:
        report.skip(label, "no [[datasets]] table: not a kohya dataset config", "bad-metadata")
        return []
    found = []
    for d, dataset in enumerate(datasets, 1):
        if not isinstance(dataset, dict):
            continue
        dataset_options = {k: v for k, v in dataset.items() if k != "subsets"}
        for s, subset in enumerate(dataset.get("subsets") or [], 1):
            options = {**general, **dataset_options, **(subset if isinstance(subset, dict) else {})}
            found.append((f"{label} [[datasets]] #{d} subset #{s}", options))
    return found


def _collect(settings: dict[str, list[tuple[Any, str]]], options: dict[str, Any], where: str) -> None:
    for key in KOHYA_TO_CONFIG:
        if key in options:
            settings.setdefault(key, []).append((options[key], where))


def _subset(toml_path: Path, options: dict[str, Any], where: str, report: IntakeReport,
            trust_paths: bool) -> KohyaSubset | None:
    image_dir = options.get("image_dir")
    if not isinstance(image_dir, str) or not image_dir:
        what = "metadata_file (fine-tuning) subsets are not supported" if "metadata_file" in options else "no image_dir"
        report.skip(where, f"{what}; give each subset an image_dir", "bad-metadata")
        return None
    # kohya resolves relative paths from its working directory; next to the toml is the likelier home
    candidates = [Path(image_dir)] if Path(image_dir).is_absolute() else [toml_path.parent / image_dir, Path(image_dir)]
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is None:
        report.skip(f"{where}: {image_dir}", "image_dir not found; fix the path in dataset.toml", "not-found")
        return None
    home = toml_path.parent.resolve()
    if not trust_paths and folder.resolve() != home and home not in folder.resolve().parents:
        report.skip(f"{where}: {image_dir}", "image_dir is outside the folder of dataset.toml; move the images "
                    "next to it (or, on your own machine, allow paths anywhere)", "not-found")
        return None
    repeats = options.get("num_repeats")
    group = None
    if repeats is not None:
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            report.warn(where, f"num_repeats = {repeats!r} is not a positive integer; using 1")
            repeats = 1
        m = REPEATS_RE.match(folder.name)
        group = repeats_folder(repeats, m[2] if m else folder.name)
    ext = options.get("caption_extension")
    ext = ("." + ext.lstrip(".")) if isinstance(ext, str) and ext.strip(".") else None
    tokens = options.get("class_tokens")
    tokens = tokens.strip() if isinstance(tokens, str) and tokens.strip() else None
    return KohyaSubset(folder, group, ext, image_dir, is_reg=bool(options.get("is_reg")), class_tokens=tokens)


def _overrides(settings: dict[str, list[tuple[Any, str]]], label: str, report: IntakeReport) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for key, values in settings.items():
        value, _ = values[0]
        distinct = list(dict.fromkeys(repr(v) for v, _ in values))
        if len(distinct) > 1:
            report.warn(label, f"{key} differs between subsets ({', '.join(distinct)}); using {value!r} for all")
        if key == "resolution" and isinstance(value, list | tuple) and value:
            report.warn(label, f"resolution {list(value)} is not square; using the larger side for the buckets")
            value = max(value)
        dotted = KOHYA_TO_CONFIG[key]
        try:  # only hand over values our config accepts
            cfg = TrainConfig()
            cfg.set(dotted, value)
            validate(cfg)
        except ConfigError as e:
            report.warn(label, f"{key} = {value!r} ignored: {str(e).splitlines()[-1].strip(' -')}")
            continue
        section, name = dotted.split(".")
        overrides[dotted] = getattr(getattr(cfg, section), name)
    return overrides
