"""Rate: people score a run's checkpoints blind, on fixed prompts and seeds; the owner exports a report.

Each browser session is a rater. The run's owner makes the rating images and gets a **rating code**
(and a link, `?rate=CODE`); a session that has the code may see that run's rating images and add
ratings, nothing else: no other file of the owner's, no listing. The code is the only key, 96
random bits; the server keeps only its hash (in `<workspace>/.rating-codes/`), so neither a
directory listing nor the registry reveals a code.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from pathlib import Path
from typing import Any

import gradio as gr

from ... import ratings
from ...fsutil import atomic_write_text
from ..common import Shared, md_escape, user_errors
from ..common import code as code_md
from ..workspace import RUN_ID_PATTERN, Session, WorkspaceError, root, servable

CODE_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16}$")
SESSION_DIR_PATTERN = re.compile(r"^[0-9a-f]{32}$")
CODES_DIR = ".rating-codes"
SHARE_FILE = "share-code"  # inside the owner's run: the code, so the owner sees the same one again


# -- rating codes ----------------------------------------------------------------------------------------
def _registry(code: str) -> Path:
    return root() / CODES_DIR / (hashlib.sha256(f"rating-code:{code}".encode()).hexdigest()[:40] + ".json")


def issue_code(run: Path) -> str:
    """The run's rating code (made once; the same one afterwards)."""
    share = ratings.folder(run) / SHARE_FILE
    if share.exists():
        existing = share.read_text().strip()
        if CODE_PATTERN.match(existing) and _registry(existing).exists():
            return existing
    new = secrets.token_urlsafe(12)
    atomic_write_text(_registry(new), json.dumps({"session": run.parent.name, "run": run.name}))
    atomic_write_text(share, new)
    return new


def run_for_code(code: str) -> Path:
    """The run a rating code opens; WorkspaceError for anything that is not a live code."""
    code = (code or "").strip()
    unknown = WorkspaceError("No run has that rating code. Check it with the person who shared it.")
    if not CODE_PATTERN.match(code):
        raise unknown
    try:
        entry = json.loads(_registry(code).read_text())
    except (OSError, ValueError):
        raise unknown from None
    session_dir, run_id = str(entry.get("session", "")), str(entry.get("run", ""))
    if not SESSION_DIR_PATTERN.match(session_dir) or not RUN_ID_PATTERN.match(run_id):
        raise unknown
    run = root() / session_dir / run_id
    if not run.is_dir():
        raise unknown
    return run


def _target(session: Session) -> Path:
    """The run this session is rating: the one its code opened, else its own current run."""
    state = session.cache.get("rating") or {}
    if state.get("code"):
        return run_for_code(state["code"])
    run = session.current()
    if run is None:
        raise WorkspaceError("No run here yet: type the rating code someone shared with you, or train a run first.")
    return run


# -- the tab --------------------------------------------------------------------------------------------------
def build(shared: Shared) -> None:
    session = shared.session
    with gr.Tab("6 · Rate", id="rate"):
        gr.Markdown("Score checkpoints by eye, blind: you see images of the same prompts and seeds from the base model "
                    "(LoRA off) and from checkpoints, without knowing which is which. Several people can rate: share "
                    "the rating code, each browser counts as one rater. The report compares people with the "
                    "automatic scores (Train tab → Evaluation).")
        with gr.Accordion("Prepare (this run's owner)", open=False):
            with gr.Row(equal_height=True):
                steps = gr.Number(20, precision=0, minimum=1, maximum=100, label="Denoising steps", elem_id="rate-steps")
                prepare_btn = gr.Button("Make the rating images and a rating code", elem_id="rate-prepare", scale=2)
            share = gr.Markdown(elem_id="rate-share")
        with gr.Row(equal_height=True):
            code = gr.Textbox(label="Rating code (empty: rate your own current run)", scale=2, elem_id="rate-code")
            mode = gr.Radio([("One image at a time", "single"), ("Pairs: which is better", "pair")], value="single",
                            label="How", scale=2, elem_id="rate-mode")
            open_btn = gr.Button("Start rating", scale=1, elem_id="rate-open")
        status = gr.Markdown(elem_id="rate-status")
        with gr.Row():
            left = gr.Image(label="Image", type="filepath", interactive=False, height=300, elem_id="rate-left")
            right = gr.Image(label="Right", type="filepath", interactive=False, height=300, visible=False, elem_id="rate-right")
        with gr.Row():
            scores = [gr.Slider(1, 5, value=3, step=1, label=f"{label} (1-5)", elem_id=f"rate-score-{key}")
                      for key, label in ratings.CRITERIA.items()]
            choices = [gr.Radio(list(ratings.PAIR_CHOICES), value="same", label=label, visible=False, elem_id=f"rate-pick-{key}")
                       for key, label in ratings.CRITERIA.items()]
        submit = gr.Button("Submit rating", variant="primary", elem_id="rate-submit")
        with gr.Accordion("Results (this run's owner)", open=False):
            export_btn = gr.Button("Export the ratings and the report", elem_id="rate-export")
            summary = gr.Markdown(elem_id="rate-summary")
            files = gr.File(label="ratings.csv, ratings.json, report.html", file_count="multiple", interactive=False)

    task_view = [status, left, right, *scores, *choices]
    prepare_btn.click(prepare_set, [session, steps], [share], api_name="rate_prepare")
    open_btn.click(open_rating, [session, code, mode], task_view, api_name="rate_open")
    submit.click(submit_rating, [session, *scores, *choices], task_view, api_name="rate_submit")
    export_btn.click(export_ratings, [session], [summary, files], api_name="rate_export")
    shared.on_run_change(code_from_link, [session], [code])


def code_from_link(session: Session, request: gr.Request) -> Any:  # noqa: ARG001 - the signature gradio fills
    """A page opened as …/?rate=CODE has the code filled in."""
    value = (getattr(request, "query_params", None) or {}).get("rate", "") if request else ""
    return value if CODE_PATTERN.match(value or "") else gr.skip()


@user_errors
def prepare_set(session: Session, steps: float, request: gr.Request, progress=gr.Progress()) -> str:
    from ...evaluate import settings_from

    run = session.current()
    if run is None:
        raise gr.Error("No run yet: train one first.")
    settings = settings_from({"steps": int(steps or 20)})
    progress(0.05, desc="Generating the rating images…")
    manifest = ratings.prepare(run, settings, progress=lambda f, text: progress(f, desc=text))
    code = issue_code(run)
    page = ((request.headers.get("referer") or "") if request else "").split("?")[0]
    link = f"  \nor send this link: {code_md(f'{page}?rate={code}')}" if page else ""
    return (f"**{len(manifest['images'])} images ready** ({len(manifest['variants'])} variants × "
            f"{len(manifest['prompts'])} prompts × {len(manifest['seeds'])} seeds).  \n"
            f"Rating code: {code_md(code)}{link}  \nWhoever has it can rate these images, and see nothing else of yours.")


def _rater(session: Session) -> str:
    return ratings.rater_id(session.ensure())


def _show(session: Session) -> tuple:
    run = _target(session)
    mode = (session.cache.get("rating") or {}).get("mode", "single")
    task, done, total = ratings.next_task(run, _rater(session), mode)
    session.cache["rating_task"] = task
    pair = mode == "pair"
    slider_updates = [gr.update(visible=not pair, value=3) for _ in ratings.CRITERIA]
    choice_updates = [gr.update(visible=pair, value="same") for _ in ratings.CRITERIA]
    if task is None:
        return (f"✅ **All {total} rated** — thank you. (You are {code_md(_rater(session))}.)",
                gr.update(value=None, label="Image"), gr.update(value=None, visible=False), *slider_updates, *choice_updates)
    paths = [servable(ratings.image_path(run, i)) for i in task["images"]]
    text = (f"**{done + 1} of {total}** · You rate as {code_md(_rater(session))}. "
            + ("Which image is better on each point? *same* if you can't tell." if pair
               else "Score this image: style match (how much it looks like the training images), detail, expressiveness."))
    return (text, gr.update(value=paths[0], label="Left" if pair else "Image"),
            gr.update(value=paths[1] if pair else None, visible=pair), *slider_updates, *choice_updates)


@user_errors
def open_rating(session: Session, code: str, mode: str) -> tuple:
    code = (code or "").strip()
    if code:
        run_for_code(code)  # a wrong code is refused here, before anything changes
    session.cache["rating"] = {"code": code or None, "mode": mode if mode in ("single", "pair") else "single"}
    return _show(session)


@user_errors
def submit_rating(session: Session, *values: Any) -> tuple:
    task = session.cache.get("rating_task")
    if not task:
        raise gr.Error("Press Start rating first.")
    n = len(ratings.CRITERIA)
    picked = values[:n] if task["mode"] == "single" else values[n:]
    answers = {key: (int(v) if task["mode"] == "single" else v) for key, v in zip(ratings.CRITERIA, picked, strict=True)}
    ratings.add_rating(_target(session), _rater(session), task, answers)
    return _show(session)


@user_errors
def export_ratings(session: Session) -> tuple:
    run = session.current()
    if run is None:
        raise gr.Error("No run yet.")
    paths = ratings.export(run)
    people = ratings.human_scores(run)
    agree = ratings.agreement(run)
    lines = ["| variant | " + " | ".join(ratings.CRITERIA.values()) + " | ratings | raters |",
             "|---|" + "---|" * (len(ratings.CRITERIA) + 2)]
    for variant, s in people.items():
        cells = " | ".join("–" if s[c] is None else f"{s[c]:.2f}" for c in ratings.CRITERIA)
        lines.append(f"| {md_escape('LoRA off' if variant == 'base' else variant)} | {cells} | {s['n']} | {s['raters']} |")
    if agree:
        lines += ["", "Agreement with the automatic scores (Spearman ρ across checkpoints):", "",
                  "| score | " + " | ".join(ratings.CRITERIA.values()) + " |", "|---|" + "---|" * len(ratings.CRITERIA)]
        for metric, by in agree.items():
            lines.append(f"| {md_escape(metric)} | " + " | ".join("–" if rho is None else f"{rho:+.2f} (n={k})"
                                                                for rho, k in by.values()) + " |")
    return "\n".join(lines), [servable(p) for p in paths.values()]
