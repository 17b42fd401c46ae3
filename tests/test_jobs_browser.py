"""A Jobs run in a real headless Chromium: pick Hugging Face Jobs on the Train tab, start, watch the job's events
arrive (step, loss, the plot), Stop; the token is nowhere in the page.

The app and the fake Hub (whose jobs run their command here) are tests/test_jobs_ui.py's; the browser is
tests/test_browser.py's (skipped, with the reason, without chromium or playwright). Off a Space the follower uses
this machine's token, as the app does there.
"""

from __future__ import annotations

import re

import pytest
from conftest import make_images
from fake_hub import WRITE_TOKEN
from test_browser import browser, fresh_session, open_tab, wait_following_progress  # noqa: F401 - a fixture
from test_jobs_ui import LONG_JOB, app, events_of, hub  # noqa: F401 - fixtures

from lora_trainer.hub import jobs as hub_jobs

pytestmark = [pytest.mark.browser, pytest.mark.slow]
STALL = 300  # seconds without any change on the page before a wait counts as hung (a stop waits for the job's push)


# The training loss's own lines (raw and smoothed, ui/tabs/train.py's colours) are drawn, not only the validation loss's.
TRAINING_LOSS_DRAWN_JS = """() => {
  const strokes = [...document.querySelectorAll('#loss-plot .mark-line path')]
    .filter(p => (p.getAttribute('d') || '').length > 20).map(p => getComputedStyle(p).stroke);
  return ['rgb(163, 184, 214)', 'rgb(232, 89, 12)'].every(colour => strokes.includes(colour));
}"""


def step_shown(page) -> int:
    found = re.search(r"step (\d+) /", page.locator("#train-status").inner_text())
    return int(found.group(1)) if found else 0


def test_a_person_trains_on_hugging_face_jobs_watches_its_loss_and_stops_it(browser, app, hub, tmp_path):  # noqa: F811
    url, workspace = app
    page = browser.new_page()
    fresh_session(page, url)
    images = make_images(tmp_path / "photos", 2)
    page.locator("#upload-files input[type=file]").set_input_files(sorted(str(p) for p in images.iterdir()))
    page.locator("#upload-report").get_by_text("2 images added").wait_for()

    # The tiny model, a run too long to end before its Stop; where to train: Hugging Face Jobs, its cheapest GPU.
    page.get_by_label("Base model").click()
    page.get_by_role("option", name="Tiny SD (built in", exact=False).click()
    open_tab(page, "3 · Train")
    page.locator("#cfg-optim-steps input").fill(str(LONG_JOB["optim.steps"]))
    page.locator("#cfg-optim-steps input").press("Tab")
    page.locator("#train-where").get_by_label("Hugging Face Jobs (a GPU", exact=False).check()
    page.locator("#train-flavor input").wait_for()
    page.wait_for_function("() => (document.querySelector('#train-flavor input')?.value || '').startsWith('l4x1')")
    page.locator("#start-training").click()

    # The job's events reach the page: the step and its loss climb, the loss plot draws, the job is named.
    wait_following_progress(page, lambda: step_shown(page) >= 3 and page.evaluate(TRAINING_LOSS_DRAWN_JS), STALL)
    run = next(p.parent for p in workspace.glob(f"*/*/{hub_jobs.STATE_FILE}"))  # this page's only run on Jobs
    state = hub_jobs.job_state(run)
    status = page.locator("#train-status").inner_text()
    assert "On Hugging Face Jobs" in status and "l4x1" in status and state.current.id in status, status
    assert re.search(r"loss \d+\.\d{4}", status) and "ETA" in status, status
    assert hub.jobs[state.current.id].spec["flavor"] == "l4x1"
    screenshot = tmp_path / "jobs-training.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot: {screenshot}")

    # Stop: the job saves, pushes and stops; the page says where it stopped and offers Resume.
    page.locator("#stop-training").click()
    status_box = page.locator("#train-status")
    wait_following_progress(page, lambda: "Stopped at step" in status_box.inner_text(), STALL)
    wait_following_progress(page, lambda: page.locator("#resume-training").is_enabled(), STALL)
    stopped = next(e for e in reversed(events_of(run)) if e["type"] == "stopped")
    assert f"Stopped at step {stopped['step']}" in status_box.inner_text()
    assert hub.jobs[state.current.id].stage == "COMPLETED"
    assert f"{stopped['checkpoint']}/trainer_state.json" in hub.repos[state.repo].files
    page.screenshot(path=str(tmp_path / "jobs-stopped.png"), full_page=True)

    # The token the jobs ran with is nowhere in the page or the browser's storage.
    assert WRITE_TOKEN not in page.content()
    assert WRITE_TOKEN not in page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")
    page.close()
