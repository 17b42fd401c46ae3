"""The pre-flight time estimate beside the measured wall time of the same run.

Runs: the README's first command (a toy-world Style LoRA: builtin:toy, --preset Style,
examples/toy-style) and the tiny model's quickstart (builtin:tiny-sd, examples/tiny-set, 64 px,
30 steps) with samples every 10 steps. Each is planned by `lora_trainer.preflight` (what `check` and
the Check button print, with what the estimate is based on) and then trained in a subprocess, timed
from start to exit. On a machine shared with other work the measured time is an upper bound.

    python bench/estimate_time.py
"""

from __future__ import annotations

import os
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

    print(f"{'run':<36} {'estimate':>9} {'measured':>9} {'ratio':>6}")
    for name, flags in RUNS.items():
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            command = [sys.executable, "-m", "lora_trainer", "train", str(run), *flags]
            check = subprocess.run([*command[:3], "check", *command[4:]], capture_output=True, text=True, cwd=ROOT)
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            measured = time.perf_counter() - started
            if done.returncode:
                print(f"{name:<36} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            cfg = config_mod.load(run)
            report = preflight(run, cfg, gpu=False)
            estimate = report.estimate_seconds
            ratio = f"{estimate / measured:.2f}" if estimate else "—"
            print(f"{name:<36} {format_duration(estimate):>9} {format_duration(measured):>9} {ratio:>6}"
                  + ("" if check.returncode == 0 else "  (check failed)") + f"  based on {report.time_basis}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
