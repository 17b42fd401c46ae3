"""Write the memory simulations shipped with the package (lora_trainer/memory/simulations.json).

A memory plan for SD 1.5 or SDXL simulates a training step of the full architecture on the meta device:
seconds to a minute on a CPU for each setting the plan tries, before a run can start or `check` can
answer. The results depend only on their arguments and the library versions, so the package ships the
ones the presets' plans need on common cards (the plan at train start and `check` then simulate nothing)
and the ones tests/test_memory.py asks for on those architectures (the suite on a fresh machine needs none
either; the tiny models' results depend on where they were built, so they stay in each machine's cache).

    python bench/memory_table.py      # about 3 minutes on 2 CPU cores; prints what it wrote

Run it again after changing the simulation (simulate._SIM_VERSION) or the pinned torch / diffusers / peft:
the table is keyed by their versions and ignored when they differ (tests/test_memory.py says so).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CARDS_GIB = (6, 8, 12, 16, 24, 48, 80)
BASES = {"sd": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}


def plan_presets() -> int:
    """Every preset's plan for both bases on each card; returns how many plans ended in a refusal."""
    from lora_trainer import memory
    from lora_trainer.config import TrainConfig
    from lora_trainer.memory.arch import from_published
    from lora_trainer.presets import PRESETS, preset_settings

    refused = 0
    for kind, base in BASES.items():
        arch = from_published(kind)
        for name in PRESETS:
            for gib in CARDS_GIB:
                cfg = TrainConfig()
                cfg.set("model.base", base)
                for key, value in preset_settings(name, base).items():
                    cfg.set(key, value)
                try:
                    memory.auto_plan(cfg, arch, gpu_bytes=gib * 2**30)
                except memory.MemoryPlanError:
                    refused += 1
                print(f"  {kind:5} {name:18} {gib:3} GB", flush=True)
    return refused


def main() -> None:
    from lora_trainer.memory import simulate

    with tempfile.TemporaryDirectory() as cache:
        os.environ.update({"LORA_STUDIO_CACHE": cache, simulate.FRESH_ENV: "1"})  # for the tests' process too
        started = time.perf_counter()
        refused = plan_presets()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-o",
                        "addopts=", "-k", "not shipped_simulations and not bench_gpu_tiny", str(ROOT / "tests" / "test_memory.py")], cwd=ROOT, check=True)
        results = json.loads((Path(cache) / "memory-simulations.json").read_text())
    table = {"versions": simulate._versions(), "results": dict(sorted(results.items()))}
    simulate.TABLE.write_text(json.dumps(table, indent=0) + "\n")
    print(f"{len(results)} simulations ({refused} preset plans refused) in {time.perf_counter() - started:.0f} s "
          f"-> {simulate.TABLE.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
