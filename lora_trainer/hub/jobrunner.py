"""What runs inside a Hugging Face Job: fetch the run from its Hub repo, train it, stop it on request.

    python -m lora_trainer.hub.jobrunner --repo USER/NAME --attempt ID [--processes N] -- train run [...]

1. fetches config.toml, dataset/ and the newest checkpoint of the repo into the run folder;
2. starts `python -m lora_trainer train ...` (under `accelerate launch` with N > 1 GPUs) with its events
   echoed to stdout, which is the job's log stream the follower parses (events.LOG_PREFIX);
3. every STOP_POLL seconds looks for control/stop-<attempt> in the repo (what `jobs.request_stop`
   commits) and then sends the trainer SIGTERM: it finishes the step, saves and pushes a checkpoint,
   writes `stopped` and exits 0, so the job ends COMPLETED. A SIGTERM to this process (a job cancelled
   with a grace period) is passed on the same way;
4. when the trainer finished, pushes what it wrote after its last checkpoint: the evaluation after training
   (evaluation.json) and the recommended checkpoint (best/);
5. exits with the trainer's exit status.

The token comes from the job's HF_TOKEN secret; nothing here prints or writes it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

STOP_POLL = 10.0  # seconds between looks for a stop request
STOP_POLL_ENV = "LORA_STUDIO_STOP_POLL"  # overrides STOP_POLL, e.g. for tests
JOB_UPLOAD_WAIT = 240.0  # seconds the trainer waits for its uploads in a job (under jobmonitor.STOP_WAIT)


def stop_file(attempt: str) -> str:
    """The repo path that asks the job of `attempt` to save and stop."""
    return f"control/stop-{attempt}"


def trainer_command(train_args: list[str], processes: int) -> list[str]:
    """The trainer's command line: the same CLI as on a local machine, data-parallel with several GPUs."""
    if processes > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={processes}",
                "-m", "lora_trainer", *train_args]
    return [sys.executable, "-m", "lora_trainer", *train_args]


def _stop_requested(repo: str, attempt: str) -> bool:
    from huggingface_hub import HfApi

    try:
        return HfApi().file_exists(repo, stop_file(attempt))
    except Exception as e:  # noqa: BLE001 - a Hub hiccup must not stop or crash training; look again later
        print(f"jobrunner: could not look for a stop request: {type(e).__name__}", flush=True)
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_trainer.hub.jobrunner")
    parser.add_argument("--repo", required=True)
    parser.add_argument("--attempt", required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- train RUN [...]: the trainer's arguments")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if train_args[:1] != ["train"] or len(train_args) < 2:
        parser.error("expected -- train RUN [...]")

    from .checkpoints import UPLOAD_WAIT_ENV, fetch_run  # imports the Hub client (with its timeouts)

    checkpoint = fetch_run(args.repo, Path(train_args[1]))
    print(f"jobrunner: fetched the run from {args.repo}" + (f" ({checkpoint.name})" if checkpoint else ""), flush=True)
    from ..events import ECHO_ENV

    # In a job the pushed checkpoints are all that outlives it: wait for uploads longer than on a local
    # machine (the follower still cancels a stop that takes longer than its STOP_WAIT).
    env = {UPLOAD_WAIT_ENV: str(JOB_UPLOAD_WAIT), **os.environ, ECHO_ENV: "1"}
    child = subprocess.Popen(trainer_command(train_args, args.processes), env=env)
    stop_sent = False

    def stop(signum=None, frame=None) -> None:  # noqa: ARG001
        nonlocal stop_sent
        if not stop_sent and child.poll() is None:
            stop_sent = True
            print("jobrunner: stop requested: the trainer saves, pushes and stops", flush=True)
            child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        poll = float(os.environ.get(STOP_POLL_ENV, STOP_POLL))
    except ValueError:
        poll = STOP_POLL
    next_look = time.monotonic() + poll
    while child.poll() is None:
        time.sleep(min(0.5, poll))
        if not stop_sent and time.monotonic() >= next_look:
            if _stop_requested(args.repo, args.attempt):
                stop()
            next_look = time.monotonic() + poll
    print(f"jobrunner: the trainer exited with {child.returncode}", flush=True)
    if child.returncode == 0:
        push_results(args.repo, Path(train_args[1]))
    return child.returncode


def push_results(repo: str, run_dir: Path) -> None:
    """What the trainer wrote after its last checkpoint and this job's disk would lose: the evaluation after
    training (evaluation.json) and its pick (best/). The follower brings them into the local run folder."""
    from .checkpoints import push_evaluation
    from .client import scrub

    try:
        pushed = push_evaluation(run_dir, repo)
    except Exception as e:  # noqa: BLE001 - the LoRA is pushed; the evaluation can be run again from the repo
        print(f"jobrunner: could not push the evaluation: {scrub(str(e), os.environ.get('HF_TOKEN'))}", flush=True)
        return
    if pushed:
        print(f"jobrunner: pushed the evaluation ({', '.join(pushed)})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
