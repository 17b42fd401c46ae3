"""`python -m lora_trainer <command>`: train, check, generate, caption, push.

Every argument parser and every line the command line prints live here; the commands call the
engine's functions. Errors a user can cause print one message that says what to do (no
traceback) and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from . import config as config_mod
from .errors import LoraStudioError
from .presets import PRESETS, preset_settings

log = logging.getLogger("lora_trainer")

# CLI flag -> config field, for the fields people change most.


COMMON_FLAGS = {
    "base": ("model.base", str),
    "trigger": ("data.trigger", str),
    "steps": ("optim.steps", int),
    "rank": ("lora.rank", int),
    "resolution": ("data.resolution", int),
    "lr": ("optim.learning_rate", float),
    "name": ("output.name", str),
}


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", help="run folder (holding config.toml); created if needed")
    p.add_argument("--config", help="config.toml to start from (copied into the run folder with the overrides)")
    p.add_argument("--images", help="images to train on: a folder (captions, kohya N_name folders, metadata.jsonl), a zip or a dataset.toml; copied into RUN/dataset")
    p.add_argument("--reg-images", metavar="PATH", help="regularization (class) images for prior preservation: a folder "
                   "or zip with optional .txt captions; copied into RUN/reg and set as data.reg_images (see also "
                   "data.reg_caption, optim.prior_loss_weight)")
    p.add_argument("--out", help="run folder to write to (default: the folder of --config, or RUN)")
    for flag, (dotted, kind) in COMMON_FLAGS.items():
        p.add_argument(f"--{flag}", type=kind, help=f"sets {dotted}: {config_mod.field_info(dotted)['help']}")
    p.add_argument("--preset", help="start from a preset's settings for the base: " + ", ".join(PRESETS) + " (flags and --set override it)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="set any config field, e.g. --set optim.lr_scheduler=cosine")


def _run_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    if args.run:
        return Path(args.run)
    if args.config:
        return Path(args.config).parent
    raise LoraStudioError("say where the run lives: a run folder (RUN or --out DIR), or --config FILE")


def resolve_config(args: argparse.Namespace) -> tuple[Path, config_mod.TrainConfig]:
    """The run folder and its config: --config or RUN/config.toml or defaults, then --images, then the flags.

    --images (a folder, a zip, a kohya layout, loose files) is taken in by intake into RUN/dataset:
    normalised copies, bad files skipped with a reason (the report is printed), kohya dataset.toml
    settings applied unless a flag says otherwise.
    """
    run_dir = _run_dir(args)
    source = Path(args.config) if args.config else run_dir / config_mod.CONFIG_FILENAME
    cfg = config_mod.load(source) if source.exists() else config_mod.TrainConfig()
    from .prior import REG_FOLDER

    if args.images and not _is_main_process():
        cfg.set("data.images", "dataset")  # the main process takes the images in; train() waits for it
    elif args.images:
        report = _take_in(args, cfg, [args.images], run_dir / "dataset", reg_dest=run_dir / REG_FOLDER)
        for dotted, value in report.config_overrides.items():
            cfg.set(dotted, value)
        cfg.set("data.images", "dataset")
        if report.reg is not None and report.reg.dest_counts:  # a dataset.toml's is_reg subsets
            cfg.set("data.reg_images", REG_FOLDER)
    if args.reg_images:
        if _is_main_process():
            _take_in(args, cfg, [args.reg_images], run_dir / REG_FOLDER, kind="reg")
        cfg.set("data.reg_images", REG_FOLDER)
    if args.preset:  # exactly what the app's preset sets, for the base the flags name
        for dotted, value in preset_settings(args.preset, args.base or cfg.model.base).items():
            cfg.set(dotted, value)
    for flag, (dotted, _) in COMMON_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            cfg.set(dotted, value)
    for assignment in args.set:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise config_mod.ConfigError(f"--set {assignment!r}: expected SECTION.FIELD=VALUE")
        cfg.set(key.strip(), value)
    return run_dir, config_mod.validate(cfg)


def _take_in(args: argparse.Namespace, cfg: config_mod.TrainConfig, sources: list[str], dest: Path, **options):
    """intake.ingest into `dest` at the run's resolution, its report printed (also when nothing is usable)."""
    from .errors import DatasetError
    from .intake import ingest
    from .models import native_resolution

    try:
        resolution = args.resolution or cfg.data.resolution or native_resolution(args.base or cfg.model.base)
        report = ingest(sources, dest, resolution=resolution, trust_toml_paths=True, **options)
    except DatasetError as e:
        if e.report is not None:
            print(e.report.format())
        raise
    print(report.format())
    return report


def _setup_logging(run_dir: Path | None, main: bool) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None and main:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True)
    for noisy in ("diffusers", "transformers", "accelerate", "httpx", "httpx2", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


# -- commands -------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from .events import EVENTS_FILENAME, EventWriter

    main = _is_main_process()
    if args.resume_from and main:
        from .hub.checkpoints import fetch_checkpoint

        # First, so the run's own config.toml (pushed with the checkpoint) is what the flags override.
        path = fetch_checkpoint(args.resume_from, _run_dir(args))
        print(f"fetched {path.name} from {args.resume_from}")
    run_dir, cfg = resolve_config(args)
    _setup_logging(run_dir, main)
    if getattr(args, "on", "local") == "hf-jobs":
        from .hub.jobcli import train_command

        if main:
            from .checkpoints import check_resumable

            check_resumable(run_dir, cfg)  # refuse before the run's config.toml is overwritten
            config_mod.save(cfg, run_dir)
        return train_command(run_dir, args)
    try:
        if main:
            from .checkpoints import check_resumable

            check_resumable(run_dir, cfg)  # refuse before the run's config.toml is overwritten
            config_mod.save(cfg, run_dir)
        from .train import train

        result = train(run_dir, cfg)
        if main:
            print(f"{result['status']} at step {result['step']}: {run_dir}")
        return 0
    except LoraStudioError as e:
        hint = getattr(e, "hint", "") or "fix the setting named above and start again; completed checkpoints are kept"
        log.error("%s", e)
        if main:
            EventWriter(run_dir / EVENTS_FILENAME).emit("failed", error=str(e), hint=hint)
        print(f"error: {e}\nhint: {hint}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - record why, for the UI, before dying
        log.error("training crashed:\n%s", traceback.format_exc())
        if main:
            EventWriter(run_dir / EVENTS_FILENAME).emit("failed", error=f"{type(e).__name__}: {e}", hint=_crash_hint(e))
        raise


def _crash_hint(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".lower()
    if "out of memory" in text:
        return "out of GPU memory: lower optim.batch_size or data.resolution, enable optim.gradient_checkpointing, use optim.mixed_precision = bf16/fp16"
    return "an unexpected error; the traceback is in train.log. Completed checkpoints are kept: start again to resume"


def cmd_check(args: argparse.Namespace) -> int:
    """Validate config and dataset, print the plan; loads no model and changes no run folder."""
    if not (args.out or args.run or args.config):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="lora-check-") as scratch:  # a look at --images needs no run
            args.out = scratch
            return _check(args, saved=False)
    return _check(args, saved=True)


def _check(args: argparse.Namespace, saved: bool) -> int:
    from .preflight import preflight

    run_dir, cfg = resolve_config(args)
    config_file = Path(args.config) if args.config else run_dir / config_mod.CONFIG_FILENAME
    source = str(config_file) if config_file.exists() and (saved or args.config) else ""
    gpu_memory = int(args.gpu_memory * 2**30) if args.gpu_memory else None
    report = preflight(run_dir, cfg, config_source=source, gpu_memory=gpu_memory, calibrate=not args.no_calibrate)
    print(report.format(images_label=args.images if args.images and not saved else None))
    return 1 if report.refused else 0  # the trainer would refuse it before loading


def cmd_generate(args: argparse.Namespace) -> int:
    from .inference import Generator, LoraSpec

    gen = Generator(args.base)
    loras = [LoraSpec.parse(spec) for spec in args.lora]
    out = Path(args.out)
    if args.compare:
        image = gen.compare(args.prompt, loras, seed=args.seed, steps=args.steps, guidance=args.guidance, size=args.size)
    else:
        image = gen.generate(args.prompt, loras, seed=args.seed, steps=args.steps, guidance=args.guidance, size=args.size)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_trainer", description="Train and use Stable Diffusion LoRAs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a LoRA (resumes if the run folder has a checkpoint)")
    _add_config_arguments(p)
    p.add_argument("--resume-from", help="hub:user/name: continue from the newest checkpoint pushed there")
    from .hub.jobcli import add_job_arguments

    add_job_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("check", help="validate the config and dataset and print the plan and estimates (times a few steps where the base is on disk)")
    _add_config_arguments(p)
    p.add_argument("--gpu-memory", type=float, metavar="GB",
                   help="plan the run's memory for a GPU with this many GiB (default: the GPU found, if any)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="estimate the time from the fixed table instead of timing a few real steps here "
                        "(which loads the base when it is on disk: built-in, or a local model with a GPU)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("generate", help="generate an image with a base model and LoRAs")
    p.add_argument("--base", default="builtin:tiny-sd", help="base model (as model.base)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]", help="a LoRA file or run folder, repeatable")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.0)
    p.add_argument("--size", type=int, default=0, help="image side in pixels (default: the model's)")
    p.add_argument("--compare", action="store_true", help="LoRA off and on, side by side, same seed")
    p.add_argument("--out", default="generated.png")
    p.set_defaults(func=cmd_generate)
    _add_caption_and_push(sub)
    return parser


def cmd_caption(args: argparse.Namespace) -> int:
    """Caption a folder; LoraStudioError propagates for main() to print as one line."""
    from .captioners import captioner_options, make_captioner
    from .captioning import caption_folder

    if args.detail is not None and args.model != "florence2":
        raise LoraStudioError("--detail is Florence-2's caption task; use it with --model florence2")
    if args.instruction is not None and args.model != "qwen-vl":
        raise LoraStudioError("--instruction is what Qwen-VL is asked; use it with --model qwen-vl")
    captioner = None
    if args.style != "trigger":
        options = captioner_options(args.model, detail=args.detail, instruction=args.instruction,
                                    batch_size=args.batch_size)
        captioner = make_captioner(args.model, args.weights, **options).load()  # fails before any file is written

    def report_progress(done: int, total: int) -> None:
        print(f"\rcaptioned {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    result = caption_folder(
        args.folder, captioner, trigger=args.trigger, style=args.style, template=args.template, suffix=args.suffix,
        overwrite=args.overwrite, batch_size=args.batch_size, progress=report_progress,
    )
    print(result.summary())
    return 1 if result.failed else 0


def cmd_push(args: argparse.Namespace) -> int:
    """Publish a run: print the repo URL (progress on stderr)."""
    from .hub import push_run

    result = push_run(
        args.run, args.repo, token=args.token, private=args.private, endpoint=args.endpoint,
        progress=lambda message: print(message, file=sys.stderr), checkpoint=args.checkpoint,
    )
    print(result.url)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a run's checkpoints: progress lines, then the table (the pick marked)."""
    from .eval_report import table_text
    from .evaluate import evaluate, settings_from

    values = {}
    for assignment in args.set:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise config_mod.ConfigError(f"--set {assignment!r}: expected FIELD=VALUE")
        values[key.strip().removeprefix("eval.")] = value
    which = args.checkpoints[0] if args.checkpoints in (["all"], ["final"]) else args.checkpoints
    data = evaluate(Path(args.run), settings_from(values), which, device=args.device,
                    progress=lambda fraction, text: print(f"[{fraction:4.0%}] {text}", flush=True))
    print(table_text(data))
    return 0


def _add_caption_and_push(sub) -> None:
    from .captioners import CAPTIONERS, DETAILS, KINDS
    from .captioning import DEFAULT_TEMPLATE, STYLES

    p = sub.add_parser("caption", help="caption a folder of images (BLIP, Florence-2 or Qwen-VL) around a trigger word")
    p.add_argument("folder", metavar="DIR", help="Dataset folder: images (recursively) get a same-named .txt caption.")
    p.add_argument("--trigger", default="", help="Trigger word placed by --template (e.g. ohwx).")
    p.add_argument("--style", choices=STYLES, default="sparse",
                   help="sparse: subject only, style words stripped (style LoRAs); full: all the captioner says; "
                        "trigger: the trigger word alone (no model).")
    p.add_argument("--template", default=DEFAULT_TEMPLATE, help="Where the trigger goes: {trigger} and {caption}.")
    p.add_argument("--suffix", default="", help="Appended to every caption, e.g. 'in the style of {trigger}'.")
    p.add_argument("--overwrite", action="store_true", help="Replace existing captions (kept by default).")
    p.add_argument("--model", choices=KINDS, default="blip",
                   help="The captioner: " + "; ".join(f"{k}: {i.choose}" for k, i in CAPTIONERS.items()) + ".")
    p.add_argument("--weights", default="", metavar="ID_OR_FOLDER",
                   help="The captioner's Hub id or local folder; default: " +
                        ", ".join(f"{i.model} ({k})" for k, i in CAPTIONERS.items()) + ".")
    p.add_argument("--detail", choices=DETAILS, default=None,
                   help="Florence-2's caption task: short (default), detailed or paragraph.")
    p.add_argument("--instruction", default=None,
                   help="Qwen-VL's instruction (default: the subject and content in one sentence, not the style).")
    p.add_argument("--batch-size", type=int, default=8, help="Images captioned at once (lower it if memory runs out).")
    p.set_defaults(func=cmd_caption)

    p = sub.add_parser("push", help="publish a run to the Hugging Face Hub")
    p.add_argument("run", metavar="RUN", help="Run folder with a finished final/ LoRA.")
    p.add_argument("--repo", required=True, help="Hub repo to publish to: user/name or org/name (created if missing).")
    p.add_argument("--private", action="store_true", help="Create the repo private (an existing repo keeps its visibility).")
    p.add_argument("--checkpoint", choices=("best", "final"), default=None,
                   help="Which LoRA to publish: best (the checkpoint the evaluation recommends, RUN/best/) or final "
                   "(the last step). Default: best when the run has one, else final.")
    # No default value here: a default would print the token in --help. It is read when pushing.
    p.add_argument(
        "--token", default=None,
        help="Hub token with write access; default: the HF_TOKEN environment variable (safer than this flag, "
        "which other users of the machine can see in the process list), then `hf auth login`'s token.",
    )
    p.add_argument("--endpoint", default=None, help="Hub URL; default: HF_ENDPOINT or https://huggingface.co.")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("evaluate", help="score every checkpoint (adherence, style, leak, validation loss) and pick one")
    p.add_argument("run", metavar="RUN", help="run folder (with checkpoints/ and final/)")
    p.add_argument("--checkpoints", nargs="+", default=["all"], metavar="all|final|STEP",
                   help="which checkpoints to evaluate besides the base model (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="an evaluation setting, e.g. --set seeds=4 --set clip_model=./my-clip")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.set_defaults(func=cmd_evaluate)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LoraStudioError as e:
        hint = getattr(e, "hint", "")
        print(f"error: {e}" + (f"\nhint: {hint}" if hint else ""), file=sys.stderr)
        return 1
