"""Generate: the base model with LoRAs (this session's runs, uploaded files, the Hub) at a strength each,
LoRA off and on side by side with the same seed, and a grid of every checkpoint to pick the best step."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import gradio as gr

from ... import config as config_mod
from ...errors import LoraStudioError
from ...eval_report import label_checkpoint_grid
from .. import system
from ..common import Shared, md_escape, skip_all, user_errors, warning
from ..workspace import Session, WorkspaceError

SLOTS = 3
NONE = ""


def build(shared: Shared) -> None:
    session, base = shared.session, shared.base
    slots: dict[str, gr.components.Component] = {}
    with gr.Tab("4 · Generate", id="generate"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="e.g. a house by a lake, ohwx", elem_id="gen-prompt")
                negative = gr.Textbox(label="Negative prompt", placeholder="optional")
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed", min_width=90)
                    steps = gr.Number(25, precision=0, minimum=1, maximum=150, label="Steps", min_width=90, elem_id="gen-steps")
                    guidance = gr.Number(7.0, minimum=0, maximum=30, step=0.5, label="Guidance", min_width=90)
                for i in range(1, SLOTS + 1):
                    # The slider needs ~220 px for its number box, reset button and track; given less it is cut off.
                    with gr.Row(equal_height=True):
                        slots[f"lora_{i}"] = gr.Dropdown([("none", NONE)], value=NONE, label=f"LoRA {i}", scale=3,
                                                         min_width=200, elem_id=f"lora-{i}")
                        slots[f"strength_{i}"] = gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="Strength", scale=2,
                                                           min_width=220, elem_id=f"strength-{i}")
                generate_btn = gr.Button("Generate: LoRA off and on, same seed", variant="primary", elem_id="generate-button")
                with gr.Accordion("Add a LoRA file or one from the Hub", open=False):
                    upload = gr.File(label="LoRA .safetensors (diffusers or kohya format)", file_types=[".safetensors"], height=130,
                                     elem_id="lora-upload")
                    with gr.Row(equal_height=True):
                        repo = gr.Textbox(label="Load from the Hub", placeholder="user/repo", scale=3)
                        hub_btn = gr.Button("Load", scale=1)
                    lora_note = gr.Markdown(elem_id="lora-note")
            with gr.Column(scale=3):
                with gr.Row():
                    off = gr.Image(label="LoRA off", type="pil", format="png", interactive=False, height=360, elem_id="gen-off")
                    on = gr.Image(label="LoRA on", type="pil", format="png", interactive=False, height=360, elem_id="gen-on")
        with gr.Accordion("Checkpoint grid: every saved step × a few prompts", open=False):
            gr.Markdown("Rows are the run's checkpoints (oldest at the top, `final` last), columns the prompts. "
                        "Pick the last step before the images overcook.")
            with gr.Row(equal_height=True):
                grid_prompts = gr.Textbox(label="Prompts (one per line; empty = the run's sample prompts)", lines=3, scale=3)
                grid_strength = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Strength", scale=1)
            grid_btn = gr.Button("Make the grid")
            grid_rows = gr.Markdown()
            grid = gr.Image(label="Checkpoints × prompts", type="pil", format="png", interactive=False)

    pickers = [slots[f"lora_{i}"] for i in range(1, SLOTS + 1)]
    generate_btn.click(generate, [session, base, prompt, negative, seed, steps, guidance], [off, on],
                       inputs_kwargs=slots, api_name="generate")
    upload.upload(add_lora_file, [session, upload], [lora_note, upload, *pickers], api_name="upload_lora")
    hub_btn.click(load_hub_lora, [session, repo], [lora_note, *pickers], api_name="load_hub_lora")
    grid_btn.click(checkpoint_grid, [session, base, grid_prompts, grid_strength, steps, seed], [grid, grid_rows],
                   api_name="checkpoint_grid")
    shared.on_run_change(refresh_pickers, [session, *pickers], pickers)
    # Opening a list refreshes all three (a run may have finished since the page loaded).
    for i, picker in enumerate(pickers):
        visibility = {"api_name": "list_loras"} if i == 0 else {"api_visibility": "private"}
        picker.focus(refresh_pickers, [session, *pickers], pickers, show_progress="hidden", **visibility)


# -- LoRA choices ------------------------------------------------------------------------------------
def lora_choices(session: Session) -> list[tuple[str, str]]:
    """(label, value): this session's finished runs ("run:<id>"), the newest checkpoint of unfinished
    ones ("ckpt:<id>", e.g. a stopped run) and its LoRA files ("file:<name>")."""
    from ...checkpoints import latest_checkpoint

    choices = [("none", NONE)]
    for run_id in session.runs():
        run = session.dir / run_id
        when = time.strftime("%d %b %H:%M:%S", time.strptime(run_id[:15], "%Y%m%d-%H%M%S"))
        if (run / "final").is_dir():
            choices.append((f"{_lora_name(run / 'final')} · {when}", f"run:{run_id}"))
        elif (checkpoint := latest_checkpoint(run)) is not None:
            step = int(checkpoint.name.split("-")[1])
            choices.append((f"{_lora_name(checkpoint)} · {when} · step {step}", f"ckpt:{run_id}"))
    choices += [(f"{name} · file", f"file:{name}") for name in session.loras()]
    return choices


def _lora_name(final: Path) -> str:
    try:
        return json.loads((final / "lora_info.json").read_text()).get("name") or "LoRA"
    except (OSError, ValueError):
        return "LoRA"


def lora_path(session: Session, value: str) -> Path:
    """The file a picker value names, looked up inside this session only."""
    from ...checkpoints import latest_checkpoint
    from ...formats import DIFFUSERS_FILENAME

    kind, _, ident = (value or "").partition(":")
    if kind == "run":
        path = session.run_dir(ident) / "final" / DIFFUSERS_FILENAME
        if not path.is_file():
            raise WorkspaceError("That run has no finished LoRA yet; train it to the end first.")
        return path
    if kind == "ckpt":
        checkpoint = latest_checkpoint(session.run_dir(ident))
        if checkpoint is None:
            raise WorkspaceError("That run has no saved checkpoint yet.")
        return checkpoint / DIFFUSERS_FILENAME
    if kind == "file":
        return session.lora_file(ident)
    raise WorkspaceError(f"Unknown LoRA '{str(value)[:60]}'; pick one from the list.")


def refresh_pickers(session: Session, *current: str) -> list:
    """New choices for the pickers, only where the list changed.

    A picker's value is never sent back unless its LoRA is gone: this runs when a list opens, and its answer can
    arrive after the person picked (on a busy server), where echoing the value it read would undo the pick.
    An unchanged list is not sent at all, so an open list does not redraw under the pointer.
    """
    choices = lora_choices(session)
    if session.cache.get("lora_choices") == choices:
        return [gr.skip() for _ in current]
    session.cache["lora_choices"] = choices
    values = {v for _, v in choices}
    return [gr.update(choices=choices) if c in values else gr.update(choices=choices, value=NONE) for c in current]


# -- handlers ------------------------------------------------------------------------------------------
@user_errors
def generate(session: Session, base: str, prompt: str, negative_prompt: str, seed: float, steps: float,
             guidance: float, progress=gr.Progress(), **slots: Any) -> tuple:
    from ...inference import LoraSpec

    loras = []
    for i in range(1, SLOTS + 1):
        value = slots.get(f"lora_{i}") or NONE
        if value != NONE:
            loras.append(LoraSpec(str(lora_path(session, value)), float(slots.get(f"strength_{i}", 1.0))))
    if not loras:
        raise gr.Error("Pick at least one LoRA (your finished runs appear in the list, or add a file below).")
    generator = _generator(base, progress)
    kwargs = dict(seed=int(seed or 0), steps=int(steps or 25), guidance=float(guidance or 0), negative_prompt=negative_prompt or "")
    progress(0.5, desc="Generating without the LoRA…")
    image_off = generator.generate(prompt or "", [], **kwargs)
    progress(0.75, desc="Generating with the LoRA…")
    image_on = generator.generate(prompt or "", loras, **kwargs)
    return image_off, image_on


def _generator(base: str, progress):
    """The base model's pipeline (loaded once per process and base)."""
    from ...inference import Generator

    base = (base or "").strip()
    if not base:
        raise gr.Error("Pick a base model at the top of the page.")
    if not system.is_builtin(base) and not system.has_gpu():
        warning("No GPU here: a real model runs on the CPU, which takes minutes per image.")
    progress(0.1, desc=f"Loading {base} (the first time takes a while)…")
    return Generator(base)


@user_errors
def add_lora_file(session: Session, file: str | None) -> tuple:
    """A LoRA file into this session's lists. A file that is not one is refused in the note under the box (not as an
    error, which gradio would pin over every output, pickers included) and cleared from the box."""
    if not file:
        return "No file arrived; choose a .safetensors LoRA file.", None, *skip_all(SLOTS)
    path = Path(file)
    try:
        check_lora_file(path)
    except LoraStudioError as e:
        return f"⚠️ **Not added.** {md_escape(e)}", None, *skip_all(SLOTS)
    name = session.add_lora(path, path.name)
    return (f"Added {md_escape(name)}: pick it in a LoRA list.", None, *_pickers_with(session, f"file:{name}"))


def check_lora_file(path: Path) -> None:
    """LoraStudioError unless `path` is a readable .safetensors file holding LoRA weights (diffusers/peft
    `lora_A`/`lora_B`, kohya `lora_down`/`lora_up`, LyCORIS DoRA): a base model or any other file is refused."""
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors":
        raise LoraStudioError(f"{path.name} is not a .safetensors file; LoRAs are loaded from .safetensors only.")
    try:
        with safe_open(str(path), "np") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - a damaged or renamed file
        raise LoraStudioError(f"{path.name} is not a readable .safetensors file ({str(e)[:120]}).") from None
    if not any("lora" in key.lower() for key in keys):
        what = "holds no tensors" if not keys else f"holds no LoRA weights (its tensors are named like {keys[0]})"
        raise LoraStudioError(f"{path.name} {what}: it is not a LoRA. Choose the LoRA file a trainer wrote "
                              "(diffusers or kohya format).")


def _pickers_with(session: Session, new_value: str) -> list[dict]:
    """Fresh choices for every picker; the new LoRA goes into the first."""
    choices = lora_choices(session)
    session.cache["lora_choices"] = choices
    return [gr.update(choices=choices, value=new_value) if i == 0 else gr.update(choices=choices) for i in range(SLOTS)]


@user_errors
def load_hub_lora(session: Session, repo_id: str, oauth_token: gr.OAuthToken | None = None, progress=gr.Progress()) -> tuple:
    from ... import hub

    repo_id = (repo_id or "").strip()
    if not repo_id:
        raise gr.Error("Type a Hub repo id such as user/my-lora.")
    token = oauth_token.token if oauth_token else None
    if system.space_id() and token is None:
        token = False  # anonymous: on a shared Space the machine's HF_TOKEN is the owner's, never the visitor's
    progress(0.2, desc=f"Downloading from {repo_id}…")
    try:
        path = hub.download_lora(repo_id, token=token, endpoint=system.hub_endpoint())
        check_lora_file(path)
    except LoraStudioError as e:  # in the note, not as an error pinned over every picker
        return (f"⚠️ **Not loaded.** {md_escape(e)}", *skip_all(SLOTS))
    name = session.add_lora(path, f"{repo_id.replace('/', '--')}.safetensors")
    return (f"Loaded {md_escape(repo_id)} as {md_escape(name)}.", *_pickers_with(session, f"file:{name}"))


@user_errors
def checkpoint_grid(session: Session, base: str, prompts: str, strength: float, steps: float, seed: float,
                    progress=gr.Progress()) -> tuple:
    run = session.current()
    if run is None:
        raise gr.Error(session.no_run("No run yet: upload images and train first."))
    lines = [p.strip() for p in (prompts or "").splitlines() if p.strip()]
    if not lines:
        try:
            lines = config_mod.load(run).sample_prompts()
        except LoraStudioError:
            raise gr.Error("Type one or more prompts (this run has no saved settings yet).") from None
    generator = _generator(base, progress)
    progress(0.3, desc="Rendering every checkpoint…")
    image, names = generator.checkpoint_grid(run, lines[:4], strength=float(strength), seed=int(seed or 0), steps=int(steps or 25))
    image = label_checkpoint_grid(image, run, names, lines[:4])  # each cell: its step and scores, the pick framed
    return image, "Rows, top to bottom: " + ", ".join(f"`{n}`" for n in names) + "  \nColumns: " + " | ".join(md_escape(p) for p in lines[:4])

