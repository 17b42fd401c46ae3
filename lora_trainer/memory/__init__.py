"""VRAM and RAM of a planned run, estimated from the base's configs without loading a weight, and the
automatic memory plan. `estimate(cfg, base)` prints each term; `auto_plan(cfg, base, gpu_bytes)` picks
the fastest settings that fit. Nothing here imports torch at import time."""

from .arch import Architecture, Component, architecture, lora_tensors
from .estimator import Estimate, Term, estimate, gb, load_dtype_for, load_variant_for, optimizer_state_bytes
from .plan import MemoryPlanError, auto_plan, detect_gpu, plan_for_training, plan_run_memory

__all__ = [
    "Architecture", "Component", "Estimate", "MemoryPlanError", "Term", "architecture", "auto_plan", "detect_gpu",
    "estimate", "gb", "load_dtype_for", "load_variant_for", "lora_tensors", "optimizer_state_bytes", "plan_for_training",
    "plan_run_memory",
]
