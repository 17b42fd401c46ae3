"""Generating with LoRAs: several at once, strengths, LoRA off, the checkpoint grid, and bad LoRAs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_images, tiny_config

from lora_trainer import config as config_mod
from lora_trainer.errors import LoraStudioError
from lora_trainer.inference import Generator, LoraSpec, resolve_lora_file
from lora_trainer.train import train


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loras")
    runs = []
    for name, seed in (("a", 1), ("b", 2)):
        run = tmp / name
        cfg = tiny_config(make_images(tmp / "images"), optim__steps=20, optim__seed=seed, output__save_every=10)
        config_mod.save(cfg, run)
        train(run, cfg)
        runs.append(run)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return runs


def image(gen: Generator, loras) -> np.ndarray:
    return np.asarray(gen.generate("ohwx, stripes", loras, seed=5, steps=3), dtype=np.int16)


def test_several_loras_combine_and_switching_them_off_restores_the_base(two_runs):
    a, b = (str(r) for r in two_runs)
    gen = Generator("builtin:tiny-sd")
    base = image(gen, [])
    only_a, only_b = image(gen, [LoraSpec(a, 1.0)]), image(gen, [LoraSpec(b, 1.0)])
    both = image(gen, [LoraSpec(a, 1.0), LoraSpec(b, 1.0)])
    half = image(gen, [LoraSpec(a, 0.5)])
    for x, y in [(base, only_a), (only_a, only_b), (both, only_a), (both, only_b), (half, only_a), (half, base)]:
        assert np.abs(x - y).mean() > 0.1
    assert np.array_equal(image(gen, []), base)


def test_the_checkpoint_grid_has_a_row_per_checkpoint_and_a_column_per_prompt(two_runs):
    sheet, rows = Generator("builtin:tiny-sd").checkpoint_grid(two_runs[0], ["ohwx", "ohwx, red"], seed=1, steps=2)
    assert rows == ["step-000010", "step-000020", "final"]
    assert sheet.size == (2 * 64, 3 * 64)


def test_a_lora_for_another_model_family_is_refused_clearly(two_runs):
    with pytest.raises(LoraStudioError, match="does not fit base model 'builtin:tiny-sdxl'"):
        Generator("builtin:tiny-sdxl").generate("x", [LoraSpec(str(two_runs[0]), 1.0)], steps=2)


@pytest.mark.parametrize("text, path, strength", [("a/b.safetensors", "a/b.safetensors", 1.0), ("a/b.safetensors:0.7", "a/b.safetensors", 0.7), ("C:x", "C:x", 1.0)])
def test_lora_specs_parse_an_optional_strength(text, path, strength):
    assert LoraSpec.parse(text) == LoraSpec(path, strength)


def test_a_missing_lora_says_what_to_give(tmp_path):
    with pytest.raises(LoraStudioError, match="no LoRA found"):
        resolve_lora_file(tmp_path / "nothing")


def test_a_long_session_keeps_only_the_most_recent_loras_loaded(two_runs, monkeypatch):
    import lora_trainer.inference as inference

    monkeypatch.setattr(inference, "MAX_LOADED_LORAS", 2)
    gen = Generator("builtin:tiny-sd")
    files = [two_runs[0] / "checkpoints" / c / "pytorch_lora_weights.safetensors" for c in ("step-000010", "step-000020")]
    files += [two_runs[1] / "final" / "pytorch_lora_weights.safetensors"]
    first = image(gen, [LoraSpec(str(files[0]), 1.0)])
    for f in files[1:]:
        image(gen, [LoraSpec(str(f), 1.0)])
    loaded = {n for ns in gen.pipe.get_list_adapters().values() for n in ns}
    assert len(loaded) == 2
    assert np.array_equal(image(gen, [LoraSpec(str(files[0]), 1.0)]), first)  # reloaded on demand, same image
