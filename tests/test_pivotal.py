"""Pivotal tuning: the trigger's own learned embedding, saved so that other tools load it."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from test_train import events_of, final_sample, pixels, run_training

from lora_trainer import config as config_mod
from lora_trainer.formats import DIFFUSERS_FILENAME, read_safetensors_metadata
from lora_trainer.inference import Generator, LoraSpec
from lora_trainer.pivotal import EMBEDDING_KEYS, initial_vectors

PIVOTAL = {"lora__trigger_vectors": 2, "lora__embedding_lr": 5e-2, "sampling__every": 10}


@pytest.mark.parametrize("base", ["builtin:tiny-sd", "builtin:tiny-sdxl"], ids=["sd", "sdxl"])
def test_the_learned_embedding_is_saved_bundled_and_reproduces_the_trained_image(tmp_path, base):
    run = run_training(tmp_path, model__base=base, **PIVOTAL)
    kind = "sd" if base.endswith("sd") else "sdxl"
    final = run / "final"
    emb_file = final / "my-lora_emb.safetensors"
    state = load_file(emb_file)
    assert sorted(state) == sorted(EMBEDDING_KEYS[kind]) and all(v.shape[0] == 2 for v in state.values())
    assert read_safetensors_metadata(emb_file)["trigger"] == "ohwx"

    # It trained: the vectors moved away from where they started (the same seeded draw as the trainer's).
    from diffusers import DiffusionPipeline

    from lora_trainer.tiny import tiny_model_path

    fresh = DiffusionPipeline.from_pretrained(tiny_model_path(base))
    encoders = [fresh.text_encoder, getattr(fresh, "text_encoder_2", None)]
    for key, encoder in zip(EMBEDDING_KEYS[kind], encoders, strict=False):
        start = initial_vectors(encoder.get_input_embeddings().weight, fresh.tokenizer, "", 2,
                                torch.Generator().manual_seed(config_mod.load(run).optim.seed))
        assert (state[key] - start).abs().max() > 1e-3, key

    # The kohya file carries the same tensors as A1111 reads bundled embeddings.
    kohya = load_file(final / "my-lora.safetensors")
    bundled = {k: v for k, v in kohya.items() if k.startswith("bundle_emb.")}
    if kind == "sd":
        assert list(bundled) == ["bundle_emb.ohwx.string_to_param.*"]
        torch.testing.assert_close(bundled["bundle_emb.ohwx.string_to_param.*"], state["emb_params"])
    else:
        assert sorted(bundled) == ["bundle_emb.ohwx.clip_g", "bundle_emb.ohwx.clip_l"]

    # A fresh pipeline with the LoRA and the embedding (through diffusers' load_textual_inversion) draws exactly
    # what the trainer drew at its last step; without the embedding it draws something else.
    cfg = config_mod.load(run)
    kwargs = dict(seed=cfg.sampling.seed, steps=cfg.sampling.steps, guidance=cfg.sampling.guidance, size=cfg.data.resolution)
    generator = Generator(base)
    with_embedding = pixels(generator.generate(cfg.sample_prompts()[0], [LoraSpec(str(final / DIFFUSERS_FILENAME))], **kwargs))
    assert abs(with_embedding - final_sample(run)).max() <= 1
    assert "ohwx" in generator.pipe.tokenizer.added_tokens_encoder
    base_image = pixels(generator.generate(cfg.sample_prompts()[0], [], **kwargs))  # LoRA off: the embedding goes too
    assert "ohwx" not in generator.pipe.tokenizer.added_tokens_encoder
    emb_file.rename(tmp_path / "elsewhere.safetensors")
    lora_only = pixels(generator.generate(cfg.sample_prompts()[0], [LoraSpec(str(final / DIFFUSERS_FILENAME))], **kwargs))
    assert abs(lora_only - with_embedding).max() > 8 and abs(base_image - with_embedding).max() > 8


def test_the_kohya_file_alone_brings_its_bundled_embedding_to_generation(tmp_path):
    run = run_training(tmp_path, **PIVOTAL)
    cfg = config_mod.load(run)
    kwargs = dict(seed=cfg.sampling.seed, steps=cfg.sampling.steps, guidance=cfg.sampling.guidance, size=cfg.data.resolution)
    alone = tmp_path / "upload"  # as uploaded to the Generate tab: the kohya file without its folder
    alone.mkdir()
    (run / "final" / "my-lora.safetensors").rename(alone / "my-lora.safetensors")
    image = Generator("builtin:tiny-sd").generate(cfg.sample_prompts()[0], [LoraSpec(str(alone / "my-lora.safetensors"))], **kwargs)
    assert abs(pixels(image) - final_sample(run)).max() <= 2  # kohya's alpha-scaled copy of the same weights


def test_a_stopped_pivotal_run_resumes_to_the_same_embedding_and_lora(tmp_path):
    settings = {**PIVOTAL, "optim__steps": 12, "output__save_every": 4, "sampling__every": 0}
    reference = run_training(tmp_path, "reference", **settings)

    def stop_at_step_6(event):  # as Ctrl-C would, in the middle of the run
        if event["type"] == "step" and event["step"] == 6:
            os.kill(os.getpid(), signal.SIGINT)

    images = tmp_path / "images"
    run = tmp_path / "stopped"
    cfg = config_mod.load(reference)
    config_mod.save(cfg, run)
    from lora_trainer.train import train

    assert train(run, cfg, listeners=[stop_at_step_6])["status"] == "stopped"
    assert not (run / "final").exists()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    train(run, config_mod.load(run))
    assert events_of(run, "started")[-1]["resumed"]
    for name in ("my-lora_emb.safetensors", DIFFUSERS_FILENAME):
        expected, got = load_file(reference / "final" / name), load_file(run / "final" / name)
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")
    assert images.is_dir()


def test_pivotal_tuning_needs_a_one_word_trigger():
    cfg = config_mod.TrainConfig()
    cfg.set("lora.trigger_vectors", 1)
    cfg.set("data.trigger", "")
    with pytest.raises(config_mod.ConfigError, match="needs a trigger word"):
        config_mod.validate(cfg)
    cfg.set("data.trigger", "my style")
    with pytest.raises(config_mod.ConfigError, match="single word"):
        config_mod.validate(cfg)


def test_the_model_card_loads_the_embedding_in_diffusers_and_says_where_it_goes_elsewhere(tmp_path):
    from lora_trainer.hub.modelcard import render_model_card

    run = run_training(tmp_path, **PIVOTAL)
    card = render_model_card(run, "someone/my-lora")
    assert 'pipe.load_textual_inversion(embedding["emb_params"], token="ohwx")' in card
    assert "my-lora_emb.safetensors" in card and "embedding:my-lora_emb" in card
