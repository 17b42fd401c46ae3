"""Publishing the checkpoint the evaluation recommends (RUN/best/) as well as the last step (final/).

The run is the one tests/test_hub.py builds (checkpoints at steps 50 and 100, samples at both, final/ at 100);
the evaluation's result is written by evaluate.save_evaluation itself, so best/ is what a real evaluation leaves.
"""

# ruff: noqa: F811 - the tests take the `fake` fixture imported from test_hub
from __future__ import annotations

from pathlib import Path

import pytest
from fake_hub import WRITE_TOKEN
from huggingface_hub import ModelCard
from test_hub import (
    fake,  # noqa: F401 - the same running fake Hub
    make_run,
)

from lora_trainer import cli
from lora_trainer.evaluate import EvalSettings, Recommendation, Row, save_evaluation
from lora_trainer.hub import HubError, push_run, render_model_card
from lora_trainer.hub.publish import default_checkpoint, publishable_checkpoints

REASON = "step 50 has the most style among the checkpoints that keep the prompt"


def evaluated_run(tmp_path: Path, pick: str | None = "step-000050") -> Path:
    """A trained run whose evaluation picked step 50 (an earlier checkpoint than the last, 100)."""
    run = make_run(tmp_path / "run")
    rows = [Row("base", 0, adherence=0.30, style=0.10, leak=0.10), Row("step-000050", 50, adherence=0.29, style=0.60, leak=0.12),
            Row("final", 100, adherence=0.12, style=0.70, leak=0.55)]
    recommendation = Recommendation(pick, 50, REASON, "clip", True) if pick else None
    save_evaluation(run, rows, recommendation, EvalSettings(), [], 1.0)
    return run


def test_best_is_published_by_default_with_the_checkpoints_own_files(fake, tmp_path):
    run = evaluated_run(tmp_path)
    assert publishable_checkpoints(run) == ["best", "final"] and default_checkpoint(run) == "best"

    push_run(run, "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url)

    files = fake.repos["alice/my-lora"].files
    checkpoint = run / "checkpoints/step-000050"
    assert files["pytorch_lora_weights.safetensors"] == (checkpoint / "pytorch_lora_weights.safetensors").read_bytes()
    assert files["my-lora.safetensors"] == (checkpoint / "my-lora.safetensors").read_bytes()
    assert files["pytorch_lora_weights.safetensors"] != (run / "final/pytorch_lora_weights.safetensors").read_bytes()
    assert b'"checkpoint": "step-000050"' in files["evaluation.json"]


def test_the_card_of_best_says_which_checkpoint_and_why(fake, tmp_path):
    run = evaluated_run(tmp_path)
    card = ModelCard(render_model_card(run, "alice/my-lora", "best"))
    assert "the checkpoint the evaluation recommends: step 50 of 100" in card.text
    assert REASON in card.text
    assert "**This repository publishes: step-000050 (step 50).**" in card.text
    assert "| steps trained | 50 |" in card.text
    assert "## Samples (step 50)" in card.text  # the gallery shows what this checkpoint drew, not step 100
    assert [w["output"]["url"] for w in card.data.widget] == ["samples/step-000050/0.png", "samples/step-000050/1.png"]


def test_final_can_still_be_published_and_its_card_names_the_recommended_step(fake, tmp_path):
    run = evaluated_run(tmp_path)
    push_run(run, "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url)  # best first: evaluation.json goes up

    push_run(run, "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url, checkpoint="final")

    files = fake.repos["alice/my-lora"].files
    assert files["pytorch_lora_weights.safetensors"] == (run / "final/pytorch_lora_weights.safetensors").read_bytes()
    assert "evaluation.json" not in files  # the pick's scores would describe another LoRA than the one published
    card = files["README.md"].decode()
    assert "This is the last step of training (step 100). The evaluation recommends step 50 instead" in card
    assert "**This repository publishes: final.**" in card


def test_without_an_evaluation_final_is_published_and_best_is_refused_with_what_to_do(fake, tmp_path):
    run = make_run(tmp_path / "run")
    assert publishable_checkpoints(run) == ["final"] and default_checkpoint(run) == "final"
    push_run(run, "alice/plain", token=WRITE_TOKEN, endpoint=fake.url)
    assert fake.repos["alice/plain"].files["pytorch_lora_weights.safetensors"] == (
        run / "final/pytorch_lora_weights.safetensors").read_bytes()
    assert "recommends" not in fake.repos["alice/plain"].files["README.md"].decode()
    with pytest.raises(HubError, match="no recommended checkpoint.*evaluate"):
        push_run(run, "alice/other", token=WRITE_TOKEN, endpoint=fake.url, checkpoint="best")
    assert "alice/other" not in fake.repos


@pytest.mark.parametrize(("flag", "published_step"), [([], 50), (["--checkpoint", "final"], 100), (["--checkpoint", "best"], 50)])
def test_push_command_publishes_best_unless_told_otherwise(fake, tmp_path, monkeypatch, capsys, flag, published_step):
    run = evaluated_run(tmp_path)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    assert cli.main(["push", str(run), "--repo", "alice/my-lora", "--endpoint", fake.url, *flag]) == 0
    assert capsys.readouterr().out.strip() == f"{fake.url}/alice/my-lora"
    source = run / ("final" if published_step == 100 else "checkpoints/step-000050")
    assert fake.repos["alice/my-lora"].files["pytorch_lora_weights.safetensors"] == (
        source / "pytorch_lora_weights.safetensors").read_bytes()
