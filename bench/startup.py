"""Seconds from `python app.py` to the first HTTP 200 of the page.

    python bench/startup.py [--runs 3]

Each run starts app.py in a fresh process (free port, empty temporary workspace), polls the page
every 50 ms and stops the server once it answers. Prints every run and the median.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_first_200(timeout: float = 120.0) -> float:
    port = free_port()
    with tempfile.TemporaryDirectory() as workspace:
        env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
               "LORA_STUDIO_WORKSPACE": workspace, "GRADIO_ANALYTICS_ENABLED": "False"}
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while time.perf_counter() - started < timeout:
                if proc.poll() is not None:
                    raise RuntimeError(f"app.py exited with status {proc.returncode} before serving the page")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                        if response.status == 200:
                            return time.perf_counter() - started
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                time.sleep(0.05)
            raise RuntimeError(f"no HTTP 200 within {timeout:.0f} s")
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    times = []
    for run in range(1, args.runs + 1):
        seconds = time_to_first_200()
        times.append(seconds)
        print(f"run {run}: {seconds:.2f} s to the first HTTP 200")
    print(f"median: {statistics.median(times):.2f} s over {len(times)} runs")


if __name__ == "__main__":
    main()
