"""The engine never imports gradio: it runs headless (CLI, Jobs, a subprocess of the app)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = sorted(p for p in (ROOT / "lora_trainer").rglob("*.py") if "ui" not in p.relative_to(ROOT / "lora_trainer").parts)


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_engine_module_imports_gradio_anywhere_in_its_code():
    assert len(ENGINE) > 20
    offenders = [str(p.relative_to(ROOT)) for p in ENGINE if any(m.split(".")[0] in ("gradio", "gradio_client") for m in _imported_modules(p))]
    assert offenders == []


def test_importing_every_engine_module_leaves_gradio_unloaded():
    modules = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in ENGINE]
    modules = [m for m in modules if m != "lora_trainer.__main__"]
    code = f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\nprint('gradio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"
