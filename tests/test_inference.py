"""Generating with LoRAs: several at once, strengths, LoRA off, the checkpoint grid, and bad LoRAs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_images, tiny_config

from lora_trainer import config as config_mod
from lora_trainer.errors import LoraStudioError
from lora_trainer.inference import (
    Generator,
    InferenceNeed,
    LoraSpec,
    choose_memory_options,
    inference_need,
    resolve_lora_file,
)
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


def test_a_batch_of_prompts_and_seeds_draws_what_one_call_each_draws(two_runs, monkeypatch):
    """generate_many (what the evaluation draws with) gives each (prompt, seed) the image generate() gives it,
    in order, whether the batch holds all of them or is cut into calls."""
    gen = Generator("builtin:tiny-sd")
    loras = [LoraSpec(str(two_runs[0]), 1.0)]
    prompts, seeds = ["ohwx, stripes", "ohwx, a dot", "stripes"], [5, 6, 5]
    alone = [np.asarray(gen.generate(p, loras, seed=s, steps=3), dtype=np.int16) for p, s in zip(prompts, seeds, strict=True)]
    assert gen.batch_size(gen.default_size) > len(prompts)
    for per_call in (len(prompts), 2):
        monkeypatch.setattr(Generator, "batch_size", lambda self, size, n=per_call: n)
        batch = [np.asarray(im, dtype=np.int16) for im in gen.generate_many(prompts, seeds, loras, steps=3)]
        assert len(batch) == 3 and all(np.abs(a - b).max() <= 1 for a, b in zip(alone, batch, strict=True)), per_call
    assert np.abs(alone[0] - alone[1]).max() > 8 and np.abs(alone[0] - alone[2]).max() > 8  # prompts and seeds differ


# -- fusing and the memory options ---------------------------------------------------------------------
def test_one_lora_is_fused_and_gives_the_unfused_image(two_runs):
    import lora_trainer.inference as inference

    gen = Generator("builtin:tiny-sd")
    gen.fuse = True  # what a GPU does (on a CPU a lone LoRA stays unfused)
    fused = image(gen, [LoraSpec(str(two_runs[0]), 0.8)])
    assert inference._FUSED[gen.key][1] == 0.8
    both = [LoraSpec(str(two_runs[0]), 0.8), LoraSpec(str(two_runs[1]), 0.0)]  # two LoRAs: never fused
    unfused = image(gen, both)
    assert gen.key not in inference._FUSED
    assert np.abs(fused - unfused).max() <= 1  # the same image, up to rounding of merged weights
    gen.fuse = False


def test_unfusing_before_another_lora_restores_the_base_weights(two_runs):
    import torch

    gen = Generator("builtin:tiny-sd")

    def base_weights():  # named alike before and after peft wraps a layer
        return {k.replace(".base_layer", ""): v.clone() for k, v in gen.pipe.unet.state_dict().items() if "lora" not in k}

    image(gen, [LoraSpec(str(two_runs[0]), 1.0)])
    image(gen, [])
    before = base_weights()
    image(gen, [LoraSpec(str(two_runs[0]), 1.0)])
    image(gen, [LoraSpec(str(two_runs[1]), 0.5)])
    image(gen, [])
    after = base_weights()
    assert all(torch.equal(before[k], after[k]) for k in before)  # exactly: restored, not subtracted


GiB = 2**30
NEED = InferenceNeed(unet=5 * GiB, text_encoders=int(1.5 * GiB), vae=GiB // 6, denoise=GiB // 2, decode=3 * GiB, decode_tiled=GiB // 2)


@pytest.mark.parametrize("free_gib, tiling, offload", [
    (40, False, False),  # everything fits
    (9, True, False),  # the full-size decode does not
    (6.5, True, True),  # the models together do not
    (None, False, False),  # no GPU
])
def test_memory_options_follow_the_free_memory(free_gib, tiling, offload):
    options = choose_memory_options(NEED if free_gib else None, int(free_gib * GiB) if free_gib else None)
    assert (options.vae_tiling, options.cpu_offload, options.attention_slicing) == (tiling, offload, False)
    assert options.reasons


def test_attention_slicing_only_where_fused_attention_is_missing():
    assert choose_memory_options(NEED, 6 * GiB, fused_attention=False).attention_slicing
    assert not choose_memory_options(NEED, 6 * GiB).attention_slicing


def test_the_need_of_sdxl_comes_from_its_configs_and_tiling_flattens_large_decodes():
    need = inference_need("stabilityai/stable-diffusion-xl-base-1.0", 2048)
    assert need.unet == 2 * 2_567_463_684
    assert need.decode_tiled < need.decode / 2


def test_on_the_cpu_no_memory_option_is_set(two_runs):
    gen = Generator("builtin:tiny-sd")
    assert gen.device == "cpu" and not gen.pipe.vae.use_tiling
