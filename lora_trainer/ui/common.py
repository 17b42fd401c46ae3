"""Pieces every tab uses: the shared components, error handling, small formatting helpers."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from ..errors import LoraStudioError

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

    def on_run_change(self, fn: Callable, inputs: list, outputs: list) -> None:
        self.refreshers.append((fn, inputs, outputs))

    def then_refresh(self, event: Any) -> None:
        """Refresh every tab after `event` (page load, run switch, new run, upload); wired by `finish()`."""
        self.refresh_events.append(event)

    def finish(self) -> None:
        """Chain the refreshers once every tab has registered its own."""
        for event in self.refresh_events:
            for fn, inputs, outputs in self.refreshers:
                event = event.then(fn, inputs, outputs, api_visibility="private", show_progress="hidden")


def user_errors(fn: Callable) -> Callable:
    """Show errors a user can fix as their message, and anything else as a short, honest note.

    Nothing a user did is undone by an error: handlers validate before they write.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except LoraStudioError as e:
            raise gr.Error(str(e), duration=None, print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the page shows a message, the log keeps the traceback
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(
                f"Something went wrong ({type(e).__name__}: {str(e)[:300]}). Your files are kept; "
                "try again, and if it repeats, the server log has the details.",
                duration=None, print_exception=False,
            ) from None

    return wrapper


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+|!~])")


def md_escape(text: object) -> str:
    """Text shown inside Markdown as written (file names have underscores, prompts have asterisks)."""
    return _MD_SPECIAL.sub(r"\\\1", str(text))


def code(text: object) -> str:
    return "`" + str(text).replace("`", "'") + "`"


def skip_all(n: int) -> tuple:
    return tuple(gr.skip() for _ in range(n))
