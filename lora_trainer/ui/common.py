"""Pieces every tab uses: the shared components, error handling, small formatting helpers."""

from __future__ import annotations

import functools
import html
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import LoraStudioError
from ..fsutil import disk_full_from
from . import workspace

log = logging.getLogger("lora_trainer.ui")


@dataclass
class Shared:
    """Components more than one tab reads, and what to refresh when the current run changes."""

    session: gr.State
    base: gr.Dropdown
    run: gr.Dropdown
    new_run_button: gr.Button | None = None
    keep_dataset: gr.Checkbox | None = None
    trigger: gr.components.Component | None = None
    caption_style: gr.Dropdown | None = None
    # (fn, inputs, outputs) run after the page loads and whenever another run becomes current
    refreshers: list[tuple[Callable, list, list]] = field(default_factory=list)
    refresh_events: list[Any] = field(default_factory=list)
    # (fn, inputs, outputs) run after "New run" made a run (before the refreshers)
    new_run_handlers: list[tuple[Callable, list, list]] = field(default_factory=list)
    new_run_event: Any = None

    def on_run_change(self, fn: Callable, inputs: list, outputs: list) -> None:
        self.refreshers.append((fn, inputs, outputs))

    def on_new_run(self, fn: Callable, inputs: list, outputs: list) -> None:
        self.new_run_handlers.append((fn, inputs, outputs))

    def then_refresh(self, event: Any) -> None:
        """Refresh every tab after `event` (page load, run switch, new run, upload); wired by `finish()`."""
        self.refresh_events.append(event)

    def finish(self) -> None:
        """Chain the refreshers once every tab has registered its own."""
        if self.new_run_event is not None:
            for fn, inputs, outputs in self.new_run_handlers:
                self.new_run_event.success(fn, inputs, outputs, api_visibility="private", show_progress="hidden")
        for event in self.refresh_events:
            for fn, inputs, outputs in self.refreshers:
                event = event.then(fn, inputs, outputs, api_visibility="private", show_progress="hidden")


def toast_html(text: object) -> str:
    """A message as a toast shows it: gradio renders toast text as HTML, so it is escaped here (a '<name>' in
    a message would vanish as an unknown tag); **bold** and line breaks are kept."""
    escaped = html.escape(str(text), quote=False)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return escaped.replace("\n", "<br>")


def info(message: str, **kwargs: Any) -> None:
    """gr.Info with the message escaped (every toast goes through toast_html)."""
    gr.Info(toast_html(message), **kwargs)


def warning(message: str, **kwargs: Any) -> None:
    gr.Warning(toast_html(message), **kwargs)


def user_errors(fn: Callable) -> Callable:
    """Show errors a user can fix as their message, and anything else as a short, honest note.

    The one place error messages reach the page: every handler is wrapped in this, and every message
    (a gr.Error raised in the handler, a LoraStudioError from the engine) is plain text escaped here.
    Nothing a user did is undone by an error: handlers validate before they write.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            if not getattr(e, "escaped", False):  # a handler called from another handler raises it once
                e.message, e.escaped = toast_html(e.message), True
            raise
        except LoraStudioError as e:
            hint = getattr(e, "hint", "")  # what to do, where the message says only what happened
            raise gr.Error(toast_html(f"{e}\n{hint}" if hint else e), duration=None, print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the page shows a message, the log keeps the traceback
            if (full := disk_full_from(e, workspace.root())) is not None:  # the page's own writes (captions, config)
                raise gr.Error(toast_html(f"{full}\n{full.hint}"), duration=None, print_exception=False) from None
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(
                toast_html(f"Something went wrong ({type(e).__name__}: {str(e)[:300]}). Your files are kept; "
                           "try again, and if it repeats, the server log has the details."),
                duration=None, print_exception=False,
            ) from None

    return wrapper


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+|!~])")


def md_escape(text: object) -> str:
    """Text shown inside Markdown as written (file names have underscores, prompts have asterisks)."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def code(text: object) -> str:
    return "`" + str(text).replace("`", "'") + "`"


def dora_note(run_dir: Path | None) -> str:
    """The warning for A1111 users when the run trained DoRA (empty otherwise): stock A1111 normalises DoRA's
    magnitude over the other axis (measured 55 % off on one layer), ComfyUI applies it as trained."""
    from ..config import load

    try:
        dora = run_dir is not None and load(run_dir).lora.use_dora
    except LoraStudioError:
        return ""
    if not dora:
        return ""
    return ("**This LoRA uses DoRA: not for A1111.** Stock A1111 applies DoRA's magnitude along the other axis, so "
            "the result is far off (55 % on one layer we measured). Use the kohya file in ComfyUI or the diffusers "
            "file in diffusers; for A1111, train again with DoRA off.")


def series_frame(points: list[tuple[int, float, str]], value: str, series: str):
    """A gr.LinePlot's long-format frame from (step, value, series) points, with fixed column types (an int
    step axis, float values, string series: the plot keeps the types of the first frame it gets)."""
    import pandas as pd

    return pd.DataFrame({
        "step": pd.Series([p[0] for p in points], dtype="int64"),
        value: pd.Series([p[1] for p in points], dtype="float64"),
        series: pd.Series([p[2] for p in points], dtype="string"),
    })


def skip_all(n: int) -> tuple:
    return tuple(gr.skip() for _ in range(n))
