"""Faults as the page shows them: what happened and what to do, never a traceback or a raw OSError."""

from __future__ import annotations

import errno

import gradio as gr
import pytest

from lora_trainer.errors import DiskFullError, TrainingFailed
from lora_trainer.ui.common import user_errors


def shown(error: BaseException) -> str:
    @user_errors
    def handler():
        raise error

    with pytest.raises(gr.Error) as raised:
        handler()
    return raised.value.message


@pytest.mark.parametrize("error, message, hint", [
    (TrainingFailed("the loss became nan at step 3", hint="lower optim.learning_rate"), "the loss became nan", "lower optim.learning_rate"),
    (DiskFullError("the disk holding /data is full (3 MB free)"), "the disk holding /data is full", "free space on that disk"),
])
def test_an_engine_error_shows_its_message_and_what_to_do(error, message, hint):
    text = shown(error)
    assert message in text and hint in text and text.index(message) < text.index(hint)


def test_a_full_disk_in_a_handler_is_told_as_a_full_disk_naming_the_workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_WORKSPACE", str(tmp_path))
    text = shown(OSError(errno.ENOSPC, "No space left on device"))
    assert f"the disk holding {tmp_path} is full" in text and "MB free" in text and "free space on that disk" in text
    assert "Something went wrong" not in text and "Errno" not in text


def test_any_other_error_is_a_short_note_that_the_files_are_kept():
    text = shown(OSError(errno.EACCES, "Permission denied"))
    assert "Something went wrong" in text and "Your files are kept" in text


def test_the_training_status_shows_the_trainers_warnings(tmp_path):
    from lora_trainer.events import EventWriter
    from lora_trainer.ui.live import status_markdown
    from lora_trainer.ui.monitor import RunMonitor, Status

    writer = EventWriter(tmp_path / "events.jsonl")
    writer.emit("started", step=4, total_steps=10, warnings=[
        "checkpoint step-000005 is damaged (state/optimizer.pt is missing); training resumes from step-000004 instead",
        "data.keep_tokens is set but does nothing here: it only applies with data.shuffle_captions on",
    ])
    writer.emit("step", step=5, total_steps=10, loss=0.5, sec_per_step=1.0, eta_seconds=5.0)
    writer.close()
    monitor = RunMonitor(tmp_path)
    monitor.update()
    shown = status_markdown(monitor, Status("running"))
    assert "step 5 / 10" in shown
    assert r"⚠️ checkpoint step-000005 is damaged \(state/optimizer.pt is missing\); training resumes" in shown
    assert r"⚠️ data.keep\_tokens is set but does nothing here" in shown
