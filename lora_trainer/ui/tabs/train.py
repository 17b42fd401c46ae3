"""Train: presets, every config field (generated from the config's metadata), where to train (this
machine or Hugging Face Jobs: ui/remote.py), Check, Start / Stop / Resume; the live view (step, ETA,
loss, samples, memory) is ui/live.py, driven by the tab's gr.Timer."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import gradio as gr

from ... import captioners
from ... import config as config_mod
from ...errors import ConfigError
from .. import evaluation, fields, jobs, presets, remote, system
from ..common import Shared, info, skip_all, user_errors
from ..live import full_view, hub_token, page_view, poll, username
from ..monitor import VALIDATION_SERIES
from ..workspace import DATASET, Session

BASIC_FIELDS = ["output.name", "optim.steps", "lora.rank", "lora.alpha", "optim.learning_rate", "data.resolution"]
SHARED_FIELDS = {"model.base", "data.trigger"}  # their controls live at the top of the page and on the Captions tab
BLIP_STYLES = {"sparse", "full"}  # the caption styles (captioning.STYLES) that run the captioning model
POLL_SECONDS = 1.0


class TrainTab:
    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        initial = presets.settings(presets.DEFAULT_PRESET, system.default_base())
        self.settings: dict[str, gr.components.Component] = {"model.base": shared.base, "data.trigger": shared.trigger}
        with gr.Tab("3 · Train", id="train"):
            with gr.Row(equal_height=True):
                self.preset = gr.Radio([*presets.PRESETS, presets.CUSTOM], value=presets.DEFAULT_PRESET, label="Preset", scale=2)
                self.preset_note = gr.Markdown(presets.describe(presets.DEFAULT_PRESET), scale=3)
            with gr.Row():
                for dotted in BASIC_FIELDS:
                    self.settings[dotted] = fields.control(dotted, min_width=150, **_value(initial, dotted))
            with gr.Accordion("Advanced: every setting", open=False):
                gr.Markdown("The base model is picked at the top of the page and the trigger word on the Captions tab. "
                            "Each setting's help comes from the trainer's own config (lora_trainer/config.py).")
                for section in config_mod.SECTIONS:
                    names = [n for n in config_mod.field_names()
                             if n.startswith(section + ".") and n not in SHARED_FIELDS and n not in BASIC_FIELDS]
                    if not names:
                        continue
                    gr.Markdown(f"#### {fields.SECTION_TITLES[section]}")
                    # switches in a row of their own: squeezed between text fields they shrink to a sliver
                    switches = [n for n in names if config_mod.field_info(n)["type"] == "bool"]
                    for group in ([n for n in names if n not in switches], switches):
                        if group:
                            with gr.Row():
                                for dotted in group:
                                    self.settings[dotted] = fields.control(dotted, min_width=260, scale=1,
                                                                           **_value(initial, dotted))
            self.where, self.flavor, self.timeout = remote.controls()
            with gr.Row():
                self.check = gr.Button("Check", variant="secondary", elem_id="check-run")
                self.start = gr.Button("Start training", variant="primary", elem_id="start-training")
                self.stop = gr.Button("Stop", variant="stop", interactive=False, elem_id="stop-training")
                self.resume = gr.Button("Resume", interactive=False, elem_id="resume-training")
            with gr.Accordion("Continue a run from the Hub (after a restart, or on another machine)", open=False):
                gr.Markdown("A run whose checkpoints were pushed to the Hub (Advanced → *Hub repo that every saved "
                            "checkpoint is pushed to*) continues here from its newest checkpoint, with its own "
                            "settings and images. On a Space, sign in with Hugging Face first (Publish tab).")
                with gr.Row(equal_height=True):
                    self.hub_repo = gr.Textbox(label="Checkpoint repo", placeholder="your-name/my-lora-checkpoints",
                                               scale=3, elem_id="resume-hub-repo")
                    self.hub_resume = gr.Button("Fetch and continue", scale=1, elem_id="resume-from-hub")
            self.check_report = gr.Markdown()
            self.status = gr.Markdown("Add images, then press **Check** to see the plan, then **Start training**.",
                                      elem_classes=["train-status"], elem_id="train-status")
            with gr.Row(equal_height=False):
                self.loss = gr.LinePlot(
                    x="step", y="loss", color="series", label="Loss", scale=3, color_title="",
                    caption="Blue: the loss of each step (noisy by nature). Orange: smoothed; it should drift down. "
                            "Green: validation loss on fixed images, noise and timesteps (comparable point to point).",
                    color_map={"raw": "#a3b8d6", "smoothed": "#e8590c", VALIDATION_SERIES: "#2f9e44"},
                    x_title="step", y_title="loss", elem_id="loss-plot",
                )
                self.samples = gr.Gallery(label="Samples (same prompts and seed), newest step first",
                                          columns=3, height=340, object_fit="contain", scale=2, elem_id="samples")
            with gr.Row(equal_height=False):
                self.memory = gr.Markdown()
                self.files = gr.File(label="Your LoRA: diffusers and kohya (A1111 / ComfyUI) formats",
                                     file_count="multiple", interactive=False)
            with gr.Accordion("Console output", open=False):
                self.console = gr.Textbox(show_label=False, lines=12, max_lines=12, interactive=False, autoscroll=True,
                                          elem_id="train-console")
            self.evaluation = evaluation.build(shared)  # table, plot and the recommended checkpoint (ui/evaluation.py)
            # Inside the tab: a stray child of gr.Tabs shifts the page's tab bookkeeping (a tab shows twice).
            self.timer = gr.Timer(POLL_SECONDS, active=False)
        self.view = [self.status, self.loss, self.samples, self.memory, self.files, self.console, self.timer,
                     shared.run, self.start, self.stop, self.resume]

    def wire(self) -> None:
        s, session = self.settings, self.shared.session
        self.check.click(check_run, [session], [self.check_report], inputs_kwargs=s, api_name="check_run")
        self.start.click(start_training, [session, self.where, self.flavor, self.timeout], self.view, inputs_kwargs=s,
                         api_name="start_training")
        self.where.change(remote.where_changed, [self.where], [self.flavor, self.timeout], api_name="train_where",
                          show_progress="minimal")
        self.stop.click(stop_training, [session], self.view, api_name="stop_training")
        self.resume.click(resume_training, [session], self.view, api_name="resume_training")
        self.hub_resume.click(continue_from_hub, [session, self.hub_repo], self.view, api_name="continue_from_hub")
        self.timer.tick(poll, [session], self.view, api_name="poll", show_progress="hidden", concurrency_limit=None)
        self.shared.on_run_change(page_view, [session], self.view)  # a reload follows a run's Hugging Face job again
        preset_targets = [self.preset_note, self.shared.caption_style, *(s[n] for n in presets.FIELDS)]
        self.preset.change(apply_preset, [self.preset, self.shared.base], preset_targets, api_visibility="private")
        # .input, not .change: only a person's pick adapts the resolution, not a run's saved settings arriving
        self.shared.base.input(apply_base, [self.shared.base, self.preset],
                               [s["data.resolution"], s["data.bucket_step"]], api_visibility="private")
        names = list(s)
        self.shared.on_run_change(lambda session: saved_settings(session, names), [session], [s[n] for n in names])
        # A new run starts from the preset the page shows, not from the previous run's form.
        own = [n for n in config_mod.field_names() if n not in SHARED_FIELDS]
        self.shared.on_new_run(fresh_settings, [session, self.preset, self.shared.base], [s[n] for n in own])


def apply_preset(name: str, base: str) -> tuple:
    """A preset's values into the form, and its caption style into the Captions tab where that style can run:
    the BLIP styles need the captioning model, and where it cannot load the style the user has is kept."""
    preset = presets.PRESETS.get(name)
    if preset is None:
        return (presets.describe(name), *skip_all(1 + len(presets.FIELDS)))
    values = presets.form_values(name, base)
    note, style = presets.describe(name), preset.caption_style
    if style in BLIP_STYLES and not system.blip_loadable(captioners.CAPTIONERS["blip"].model):
        note += (" The captioning model (BLIP) cannot load on this machine, so the caption style was left as it is: "
                 "use *Trigger only* or type your captions.")
        style = gr.skip()
    return (note, style, *(values[n] for n in presets.FIELDS))


def fresh_settings(session: Session, preset_name: str, base: str) -> tuple:
    """The form of a new run: every setting at its default, then the chosen preset's values, and a LoRA name no
    other run of this session uses. The base model and the trigger word (the images' captions use it) stay."""
    names = [n for n in config_mod.field_names() if n not in SHARED_FIELDS]
    values = {n: fields.from_config(config_mod.TrainConfig(), n) for n in names}
    preset = presets.PRESETS.get(preset_name)
    if preset is not None:
        values.update(presets.form_values(preset_name, base))
    elif system.is_builtin(base):
        values["data.resolution"], values["data.bucket_step"] = system.builtin_size(base)
    values["output.name"] = unused_name(session, str(values["output.name"]))
    return tuple(values[n] for n in names)


def unused_name(session: Session, name: str) -> str:
    """`name`, or `name-2`, `name-3`... if a run of this session already saved that LoRA name."""
    taken = set()
    for run_id in session.runs():
        try:
            taken.add(config_mod.load(session.run_dir(run_id)).output.name)
        except (ConfigError, OSError):
            continue
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def apply_base(base: str, preset_name: str) -> tuple:
    """Resolution and bucket step that suit the base model (a built-in one trains at its own size)."""
    if system.is_builtin(base):
        return system.builtin_size(base)
    preset = presets.PRESETS.get(preset_name) or presets.PRESETS[presets.DEFAULT_PRESET]
    values = presets.form_values(preset.name, base)
    return values["data.resolution"], values["data.bucket_step"]


def saved_settings(session: Session, names: list[str]) -> tuple:
    """The form as the current run was trained (a reload, or another run picked); untouched for a new run."""
    run = session.current()
    if run is None or not (run / config_mod.CONFIG_FILENAME).exists():
        return skip_all(len(names))
    try:
        cfg = config_mod.load(run)
    except ConfigError:
        return skip_all(len(names))
    return tuple(fields.from_config(cfg, name) for name in names)


def _value(initial: dict[str, Any], dotted: str) -> dict[str, Any]:
    return {"value": initial[dotted]} if dotted in initial else {}


def build(shared: Shared) -> TrainTab:
    tab = TrainTab(shared)
    tab.wire()
    return tab


# -- settings -> config ------------------------------------------------------------------------------
def build_config(run: Path, settings: dict[str, Any]) -> tuple[config_mod.TrainConfig, list[str]]:
    """The config the form describes, with what the UI decides for the user noted."""
    notes = []
    settings = dict(settings)
    base = str(settings.get("model.base") or "").strip()
    if not base:
        raise ConfigError("Pick a base model at the top of the page.")
    size = system.builtin_size(base)
    if size is not None:
        if (settings.get("data.resolution"), settings.get("data.bucket_step")) != size:
            notes.append(f"the built-in model {base} trains at {size[0]} px (bucket step {size[1]})")
        settings["data.resolution"], settings["data.bucket_step"] = size
    images = Path(str(settings.get("data.images") or DATASET))
    if images.is_absolute() or not (run / images).resolve().is_relative_to(run.resolve()):
        raise ConfigError("data.images must be a folder inside the run (normally 'dataset'); uploaded images live there.")
    reg = str(settings.get("data.reg_images") or "").strip()
    if reg and (Path(reg).is_absolute() or not (run / reg).resolve().is_relative_to(run.resolve())):
        raise ConfigError("data.reg_images must be a folder inside the run (e.g. 'reg'), or empty.")
    cfg = fields.to_config(settings)
    cfg.model.base = base
    return cfg, notes


def _dataset_ready(session: Session) -> Path:
    run = session.current()
    if run is None or not any(p.is_file() for p in (run / DATASET).rglob("*")):
        raise gr.Error(session.no_run("This run has no images yet: add some on the Upload tab first."))
    return run


# -- Check -------------------------------------------------------------------------------------------------
@user_errors
def check_run(session: Session, **settings: Any) -> str:
    """The pre-flight check: dataset, plan and estimates (a built-in base is timed for a few steps)."""
    from ...preflight import preflight

    run = _dataset_ready(session)
    cfg, notes = build_config(run, settings)
    # Timing a few steps loads the base: here only a built-in one (a few MB; a real one could take the GPU from a run).
    report = preflight(run, cfg, config_source="this page's settings", gpu=system.has_gpu(),
                       calibrate=cfg.model.base.startswith("builtin:"))
    heading = "#### Check: this run does not fit the GPU (see *memory plan*)" if report.refused else "#### Check passed"
    lines = [heading, f"```\n{report.format(images_label='this run')}\n```"]
    if notes:
        lines.append("Note: " + "; ".join(notes) + ".")
    return "\n\n".join(lines)


# -- Start / Stop / Resume -----------------------------------------------------------------------------
@user_errors
def start_training(session: Session, where: str | None = remote.LOCAL, flavor: str | None = None,
                   timeout: str | None = remote.DEFAULT_TIMEOUT, oauth_token: gr.OAuthToken | None = None,
                   oauth_profile: gr.OAuthProfile | None = None, **settings: Any) -> tuple:
    run = _dataset_ready(session)
    token = hub_token(oauth_token)
    job_args = remote.start_args(where, flavor, timeout, token)  # None: train on this machine
    job = jobs.MANAGER.get(run)
    if job is not None and job.active:
        raise gr.Error("This run is already training (or waiting in line). Stop it first, or make a New run.")
    from ...checkpoints import latest_checkpoint

    done = latest_checkpoint(run)
    if done is not None or (run / "final").is_dir():
        raise gr.Error(
            "This run already has training progress. Press **Resume** to continue it with its saved settings, or "
            "**New run** (at the top, with 'Copy images & captions') to train again with new settings.",
            duration=None, print_exception=False,
        )
    cfg, notes = build_config(run, settings)
    if job_args is None and not system.is_builtin(cfg.model.base) and not system.has_gpu():
        notes.append("there is no GPU here: a real model trains for days on a CPU (Stop keeps what is done)")
    (run / "events.jsonl").unlink(missing_ok=True)  # a run that failed before its first checkpoint starts clean
    config_mod.save(cfg, run)
    if job_args is None:
        jobs.MANAGER.submit(run, hub_token=token)
    else:
        jobs.MANAGER.submit(run, hub_token=token, args=job_args, remote=True, owner=remote.owner(username(oauth_profile)))
        info("Submitting to Hugging Face Jobs: the run and its images go to a private repo of yours, then the job "
             "starts (installing and loading take a few minutes). You can close this page: the job goes on.")
    for note in notes:
        info(f"Note: {note}.")
    return full_view(session)


@user_errors
def stop_training(session: Session, oauth_token: gr.OAuthToken | None = None) -> tuple:
    run = session.current()
    outcome = jobs.MANAGER.stop(run) if run else "idle"
    if outcome == "idle" and run is not None and remote.detached(run, jobs.MANAGER):
        from ...hub import jobs as hub_jobs

        hub_jobs.request_stop(run, token=hub_token(oauth_token))  # nothing follows it here: ask the job directly
        outcome = "stopping"
    message = {"stopping": "Stopping: the trainer saves a checkpoint after this step; Resume continues from it.",
               "cancelled": "Taken out of the line; nothing was trained.",
               "idle": "Nothing is running in this run."}[outcome]
    info(message)
    return full_view(session)


@user_errors
def resume_training(session: Session, oauth_token: gr.OAuthToken | None = None,
                    oauth_profile: gr.OAuthProfile | None = None) -> tuple:
    run = session.current()
    if run is None or not (run / config_mod.CONFIG_FILENAME).exists():
        raise gr.Error("Nothing to resume in this run: press Start training.")
    job = jobs.MANAGER.get(run)
    if job is not None and job.active:
        raise gr.Error("This run is already training (or waiting in line).")
    if remote.detached(run, jobs.MANAGER):  # its job still trains: follow it, never start a second one
        if not remote.reattach(run, jobs.MANAGER, hub_token(oauth_token), username(oauth_profile)):
            raise gr.Error("This run's Hugging Face job is still training: sign in with Hugging Face to follow it.")
        return full_view(session)
    job_args = remote.resume_args(run)  # a run that trained on Hugging Face Jobs goes on there
    if job_args is None:
        jobs.MANAGER.submit(run, hub_token=hub_token(oauth_token))
    else:
        jobs.MANAGER.submit(run, hub_token=hub_token(oauth_token), args=job_args, remote=True,
                            owner=remote.owner(username(oauth_profile)))
    return full_view(session)


@user_errors
def continue_from_hub(session: Session, repo_id: str, oauth_token: gr.OAuthToken | None = None,
                      progress=gr.Progress()) -> tuple:
    """A new run in this session from the newest checkpoint pushed to `repo_id` (config and images too), training on."""
    from ...hub import checkpoints as hub_checkpoints

    repo_id = (repo_id or "").strip()
    if not repo_id:
        raise gr.Error("Type the repo the checkpoints were pushed to, such as your-name/my-lora-checkpoints.")
    token = hub_token(oauth_token)
    if system.space_id() and token is None:
        raise gr.Error("On a shared Space, sign in with Hugging Face (Publish tab) first: checkpoint repos are private.")
    previous = session.current_run
    run_id = session.new_run()
    run = session.run_dir(run_id)
    (run / DATASET).rmdir()  # new_run makes it empty: the pushed images fill it
    progress(0.1, desc=f"Fetching the newest checkpoint of {repo_id}…")
    try:
        checkpoint = hub_checkpoints.fetch_checkpoint(repo_id, run, token=token, endpoint=system.hub_endpoint())
        config_mod.load(run)  # the run's own settings must be there and valid
    except Exception:
        shutil.rmtree(run, ignore_errors=True)  # no half-made run left in the picker
        session.current_run = previous
        raise
    jobs.MANAGER.submit(run, hub_token=token)
    info(f"Fetched {checkpoint.name} from {repo_id}: training continues from there.")
    return full_view(session)
