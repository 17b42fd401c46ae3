"""Two people rate one run in real headless Chromium: the owner shares a rating code, a second browser
session opens it from the link, both rate, and the owner's report holds both raters.

Reuses test_browser's server fixture and helpers; skipped, with the reason, without playwright or chromium.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_images, tiny_config
from test_browser import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS, open_tab, shot, studio  # noqa: F401 - studio is a fixture

from lora_trainer import config as config_mod
from lora_trainer.train import train

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_people():
    """Two browser contexts: two sessions that share nothing (cookies, localStorage)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    if not CHROMIUM:
        pytest.skip("no chromium executable (apt-get install chromium, or set CHROMIUM)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # generation in the app's process: two spinning threads on 2 loaded cores are ~10x slower
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        contexts = [browser.new_context(viewport={"width": 1400, "height": 1000}) for _ in range(2)]
        for context in contexts:
            context.set_default_timeout(TIMEOUT_MS)
        yield contexts
        browser.close()
    torch.set_num_threads(threads)


def test_two_sessions_rate_one_run_and_the_report_holds_both(two_people, studio, tmp_path):  # noqa: F811
    url, workspace, _ = studio
    owner_context, rater_context = two_people
    owner = owner_context.new_page()
    owner.goto(url)
    images = make_images(tmp_path / "photos", 3)
    owner.locator("#upload-files input[type=file]").set_input_files(sorted(str(p) for p in images.glob("*.png")))
    owner.locator("#upload-report").get_by_text("3 images added").wait_for()

    # The owner's run gets two checkpoints (trained in this process: the Train tab has its own browser test).
    run = next(workspace.rglob("dataset")).parent
    cfg = tiny_config(run / "dataset", optim__steps=6, output__save_every=3)
    config_mod.save(cfg, run)
    train(run, cfg)

    # Owner: make the rating images and get a rating code.
    open_tab(owner, "6 · Rate")
    owner.get_by_text("Prepare (this run's owner)").click()
    owner.locator("#rate-steps input").fill("2")
    owner.locator("#rate-steps input").press("Tab")
    owner.locator("#rate-prepare").click()
    share = owner.locator("#rate-share")
    share.get_by_text("Rating code").wait_for()
    code = re.search(r"Rating code: (\S{16})", share.inner_text()).group(1)
    link = re.search(r"(http\S+\?rate=\S{16})", share.inner_text()).group(1)
    assert link.endswith(code)

    # Owner rates one image of their own run (empty code).
    owner.locator("#rate-open").click()
    status = owner.locator("#rate-status")
    status.get_by_text("1 of 24").wait_for()
    owner.locator("#rate-left img").wait_for()
    owner.locator("#rate-submit").click()
    status.get_by_text("2 of 24").wait_for()
    shot(owner, "6-rate-owner")

    # A second session: a wrong code opens nothing; the link fills in the code; it rates a single and a pair.
    rater = rater_context.new_page()
    rater.goto(url)
    open_tab(rater, "6 · Rate")
    rater.locator("#rate-code input, #rate-code textarea").first.fill("x" * 16)
    rater.locator("#rate-open").click()
    rater.get_by_text("No run has that rating code").first.wait_for()
    rater.goto(link)
    open_tab(rater, "6 · Rate")
    rater.wait_for_function(
        f"() => [...document.querySelectorAll('#rate-code input, #rate-code textarea')].some(e => e.value === '{code}')")
    rater.locator("#rate-open").click()
    rater_status = rater.locator("#rate-status")
    rater_status.get_by_text("1 of 24").wait_for()
    rater.locator("#rate-score-style input[type=number]").fill("5")
    rater.locator("#rate-score-style input[type=number]").press("Tab")
    rater.locator("#rate-submit").click()
    rater_status.get_by_text("2 of 24").wait_for()
    rater.get_by_text("Pairs: which is better").click()
    rater.locator("#rate-open").click()
    rater_status.get_by_text("1 of 24").wait_for()  # 8 prompt-seed cases x 3 pairs of variants
    rater.locator("#rate-right img").wait_for()
    rater.locator("#rate-pick-style").get_by_text("left").click()
    rater.locator("#rate-submit").click()
    rater_status.get_by_text("2 of 24").wait_for()
    shot(rater, "6-rate-second-rater")
    assert run.name not in rater.content() and "Rating code:" not in rater.content()  # nothing else of the owner's

    # The owner exports: the report holds both raters and the images.
    owner.get_by_text("Results (this run's owner)").click()
    owner.locator("#rate-export").click()
    owner.locator("#rate-summary").get_by_text("LoRA off").wait_for()
    records = [json.loads(line) for line in (run / "ratings" / "ratings.jsonl").read_text().splitlines()]
    raters = {r["rater"] for r in records}
    assert len(records) == 3 and len(raters) == 2
    assert [r["answers"]["style"] for r in records if r["mode"] == "single"].count(5) == 1
    report = (run / "ratings" / "report.html").read_text()
    assert all(r in report for r in raters) and report.count("data:image/png;base64,") == 24
    assert code not in report
    shot(owner, "6-rate-report")
