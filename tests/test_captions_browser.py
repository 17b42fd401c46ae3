"""The Captions tab in headless Chromium: the captioners on offer, their settings, a caption run on a tiny Florence-2,
a model without weights, and a caption too long for CLIP.

Reuses test_browser's browser and app fixtures (a fresh app and browser for this module).
"""

from __future__ import annotations

import pytest
from conftest import make_images
from test_browser import browser, open_tab, shot, studio  # noqa: F401 - browser and studio are fixtures
from tiny_captioners import build_tiny_florence2

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_the_captions_tab_offers_each_captioner_and_captions_with_florence2(browser, studio, tmp_path):  # noqa: F811
    url, workspace, _ = studio
    model_folder = tmp_path / "tiny-florence2"
    build_tiny_florence2(model_folder)
    images = make_images(tmp_path / "photos", 3, captions=False)
    page = browser.new_page()
    page.goto(url)
    page.locator("#upload-files input[type=file]").set_input_files(sorted(str(p) for p in images.iterdir()))
    page.locator("#upload-report").get_by_text("3 images added").wait_for()

    open_tab(page, "2 · Captions")
    page.locator("#cfg-data-trigger input, #cfg-data-trigger textarea").first.fill("ohwx")
    page.get_by_text("Caption options").click()
    # a BLIP model that is not there: one whole, clear message, and no caption written
    model = page.locator("#caption-model input, #caption-model textarea").first
    model.fill("/no/such/blip-folder")
    page.locator("#write-captions").click()
    failure = page.get_by_text("Could not load the captioning model", exact=False).first
    failure.wait_for()
    message = failure.inner_text()
    assert "'/no/such/blip-folder' (BLIP): there is no such folder" in message
    assert "or choose another captioner" in message  # not cut mid-word
    assert "Error" not in message and "Traceback" not in message  # no raw exception text
    assert not list(workspace.rglob("dataset/*.txt"))
    shot(page, "2-captions-no-weights")
    page.locator(".toast-close").first.click()

    page.locator("#captioner input").click()
    offered = [o.inner_text().split("\n")[-1].strip() for o in page.get_by_role("option").all()]  # after the ✓ mark
    assert offered == ["BLIP", "Florence-2", "Qwen-VL"]

    # Qwen-VL asks for an instruction, prefilled with one that leaves the style out
    page.get_by_role("option", name="Qwen-VL").click()
    instruction = page.locator("#caption-instruction textarea")
    instruction.wait_for()
    assert "style" in instruction.input_value() and "one sentence" in instruction.input_value()
    assert not page.locator("#caption-detail").is_visible()
    page.wait_for_function("() => document.querySelector('#caption-model input, #caption-model textarea')"
                           "?.value.startsWith('Qwen/')")

    # Florence-2 offers its caption tasks instead, and its own default model
    page.locator("#captioner input").click()
    page.get_by_role("option", name="Florence-2").click()
    page.locator("#caption-detail").wait_for()
    page.wait_for_function("() => document.querySelector('#caption-model input, #caption-model textarea')"
                           "?.value === 'florence-community/Florence-2-large'")
    assert not instruction.is_visible()
    shot(page, "2-captions-captioners")

    # captioning with a local (tiny, random) Florence-2: every image gets a caption around the trigger word
    model.fill(str(model_folder))
    page.locator("#write-captions").click()
    page.get_by_text("3 captions written").wait_for()
    captions = sorted(workspace.rglob("dataset/*.txt"))  # written before the page says so
    assert len(captions) == 3 and all(p.read_text().startswith("ohwx, ") for p in captions)
    page.wait_for_function("() => [...document.querySelectorAll('.caption-text textarea')]"
                           ".filter(t => t.value.startsWith('ohwx, ')).length === 3")
    shot(page, "2-captions-florence2")

    # a caption past CLIP's 75 tokens: the note names the words that are cut, as typed
    long_caption = ", ".join(["ohwx, a red cat sitting on a table"] * 10) + ", under a bright moon"
    card = page.locator(".caption-text textarea").first
    card.fill(long_caption)
    card.press("Tab")
    note = page.locator(".caption-card .caption-note").filter(has_text="under a bright moon").first
    note.wait_for()
    assert "is cut off" in note.inner_text() and "</w>" not in note.inner_text()
