"""`python -m lora_trainer train RUN --on hf-jobs --flavor l4x1 [--timeout 2h]`: cli.py hands over here.

The process follows the job until the run ends, so it behaves like a local trainer for whoever
started it (the app's job runner included): events and train.log grow in the run folder, SIGTERM
or Ctrl-C asks the job to save and stop, the exit status is 0 for finished/stopped and 1 for a
failure. `--attach` follows the run's job again (after a reload, a restart, from another machine
with the run folder), `--stop-job` asks it to stop and follows it until it has.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from ..errors import LoraStudioError
from .jobs import DEFAULT_ATTEMPTS, DEFAULT_IMAGE, request_stop, submit


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """The train command's options for Hugging Face Jobs."""
    group = parser.add_argument_group("training on Hugging Face Jobs (the token: HF_TOKEN or `hf auth login`)")
    group.add_argument("--on", choices=("local", "hf-jobs"), default="local", help="where to train (default: this machine)")
    group.add_argument("--flavor", help="Jobs hardware, e.g. l4x1, a10g-large, a100-large (several GPUs: data-parallel)")
    group.add_argument("--timeout", help="the job's time limit, e.g. 90m or 2h (default: the Hub's)")
    group.add_argument("--attempts", type=int, default=DEFAULT_ATTEMPTS,
                       help="jobs in all for this run: one that dies is continued by a new one from the last checkpoint")
    group.add_argument("--job-repo", help="private Hub repo for the run and its checkpoints (default: you/lora-studio-RUN)")
    group.add_argument("--image", default=DEFAULT_IMAGE, help="the job's container image (a Space's: hf.co/spaces/you/app)")
    group.add_argument("--attach", action="store_true", help="follow this run's job again instead of submitting one")
    group.add_argument("--stop-job", action="store_true", help="ask this run's job to save and stop, and follow it until it has")


def train_command(run_dir: Path, args: argparse.Namespace) -> int:
    """Submit (or attach to) the run's job and follow it; print the problem and return 1 when it fails."""
    from .jobmonitor import follow

    stop = threading.Event()

    def on_signal(signum, frame) -> None:  # noqa: ARG001 - the follower asks the job to stop (never from here)
        if not stop.is_set():
            print("stopping: the job saves a checkpoint and stops (this can take a minute)", file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    say = lambda message: print(message, file=sys.stderr)  # noqa: E731
    try:
        if args.stop_job:
            request_stop(run_dir)
        elif not args.attach:
            if not args.flavor:
                raise LoraStudioError("say which hardware to train on: --flavor l4x1 (or a10g-large, a100-large, ...)")
            state = submit(run_dir, args.flavor, timeout=args.timeout, max_attempts=args.attempts, repo=args.job_repo,
                           image=args.image)
            say(f"submitted job {state.current.id} on {state.flavor}: {state.current.url}")
        state = follow(run_dir, stop=stop, say=say)
    except LoraStudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{state.status} on Hugging Face Jobs: {run_dir}")
    return 0
