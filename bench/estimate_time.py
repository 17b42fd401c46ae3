"""The pre-flight time estimate beside the measured wall time of the same run.

Runs: the README's first command (a toy-world Style LoRA: builtin:toy, --preset Style,
examples/toy-style) and the tiny model's quickstart (builtin:tiny-sd, examples/tiny-set, 64 px,
30 steps) with samples every 10 steps. Each is checked first (`check`, which times a few real steps
and renders here: its estimate is the one printed, "calibrated"), then trained in a subprocess, timed
from start to exit; "table" is the same estimate from the fixed table (`check --no-calibrate`). On a
machine shared with other work both the calibration and the run see its load.

    python bench/estimate_time.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RUNS = {
    "README first command (toy Style)": ["--base", "builtin:toy", "--preset", "Style", "--images",
                                         str(ROOT / "examples" / "toy-style")],
    "tiny quickstart, samples every 10": ["--base", "builtin:tiny-sd", "--images", str(ROOT / "examples" / "tiny-set"),
                                          "--resolution", "64", "--steps", "30", "--set", "sampling.every=10"],
}


def main() -> int:
    from lora_trainer import config as config_mod
    from lora_trainer.preflight import format_duration, preflight

    print(f"{'run':<36} {'calibrated':>10} {'table':>7} {'measured':>9} {'ratio':>6}")
    for name, flags in RUNS.items():
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            command = [sys.executable, "-m", "lora_trainer", "train", str(run), *flags]
            check = subprocess.run([*command[:3], "check", *command[4:]], capture_output=True, text=True, cwd=ROOT)
            said = re.search(r"estimated time: about (\S+) \(from (.*?);", check.stdout)
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            measured = time.perf_counter() - started
            if done.returncode or not said:
                print(f"{name:<36} failed: {(done.stderr or check.stderr).strip().splitlines()[-1:]}")
                continue
            table = preflight(run, config_mod.load(run), gpu=False).estimate_seconds
            estimate = _seconds(said.group(1))
            print(f"{name:<36} {said.group(1):>10} {format_duration(table):>7} {format_duration(measured):>9} "
                  f"{estimate / measured:>6.2f}  calibrated from {said.group(2)}")
    return 0


def _seconds(text: str) -> float:
    """h:mm:ss or m:ss as seconds."""
    total = 0
    for part in text.split(":"):
        total = 60 * total + int(part)
    return float(total)


if __name__ == "__main__":
    sys.exit(main())
