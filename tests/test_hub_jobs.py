"""Training on Hugging Face Jobs against the fake Hub, whose jobs run their command here as subprocesses.

The end-to-end test drives the real CLI (`train RUN --on hf-jobs`) as the app would: events reach the
local run folder from the job's log stream, SIGTERM stops the job (it saves and pushes), a second
submission resumes from the pushed checkpoint, a job killed outright is continued by the next attempt,
the files end up in the repo and in the run, and the token is in no file, log or command.
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
from fake_hub import FINE_GRAINED_TOKEN, WRITE_TOKEN, FakeHub, Until, wait_following_progress

from lora_trainer import config as config_mod
from lora_trainer.eval_metrics import TINY_CLIP
from lora_trainer.events import read_events
from lora_trainer.hub import HubError, client, jobmonitor, jobrunner, jobs

ROOT = Path(__file__).resolve().parent.parent
REPO = "alice/lora-studio-run"
STEPS = 60  # the end-to-end run's
IDLE = 120  # seconds without any progress (see Cli.progress) before a wait counts as hung
# The evaluation after training, on in the job (auto leaves it off for the tiny model on a CPU), cheap: random tiny CLIP.
EVALUATE = {"eval__after_training": "on", "eval__clip_model": TINY_CLIP, "eval__steps": 2, "eval__prompt_count": 2,
            "eval__seeds": 2, "eval__validation_images": 2, "eval__validation_timesteps": 2}


@pytest.fixture
def server(tmp_path):
    with FakeHub() as hub:
        hub.job_env = {jobrunner.STOP_POLL_ENV: "0.5"}
        yield hub


def new_run(tmp_path: Path, steps: int, save_every: int = 2, **settings) -> Path:
    """A run folder with its own dataset/, as the app or `train --images` leaves it."""
    run = tmp_path / "run"
    cfg = tiny_config(tmp_path / "unused", optim__steps=steps, output__save_every=save_every, **settings)
    cfg.set("data.images", "dataset")
    config_mod.save(cfg, run)
    make_images(run / "dataset")
    return run


def events_of(run: Path) -> list[dict]:
    return read_events(run / "events.jsonl")[0]


class Cli:
    """`python -m lora_trainer train RUN --on hf-jobs ...` in a subprocess, followed while it makes progress."""

    def __init__(self, server: FakeHub, run: Path, tmp_path: Path):
        self.server, self.run, self.out = server, run, tmp_path / "cli.out"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": server.url, "HF_TOKEN": WRITE_TOKEN,
                    "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}

    def start(self, *args: str) -> subprocess.Popen:
        with open(self.out, "ab") as sink:
            cmd = [sys.executable, "-m", "lora_trainer", "train", str(self.run), "--on", "hf-jobs", *args]
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=sink, stderr=sink)
        self.procs.append(proc)
        return proc

    def report(self) -> str:
        """What the follower and each job printed, for a failed assertion."""
        jobs_said = "".join(f"\n--- job {i}:\n{self.server.job_text(i)[-2500:]}" for i in self.server.jobs)
        return f"--- follower:\n{self.out.read_text()[-2500:]}{jobs_said}"

    def close(self) -> None:
        for proc in self.procs:  # a failed test leaves no follower behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def progress(self):
        """Jobs started, lines they printed, CPU their trainers used, events that arrived (not requests:
        the follower polls the Hub whether or not anything happens)."""
        lines = sum(len(job.lines) for job in self.server.jobs.values())
        events = self.run / "events.jsonl"
        cpu = round(self.server.job_cpu_seconds() * 2)  # in half seconds
        return len(self.server.jobs), lines, cpu, events.stat().st_size if events.exists() else 0

    def wait_for(self, proc: subprocess.Popen, condition) -> None:
        while not condition():
            assert proc.poll() is None, self.report()
            wait_following_progress(Until(lambda: condition() or proc.poll() is not None), self.progress, IDLE)

    def finish(self, proc: subprocess.Popen) -> int:
        return wait_following_progress(proc, self.progress, IDLE)


@pytest.fixture
def cli(server, tmp_path):
    follower = Cli(server, new_run(tmp_path, steps=STEPS, save_every=20, **EVALUATE), tmp_path)
    yield follower
    follower.close()


def test_a_run_trains_on_jobs_stops_resumes_survives_a_killed_job_and_comes_back(cli, server):
    run = cli.run

    # 1. Submit; the trainer's events reach the local run folder through the job's log stream. The stop below is
    #    sent at the first checkpoint and reaches the job through the Hub a while later: the job's trainer waits
    #    for it there (the fake Hub pauses it until the job says the stop arrived), or a quick run would finish first.
    server.hold_at('"type": "checkpoint"', "jobrunner: stop requested")
    proc = cli.start("--flavor", "l4x1", "--timeout", "2h")
    cli.wait_for(proc, lambda: any(e["type"] == "checkpoint" for e in events_of(run)))
    state = jobs.job_state(run)
    first = server.jobs[state.current.id]
    assert first.spec["flavor"] == "l4x1" and first.spec["timeoutSeconds"] == 7200
    assert [e["type"] for e in events_of(run)][:2] == ["started", "step"]

    # 2. Stop (what the app's Stop button sends): the job saves, pushes and stops; the checkpoint comes back.
    proc.send_signal(signal.SIGTERM)
    assert cli.finish(proc) == 0, cli.report()
    assert server.released  # the trainer was held at its first checkpoint until the stop reached the job
    stopped = [e for e in events_of(run) if e["type"] == "stopped"]
    assert len(stopped) == 1 and stopped[0]["step"] < STEPS
    assert first.stage == "COMPLETED"
    assert jobs.job_state(run).status == "stopped"
    assert (run / stopped[0]["checkpoint"] / "trainer_state.json").is_file()
    assert f"{stopped[0]['checkpoint']}/trainer_state.json" in server.repos[REPO].files

    # 3. Submit again: the new job resumes from the pushed checkpoint; its machine is lost as it pushes its
    #    first checkpoint (mid-run or its last), and the next attempt continues from the last pushed one.
    server.kill_on_request("/commit/", body_contains="checkpoints/step-")
    proc = cli.start("--flavor", "l4x1", "--attempts", "3")
    assert cli.finish(proc) == 0, cli.report()
    state = jobs.job_state(run)
    # This submission's attempts: the killed job, then the one that continued it.
    assert len(state.jobs) == 2 and state.status == "finished", cli.report()
    killed, last = (server.jobs[j.id] for j in state.jobs)
    assert (killed.stage, killed.message) == ("ERROR", "the machine was lost (fake hub)") and last.stage == "COMPLETED"
    assert all("--resume-from" in job.spec["command"] for job in (killed, last))
    started = [e for e in events_of(run) if e["type"] == "started"]
    assert [e["resumed"] for e in started] == [False, True, True]
    assert started[1]["step"] == started[2]["step"] == stopped[0]["step"]  # the last checkpoint that was pushed
    assert [e["type"] for e in events_of(run)][-2:] == ["evaluation", "finished"]
    assert "continuing with a new job" in (run / "train.log").read_text()

    # 4. The files: in the repo, and in the run folder as after a local run, the evaluation after training and its
    #    pick (best/) too: Generate, `push --checkpoint best` and Publish find them where a local run has them.
    files = server.repos[REPO].files
    assert f"checkpoints/step-{STEPS:06d}/pytorch_lora_weights.safetensors" in files
    assert (run / "final" / "pytorch_lora_weights.safetensors").read_bytes() == files[
        f"checkpoints/step-{STEPS:06d}/pytorch_lora_weights.safetensors"]
    evaluation = json.loads((run / "evaluation.json").read_text())
    pick = evaluation["recommendation"]["name"]
    assert events_of(run)[-2]["best"] == pick and evaluation["rows"][0]["name"] == "base"
    assert {r["name"] for r in evaluation["rows"][1:]} >= {f"step-{STEPS:06d}"}  # the job's checkpoints, scored there
    best = sorted(p.name for p in (run / "best").iterdir())
    kohya = f"{config_mod.load(run).output.name}.safetensors"
    assert best == sorted(["evaluation.json", "lora_info.json", "pytorch_lora_weights.safetensors", kohya]), best
    for name in best:
        assert (run / "best" / name).read_bytes() == files[f"best/{name}"], name
    assert files[f"checkpoints/{pick}/pytorch_lora_weights.safetensors"] == (run / "best" / "pytorch_lora_weights.safetensors").read_bytes()
    assert (run / "evaluation.json").read_bytes() == files["evaluation.json"]
    assert "## Evaluation" in (run / "README.md").read_text()  # the card, written after it came back, has its table
    assert server.repos[REPO].private

    # 5. The token is in no file, log, command or job environment.
    for path in run.rglob("*"):
        if path.is_file():
            assert WRITE_TOKEN.encode() not in path.read_bytes(), path
    for name, data in files.items():
        assert WRITE_TOKEN.encode() not in data, name
    for job in server.jobs.values():
        assert WRITE_TOKEN not in server.job_text(job.id)
        assert WRITE_TOKEN not in repr(job.spec["command"]) + repr(job.spec["environment"])
        assert job.spec["secrets"] == {"HF_TOKEN": WRITE_TOKEN}  # the only way it travels
    assert WRITE_TOKEN not in cli.out.read_text()


# -- submission errors and failed jobs, in this process ---------------------------------------------
@pytest.fixture
def hub(monkeypatch, tmp_path, server):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(client, "RETRY_BASE_DELAY", 0.0)
    return server


@pytest.mark.parametrize(
    ("setup", "token", "flavor", "message"),
    [
        ("payment", WRITE_TOKEN, "l4x1", "needs a payment method or prepaid credit"),
        ("", FINE_GRAINED_TOKEN, "l4x1", "may not run Jobs"),
        ("", WRITE_TOKEN, "h100-huge", "'h100-huge' is not a Jobs hardware flavour. GPU flavours the Hub offers now: l4x1"),
    ],
)
def test_a_job_that_cannot_start_says_why_and_starts_nothing(hub, tmp_path, setup, token, flavor, message):
    hub.payment_required = setup == "payment"
    run = new_run(tmp_path, steps=4)
    with pytest.raises(HubError, match=message) as error:
        jobs.submit(run, flavor, token=token, endpoint=hub.url)
    assert token not in str(error.value)
    assert hub.jobs == {} and jobs.job_state(run) is None


def test_unknown_flavour_message_quotes_the_hubs_prices(hub, tmp_path):
    with pytest.raises(HubError, match=r"l4x1 \(1x Nvidia L4, \$0.001/minute\)"):
        jobs.submit(new_run(tmp_path, steps=4), "nope", token=WRITE_TOKEN, endpoint=hub.url)


def test_a_dead_job_past_its_attempts_fails_with_its_last_log_lines_and_page(hub, tmp_path):
    run = new_run(tmp_path, steps=4)
    state = jobs.submit(run, "l4x1", max_attempts=1, token=WRITE_TOKEN, endpoint=hub.url)
    job = hub.jobs[state.current.id]
    outcome: list = []

    def following() -> None:
        try:
            jobmonitor.follow(run, token=WRITE_TOKEN)
        except jobmonitor.JobFailed as e:
            outcome.append(e)

    thread = threading.Thread(target=following, daemon=True)
    thread.start()
    progress = lambda: (len(job.lines), round(hub.job_cpu_seconds() * 2))  # noqa: E731 - not requests: they never stop
    wait_following_progress(Until(lambda: "jobrunner: fetched" in hub.job_text(job.id)), progress, IDLE)
    hub.kill_job(job.id, message="the machine was lost")
    wait_following_progress(Until(lambda: not thread.is_alive()), lambda: (*progress(), len(hub.requests) // 50), IDLE)

    message = str(outcome[0])
    assert "ended ERROR (the machine was lost) without finishing" in message
    assert state.current.url in message and f"/{REPO}" in message
    assert "jobrunner: fetched the run" in message  # the last log lines
    assert events_of(run)[-1]["type"] == "failed" and jobs.job_state(run).status == "failed"
    assert len(hub.jobs) == 1  # no attempt left: not continued


def test_several_gpus_train_data_parallel_under_accelerate():
    command = jobs.job_command(REPO, "abc", processes=4, resume=True)
    runner = command[command.index("lora-studio-job") + 1:]
    assert runner[:3] == ["python", "-m", "lora_trainer.hub.jobrunner"] and "--processes" in runner
    assert runner[-4:] == ["train", "run", "--resume-from", f"hub:{REPO}"]
    trainer = jobrunner.trainer_command(["train", "run"], 4)
    assert trainer[1:5] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes=4"]
    assert trainer[-3:] == ["lora_trainer", "train", "run"]
    assert jobrunner.trainer_command(["train", "run"], 1)[1:] == ["-m", "lora_trainer", "train", "run"]
