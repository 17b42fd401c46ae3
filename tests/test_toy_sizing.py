"""Guidance-sized training judged in the toy world: a module of its own, so that its two training runs go
to one worker while test_toyworld.py's go to the other."""

from __future__ import annotations

import pytest
from toy_runs import STYLE, train_style_lora

from lora_trainer import toyworld
from lora_trainer.toyworld import world

pytestmark = pytest.mark.skipif(not (toyworld.BASE_DIR / "model_index.json").exists(), reason="the toy base is not built")


# Measured (README, "Guidance-sized training"): at lr 3e-3 the first Style preset's run (300 steps, uniform timesteps, no
# pivotal tuning) draws the style on every triggered prompt and keeps 0.08-0.17 of them (seeds 0-2, 24 prompts); trained
# 3 times over it keeps 0.54-0.71. Those settings, pinned: the Style preset itself is now sized (test_toyworld.py).
SIZING = {"optim.learning_rate": 3e-3, "optim.steps": 300, "optim.timestep_sampling": "uniform", "lora.trigger_vectors": 0,
          "optim.preservation_weight": 1.0, "lora.targets": "attention", "optim.ema_decay": 0.0}


@pytest.fixture(scope="module")
def sizing_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy-sizing")
    sized = train_style_lora(root / "sized", **SIZING, **{"optim.train_guidance": 3.0})
    unsized = train_style_lora(root / "unsized", **SIZING, **{"optim.train_guidance": 0.0})
    return tuple(run / "final" / "pytorch_lora_weights.safetensors" for run in (sized, unsized))


def _triggered_change(lora_file) -> float:
    """Mean |LoRA model - base model| of the noise predicted for triggered evaluation prompts, on fixed noisy latents."""
    import torch

    from lora_trainer.inference import Generator, LoraSpec

    gen = Generator(toyworld.BASE_SPEC)
    prompts = [toyworld.with_trigger(p) for p in toyworld.eval_prompts(8)]
    rng = torch.Generator().manual_seed(0)
    latents = torch.randn((len(prompts), 4, world.SIZE // 2, world.SIZE // 2), generator=rng)
    timesteps = torch.randint(0, 1000, (len(prompts),), generator=rng)

    def predict(loras):
        with gen.using(loras) as pipe, torch.no_grad():
            embeds = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
            return pipe.unet(latents, timesteps, embeds).sample

    return (predict([LoraSpec(str(lora_file), 1.0)]) - predict([])).abs().mean().item()


def test_guidance_sized_training_learns_a_smaller_change_to_the_triggered_prediction(sizing_pair):
    sized, unsized = sizing_pair
    assert 0 < _triggered_change(sized) < _triggered_change(unsized) / 1.5  # trained 3 times over


def test_guidance_sized_training_keeps_what_triggered_prompts_ask(sizing_pair):
    from lora_trainer.toyworld.scoring import lora_quality

    sized, unsized = (lora_quality(f, STYLE, strengths=(1.0,), prompts=toyworld.eval_prompts(12), seeds=(0,))[0]
                      for f in sizing_pair)
    assert unsized.style >= 0.75 and unsized.adherence <= 0.35  # guidance 7 overcooks the unsized change
    assert sized.adherence >= unsized.adherence + 0.25
    assert sized.leak <= 0.1
