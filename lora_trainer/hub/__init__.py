"""The Hugging Face Hub: publish a run, fetch LoRAs, checkpoints off the box, training on Jobs.

- client.py       the token, timeouts, bounded retries, error messages (HubError)
- publish.py      publish a finished run (push_run, the `push` command), download a LoRA
- checkpoints.py  push checkpoints while training (Uploader), fetch the newest one to resume
- modelcard.py    the model card (README.md) and loss curve of a published LoRA
- jobs.py         train on Hugging Face Jobs: flavours, submit, stop, the run's hf_job.json (docs/jobs.md)
- jobmonitor.py   follow a job: its log stream into events.jsonl, continuation of a dead job, files back
- jobrunner.py    what runs inside the job: fetch the run, train it, stop on request
- jobcli.py       `train RUN --on hf-jobs --flavor F`

The names below are the package's public API; import the modules for the rest.
"""

from __future__ import annotations

from .checkpoints import Uploader, fetch_checkpoint, push_checkpoint, push_checkpoint_safely
from .client import HubError, PushResult, check_token
from .modelcard import loss_curve_png, render_model_card
from .publish import download_lora, push_run

__all__ = [
    "HubError", "PushResult", "Uploader", "check_token", "download_lora", "fetch_checkpoint",
    "loss_curve_png", "push_checkpoint", "push_checkpoint_safely", "push_run", "render_model_card",
]
