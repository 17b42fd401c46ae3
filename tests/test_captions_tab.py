"""The Captions tab's handlers without a browser: choosing a captioner, stopping a caption run, a model that cannot load."""

from __future__ import annotations

import gradio as gr
import huggingface_hub.constants
import pytest
from conftest import make_images

from lora_trainer import captioners, captioning
from lora_trainer.intake import scan_captions, write_caption
from lora_trainer.ui.tabs import captions
from lora_trainer.ui.workspace import Session


def no_progress(*args, **kwargs) -> None:
    pass


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_WORKSPACE", str(tmp_path / "workspace"))
    session = Session()
    make_images(session.dataset_dir(create=True), 10, captions=False)
    return session


@pytest.mark.parametrize("kind, shows_detail, shows_instruction", [
    ("blip", False, False), ("florence2", True, False), ("qwen-vl", False, True)])
def test_choosing_a_captioner_sets_its_model_and_shows_its_settings(kind, shows_detail, shows_instruction):
    _, model, detail, instruction = captions.choose_captioner(kind)
    assert model["value"] == captioners.CAPTIONERS[kind].model
    assert captioners.CAPTIONERS[kind].light in model["info"]
    assert (detail["visible"], instruction["visible"]) == (shows_detail, shows_instruction)


class StopsOnFirstBatch:
    """A captioner during whose first batch the person presses Stop."""

    def __init__(self, session: Session):
        self.session, self.calls = session, 0

    def caption(self, images):
        self.calls += 1
        captions.stop_captions(self.session)
        return ["a cat"] * len(images)


def test_stop_ends_captioning_after_the_current_batch_and_keeps_what_was_written(session, monkeypatch):
    captioner = StopsOnFirstBatch(session)
    asked = []
    monkeypatch.setattr(captioning, "shared_captioner", lambda kind, model, **options: asked.append(
        (kind, model, options)) or captioner)
    status = captions.write_captions(session, "ohwx", "sparse", "{trigger}, {caption}", "", False, "my/florence",
                                     "florence2", "detailed", "ignored", progress=no_progress)
    assert asked == [("florence2", "my/florence", {"detail": "detailed"})]
    assert captioner.calls == 1
    assert "8 captions written" in status and "2 images left uncaptioned" in status
    assert sum(bool(e.caption) for e in scan_captions(session.dataset_dir())) == 8
    assert str(session.dataset_dir()) not in captions._STOPS  # the next run starts unstopped


def test_stop_with_nothing_running_says_so(session, monkeypatch):
    said = []
    monkeypatch.setattr(gr, "Info", said.append)
    captions.stop_captions(session)
    assert said == ["Nothing is being captioned."]


@pytest.mark.parametrize("kind", captioners.KINDS)
def test_a_captioner_without_weights_says_which_and_what_to_do_and_changes_nothing(kind, session, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    write_caption(session.dataset_dir() / "img000.png", "my careful caption")
    before = {p: p.read_bytes() for p in session.dataset_dir().iterdir()}
    with pytest.raises(gr.Error) as error:
        captions.write_captions(session, "ohwx", "sparse", "{trigger}, {caption}", "", True, "", kind,
                                progress=no_progress)
    first_line, *rest = error.value.message.split("<br>")  # a toast: line breaks as HTML
    info = captioners.CAPTIONERS[kind]
    assert first_line.startswith(f"Could not load the captioning model '{info.model}' ({info.label}): it is not in")
    assert first_line.endswith("or choose another captioner.")  # whole, not cut mid-word
    assert "Nothing was changed" in rest[-1] and "Trigger only" in rest[-1]
    assert {p: p.read_bytes() for p in session.dataset_dir().iterdir()} == before
