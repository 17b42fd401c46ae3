"""The fake Hub's Jobs: the state and the endpoints huggingface_hub's job API calls (see fake_hub.py)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Job hardware as /api/jobs/hardware lists it; the prices are made up (tests only).
HARDWARE = [
    {"name": "cpu-basic", "prettyName": "CPU Basic", "cpu": "2 vCPU", "ram": "16 GB", "accelerator": None,
     "unitCostMicroUSD": 100, "unitCostUSD": 0.0001, "unitLabel": "minute"},
    {"name": "l4x1", "prettyName": "1x Nvidia L4", "cpu": "8 vCPU", "ram": "30 GB", "unitCostMicroUSD": 1000,
     "unitCostUSD": 0.001, "unitLabel": "minute",
     "accelerator": {"type": "gpu", "model": "L4", "quantity": "1", "vram": "24 GB", "manufacturer": "Nvidia"}},
    {"name": "l4x4", "prettyName": "4x Nvidia L4", "cpu": "48 vCPU", "ram": "186 GB", "unitCostMicroUSD": 4000,
     "unitCostUSD": 0.004, "unitLabel": "minute",
     "accelerator": {"type": "gpu", "model": "L4", "quantity": "4", "vram": "96 GB", "manufacturer": "Nvidia"}},
]



@dataclass
class Job:
    id: str
    namespace: str
    spec: dict[str, Any]
    stage: str = "RUNNING"
    message: str | None = None
    lines: list[tuple[str, str]] = field(default_factory=list)  # (timestamp, text)
    proc: subprocess.Popen | None = None
    changed: threading.Condition = field(default_factory=threading.Condition)

    def info(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "id": self.id, "createdAt": "2026-01-01T00:00:00.000Z", "dockerImage": spec.get("dockerImage"),
            "spaceId": spec.get("spaceId"), "command": spec["command"], "arguments": spec.get("arguments", []),
            "environment": spec.get("environment", {}), "secrets": {k: None for k in spec.get("secrets", {})},
            "flavor": spec.get("flavor"), "labels": spec.get("labels"),
            "status": {"stage": self.stage, "message": self.message},
            "owner": {"id": "0001", "name": self.namespace, "type": "user"},
        }



class HubHTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


class JobsMixin:
    """FakeHub's jobs: each runs its command as a local subprocess (see fake_hub.py's docstring)."""

    jobs: dict[str, Job]
    job_env: dict[str, str]
    _jobs_dir: str

    def start_job(self, namespace: str, spec: dict[str, Any]) -> Job:
        job = Job(id=hashlib.sha1(f"{time.time_ns()}{len(self.jobs)}".encode()).hexdigest()[:24], namespace=namespace, spec=spec)
        self.jobs[job.id] = job
        folder = os.path.join(self._jobs_dir, job.id)
        os.makedirs(folder)
        argv = list(spec["command"])
        if argv[:2] == ["bash", "-c"]:
            argv = argv[4:]  # skip the bootstrap: the job runs this checkout's code
        if argv[:1] == ["python"]:
            argv = [sys.executable, *argv[1:]]
        env = {
            "PATH": os.environ["PATH"], "HOME": folder, "PYTHONPATH": ROOT, "HF_HOME": os.path.join(folder, "hf"),
            "TOKENIZERS_PARALLELISM": "false", "LORA_STUDIO_CACHE": os.environ.get("LORA_STUDIO_CACHE", ""),
            **self.job_env, **spec.get("environment", {}), **spec.get("secrets", {}),
        }
        job.proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        threading.Thread(target=self._run_job, args=(job,), daemon=True).start()
        if spec.get("timeoutSeconds"):
            threading.Timer(spec["timeoutSeconds"], self.kill_job, (job.id, "Job timed out")).start()
        return job

    def _run_job(self, job: Job) -> None:
        assert job.proc is not None and job.proc.stdout is not None
        for raw in job.proc.stdout:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + ".000Z"
            text = raw.decode("utf-8", "replace").rstrip("\n")
            self._gate(job, text)
            with job.changed:
                job.lines.append((stamp, text))
                job.changed.notify_all()
        code = job.proc.wait()
        with job.changed:
            if job.stage == "RUNNING":
                job.stage = "COMPLETED" if code == 0 else "ERROR"
                job.message = None if code == 0 else f"exit code {code}"
            job.changed.notify_all()

    def hold_at(self, line_contains: str, until_line_contains: str) -> None:
        """Pause the next job's trainer (its job process's children: SIGSTOP) once the job prints a line that
        contains `line_contains`, and let it go on (SIGCONT) when the job prints one with `until_line_contains`.

        The job's own process keeps running (it polls the Hub for a stop request, signals its trainer and says
        so), so a test can send a stop mid-run however slowly the machine goes: an event gate, not slack.
        """
        self._hold = {"at": line_contains, "until": until_line_contains, "paused": None}
        self.released = False  # True once a paused trainer was let go

    def _gate(self, job: Job, text: str) -> None:
        import psutil

        hold = getattr(self, "_hold", None)
        if hold is None or job.proc is None:
            return
        if hold["paused"] is None and hold["at"] in text:
            hold["paused"] = psutil.Process(job.proc.pid).children(recursive=True)
            for proc in hold["paused"]:
                proc.suspend()
        elif hold["paused"] is not None and hold["until"] in text:
            self._hold, self.released = None, True
            for proc in hold["paused"]:
                try:
                    proc.resume()
                except psutil.NoSuchProcess:
                    pass

    def kill_job(self, job_id: str, message: str = "killed", stage: str = "ERROR") -> None:
        """Kill a job's processes outright (no signal it could catch), as a lost machine would."""
        job = self.jobs[job_id]
        with job.changed:
            if job.stage != "RUNNING":
                return
            job.stage, job.message = stage, message
        try:
            if job.proc is not None:
                os.killpg(job.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def kill_on_request(self, path_contains: str, body_contains: str = "", after: int = 0) -> None:
        """Kill every running job outright when the request after the next `after` ones whose path and
        body contain these arrives (it gets no answer): a machine lost at a chosen moment."""
        self._kill_trigger = [after, path_contains, body_contains.encode()]

    def take_kill(self, path: str, body: bytes) -> bool:
        trigger = getattr(self, "_kill_trigger", None)
        if trigger is None or trigger[1] not in path or trigger[2] not in body:
            return False
        if trigger[0] > 0:
            trigger[0] -= 1
            return False
        self._kill_trigger = None
        for job in list(self.jobs.values()):
            self.kill_job(job.id, message="the machine was lost (fake hub)")
        return True

    def job_cpu_seconds(self) -> float:
        """CPU time the jobs' work has used: the trainer processes, or a job's own process before it starts one.

        A progress measure for waits that holds on a loaded machine (a starting trainer prints nothing
        for long) and stops moving when a job hangs (the job's own stop-polling loop is left out).
        """
        import psutil

        total = 0.0
        for job in list(self.jobs.values()):
            if job.proc is None:  # being started
                continue
            try:
                main = psutil.Process(job.proc.pid)
                workers = main.children(recursive=True) or [main]
                total += sum(sum(p.cpu_times()[:2]) for p in workers)
            except psutil.Error:  # ended: its time no longer moves
                continue
        return total

    def job_text(self, job_id: str) -> str:
        return "\n".join(text for _, text in self.jobs[job_id].lines)


class JobEndpointsMixin:
    """The request handler's job endpoints."""

    def jobs_hardware(self, who: dict | None) -> None:
        self._send(200, HARDWARE)

    def _job(self, who: dict | None, ns: str, job_id: str) -> Job:
        job = self.hub.jobs.get(job_id)
        if who is None or job is None or job.namespace != ns or ns != who["name"]:
            raise HubHTTPError(404, "Job not found")
        return job

    def create_job(self, who: dict | None, ns: str) -> None:
        if who is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        token = self.headers["Authorization"].removeprefix("Bearer ")
        if token not in self.hub.job_tokens or not self.hub.can_write(who, ns):
            raise HubHTTPError(403, "This token is not allowed to run jobs here (fake hub)")
        if self.hub.payment_required:
            raise HubHTTPError(402, "Payment required: add a payment method or credits (fake hub)")
        spec = json.loads(self.body)
        if spec.get("flavor") not in {h["name"] for h in HARDWARE}:
            raise HubHTTPError(400, f"Invalid flavor: {spec.get('flavor')}")
        self._send(200, self.hub.start_job(ns, spec).info())

    def inspect_job(self, who: dict | None, ns: str, job_id: str) -> None:
        self._send(200, self._job(who, ns, job_id).info())

    def cancel_job(self, who: dict | None, ns: str, job_id: str) -> None:
        self.hub.kill_job(self._job(who, ns, job_id).id, message="canceled", stage="CANCELED")
        self._send(200, {})

    def job_logs(self, who: dict | None, ns: str, job_id: str) -> None:
        """Server-sent events: every line from the start, then new ones as they come, until the job ends."""
        job = self._job(who, ns, job_id)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        sent = 0
        while not self.hub._released.is_set():
            with job.changed:
                if sent >= len(job.lines) and job.stage == "RUNNING":
                    job.changed.wait(timeout=0.5)
                batch, done = job.lines[sent:], job.stage != "RUNNING"
            try:
                for stamp, text in batch:
                    self.wfile.write(f"data: {json.dumps({'timestamp': stamp, 'data': text})}\n\n".encode())
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return  # the client went away (it reconnects, or stopped following)
            sent += len(batch)
            if done and sent >= len(job.lines):
                return
