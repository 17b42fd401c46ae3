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

import numpy as np
import pytest
from conftest import make_images
from fake_hub import WRITE_TOKEN, FakeHub
from PIL import Image
from test_app import serve

from lora_trainer.ui import presets, system

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
    """A full-page screenshot in test-artifacts/, written whole (another process may be reading the folder)."""
    ARTIFACTS.mkdir(exist_ok=True)
    part = ARTIFACTS / f".{name}.png.part"
    part.write_bytes(page.screenshot(full_page=True))
    os.replace(part, ARTIFACTS / f"{name}.png")


PROGRESS_JS = """() => [document.querySelector('#train-status')?.innerText || '',
                          document.querySelector('#train-console textarea')?.value || '']"""
LOSS_DRAWN_JS = """() => [...document.querySelectorAll('#loss-plot .mark-line path')].some(
    p => (p.getAttribute('d') || '').length > 20 && getComputedStyle(p).stroke !== 'none')"""  # path data, a stroke


def wait_following_progress(page, done, stall: float = TIMEOUT_MS / 1000) -> list[str]:
    """Wait until `done()` while a run trains, following its progress: it fails only when neither the Train tab's
    status nor the trainer's console output has changed for `stall` seconds, however long the run takes on a
    loaded machine. Returns every status text seen, in order."""
    status, console = page.evaluate(PROGRESS_JS)
    seen, last, since = [status], (status, console), time.monotonic()
    while not done():
        time.sleep(0.3)
        status, console = page.evaluate(PROGRESS_JS)
        if (status, console) != last:
            last, since = (status, console), time.monotonic()
            if status != seen[-1]:
                seen.append(status)
        assert time.monotonic() - since < stall, f"the run stopped moving at: {status}"
    return seen


def wait_for_status(page, *words: str) -> list[str]:
    """Wait, following progress, until the Train tab's status mentions one of `words`."""
    status = page.locator("#train-status")
    return wait_following_progress(page, lambda: any(w in status.inner_text() for w in words))


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
    with page.expect_request(lambda r: "/queue/join" in r.url):  # the save was sent (a lost blur fails here) ...
        first_caption.press("Tab")
    caption_file = next(workspace.rglob("dataset/img000.txt"))
    # ... and waits in the app's queue behind whatever else the page asked for: once (30 s) not enough on a machine
    # running two test processes and a trainer.
    wait_until(lambda: caption_file.read_text() == "ohwx, a card with dark stripes", 120)
    shot(page, "2-captions")

    # Train: the default preset on the default base (the toy world's on a CPU), shortened; a loss point and a sample image
    # appear. The first samples come at step 20 and Stop is pressed then: 100 steps before the run could finish.
    open_tab(page, "3 · Train")
    page.locator("#cfg-optim-steps input").fill("120")
    page.get_by_text("Advanced: every setting").click()
    for field, value in (("sampling-every", "20"), ("sampling-steps", "4")):
        page.locator(f"#cfg-{field} input").fill(value)
        page.locator(f"#cfg-{field} input").press("Tab")
    # The evaluation after training (on by default for the toy base) scores 7 checkpoints: tests/test_toy_evaluate.py
    # and test_evaluate.py own it; here it would only lengthen the wait for "Finished".
    page.locator("#cfg-eval-after_training input").click()
    page.get_by_role("option", name="off", exact=True).click()
    page.get_by_text("Advanced: every setting").click()
    page.locator("#check-run").click()
    page.get_by_text("Check passed").wait_for()
    page.locator("#start-training").click()
    wait_for_status(page, "Training")
    wait_following_progress(page, lambda: page.evaluate(LOSS_DRAWN_JS))
    wait_following_progress(page, lambda: page.locator("#samples img").count() > 0)
    shot(page, "3-train-running")

    # Stop: the trainer saves a checkpoint; Resume is offered. A reload shows the same run and its settings.
    page.locator("#stop-training").click()
    wait_for_status(page, "Stopped at step")
    wait_following_progress(page, lambda: page.locator("#resume-training").is_enabled())  # once its process exits
    shot(page, "3-train-stopped")
    page.reload()
    open_tab(page, "3 · Train")
    page.locator("#train-status").get_by_text("Stopped at step", exact=False).wait_for()
    page.wait_for_function("() => document.querySelector('#cfg-optim-steps input')?.value === '120'")

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
    wait_for_status(page, "Training")
    page.reload()
    open_tab(page, "3 · Train")
    wait_for_status(page, "Training", "Finished")
    wait_following_progress(page, lambda: page.locator("#samples img").count() > 0)
    seen = wait_for_status(page, "Finished")
    # once it trains, it never reads "Starting" again (it did for ~3 s while the trainer process exited)
    assert not any("Starting" in text for text in seen), seen
    page.get_by_text("Advanced: every setting").click()
    shot(page, "3-train-finished")

    # Publish where the token cannot write: the message shows whole, "<name>" included (it was swallowed as HTML).
    open_tab(page, "5 · Publish")
    page.locator("#publish-token input").fill(WRITE_TOKEN)
    page.locator("#publish-repo input, #publish-repo textarea").first.fill("bob/stripes")
    page.locator("#publish-button").click()
    toast = page.locator("[data-testid=toast-body]").filter(has_text="cannot write")
    toast.wait_for()
    assert "Push to 'alice/<name>' instead" in toast.inner_text()
    toast.locator("[data-testid=toast-close]").click()

    # Publish to the fake Hub with a typed token: the page shows the repo, never the token.
    page.locator("#publish-repo input, #publish-repo textarea").first.fill("stripes")
    page.locator("#publish-button").click()
    page.locator("#publish-result").get_by_text("Published").wait_for()
    assert "alice/stripes" in page.locator("#publish-result").inner_text()
    assert "pytorch_lora_weights.safetensors" in hub.repos["alice/stripes"].files
    shot(page, "5-publish")
    assert WRITE_TOKEN not in page.content()
    assert WRITE_TOKEN not in page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")


def fresh_session(page, url: str) -> None:
    """This browser's pages share one localStorage, hence one session: forget it, so the page starts a new one."""
    page.goto(url)
    page.evaluate("localStorage.clear()")
    page.reload()


SLIDER_FITS = """id => {
  const block = document.getElementById(id), range = block.querySelector('input[type=range]');
  return block.scrollWidth <= block.clientWidth && range.getBoundingClientRect().right <= block.getBoundingClientRect().right;
}"""


def test_on_generate_sliders_fit_a_non_lora_file_is_refused_and_a_pick_survives_a_slow_refresh(browser, studio, tmp_path):
    from safetensors.numpy import save_file

    url, workspace, _ = studio
    (tmp_path / "renamed.safetensors").write_bytes(b"a text file with the wrong name")
    save_file({"down_blocks.0.resnets.0.conv1.weight": np.zeros((4, 4), np.float32)}, str(tmp_path / "unet.safetensors"))
    save_file({"lora_unet_down_blocks_0.lora_down.weight": np.zeros((4, 4), np.float32)}, str(tmp_path / "mine.safetensors"))
    page = browser.new_page()
    fresh_session(page, url)
    open_tab(page, "4 · Generate")

    # Each Strength slider is whole inside its column (the track and its max were cut off).
    for i in (1, 2, 3):
        page.locator(f"#strength-{i} input[type=range]").wait_for()
        assert page.evaluate(SLIDER_FITS, f"strength-{i}"), f"strength-{i} is clipped"

    # A file that is not a LoRA: a note says so, nothing is pinned over the pickers, the box is emptied.
    page.get_by_text("Add a LoRA file or one from the Hub").click()
    upload = page.locator("#lora-upload input[type=file]")
    note = page.locator("#lora-note")
    for name, reason in (("renamed.safetensors", "not a readable"), ("unet.safetensors", "not a LoRA")):
        upload.set_input_files(str(tmp_path / name))
        note.get_by_text(reason, exact=False).wait_for()
        assert "Not added" in note.inner_text()
        assert page.locator("span.error:not(.toast-title)").count() == 0  # gradio's red "Error" badges
        assert page.locator("#lora-upload").get_by_text(name).count() == 0
    shot(page, "4-generate-refused")

    upload.set_input_files(str(tmp_path / "mine.safetensors"))
    note.get_by_text("Added mine.safetensors").wait_for()

    # Opening a list asks the server for fresh choices. On a busy server the answer comes after the pick; it must
    # not undo the pick. LoRA 3 holds a file that then vanishes, so the late answer visibly resets LoRA 3 (and
    # only LoRA 3): that is how this test knows the answer has arrived.
    loras = next(workspace.rglob("loras/mine.safetensors")).parent
    shutil.copy(loras / "mine.safetensors", loras / "theirs.safetensors")
    page.locator("#lora-3 input").click()
    page.locator("#lora-3").get_by_role("option", name="theirs.safetensors · file").click()
    (loras / "theirs.safetensors").unlink()
    held = []
    page.route("**/queue/join*", lambda route: held.append(route))
    with page.expect_request("**/queue/join*"):
        page.locator("#lora-2 input").click()
    page.locator("#lora-2").get_by_role("option", name="mine.safetensors · file").click()
    assert page.locator("#lora-2 input").input_value() == "mine.safetensors · file"
    page.evaluate("1")  # let the route handler run
    assert held, "the list refresh was not requested"
    for route in held:
        route.continue_()
    page.unroute("**/queue/join*")
    page.wait_for_function("() => document.querySelector('#lora-3 input').value === 'none'")  # the answer is in
    assert page.locator("#lora-2 input").input_value() == "mine.safetensors · file"
    page.close()


def test_a_new_run_starts_from_the_preset_with_a_fresh_name_and_runs_read_apart(browser, studio, tmp_path, monkeypatch):
    url, _, _ = studio
    monkeypatch.setattr(system, "blip_loadable", lambda model: False)  # as on a machine without the BLIP weights
    page = browser.new_page()
    fresh_session(page, url)
    images = make_images(tmp_path / "photos", 2)
    page.locator("#upload-files input[type=file]").set_input_files(sorted(str(p) for p in images.iterdir()))
    page.locator("#upload-report").get_by_text("2 images added").wait_for()

    # Captions written without BLIP; a preset picked afterwards leaves that choice alone (it switched to BLIP).
    open_tab(page, "2 · Captions")
    page.get_by_label("Caption style").click()
    page.get_by_role("option", name="Trigger only", exact=False).click()
    open_tab(page, "3 · Train")
    page.get_by_label("Character").check()
    page.get_by_text("cannot load on this machine", exact=False).wait_for()
    steps = str(presets.form_values("Character", system.default_base())["optim.steps"])
    page.wait_for_function("steps => document.querySelector('#cfg-optim-steps input')?.value === steps", arg=steps)
    open_tab(page, "2 · Captions")
    assert "Trigger only" in page.get_by_label("Caption style").input_value()

    # This run's own choices: a name, DoRA. A new run starts from the preset shown (Character) and its own name.
    open_tab(page, "3 · Train")
    page.locator("#cfg-output-name input, #cfg-output-name textarea").first.fill("stripes")
    page.get_by_text("Advanced: every setting").click()
    page.locator("#cfg-lora-use_dora input").check()
    page.get_by_role("button", name="New run").click()
    page.wait_for_function("() => document.querySelector('#cfg-output-name input, #cfg-output-name textarea')?.value === 'my-lora'")
    assert not page.locator("#cfg-lora-use_dora input").is_checked()
    assert page.locator("#cfg-optim-steps input").input_value() == steps
    assert page.get_by_label("Character").is_checked()

    # Runs made within the same minute read apart in the picker.
    page.get_by_role("button", name="New run").click()
    page.get_by_text("New run created", exact=False).last.wait_for()
    page.locator("#run-picker input").click()
    options = page.get_by_role("option")
    wait_until(lambda: options.count() == 3, 60)
    labels = options.all_inner_texts()
    assert len(set(labels)) == 3, labels
    shot(page, "0-run-picker")
    page.close()


def test_a_page_open_across_a_server_restart_takes_its_runs_back(browser, tmp_path):
    from test_app import _free_port

    port = _free_port()
    with FakeHub() as hub:
        mp = pytest.MonkeyPatch()
        try:
            demo, url = serve(mp, tmp_path / "workspace", hub.url, tmp_path / "hf", port=port)
            page = browser.new_page()
            fresh_session(page, url)
            images = make_images(tmp_path / "photos", 2)
            page.locator("#upload-files input[type=file]").set_input_files(sorted(str(p) for p in images.iterdir()))
            page.locator("#upload-report").get_by_text("2 images added").wait_for()

            demo.close()  # the server restarts: this page's server-side session is gone
            with page.expect_event("load"):  # the page notices and reloads itself
                demo, _ = serve(mp, tmp_path / "workspace", hub.url, tmp_path / "hf", port=port)
            open_tab(page, "3 · Train")
            page.locator("#check-run").click()
            page.get_by_text("Check passed").wait_for()  # its run and images are back
            page.close()
        finally:
            demo.close()
            mp.undo()
            system.has_gpu.cache_clear()


def test_screenshots_are_real_images():
    """The artifacts the previous test leaves are what a person would see, not blank pages."""
    shots = sorted(ARTIFACTS.glob("*.png")) if ARTIFACTS.exists() else []
    if not shots:
        pytest.skip("no screenshots (the browser test was skipped)")
    for path in shots:
        with Image.open(path) as im:
            assert im.width >= 1000 and im.height >= 600
            assert len(set(im.convert("L").resize((64, 64)).tobytes())) > 8  # not a blank page
