"""The job registry (one trainer at a time, a queue, stop = SIGTERM) and reading a run's state from its events.

A fake trainer (a short Python script speaking the events contract) stands in for
`python -m lora_trainer train`, so these tests need no model and take seconds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from lora_trainer.ui import jobs
from lora_trainer.ui.monitor import RunMonitor, Status, console_tail, run_status

FAKE_TRAINER = r'''
import json, signal, sys, time
from pathlib import Path

run = Path(sys.argv[1])
mode = (run / "mode").read_text().strip() if (run / "mode").exists() else "train"
events = open(run / "events.jsonl", "a")
def emit(event_type, **fields):
    events.write(json.dumps({"type": event_type, "time": time.time(), **fields}) + "\n"); events.flush()
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print("fake trainer says hello", flush=True)
while mode == "hold" and not (run / "release").exists():  # a trainer still loading its model
    time.sleep(0.02)
if mode == "refuse":  # the command line says what is wrong and exits before training (cli.main)
    print("error: Hugging Face Jobs needs a payment method or prepaid credit", file=sys.stderr, flush=True)
    sys.exit(1)
if mode == "crash":
    print("Traceback (most recent call last):\nMemoryError: the fake trainer ran out", file=sys.stderr, flush=True)
    sys.exit(3)
emit("started", step=0, total_steps=50, base="builtin:tiny-sd", kind="sd", resumed=False, plan={}, device="cpu")
if mode == "fail":
    emit("failed", step=0, error="data.resolution = 7 is out of range", hint="use a resolution of at least 64")
    sys.exit(1)
for step in range(1, 51):
    time.sleep(0.02)
    emit("step", step=step, total_steps=50, loss=1.0 / step, lr=1e-4, sec_per_step=0.05, eta_seconds=0.05 * (50 - step), memory={"rss_gb": 0.1})
    if stop:
        emit("checkpoint", step=step, path=f"checkpoints/step-{step:06d}")
        emit("stopped", step=step, checkpoint=f"checkpoints/step-{step:06d}")
        sys.exit(0)
emit("finished", step=50, final="final", files=[])
while mode == "linger" and not (run / "release").exists():  # a trainer still closing after its last event
    time.sleep(0.02)
'''


@pytest.fixture
def manager(tmp_path: Path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)
    m = jobs.JobManager(slots=1, command=lambda run: [sys.executable, str(script), str(run)])
    yield m
    m.shutdown(timeout=10)


def make_run(tmp_path: Path, name: str, mode: str = "train") -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "mode").write_text(mode)
    return run


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def events_of(run: Path) -> list[str]:
    return [json.loads(line)["type"] for line in (run / "events.jsonl").read_text().splitlines()]


def test_the_trainer_command_is_an_argument_list_running_this_python():
    command = jobs.train_command(Path("/runs/a b; rm -rf x"))
    assert command == [sys.executable, "-m", "lora_trainer", "train", "/runs/a b; rm -rf x"]


def test_a_job_runs_to_the_end_and_its_output_goes_to_console_log(manager, tmp_path):
    run = make_run(tmp_path, "a")
    manager.submit(run)
    job = manager.wait(run, timeout=60)
    assert (job.state, job.returncode) == (jobs.ENDED, 0)
    assert events_of(run)[-1] == "finished"
    assert "fake trainer says hello" in (run / jobs.CONSOLE_LOG).read_text()
    monitor = RunMonitor(run)
    monitor.update()
    assert run_status(monitor, manager).state == "finished"


def test_a_second_job_waits_in_line_and_starts_when_the_first_ends(manager, tmp_path):
    first, second = make_run(tmp_path, "first"), make_run(tmp_path, "second")
    manager.submit(first)
    manager.submit(second)
    assert manager.get(second).state == jobs.QUEUED
    assert manager.position(second) == 1
    monitor = RunMonitor(second)
    status = run_status(monitor, manager)
    assert (status.state, status.queue_position) == ("queued", 1)
    assert not (second / "events.jsonl").exists()  # it has not started while the first runs
    manager.wait(first, timeout=60)
    manager.wait(second, timeout=60)
    assert events_of(second)[-1] == "finished"
    first_end = json.loads((first / "events.jsonl").read_text().splitlines()[-1])["time"]
    second_start = json.loads((second / "events.jsonl").read_text().splitlines()[0])["time"]
    assert second_start >= first_end


def test_a_hugging_face_job_starts_at_once_beside_a_local_one_with_its_own_arguments(manager, tmp_path):
    local, followed = make_run(tmp_path, "local", mode="hold"), make_run(tmp_path, "followed", mode="hold")
    manager.submit(local)
    job = manager.submit(followed, args=["--on", "hf-jobs", "--flavor", "l4x1"], remote=True, owner="alice")
    assert job.state == jobs.RUNNING  # the GPU is the Hub's: no place in this machine's line
    assert job.proc.args[-4:] == ["--on", "hf-jobs", "--flavor", "l4x1"]
    assert manager.get(local).state == jobs.RUNNING
    waiting = manager.submit(make_run(tmp_path, "waiting"))
    assert waiting.state == jobs.QUEUED  # a local run still waits for the local one


def test_one_hugging_face_job_per_account(manager, tmp_path):
    manager.submit(make_run(tmp_path, "a", mode="hold"), remote=True, owner="alice")
    with pytest.raises(jobs.OneJobEach, match="one job per account"):
        manager.submit(make_run(tmp_path, "b", mode="hold"), remote=True, owner="alice")
    assert manager.get(tmp_path / "b") is None
    assert manager.submit(make_run(tmp_path, "c", mode="hold"), remote=True, owner="bob").state == jobs.RUNNING
    assert manager.remote_job_of("alice").run_dir == (tmp_path / "a").resolve()


def test_detaching_ends_the_follower_without_asking_its_job_to_stop(manager, tmp_path):
    run = make_run(tmp_path, "a")
    job = manager.submit(run, remote=True, owner="alice")
    wait_for(lambda: (run / "events.jsonl").exists() and "step" in events_of(run))
    assert manager.detach(run) is True
    assert job.proc.returncode == -9  # killed: SIGTERM would have meant "save and stop the job"
    assert "stopped" not in events_of(run) and manager.get(run) is None
    assert manager.submit(make_run(tmp_path, "b", mode="hold"), remote=True, owner="alice").state == jobs.RUNNING


def test_shutdown_stops_local_trainers_but_leaves_hugging_face_jobs_training(manager, tmp_path):
    local, followed = make_run(tmp_path, "local"), make_run(tmp_path, "followed")
    manager.submit(local)
    follower = manager.submit(followed, remote=True, owner="alice")
    wait_for(lambda: all((r / "events.jsonl").exists() and "step" in events_of(r) for r in (local, followed)))
    manager.shutdown(timeout=30)
    assert events_of(local)[-1] == "stopped"
    assert follower.proc.returncode == -9 and "stopped" not in events_of(followed)


def test_a_trainer_closing_after_its_finished_event_reads_finished_not_starting(manager, tmp_path, monkeypatch):
    from lora_trainer.ui.header import run_label
    from lora_trainer.ui.live import status_markdown

    monkeypatch.setattr(jobs, "MANAGER", manager)
    run = make_run(tmp_path, "20261208-041500-a", mode="linger")  # the picker's label reads the stamp
    manager.submit(run)
    monitor = RunMonitor(run)
    wait_for(lambda: monitor.update() is not None and monitor.terminal)  # the `finished` event is written ...
    assert manager.get(run).state == jobs.RUNNING  # ... and the process has not exited yet
    status = run_status(monitor, manager)
    assert (status.state, status.exiting, status.active) == ("finished", True, True)  # the page keeps polling
    assert "Finished: step 50 / 50" in status_markdown(monitor, status)
    assert run_label(run).endswith(" · finished")  # the run picker says what the status says (it said "running")
    (run / "release").touch()
    manager.wait(run, timeout=60)
    assert run_status(monitor, manager) == Status("finished")


def test_a_resumed_run_reads_starting_until_its_new_attempt_starts(manager, tmp_path, monkeypatch):
    from lora_trainer.ui.header import run_label
    from lora_trainer.ui.live import status_markdown

    monkeypatch.setattr(jobs, "MANAGER", manager)
    run = make_run(tmp_path, "20261208-041500-a")
    old = {"type": "stopped", "step": 7, "time": time.time() - 60}  # the previous attempt's end
    (run / "events.jsonl").write_text(json.dumps({"type": "started", "step": 0, "time": old["time"] - 5}) + "\n"
                                      + json.dumps(old) + "\n")
    (run / "mode").write_text("hold")  # writes nothing until released
    manager.submit(run)
    monitor = RunMonitor(run)
    monitor.update()
    status = run_status(monitor, manager)
    assert status.state == "running" and "Starting" in status_markdown(monitor, status)
    assert run_label(run).endswith(" · running")  # not the previous attempt's "stopped"
    (run / "release").touch()
    manager.wait(run, timeout=60)
    monitor.update()
    assert run_status(monitor, manager) == Status("finished")


def test_submitting_an_active_run_again_returns_the_same_job(manager, tmp_path):
    run = make_run(tmp_path, "a")
    assert manager.submit(run) is manager.submit(run)


def test_stopping_a_queued_job_takes_it_out_of_the_line(manager, tmp_path):
    first, second = make_run(tmp_path, "first"), make_run(tmp_path, "second")
    manager.submit(first)
    manager.submit(second)
    assert manager.stop(second) == "cancelled"
    assert manager.get(second).state == jobs.CANCELLED
    manager.wait(first, timeout=60)
    time.sleep(0.3)
    assert not (second / "events.jsonl").exists()


def test_stop_sends_sigterm_and_the_trainer_saves_and_ends(manager, tmp_path):
    run = make_run(tmp_path, "a")
    manager.submit(run)
    wait_for(lambda: (run / "events.jsonl").exists() and "step" in events_of(run))
    assert manager.stop(run) == "stopping"
    job = manager.wait(run, timeout=30)
    assert job.returncode == 0
    assert events_of(run)[-2:] == ["checkpoint", "stopped"]
    monitor = RunMonitor(run)
    monitor.update()
    assert run_status(monitor, manager).state == "stopped"
    assert monitor.step < 50


def test_a_failed_run_shows_the_trainers_own_error_and_hint(manager, tmp_path):
    run = make_run(tmp_path, "a", mode="fail")
    manager.submit(run)
    manager.wait(run, timeout=30)
    monitor = RunMonitor(run)
    monitor.update()
    status = run_status(monitor, manager)
    assert status.state == "failed"
    assert status.error == "data.resolution = 7 is out of range"
    assert status.hint == "use a resolution of at least 64"


def test_a_crash_without_a_failed_event_shows_the_end_of_the_console(manager, tmp_path):
    run = make_run(tmp_path, "a", mode="crash")
    manager.submit(run)
    manager.wait(run, timeout=30)
    monitor = RunMonitor(run)
    monitor.update()
    status = run_status(monitor, manager)
    assert status.state == "failed"
    assert "status 3" in status.error
    assert "MemoryError: the fake trainer ran out" in status.hint


def test_a_command_that_refuses_to_start_shows_its_own_message(manager, tmp_path):
    run = make_run(tmp_path, "a", mode="refuse")
    manager.submit(run, remote=True, owner="alice")
    manager.wait(run, timeout=60)
    monitor = RunMonitor(run)
    monitor.update()
    status = run_status(monitor, manager)
    assert status.state == "failed"
    assert status.error == "Hugging Face Jobs needs a payment method or prepaid credit"


def test_a_run_that_started_but_never_ended_reads_as_interrupted_after_a_restart(tmp_path):
    run = tmp_path / "a"
    run.mkdir()
    (run / "events.jsonl").write_text(
        json.dumps({"type": "started", "step": 0, "total_steps": 10}) + "\n"
        + json.dumps({"type": "step", "step": 3, "total_steps": 10, "loss": 0.5}) + "\n"
    )
    monitor = RunMonitor(run)
    monitor.update()
    assert run_status(monitor, jobs.JobManager()).state == "interrupted"
    assert monitor.step == 3


def test_the_monitor_reads_only_new_events_and_a_fresh_one_rebuilds_everything(tmp_path):
    run = tmp_path / "a"
    run.mkdir()
    path = run / "events.jsonl"
    path.write_text(json.dumps({"type": "started", "step": 0, "total_steps": 4}) + "\n")
    monitor = RunMonitor(run)
    assert monitor.update() is True
    assert monitor.update() is False  # nothing new
    with open(path, "a") as f:
        for step, loss in [(1, 1.0), (2, 0.5), (2, 0.25)]:  # step 2 re-done after a crash: the newer loss wins
            f.write(json.dumps({"type": "step", "step": step, "total_steps": 4, "loss": loss}) + "\n")
        f.write(json.dumps({"type": "sample", "step": 2, "images": ["samples/step-000002/0.png"], "prompts": ["p"]}) + "\n")
        f.write('{"type": "step", "step": 3, "lo')  # half-written: left for the next read
    assert monitor.update() is True
    assert monitor.losses == {1: 1.0, 2: 0.25}
    assert monitor.samples == {2: [(str(run / "samples/step-000002/0.png"), "p")]}
    reattached = RunMonitor(run)
    reattached.update()
    assert (reattached.losses, reattached.step, reattached.total_steps) == (monitor.losses, 2, 4)


def test_the_loss_plot_has_raw_and_smoothed_series():
    monitor = RunMonitor(Path("unused"))
    monitor.losses = {step: float(step % 2) for step in range(1, 101)}  # 1, 0, 1, 0, ...
    rows = monitor.loss_rows()
    raw = [r for r in rows if r[2] == "raw"]
    smooth = [r for r in rows if r[2] == "smoothed"]
    assert [r[1] for r in raw] == [float(s % 2) for s in range(1, 101)]
    assert smooth[0][1] == pytest.approx(1.0)  # bias-corrected: starts at the first value
    assert all(0.2 < r[1] < 0.8 for r in smooth[50:])  # the zigzag averaged out


def test_validation_events_are_plotted_as_their_own_series_next_to_the_training_loss(tmp_path):
    from lora_trainer.ui.live import loss_frame

    events = [{"type": "started", "step": 0, "total_steps": 4}]
    events += [{"type": "step", "step": s, "total_steps": 4, "loss": 1.0 / s} for s in range(1, 5)]
    events.insert(3, {"type": "validation", "step": 2, "val_loss": 0.75, "images": 4})
    events.append({"type": "validation", "step": 4, "val_loss": 0.5, "images": 4})
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    monitor = RunMonitor(tmp_path)
    monitor.update()
    frame = loss_frame(monitor)
    validation = frame[frame["series"] == "validation"]
    assert list(zip(validation["step"], validation["loss"], strict=True)) == [(2, 0.75), (4, 0.5)]
    assert list(frame[frame["series"] == "raw"]["loss"]) == [1.0, 0.5, 1.0 / 3, 0.25]  # the training loss is as it was
    assert str(frame["step"].dtype) == "int64" and str(frame["loss"].dtype) == "float64"


def test_the_loss_plot_waits_for_the_first_steps_loss_not_only_step_0s_validation_loss():
    """The plot fixes its series from its first data: validation alone would hide the training loss for good."""
    from lora_trainer.ui.live import loss_frame

    monitor = RunMonitor(Path("unused"))
    monitor.val_losses = {0: 1.1}
    assert loss_frame(monitor) is None
    monitor.losses = {1: 1.0}
    assert set(loss_frame(monitor)["series"]) == {"raw", "smoothed", "validation"}


def test_console_tail_keeps_the_last_redraw_of_progress_bars(tmp_path):
    (tmp_path / jobs.CONSOLE_LOG).write_text("start\ntraining: 10%\rtraining: 50%\rtraining: 100%\nerror: boom\n")
    assert console_tail(tmp_path) == "start\ntraining: 100%\nerror: boom"


def test_on_a_shared_space_the_trainer_does_not_get_the_spaces_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_owner_secret")
    monkeypatch.setenv("SPACE_ID", "owner/studio")
    assert "HF_TOKEN" not in jobs.trainer_env()
    monkeypatch.delenv("SPACE_ID")
    assert jobs.trainer_env()["HF_TOKEN"] == "hf_owner_secret"
