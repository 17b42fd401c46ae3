"""The evaluation on LoRAs trained in the toy world, judged: the recommendation on a run without preservation is
a judged checkpoint with the style that says what no checkpoint kept (that a LoRA trained on captions without its
trigger leaks where the Style preset's does not is `test_toyworld.py`'s, on the preset's run trained there).
Each run as a user would train it (`train`, the evaluation after training on, with the toy judge).

Measured on the toy base before its tune stage (12 prompts, trigger first): style / adherence / leak 0.50 / 0.08 /
0.25 at step 50, then 1.00 / 0.08 / 0.83 at 100 and 1.00 / 0.08 / 0.75 at 150; the pick was step 50. On the
current base, which reads past the trigger, a run without preservation takes longer to show the style (0.00 /
0.58 / 0.25 at 50, 0.67 / 0.42 / 0.75 at 100, 0.75 / 0.42 / 0.67 at 150; at lr 1e-2 or 250 steps the style and the
leak keep rising together), so its last step is no longer worse than the others by the rule, and the pick is the
best trade-off. Passing over an overcooked last step is `test_evaluate.py`'s, on rows made to show it.
"""

from __future__ import annotations

import json

import pytest
import torch
from toy_runs import train_style_lora

# No preservation and a high learning rate: the style and the leak rise together (module docstring).
OVERCOOKED = {"optim.learning_rate": 3e-3, "optim.steps": 150, "optim.batch_size": 4, "lora.rank": 8, "lora.alpha": 8,
              "output.save_every": 50, "sampling.every": 0, "eval.after_training": "on", "eval.prompt_count": 12,
              "eval.seeds": 1}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(run, settings: dict):
    train_style_lora(run, preset=None, **settings)
    return json.loads((run / "evaluation.json").read_text())


@pytest.fixture(scope="module")
def overcooked(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("toy-eval") / "overcooked", OVERCOOKED)


def _rows(evaluation: dict) -> dict[str, dict]:
    return {row["name"]: row for row in evaluation["rows"]}


def test_the_recommendation_on_a_run_without_preservation_is_judged_and_says_what_it_lacks(overcooked):
    rows, pick = _rows(overcooked), overcooked["recommendation"]
    assert pick["source"] == "judge"
    chosen = rows[pick["name"]]
    # What the judge saw: the pick has the style; every checkpoint lost the prompt, and the reason says so.
    assert chosen["judged_style_rate"] >= rows["base"]["judged_style_rate"] + 0.3
    assert not pick["eligible"] and "loses more than" in pick["reason"], pick["reason"]
    assert all(r["judged_adherence_rate"] < rows["base"]["judged_adherence_rate"] for n, r in rows.items() if n != "base")
    # How sure the rates are: 12 pictures per checkpoint, each rate near 0.85 within about 0.10.
    assert any(n.startswith("judged on 12 pictures per checkpoint (12 prompts x 1 seed)") and "about 0.10" in n
               for n in overcooked["notes"]), overcooked["notes"]


def test_best_holds_the_recommended_checkpoints_weights(overcooked, tmp_path_factory):
    pick = overcooked["recommendation"]
    run = next(tmp_path_factory.getbasetemp().glob("toy-eval*/overcooked"))
    from safetensors.torch import load_file

    best = load_file(run / "best" / "pytorch_lora_weights.safetensors")
    checkpoint = load_file(run / "checkpoints" / pick["name"] / "pytorch_lora_weights.safetensors") \
        if (run / "checkpoints" / pick["name"]).is_dir() else load_file(run / "final" / "pytorch_lora_weights.safetensors")
    assert best.keys() == checkpoint.keys() and all(torch.equal(best[k], checkpoint[k]) for k in best)
