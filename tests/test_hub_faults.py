"""A Hub that never answers (issue 12): every call times out, retries are bounded, a stop or the end
of training waits a bounded time for uploads, and what did not upload is recorded and pushed later.

The fake Hub's hang mode reads a request and never answers it. Processes under test run as
subprocesses followed by `wait_following_progress`, so a hang fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import huggingface_hub
import pytest
from conftest import make_images, tiny_config
from fake_hub import WRITE_TOKEN, FakeHub, Until, wait_following_progress
from test_hub import make_run

from lora_trainer import config as config_mod
from lora_trainer.events import read_events
from lora_trainer.hub import checkpoints as hub_checkpoints
from lora_trainer.hub import client

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def hub_env(tmp_path):
    """A fake Hub, and the environment of a process that talks to it with short timeouts and waits."""
    with FakeHub() as server:
        env = {
            **os.environ, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": server.url, "HF_TOKEN": WRITE_TOKEN,
            "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"),
            client.TIMEOUT_ENV: "0.5", hub_checkpoints.UPLOAD_WAIT_ENV: "1",
        }
        yield server, env


def start(env, out: Path, *args: str) -> subprocess.Popen:
    with open(out, "wb") as sink:
        return subprocess.Popen([sys.executable, "-m", "lora_trainer", *args], cwd=ROOT, env=env, stdout=sink, stderr=sink)


def sizes(*paths: Path) -> tuple:
    return tuple(p.stat().st_size if p.exists() else -1 for p in paths)


def test_push_to_a_hub_that_accepts_the_commit_and_never_answers_fails_with_a_clear_message(tmp_path, hub_env):
    server, env = hub_env
    run = make_run(tmp_path / "run")
    server.hang_next(1000, path_contains="/commit/")
    out = tmp_path / "push.log"
    proc = start(env, out, "push", str(run), "--repo", "alice/my-lora")
    assert wait_following_progress(proc, lambda: (len(server.requests), sizes(out))) == 1
    message = out.read_text()
    assert "Gave up uploading to alice/my-lora after" in message
    assert "the Hub did not answer within 0.5 s" in message
    assert "Traceback" not in message
    assert len(server.hung) >= 2  # retried, and gave up
    assert "pytorch_lora_weights.safetensors" not in server.repos["alice/my-lora"].files


def test_stop_during_a_hung_upload_stops_records_the_checkpoint_and_a_resume_pushes_it(tmp_path, hub_env):
    server, env = hub_env
    run = tmp_path / "run"
    cfg = tiny_config(make_images(tmp_path / "images"), optim__steps=8, output__save_every=2,
                      output__push_checkpoints_to="alice/ckpts")
    config_mod.save(cfg, run)
    server.hang_next(1000, path_contains="/commit/")
    out, events = tmp_path / "train.out", run / "events.jsonl"
    proc = start(env, out, "train", str(run))
    progress = lambda: (len(server.requests), sizes(out, events, run / "train.log"))  # noqa: E731

    def checkpointed() -> bool:
        return any(e["type"] == "checkpoint" for e in read_events(events)[0])

    while not checkpointed():  # the first checkpoint is saved and its push hangs
        assert proc.poll() is None, out.read_text()[-3000:]
        wait_following_progress(Until(checkpointed), progress)
    proc.send_signal(signal.SIGTERM)
    assert wait_following_progress(proc, progress) == 0, out.read_text()[-3000:]

    stopped = [e for e in read_events(events)[0] if e["type"] == "stopped"]
    assert stopped and stopped[0]["step"] < 8
    record = hub_checkpoints.pending_uploads(run)
    assert record["repo"] == "alice/ckpts"
    assert "checkpoints/step-000002" in record["checkpoints"]
    assert stopped[0]["checkpoint"] in record["checkpoints"]
    assert "not uploaded to alice/ckpts" in (run / "train.log").read_text()

    # The Hub answers again: the resumed run pushes what was pending first, then trains on.
    server.answer_again()
    proc = start(env, out, "train", str(run))
    assert wait_following_progress(proc, progress) == 0, out.read_text()[-3000:]
    stored = server.repos["alice/ckpts"].files
    for rel in record["checkpoints"]:
        if (run / rel).is_dir():  # pruning may have removed older ones after their push
            assert f"{rel}/trainer_state.json" in stored
    assert f"{stopped[0]['checkpoint']}/trainer_state.json" in stored
    assert "checkpoints/step-000008/trainer_state.json" in stored
    assert not (run / hub_checkpoints.PENDING_FILE).exists()


# -- the uploader, in this process ----------------------------------------------------------------
@pytest.fixture
def fake(monkeypatch, tmp_path):
    """A fake Hub with a short read timeout for this process' Hub session; retries without pauses."""
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    monkeypatch.setenv(client.TIMEOUT_ENV, "0.3")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(client, "RETRY_BASE_DELAY", 0.0)
    huggingface_hub.close_session()  # the next session is built with the short timeout
    with FakeHub() as server:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)
        yield server
    huggingface_hub.close_session()  # and the one after with the default again (env restored by then)


def checkpoint(run: Path, step: int) -> Path:
    folder = run / "checkpoints" / f"step-{step:06d}"
    (folder / "state").mkdir(parents=True)
    (folder / "state" / "optimizer.pt").write_bytes(b"state %d" % step)
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    return folder


def test_close_waits_a_bounded_time_then_reports_and_records_what_did_not_upload(fake, tmp_path):
    run = tmp_path / "run"
    fake.hang_next(1000, path_contains="/commit/")
    reports = []
    uploader = hub_checkpoints.Uploader(run, "alice/ckpts", wait=0.2, on_pending=reports.append)
    uploader.submit(checkpoint(run, 2))
    uploader.submit(checkpoint(run, 4))
    left: list = []
    closing = threading.Thread(target=lambda: left.append(uploader.close()), daemon=True)
    closing.start()  # in a thread: a close that waited for ever would fail this test, not hang it
    wait_following_progress(Until(lambda: not closing.is_alive()), lambda: len(fake.requests))
    assert left == [["checkpoints/step-000002", "checkpoints/step-000004"]]
    assert [r["checkpoints"] for r in reports] == [["checkpoints/step-000002", "checkpoints/step-000004"]]
    assert "still uploading after 0.2 s" in reports[0]["message"] and "resumes" in reports[0]["message"]
    record = hub_checkpoints.pending_uploads(run)
    assert record["repo"] == "alice/ckpts"
    assert record["checkpoints"] == ["checkpoints/step-000002", "checkpoints/step-000004"]
    assert WRITE_TOKEN not in (run / hub_checkpoints.PENDING_FILE).read_text()


def test_a_failed_push_is_recorded_and_the_next_uploader_pushes_it_first(fake, tmp_path):
    run = tmp_path / "run"
    fake.fail_next(1000, status=503, path_contains="/commit/")
    reports = []
    uploader = hub_checkpoints.Uploader(run, "alice/ckpts", wait=30, on_pending=reports.append)
    uploader.submit(checkpoint(run, 2))
    assert uploader.close() == ["checkpoints/step-000002"]  # finished (failed) within the wait
    assert "the push failed: Gave up uploading to alice/ckpts after 4 tries: the Hub answered 503" in reports[0]["message"]

    fake.answer_again()
    uploader = hub_checkpoints.Uploader(run, "alice/ckpts", wait=30, on_pending=reports.append)
    assert uploader.close() == []
    assert "checkpoints/step-000002/trainer_state.json" in fake.repos["alice/ckpts"].files
    assert hub_checkpoints.pending_uploads(run) is None
    assert len(reports) == 1  # nothing left to report the second time


def test_publishing_pushes_checkpoints_that_did_not_upload_during_training(fake, tmp_path):
    from lora_trainer.hub import push_run

    run = make_run(tmp_path / "run")
    fake.fail_next(1000, status=503, path_contains="/commit/")
    uploader = hub_checkpoints.Uploader(run, "alice/ckpts", wait=30)
    uploader.submit(run / "checkpoints" / "step-000100")
    assert uploader.close() == ["checkpoints/step-000100"]

    fake.answer_again()
    push_run(run, "alice/my-lora", endpoint=fake.url)
    assert "checkpoints/step-000100/trainer_state.json" in fake.repos["alice/ckpts"].files
    assert hub_checkpoints.pending_uploads(run) is None
