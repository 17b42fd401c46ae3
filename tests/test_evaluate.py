"""Evaluating a run's checkpoints: deterministic validation loss, skipping without weights, the
recommendation rule, best/ and evaluation.json, the labelled grid and the model-card table.

Scores here come from builtin:tiny-clip (random weights): they prove the plumbing, not quality;
the toy world's judged tests prove the rule picks well.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_images, tiny_config

from lora_trainer import config as config_mod
from lora_trainer.cli import main as cli_main
from lora_trainer.eval_metrics import TINY_CLIP
from lora_trainer.eval_report import evaluation_markdown, label_checkpoint_grid
from lora_trainer.evaluate import (
    EvalSettings,
    Row,
    adapters,
    evaluate,
    evaluate_run,
    recommend,
    settings_from,
)
from lora_trainer.formats import DIFFUSERS_FILENAME
from lora_trainer.train import train

FAST = {"steps": 2, "prompt_count": 2, "seeds": 2, "validation_images": 2, "validation_timesteps": 3}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("evaluate")
    run = tmp / "run"
    cfg = tiny_config(make_images(tmp / "images", 4), optim__steps=20, output__save_every=10, output__name="stripes",
                      optim__learning_rate=5e-3)
    config_mod.save(cfg, run)
    train(run, cfg)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    return run


def fast(**extra) -> EvalSettings:
    return settings_from({**FAST, **extra})


# -- validation loss --------------------------------------------------------------------------------------
def test_validation_loss_is_identical_twice_and_moves_with_the_lora(run):
    from lora_trainer.eval_scores import Scorer

    cfg = config_mod.load(run)
    lora = run / "final" / DIFFUSERS_FILENAME
    first = Scorer(run, cfg, fast(clip_model="./no-such-model"), [])
    second = Scorer(run, cfg, fast(clip_model="./no-such-model"), [])  # the fixed set built again
    with_lora = [first.validation_loss(lora), second.validation_loss(lora), first.validation_loss(lora)]
    assert with_lora[0] == with_lora[1] == with_lora[2]
    assert first.validation_loss(None) != with_lora[0]  # it measures the LoRA, not a constant


def test_validation_set_is_spread_over_the_schedule():
    from lora_trainer.validation import fixed_timesteps

    steps = fixed_timesteps(4, 1000, 0)
    assert steps == sorted(steps) and steps[0] < 250 <= steps[1] < 500 <= steps[2] < 750 <= steps[3] < 1000
    assert fixed_timesteps(4, 1000, 1) != steps  # each image at other timesteps


# -- without weights: skipped, with one line -----------------------------------------------------------------
def test_evaluation_without_metric_weights_is_skipped_with_a_message(run, capsys):
    assert cli_main(["evaluate", str(run), "--checkpoints", "final", "--set", "steps=2"]) == 0  # HF_HUB_OFFLINE=1
    out = capsys.readouterr().out
    data = json.loads((run / "evaluation.json").read_text())
    assert any(n.startswith("scores skipped") and "openai/clip-vit-base-patch32" in n for n in data["notes"])
    assert data["recommendation"] is None and not (run / "best").exists()
    assert all(r["style"] is None and r["adherence"] is None and r["val_loss"] is not None for r in data["rows"])
    assert "No recommendation" in out and "scores skipped" in out


def test_an_unreachable_hub_fails_fast_and_is_reported(run, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    notes: list[str] = []
    rows = evaluate_run(run, fast(clip_model="nobody/no-clip"), "final", notes=notes)
    assert [r.name for r in rows] == ["base", "step-000020"]
    assert len(notes) == 1 and "cannot be reached" in notes[0] and "nobody/no-clip" in notes[0]


# -- which checkpoints ------------------------------------------------------------------------------------------
def test_checkpoint_selection(run):
    assert [a[0] for a in adapters(run)] == ["base", "step-000010", "step-000020"]  # final/ is step 20: not twice
    assert [a[0] for a in adapters(run, "final")] == ["base", "step-000020"]
    assert [a[0] for a in adapters(run, ["10"])] == ["base", "step-000010"]
    with pytest.raises(Exception, match="no checkpoint at step"):
        adapters(run, ["15"])


# -- the rule -----------------------------------------------------------------------------------------------------
def rows_of(*table: tuple) -> list[Row]:
    """(name, step, style, adherence, leak) per row; the first is the base."""
    return [Row(name, step, style=s, adherence=a, leak=lk) for name, step, s, a, lk in table]


BASE = ("base", 0, 0.50, 0.30, 0.50)
RULE_CASES = {
    "the overcooked last step loses adherence: the earlier one": (
        [BASE, ("step-000100", 100, 0.60, 0.29, 0.52), ("step-000200", 200, 0.70, 0.28, 0.53),
         ("step-000300", 300, 0.80, 0.15, 0.55)], "step-000200", True),
    "a leaking step is passed over": (
        [BASE, ("step-000100", 100, 0.60, 0.30, 0.51), ("step-000200", 200, 0.75, 0.30, 0.72)], "step-000100", True),
    "the most style when all are fine": (
        [BASE, ("step-000100", 100, 0.55, 0.30, 0.50), ("final", 200, 0.65, 0.30, 0.52)], "final", True),
    "a tie goes to the earlier step": (
        [BASE, ("step-000100", 100, 0.60, 0.30, 0.50), ("step-000200", 200, 0.60, 0.30, 0.50)], "step-000100", True),
    "equal style: the one that leaks less, though later": (
        [BASE, ("step-000100", 100, 0.80, 0.30, 0.60), ("step-000200", 200, 0.80, 0.30, 0.50)], "step-000200", True),
    "none eligible: the best trade-off": (
        [BASE, ("step-000100", 100, 0.55, 0.10, 0.50), ("step-000200", 200, 0.90, 0.12, 0.55)], "step-000200", False),
    "none eligible, equal trade-offs: the one that leaks less, though later": (
        [BASE, ("step-000100", 100, 0.90, 0.10, 0.55), ("step-000200", 200, 0.90, 0.10, 0.50)], "step-000200", False),
    "a step that has barely taken the style is no pick: the best trade-off of those that have": (
        [BASE, ("step-000100", 100, 0.55, 0.30, 0.50), ("step-000200", 200, 0.90, 0.26, 0.50),
         ("step-000300", 300, 0.90, 0.20, 0.50)], "step-000200", False),
    "no style gain anywhere": (
        [BASE, ("step-000100", 100, 0.49, 0.30, 0.50), ("step-000200", 200, 0.40, 0.30, 0.50)], "step-000100", False),
}


@pytest.mark.parametrize("case", RULE_CASES, ids=list(RULE_CASES))
def test_the_recommendation_rule(case):
    table, expected, eligible = RULE_CASES[case]
    pick = recommend(rows_of(*table))
    assert (pick.name, pick.eligible) == (expected, eligible)
    assert pick.reason and pick.source == "clip"


def test_the_rule_explains_a_passed_over_overcooked_step():
    table, _, _ = RULE_CASES["the overcooked last step loses adherence: the earlier one"]
    assert "Later step 300 has more style" in recommend(rows_of(*table)).reason


def test_the_rule_says_when_the_steps_that_keep_the_prompt_have_barely_taken_the_style():
    table, _, _ = RULE_CASES["a step that has barely taken the style is no pick: the best trade-off of those that have"]
    assert "the checkpoints that keep prompt adherence show little of the style" in recommend(rows_of(*table)).reason


def test_judged_rates_decide_when_every_row_has_them():
    rows = rows_of(BASE, ("step-000100", 100, 0.60, 0.30, 0.50), ("step-000200", 200, 0.70, 0.30, 0.50))
    for row, (style, adherence, leak) in zip(rows, [(0.0, 0.8, 0.0), (0.85, 0.8, 0.05), (0.54, 0.8, 0.05)], strict=True):
        row.judged_style_rate, row.judged_adherence_rate, row.judged_leak_rate = style, adherence, leak
    pick = recommend(rows)
    assert (pick.name, pick.source) == ("step-000100", "judge")  # CLIP alone would take step 200


def test_equal_judged_rates_go_to_the_step_closest_to_the_training_style_then_the_earlier():
    # A few pictures leave the judge's rates equal at many late checkpoints (README, "The toy world"): the continuous
    # style similarity, a finer measure of the same thing, decides between them; equal in that too, the earlier step.
    rows = rows_of(BASE, ("step-000100", 100, 0.60, 0.30, 0.50), ("step-000200", 200, 0.70, 0.30, 0.50),
                   ("step-000300", 300, 0.65, 0.30, 0.50))
    for row, style in zip(rows, [0.0, 0.75, 0.75, 0.75], strict=True):
        row.judged_style_rate, row.judged_adherence_rate, row.judged_leak_rate = style, 1.0, 0.0
    assert recommend(rows).name == "step-000200"
    rows[3].style = rows[2].style
    assert recommend(rows).name == "step-000200"
    rows[1].style = rows[2].style = rows[3].style
    assert recommend(rows).name == "step-000100"


def test_no_scores_no_recommendation():
    assert recommend([Row("base", 0, val_loss=1.0), Row("final", 10, val_loss=0.9)]) is None


# -- a full evaluation: evaluation.json, best/, the card table, the grid --------------------------------------------
@pytest.fixture(scope="module")
def evaluated(run) -> dict:
    final_before = (run / "final" / DIFFUSERS_FILENAME).read_bytes()
    data = evaluate(run, fast(clip_model=TINY_CLIP))
    assert (run / "final" / DIFFUSERS_FILENAME).read_bytes() == final_before  # final/ stays the last step
    return data


def test_evaluation_writes_every_row_and_best_holds_both_lora_files(run, evaluated):
    data = json.loads((run / "evaluation.json").read_text())
    assert [r["name"] for r in data["rows"]] == ["base", "step-000010", "step-000020"]
    assert all(isinstance(r[k], float) for r in data["rows"] for k in ("val_loss", "adherence", "style", "leak", "diversity"))
    assert any(n == "kid skipped: 4 training images < 50" for n in data["notes"])
    pick = data["recommendation"]["name"]
    best = run / "best"
    assert sorted(p.name for p in best.iterdir()) == sorted([DIFFUSERS_FILENAME, "stripes.safetensors", "lora_info.json", "evaluation.json"])
    source = run / "checkpoints" / pick
    assert (best / DIFFUSERS_FILENAME).read_bytes() == (source / DIFFUSERS_FILENAME).read_bytes()
    saved = json.loads((best / "evaluation.json").read_text())
    assert saved["checkpoint"] == pick and saved["reason"] == data["recommendation"]["reason"]
    assert saved["scores"]["style"] == next(r["style"] for r in data["rows"] if r["name"] == pick)


def test_the_same_evaluation_twice_gives_the_same_scores(run, evaluated):
    again = evaluate_run(run, fast(clip_model=TINY_CLIP), ["10"])
    first = next(r for r in evaluated["rows"] if r["name"] == "step-000010")
    assert again[1].val_loss == first["val_loss"]  # exactly: fixed images, noise and timesteps
    # Images: the same up to float rounding (a lone LoRA is fused into the weights and unfused after).
    assert (again[1].style, again[1].adherence) == pytest.approx((first["style"], first["adherence"]), rel=1e-4)


def test_model_card_table_names_the_pick_and_what_is_published(run, evaluated):
    text = evaluation_markdown(run, published="best")
    pick = evaluated["recommendation"]["name"]
    assert "| checkpoint | step | val loss | adherence | style | leak | diversity |" in text
    assert f"| ★ {pick} |" in text and f"This repository publishes: {pick}" in text
    assert evaluation_markdown(run.parent / "nothing-here") == ""


def test_the_checkpoint_grid_labels_every_cell_and_frames_the_pick(run, evaluated):
    from PIL import Image

    names = ["step-000010", "step-000020"]
    sheet = Image.new("RGB", (64 * 2, 64 * 2), "gray")
    labelled = label_checkpoint_grid(sheet, run, names, ["a house", "a cat"])
    cell_h = (labelled.height - 18) // 2
    pick_row = names.index(evaluated["recommendation"]["name"])

    def orange(row: int) -> int:
        box = labelled.crop((0, 18 + row * cell_h, labelled.width, 18 + (row + 1) * cell_h)).convert("RGB")
        return sum(1 for p in box.getdata() if p == (234, 88, 12))

    assert labelled.width >= 2 * 160  # small cells are enlarged so their labels fit
    assert orange(pick_row) > 0 and orange(1 - pick_row) == 0


def test_the_train_tab_section_shows_the_table_the_plot_and_the_pick(run, evaluated):
    from lora_trainer.ui.evaluation import view

    summary, table, plot = view(run)
    pick = evaluated["recommendation"]["name"]
    assert pick in summary and "kid skipped" in summary
    assert list(table["checkpoint"]) == [("★ " if n == pick else "") + n for n in ("base", "step-000010", "step-000020")]
    assert set(plot["metric"]) == {"style", "adherence", "leak"} and sorted(set(plot["step"])) == [0, 10, 20]
    assert view(run.parent / "nothing")[1] is None


def test_dinov2_can_measure_style(run, tmp_path):
    """style_model = dinov2 loads a transformers Dinov2Model folder (here a tiny random one) for style and leak."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    dino = tmp_path / "dino"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(dino)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(dino)
    clip_rows = evaluate_run(run, fast(clip_model=TINY_CLIP), "final")
    dino_rows = evaluate_run(run, fast(clip_model=TINY_CLIP, style_model="dinov2", dino_model=str(dino)), "final")
    assert dino_rows[1].adherence == clip_rows[1].adherence  # adherence is always CLIP's
    assert isinstance(dino_rows[1].style, float) and dino_rows[1].style != clip_rows[1].style

