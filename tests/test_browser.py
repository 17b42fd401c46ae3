"""The page in a real headless Chromium (Playwright): what a person clicks, start to finish.

Uses Debian's chromium (/usr/bin/chromium or $CHROMIUM) and the `playwright` Python package;
skipped, with the reason, if either is missing. Screenshots of every tab go to test-artifacts/.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from conftest import make_images
from fake_hub import WRITE_TOKEN, FakeHub
from PIL import Image
from test_app import serve

from lora_trainer.ui import system

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    if not CHROMIUM:
        pytest.skip("no chromium executable (apt-get install chromium, or set CHROMIUM)")
    profile = tempfile.mkdtemp(prefix="lora-studio-chromium-")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(TIMEOUT_MS)
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    with FakeHub() as hub:
        mp = pytest.MonkeyPatch()
        workspace = tmp_path_factory.mktemp("workspace")
        demo, url = serve(mp, workspace, hub.url, tmp_path_factory.mktemp("hf"))
        yield url, workspace, hub
        demo.close()
        mp.undo()
        system.has_gpu.cache_clear()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_a_person_uploads_trains_stops_generates_and_publishes(browser, studio, tmp_path):
    url, workspace, hub = studio
    images = make_images(tmp_path / "photos", 6)
    (images / "holiday.png").write_bytes(b"definitely not a png")
    page = browser.new_page()
    page.goto(url)

    # Upload through the file input; the report names the file it left out.
    page.locator("#upload-files input[type=file]").set_input_files(sorted(str(p) for p in images.iterdir()))
    report = page.locator("#upload-report")
    report.get_by_text("6 images added").wait_for()
    assert "holiday.png" in report.inner_text()
    shot(page, "1-upload")

    # Captions: edit one in its card; it is saved when the box loses focus.
    open_tab(page, "2 · Captions")
    page.wait_for_function("() => document.querySelector('.caption-name input, .caption-name textarea')?.value === 'img000.png'")
    first_caption = page.locator(".caption-text textarea").first
    first_caption.fill("ohwx, a card with dark stripes")
    first_caption.press("Tab")
    caption_file = next(workspace.rglob("dataset/img000.txt"))
    wait_until(lambda: caption_file.read_text() == "ohwx, a card with dark stripes")
    shot(page, "2-captions")

    # Train: the default preset on the tiny model, shortened; a loss point and a sample image appear.
    open_tab(page, "3 · Train")
    page.locator("#cfg-optim-steps input").fill("600")
    page.get_by_text("Advanced: every setting").click()
    page.locator("#cfg-sampling-steps input").fill("4")
    page.locator("#cfg-sampling-steps input").press("Tab")
    page.get_by_text("Advanced: every setting").click()
    page.locator("#check-run").click()
    page.get_by_text("Check passed").wait_for()
    page.locator("#start-training").click()
    status = page.locator("#train-status")
    status.get_by_text("Training", exact=False).wait_for()
    page.wait_for_function(  # a drawn line: path data and a visible stroke
        """() => [...document.querySelectorAll('#loss-plot .mark-line path')].some(
            p => (p.getAttribute('d') || '').length > 20 && getComputedStyle(p).stroke !== 'none')""")
    page.locator("#samples img").first.wait_for()
    shot(page, "3-train-running")

    # Stop: the trainer saves a checkpoint; Resume is offered. A reload shows the same run and its settings.
    page.locator("#stop-training").click()
    status.get_by_text("Stopped at step", exact=False).wait_for()
    assert page.locator("#resume-training").is_enabled()
    shot(page, "3-train-stopped")
    page.reload()
    open_tab(page, "3 · Train")
    page.locator("#train-status").get_by_text("Stopped at step", exact=False).wait_for()
    page.wait_for_function("() => document.querySelector('#cfg-optim-steps input')?.value === '600'")

    # Generate with the stopped run's checkpoint: LoRA off and on side by side.
    open_tab(page, "4 · Generate")
    page.locator("#gen-prompt textarea").fill("ohwx")
    page.locator("#gen-steps input").fill("4")
    page.locator("#gen-steps input").press("Tab")
    page.locator("#lora-1 input").click()
    page.get_by_role("option", name="· step ", exact=False).first.click()  # the stopped run's checkpoint
    page.locator("#generate-button").click()
    page.locator("#gen-on img").wait_for()
    page.locator("#gen-off img").wait_for()
    shot(page, "4-generate")

    # Resume, reload while it trains: the page finds the running job again; then it finishes.
    open_tab(page, "3 · Train")
    page.locator("#resume-training").click()
    page.locator("#train-status").get_by_text("Training", exact=False).wait_for()
    page.reload()
    open_tab(page, "3 · Train")
    status = page.locator("#train-status")
    status.get_by_text("Training", exact=False).or_(status.get_by_text("Finished", exact=False)).wait_for()
    page.locator("#samples img").first.wait_for()
    status.get_by_text("Finished", exact=False).wait_for(timeout=4 * TIMEOUT_MS)
    page.get_by_text("Advanced: every setting").click()
    shot(page, "3-train-finished")

    # Publish to the fake Hub with a typed token: the page shows the repo, never the token.
    open_tab(page, "5 · Publish")
    page.locator("#publish-repo input, #publish-repo textarea").first.fill("stripes")
    page.locator("#publish-token input").fill(WRITE_TOKEN)
    page.locator("#publish-button").click()
    page.locator("#publish-result").get_by_text("Published").wait_for()
    assert "alice/stripes" in page.locator("#publish-result").inner_text()
    assert "pytorch_lora_weights.safetensors" in hub.repos["alice/stripes"].files
    shot(page, "5-publish")
    assert WRITE_TOKEN not in page.content()
    assert WRITE_TOKEN not in page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")


def test_screenshots_are_real_images():
    """The artifacts the previous test leaves are what a person would see, not blank pages."""
    shots = sorted(ARTIFACTS.glob("*.png")) if ARTIFACTS.exists() else []
    if not shots:
        pytest.skip("no screenshots (the browser test was skipped)")
    for path in shots:
        with Image.open(path) as im:
            assert im.width >= 1000 and im.height >= 600
            assert len(set(im.convert("L").resize((64, 64)).tobytes())) > 8  # not a blank page
