"""The Train tab trains on Hugging Face Jobs: driven through its HTTP API with gradio_client, as a page would.

The app is served in this process (as in tests/test_app.py) with Jobs enabled, this machine's token (off a Space
the follower uses it) and the fake Hub, whose jobs run their command here as subprocesses (tests/fake_hub_jobs.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_images
from fake_hub import WRITE_TOKEN, FakeHub
from gradio_client.exceptions import AppError
from test_app import (
    TINY_TRAINING,
    current_run,
    merge,
    new_client,
    poll_until,
    serve,
    settle,
    start,
    upload_images,
)

from lora_trainer.hub import jobrunner
from lora_trainer.hub import jobs as hub_jobs
from lora_trainer.ui import jobs, system

pytestmark = pytest.mark.slow
ON_JOBS = {"where": "hf-jobs", "flavor": "l4x1", "timeout": "2h"}
JOB_TRAINING = {**TINY_TRAINING, "optim.steps": 30, "sampling.every": 0, "output.save_every": 2}
# A run that cannot end before the test stops it, however fast the machine: the stop and resume are the test.
LONG_JOB = {**JOB_TRAINING, "optim.steps": 100_000}


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as server:
        server.job_env = {jobrunner.STOP_POLL_ENV: "0.5"}
        yield server


@pytest.fixture(scope="module")
def app(hub, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    workspace = tmp_path_factory.mktemp("workspace")
    mp.setenv("LORA_STUDIO_JOBS", "1")  # before the page is built: it shows the Jobs controls only where Jobs is offered
    demo, url = serve(mp, workspace, hub.url, tmp_path_factory.mktemp("hf"))
    mp.setenv("HF_TOKEN", WRITE_TOKEN)  # this machine's token: what a follower off a Space uses
    mp.setenv("HF_HUB_OFFLINE", "0")
    mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf-home")))
    yield url, workspace
    jobs.MANAGER.shutdown(timeout=30)
    demo.close()
    mp.undo()
    system.has_gpu.cache_clear()


def run_folder(workspace: Path, client) -> Path:
    return next(p for p in workspace.glob(f"*/{current_run(client)}") if p.is_dir())


def poll_until_step(client, at_least: int, view: dict, stall: float = 300) -> dict:
    """Poll until the page shows training at step `at_least` or later (steps may pass between two polls);
    it gives up only when the status has not changed for `stall` seconds."""
    import re
    import time

    last, since = None, time.monotonic()
    while True:
        status = str(view.get("status", ""))
        found = re.search(r"step (\d+) /", status)
        if found and int(found.group(1)) >= at_least:
            return view
        assert "failed" not in status, status
        if status != last:
            last, since = status, time.monotonic()
        assert time.monotonic() - since < stall, f"the status stayed at: {status}"
        view = merge(view, client.predict(api_name="/poll"))
        time.sleep(0.2)


def events_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]


def test_picking_hugging_face_jobs_lists_the_hubs_gpus_with_their_prices(app, tmp_path):
    client = new_client(app[0], tmp_path)
    flavor, timeout = client.predict("hf-jobs", api_name="/train_where")
    assert [name for _, name in flavor["choices"]] == ["l4x1", "l4x4"]  # GPU flavours only, cheapest first
    assert flavor["choices"][0][0] == "l4x1 (1x Nvidia L4, $0.001/minute)" and flavor["visible"] is True
    assert timeout["visible"] is True
    flavor, timeout = client.predict("local", api_name="/train_where")
    assert flavor["visible"] is False and timeout["visible"] is False


def test_a_bad_time_limit_is_refused_before_anything_is_submitted(app, hub, tmp_path):
    client = new_client(app[0], tmp_path)
    upload_images(client, make_images(tmp_path / "images", 2))
    before = len(hub.jobs)
    client.predict("hf-jobs", api_name="/train_where")  # what picking Jobs on the page does
    with pytest.raises(AppError, match="90m, 2h or 1d"):
        start(client, **{**ON_JOBS, "timeout": "two hours"}, **JOB_TRAINING)
    assert len(hub.jobs) == before


def test_a_run_trains_on_jobs_from_the_page_is_followed_again_after_a_restart_stops_and_resumes(app, hub, tmp_path):
    url, workspace = app
    client = new_client(url, tmp_path)
    upload_images(client, make_images(tmp_path / "images", 2))

    # Start on Jobs: the job's events reach the same live view as a local run's.
    client.predict("hf-jobs", api_name="/train_where")
    view = poll_until(client, "s/step", "failed", view=start(client, **ON_JOBS, **LONG_JOB))
    assert "Training**: step" in view["status"] and "ETA" in view["status"], view["status"]
    run = run_folder(workspace, client)
    state = hub_jobs.job_state(run)
    first = hub.jobs[state.current.id]
    assert first.spec["flavor"] == "l4x1" and first.spec["timeoutSeconds"] == 7200
    assert f"job [{state.current.id}]" in view["status"] and "`l4x1`" in view["status"]
    assert [row[2] for row in view["loss"]["data"]].count("raw") >= 1

    # One job per account: a second session of the same account is refused, nothing is submitted.
    other = new_client(url, tmp_path)
    upload_images(other, make_images(tmp_path / "other", 2))
    other.predict("hf-jobs", api_name="/train_where")
    with pytest.raises(AppError, match="one job per account"):
        start(other, **ON_JOBS, **JOB_TRAINING)
    assert len(hub.jobs) == 1

    # The app restarts while the job trains (its follower ends, the job goes on); the page follows it again.
    steps_before = sum(e["type"] == "step" for e in events_of(run))
    assert jobs.MANAGER.detach(run) is True
    view = merge(view, client.predict(api_name="/poll"))  # the page's next tick
    assert jobs.MANAGER.get(run).args == ["--on", "hf-jobs", "--attach"] and view["timer"]["active"] is True
    view = poll_until_step(client, steps_before + 2, view)
    assert len(hub.jobs) == 1  # the same job, not a new one

    # Stop: the job saves, pushes and stops; Resume continues on Jobs from the pushed checkpoint.
    def stop() -> int:
        stopped = settle(client, poll_until(client, "Stopped at", "failed", view=start(client, "/stop_training")))
        assert "Stopped at" in stopped["status"], stopped["status"]
        return next(e for e in reversed(events_of(run)) if e["type"] == "stopped")["step"]

    stopped_at = stop()
    assert first.stage == "COMPLETED"
    view = poll_until_step(client, stopped_at + 1, poll_until(client, "Training**: step", "failed", view=start(client, "/resume_training")))
    second = hub.jobs[hub_jobs.job_state(run).current.id]
    assert second is not first and "--resume-from" in second.spec["command"]
    started = [e for e in events_of(run) if e["type"] == "started"]
    assert started[-1]["resumed"] is True and started[-1]["step"] == stopped_at
    assert stop() > stopped_at  # it went on from the checkpoint, not from zero

    # The LoRA's checkpoints are in the run folder and in the user's repo; the token is in no file or page.
    assert (run / "checkpoints" / f"step-{stopped_at:06d}" / "pytorch_lora_weights.safetensors").is_file()
    repo = hub.repos[state.repo]
    assert any(name.endswith("pytorch_lora_weights.safetensors") for name in repo.files)
    page = json.dumps(view)
    assert WRITE_TOKEN not in page
    assert not [p for p in workspace.rglob("*") if p.is_file() and WRITE_TOKEN.encode() in p.read_bytes()]
    assert all(WRITE_TOKEN not in json.dumps(job.spec["command"]) for job in hub.jobs.values())
