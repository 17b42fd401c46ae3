"""The top of the page: the base model (shared by Train and Generate), the current run, the session."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import gradio as gr

from ..config import CONFIG_FILENAME
from ..config import load as load_config
from ..errors import LoraStudioError
from ..events import EVENTS_FILENAME, last_event
from . import jobs, system
from .common import Shared, info, user_errors
from .workspace import DATASET, Session, root

STORAGE_KEY = "lora-studio-session"


def browser_secret() -> str:
    """The key gr.BrowserState encrypts the session token with; kept with the workspace so it outlives restarts."""
    path = root() / ".browser-secret"
    try:
        return path.read_text().strip()
    except OSError:
        secret = secrets.token_urlsafe(24)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secret)
        except OSError:  # another worker wrote it first, or the disk is read-only
            return path.read_text().strip() if path.exists() else secret
        return secret


def run_label(run_dir: Path) -> str:
    """'12 Mar 14:03:27 · my-lora · 24 images · finished' for the run picker (the name once the run has settings)."""
    stamp = time.strptime(run_dir.name[:15], "%Y%m%d-%H%M%S")
    parts = [time.strftime("%d %b %H:%M:%S", stamp), _run_name(run_dir)]
    dataset = run_dir / DATASET
    count = sum(1 for p in dataset.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}) if dataset.is_dir() else 0
    parts.append(f"{count} images")
    job = jobs.MANAGER.get(run_dir)
    event = last_event(run_dir / EVENTS_FILENAME, "stopped", "finished", "failed")
    # As the status does (monitor.run_status): an end newer than the active job is how it ended, while its process
    # exits; an older one is a previous attempt's. (The picker is redrawn when the status changes, not after.)
    if job is not None and job.active and (event is None or float(event.get("time", 0)) < job.submitted):
        parts.append(job.state)
    elif event is not None:
        parts.append(event["type"])
    return " · ".join(p for p in parts if p)


def _run_name(run_dir: Path) -> str:
    """The LoRA name the run trains (its saved settings), or '' before it has any."""
    if not (run_dir / CONFIG_FILENAME).exists():
        return ""
    try:
        return load_config(run_dir).output.name
    except LoraStudioError:
        return ""


def run_choices(session: Session) -> list[tuple[str, str]]:
    """(label, run id), newest first; labels that still read the same (same second, same name) get the id's tail."""
    runs = session.runs()
    labels = [run_label(session.dir / r) for r in runs]
    return [(f"{label} · #{r[-4:]}" if labels.count(label) > 1 else label, r) for label, r in zip(labels, runs, strict=True)]


def run_picker(session: Session) -> dict:
    current = session.current()
    choices = run_choices(session)
    session.cache["run_choices"] = choices
    return gr.update(choices=choices, value=current.name if current else None)


def refresh_run_choices(session: Session) -> dict:
    """Opening the picker: new choices if they changed, never the value (an answer that arrives after the person
    picked must not undo the pick), nothing at all if unchanged (an open list is not redrawn under the pointer)."""
    choices = run_choices(session)
    if session.cache.get("run_choices") == choices:
        return gr.skip()
    session.cache["run_choices"] = choices
    return gr.update(choices=choices)


def build_header() -> Shared:
    gr.Markdown("# LoRA Studio\nTurn a folder of images into a Stable Diffusion LoRA: upload, caption, train, try, publish.")
    notice = system.hardware_notice()
    if notice:
        with gr.Row(equal_height=True):
            gr.Markdown(notice, elem_classes=["notice"])
            if system.space_id() and not system.has_gpu():
                gr.DuplicateButton("Duplicate this Space", size="md")
    session = gr.State(Session())
    with gr.Row(equal_height=True):
        base = gr.Dropdown(
            system.base_choices(), value=system.default_base(), allow_custom_value=True, scale=3,
            label="Base model", info="A Hub id, a local diffusers folder or .safetensors file, or a built-in model. "
            "Used by Train and Generate.",
        )
        run = gr.Dropdown([], value=None, label="Run", scale=3, info="Each run keeps its own images, captions and results.",
                          elem_id="run-picker")
        with gr.Column(scale=1, min_width=180):
            keep = gr.Checkbox(True, label="Copy images & captions")
            new = gr.Button("New run", size="sm")
    return Shared(session=session, base=base, run=run, new_run_button=new, keep_dataset=keep)


def wire_header(demo: gr.Blocks, shared: Shared) -> None:
    browser = gr.BrowserState(None, storage_key=STORAGE_KEY, secret=browser_secret())
    shared.then_refresh(demo.load(restore_session, [browser, shared.session], [browser, shared.run], api_visibility="private"))
    shared.then_refresh(
        shared.run.input(select_run, [shared.session, shared.run], [shared.run], api_name="select_run")
    )
    shared.new_run_event = shared.new_run_button.click(new_run, [shared.session, shared.keep_dataset], [shared.run],
                                                       api_name="new_run")
    shared.then_refresh(shared.new_run_event)
    # Opening the picker refreshes it (another tab may have made a run).
    shared.run.focus(refresh_run_choices, [shared.session], [shared.run], api_visibility="private", show_progress="hidden")
    list_runs = gr.Button(visible=False)  # the list_runs API endpoint: the picker as the server sees it
    list_runs.click(run_picker, [shared.session], [shared.run], api_name="list_runs")


def restore_session(stored: object, session: Session) -> tuple[str, dict]:
    """On page load: take back the workspace this browser had (a reload reattaches to its runs and jobs)."""
    if not session.adopt(stored):
        session.ensure()
    return session.token, run_picker(session)


@user_errors
def select_run(session: Session, run_id: str) -> dict:
    session.select(run_id)
    return run_picker(session)


@user_errors
def new_run(session: Session, keep_dataset: bool) -> dict:
    current = session.current()
    has_images = current is not None and any((current / DATASET).iterdir())
    session.new_run(copy_dataset_from=current.name if keep_dataset and has_images else None)
    info("New run created" + (" with the same images and captions." if keep_dataset and has_images else "."))
    return run_picker(session)
