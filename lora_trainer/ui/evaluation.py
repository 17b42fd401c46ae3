"""The Train tab's evaluation section: Evaluate, a table and a small plot per checkpoint, the pick explained.

The evaluation itself is lora_trainer.evaluate (the same as `python -m lora_trainer evaluate RUN`);
it runs in the app's process, like Generate, and writes RUN/evaluation.json and RUN/best/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from .common import Shared, md_escape, series_frame, user_errors
from .workspace import Session

PLOTTED = (("style", "style"), ("adherence", "adherence"), ("leak", "leak"))
JUDGED = (("judged_style_rate", "style"), ("judged_adherence_rate", "adherence"), ("judged_leak_rate", "leak"))


class EvaluationSection:
    def __init__(self, shared: Shared) -> None:
        with gr.Accordion("Evaluation: which checkpoint to keep", open=False, elem_id="evaluation"):
            gr.Markdown(
                "Generates the same evaluation prompts (not your captions) with the same seeds from the base model and "
                "every checkpoint, then measures **adherence** (do the images made with the trigger follow the prompt), "
                "**style** (how close they are to your images), **leak** (the style without the trigger) and "
                "**diversity**. The pick is the checkpoint with the most style whose adherence stays near the base "
                "model's and whose style stays with the trigger; it is copied to `best/`. `final/` stays the last step."
            )
            self.button = gr.Button("Evaluate every checkpoint", elem_id="evaluate-run")
            self.summary = gr.Markdown(elem_id="evaluation-summary")
            with gr.Row(equal_height=False):
                self.table = gr.Dataframe(interactive=False, wrap=True, scale=3, elem_id="evaluation-table",
                                          label="Scores per checkpoint (★ = the pick)")
                self.plot = gr.LinePlot(x="step", y="score", color="metric", scale=2, label="Scores by step",
                                        x_title="step", y_title="score", elem_id="evaluation-plot")
        self.outputs = [self.summary, self.table, self.plot]
        self.button.click(run_evaluation, [shared.session], self.outputs, api_name="evaluate_run")
        shared.on_run_change(show_evaluation, [shared.session], self.outputs)


def build(shared: Shared) -> EvaluationSection:
    return EvaluationSection(shared)


def settings_for(run: Path):
    """The evaluation settings of a run (the defaults until config.py carries an [eval] section)."""
    from ..evaluate import EvalSettings

    return EvalSettings()


def view(run: Path | None) -> tuple:
    from ..eval_report import recommendation_text, table_rows
    from ..evaluate import load_evaluation

    data = load_evaluation(run) if run else None
    if not data:
        return ("Not evaluated yet. Press **Evaluate every checkpoint** once the run has checkpoints.", None, None)
    import pandas as pd

    head, body = table_rows(data)
    text = [f"**{md_escape(recommendation_text(data))}**"]
    text += [f"- {md_escape(n)}" for n in data.get("notes") or []]
    text.append(f"Evaluated in {data.get('seconds', 0):.0f} s.")
    return "\n".join(text), pd.DataFrame(body, columns=head), plot_frame(data)


def plot_frame(data: dict[str, Any]):
    """Long-format (step, score, metric) rows; the judge's rates on the toy base, else the CLIP scores."""
    rows = [r for r in data.get("rows") or []]
    keys = JUDGED if rows and all(r.get("judged_style_rate") is not None for r in rows) else PLOTTED
    points = [(r["step"], r[k], label) for r in rows for k, label in keys if r.get(k) is not None]
    return series_frame(points, "score", "metric") if points else None


def show_evaluation(session: Session) -> tuple:
    return view(session.current())


@user_errors
def run_evaluation(session: Session, progress=gr.Progress()) -> tuple:
    from ..checkpoints import checkpoint_dirs
    from ..evaluate import evaluate
    from . import jobs

    run = session.current()
    if run is None or not (checkpoint_dirs(run) or (run / "final").is_dir()):
        raise gr.Error("This run has no checkpoints yet: train first (checkpoints are saved every output.save_every steps).")
    job = jobs.MANAGER.get(run)
    if job is not None and job.active:
        raise gr.Error("This run is still training: evaluate when it has stopped or finished.")
    progress(0.02, desc="Loading the models…")
    evaluate(run, settings_for(run), progress=lambda fraction, text: progress(fraction, desc=text))
    return view(run)
