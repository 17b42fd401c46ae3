"""The toy world: its pictures, its judge, its base model, and LoRAs judged in it.

The quality tests train real LoRAs on `builtin:toy` and let the world's judge say what the
pictures show; margins are set from the figures of several seeds (README, "Quality").
"""

from __future__ import annotations

import numpy as np
import pytest
from toy_runs import STYLE, train_style_lora

from lora_trainer import toyworld
from lora_trainer.toyworld import world

pytestmark = pytest.mark.skipif(not (toyworld.BASE_DIR / "model_index.json").exists(), reason="the toy base is not built")


# -- the world -------------------------------------------------------------------------------------
def test_the_same_seed_draws_the_same_picture_and_another_seed_moves_it():
    scene = world.SCENES[5]
    a, b, c = (np.asarray(world.render(scene, None, seed)) for seed in (3, 3, 4))
    assert a.shape == (world.SIZE, world.SIZE, 3)
    assert (a == b).all() and (a != c).any()


@pytest.mark.parametrize("style", world.STYLES)
def test_every_style_changes_the_picture_of_a_scene(style):
    scene = world.SCENES[0]
    assert np.abs(np.asarray(world.render(scene, style, 1), int) - np.asarray(world.render(scene, None, 1), int)).mean() > 5


def test_a_caption_parses_back_to_its_scene_whatever_surrounds_it():
    for scene in world.SCENES:
        assert world.parse(scene.caption) == scene
        assert world.parse(toyworld.with_trigger(scene.caption, position="first")) == scene
        assert world.parse(toyworld.with_trigger(scene.caption, position="last") + ", striped") == scene
    assert world.parse("a portrait of a woman") is None


def test_evaluation_prompts_never_appear_in_a_style_dataset(tmp_path):
    folder = toyworld.make_style_dataset(tmp_path / "set", "frame", n=48, seed=1)
    captions = {p.read_text().strip().removeprefix("ohwx, ") for p in folder.glob("*.txt")}
    assert len(list(folder.glob("*.png"))) == 48
    assert captions and not captions & set(toyworld.eval_prompts())
    assert all(p.read_text().startswith("ohwx, ") for p in folder.glob("*.txt"))


# -- the judge -------------------------------------------------------------------------------------
def test_the_judge_names_scene_and_style_of_fresh_pictures():
    grammar = world.all_judge_captions()
    pictures = [world.render(scene, style, 10_000 + k) for k, (scene, style, _) in enumerate(grammar)]
    verdicts = toyworld.judge(pictures)
    scene_right = np.mean([v.scene == s for v, (s, _, _) in zip(verdicts, grammar, strict=True)])
    style_right = np.mean([v.style == st for v, (_, st, _) in zip(verdicts, grammar, strict=True)])
    assert scene_right >= 0.97 and style_right >= 0.97


def test_the_judge_reads_the_scene_of_a_striped_picture_wherever_its_bands_fall():
    """A generated picture's bands need not fall where the training pictures' do (phase 0); the scene is the same.
    The first judge, trained on phase 0 only, named 0.62 to 0.97 of these scenes right at phases 1 to 5 (0.99 at 0)."""
    for phase in range(world.STRIPE_PERIOD):
        pictures = [world.render(scene, "stripes", 20_000 + k, phase=phase) for k, scene in enumerate(world.SCENES)]
        verdicts = toyworld.judge(pictures)
        assert np.mean([v.scene == s for v, s in zip(verdicts, world.SCENES, strict=True)]) >= 0.9, phase
        assert np.mean([v.style == "stripes" for v in verdicts]) >= 0.95, phase


def test_the_judge_is_a_clip_model_that_transformers_loads():
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(toyworld.judge_path())
    processor = CLIPProcessor.from_pretrained(toyworld.judge_path())
    scene = world.SCENES[7]
    inputs = processor(text=[scene.caption, world.SCENES[30].caption], images=[world.render(scene, None, 2)], return_tensors="pt", padding=True)
    logits = model(**inputs).logits_per_image[0]
    assert logits[0] > logits[1]  # the right caption scores higher


# -- LoRAs judged in the world ----------------------------------------------------------------------
# The Style preset's methods, evaluated after training as on by default for the toy base, judged at steps 150 and 300
# on 12 prompts. The preset trains 1500 steps at k = 4.5 and lr 4e-3, and its style shows from step 500 to 1100
# depending on the seed: too late for a test. At its previous k = 4 and lr 3e-3 (session 12's preset, all else the
# same) the style showed on 0.83 and 1.00 of the 12 prompts at steps 150 and 300, and on 0.58 to 0.92 of 24 at step 300
# in five seeds (README).
EVALUATED = {"eval.after_training": "on", "eval.prompt_count": 12, "eval.seeds": 1, "optim.steps": 300, "output.save_every": 150,
             "optim.train_guidance": 4.0, "optim.learning_rate": 3e-3}


@pytest.fixture(scope="module")
def style_run(tmp_path_factory):
    return train_style_lora(tmp_path_factory.mktemp("toy") / "style", **EVALUATED)


@pytest.fixture(scope="module")
def scores(style_run):
    """Judged style, adherence and leak of the base and of the LoRA at strengths 0.5 and 1."""
    from lora_trainer.toyworld.scoring import lora_quality

    prompts, seeds = toyworld.eval_prompts(12), (0,)
    base = lora_quality(None, STYLE, strengths=(0.0,), prompts=prompts, seeds=seeds)[0]
    lora_file = style_run / "final" / "pytorch_lora_weights.safetensors"
    lora = {s.strength: s for s in lora_quality(lora_file, STYLE, prompts=prompts, seeds=seeds)}
    return base, lora


def test_the_style_lora_shows_the_style_with_its_trigger_far_more_often_than_the_base(scores):
    base, lora = scores
    assert base.style <= 0.05
    assert lora[1.0].style >= base.style + 0.6
    assert lora[0.5].style <= lora[1.0].style


def test_without_the_trigger_the_style_stays_rare(scores):
    _, lora = scores
    assert lora[1.0].leak <= 0.3
    assert lora[1.0].leak < lora[1.0].style - 0.4


def test_without_the_trigger_the_lora_still_draws_what_the_prompt_asks(scores):
    base, lora = scores
    assert base.adherence_untriggered >= 0.85
    # One training seed on 12 prompts: the Style preset keeps 0.92 here (session 11's kept 0.42), 0.96 to 1.00 of 24
    # prompts at other seeds (README); without preservation, trained until its style shows, a quarter (0.25).
    assert lora[1.0].adherence_untriggered >= 0.35


def test_strength_zero_gives_the_base_models_picture(style_run):
    from lora_trainer.inference import Generator, LoraSpec

    gen = Generator(toyworld.BASE_SPEC)
    prompt = toyworld.with_trigger(toyworld.eval_prompts(1)[0])
    lora = LoraSpec(str(style_run / "final" / "pytorch_lora_weights.safetensors"), 0.0)
    base, off, on = (np.asarray(gen.generate(prompt, loras, seed=3, steps=10), int)
                     for loras in ([], [lora], [LoraSpec(lora.path, 1.0)]))
    assert np.abs(base - off).max() <= 1
    assert np.abs(base - on).mean() > 5


# The Style preset's run against the same pictures captioned without the trigger, trained without preservation (with
# nothing to take the trigger out of, it has nothing to preserve). Measured: style 0.33 / 1.00 and leak 0.00 / 0.00
# at steps 150 / 300, against leak 0.67 / 0.83 without the trigger in the captions.
@pytest.fixture(scope="module")
def untriggered_run(tmp_path_factory):
    return train_style_lora(tmp_path_factory.mktemp("toy") / "untriggered", trigger_in_captions=False,
                            **EVALUATED, **{"optim.preservation_weight": 0.0, "lora.trigger_vectors": 0})


def test_a_lora_trained_without_its_trigger_in_the_captions_leaks_more(style_run, untriggered_run):
    """What the evaluation after training measures (evaluation.json, the judge's rates) tells the two apart."""
    import json

    def checkpoints(run) -> list[dict]:
        rows = json.loads((run / "evaluation.json").read_text())["rows"]
        return [r for r in rows if r["name"] != "base"]

    def mean_leak(run) -> float:
        return sum(r["judged_leak_rate"] for r in checkpoints(run)) / len(checkpoints(run))

    last = max(checkpoints(style_run), key=lambda r: r["step"])
    assert last["judged_style_rate"] >= 0.5  # it learned the style ...
    assert mean_leak(untriggered_run) >= mean_leak(style_run) + 0.3  # ... and keeps it to the trigger
