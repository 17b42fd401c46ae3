"""Human ratings: a blind rating set, append-only ratings from several raters, exports, agreement."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import make_images, tiny_config

from lora_trainer import config as config_mod
from lora_trainer import ratings
from lora_trainer.errors import LoraStudioError
from lora_trainer.evaluate import settings_from
from lora_trainer.train import train


@pytest.fixture(scope="module")
def rated_run(tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two spinning threads on a loaded 2-core machine are ~10x slower
    tmp = tmp_path_factory.mktemp("ratings")
    run = tmp / "run"
    cfg = tiny_config(make_images(tmp / "images", 3), optim__steps=10, output__save_every=5)
    config_mod.save(cfg, run)
    train(run, cfg)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    ratings.prepare(run, settings_from({"steps": 2, "prompt_count": 1, "seeds": 2}))
    torch.set_num_threads(threads)
    return run


def test_the_rating_set_is_blind_and_fixed(rated_run):
    manifest = ratings.load_manifest(rated_run)
    assert manifest["variants"] == ["base", "step-000005", "step-000010"]
    assert len(manifest["images"]) == 3 * 1 * 2 and manifest["seeds"] == [0, 1]
    assert manifest["prompts"][0].startswith("ohwx, ")
    files = sorted(p.stem for p in (rated_run / "ratings" / "images").iterdir())
    assert files == sorted(e["id"] for e in manifest["images"])
    assert not any(v in name for name in files for v in ("base", "step"))  # names say nothing


def test_two_raters_rate_singles_in_their_own_order_and_the_exports_hold_both(rated_run):
    alice, bob = ratings.rater_id("alice-secret"), ratings.rater_id("bob-secret")
    assert alice != bob and "secret" not in alice
    first_a, done, total = ratings.next_task(rated_run, alice, "single")
    assert (done, total) == (0, 6)
    seen = []
    while (task := ratings.next_task(rated_run, alice, "single")[0]) is not None:
        seen.append(task["images"][0])
        ratings.add_rating(rated_run, alice, task, {"style": 5, "detail": 4, "expressiveness": 3})
    assert len(seen) == 6 == len(set(seen))
    assert ratings.next_task(rated_run, alice, "single")[1:] == (6, 6)
    bob_task = ratings.next_task(rated_run, bob, "single")[0]
    ratings.add_rating(rated_run, bob, bob_task, {"style": 1, "detail": 1, "expressiveness": 1})

    paths = ratings.export(rated_run)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 7 and {r["rater"] for r in rows} == {alice, bob}
    data = json.loads(paths["json"].read_text())
    assert all(r["variants"][0] in ("base", "step-000005", "step-000010") for r in data["ratings"])
    report = paths["html"].read_text()
    assert alice in report and bob in report and report.count("data:image/png;base64,") == 6
    assert "Agreement of the automatic scores with people" in report


def test_pairs_compare_two_variants_of_the_same_prompt_and_seed(rated_run):
    manifest = ratings.load_manifest(rated_run)
    entry = {e["id"]: e for e in manifest["images"]}
    pairs = ratings.tasks(manifest, "pair")
    assert len(pairs) == 2 * 3  # per seed: 3 variants -> 3 pairs
    for pair in pairs:
        a, b = (entry[i] for i in pair["images"])
        assert (a["prompt"], a["seed"]) == (b["prompt"], b["seed"]) and a["variant"] != b["variant"]


def test_a_pair_gives_the_preferred_side_the_point(tmp_path):
    run = _fake_set(tmp_path)
    task = {"mode": "pair", "images": ["i-b", "i-c"]}
    ratings.add_rating(run, "r1", task, {"style": "left", "detail": "same", "expressiveness": "right"})
    scores = ratings.human_scores(run)
    assert (scores["b"]["style"], scores["c"]["style"]) == (1.0, 0.0)
    assert (scores["b"]["detail"], scores["c"]["detail"]) == (0.5, 0.5)
    assert scores["a"]["style"] is None


@pytest.mark.parametrize("task,answers", [
    ({"mode": "single", "images": ["i-a"]}, {"style": 6, "detail": 3, "expressiveness": 3}),
    ({"mode": "single", "images": ["i-a"]}, {"style": 3, "detail": 3}),
    ({"mode": "pair", "images": ["i-a", "i-b"]}, {"style": "up", "detail": "same", "expressiveness": "same"}),
    ({"mode": "single", "images": ["not-in-the-set"]}, {"style": 3, "detail": 3, "expressiveness": 3}),
])
def test_bad_ratings_are_refused(tmp_path, task, answers):
    run = _fake_set(tmp_path)
    with pytest.raises(LoraStudioError):
        ratings.add_rating(run, "r1", task, answers)
    assert ratings.read_ratings(run) == []


def test_a_half_written_last_line_is_not_a_rating(tmp_path):
    run = _fake_set(tmp_path)
    ratings.add_rating(run, "r1", {"mode": "single", "images": ["i-a"]}, {"style": 2, "detail": 2, "expressiveness": 2})
    with (run / "ratings" / "ratings.jsonl").open("a") as f:
        f.write('{"rater": "r2", "mode": "sin')
    assert [r["rater"] for r in ratings.read_ratings(run)] == ["r1"]


@pytest.mark.parametrize("x,y,rho", [
    ([1, 2, 3, 4], [10, 20, 30, 40], 1.0),
    ([1, 2, 3, 4], [4, 3, 2, 1], -1.0),
    ([1, 2, 3], [1, 3, 2], 0.5),
    ([1, 1, 2], [1, 2, 3], 0.866),
    ([1, 2], [1, 2], None),
    ([1, 1, 1], [1, 2, 3], None),
])
def test_spearman(x, y, rho):
    value = ratings.spearman(x, y)
    assert value == rho if rho is None else round(value, 3) == rho


def test_agreement_is_perfect_when_people_order_the_checkpoints_as_the_style_score(tmp_path):
    run = _fake_set(tmp_path)
    (run / "evaluation.json").write_text(json.dumps({"rows": [
        {"name": "a", "style": 0.1, "leak": 0.3}, {"name": "b", "style": 0.2, "leak": 0.2}, {"name": "c", "style": 0.3, "leak": 0.1}]}))
    for image, score in (("i-a", 1), ("i-b", 3), ("i-c", 5)):
        ratings.add_rating(run, "r1", {"mode": "single", "images": [image]}, {"style": score, "detail": score, "expressiveness": score})
    agree = ratings.agreement(run)
    assert agree["style"]["style"] == (1.0, 3) and agree["leak"]["style"] == (-1.0, 3)
    assert "adherence" not in agree  # no automatic adherence scores: no row


def _fake_set(tmp_path: Path) -> Path:
    """A rating set of three variants a, b, c with one image each (no images on disk needed for the rules)."""
    run = tmp_path / "run"
    (run / "ratings").mkdir(parents=True)
    manifest = {"version": 1, "set": "s1", "prompts": ["ohwx, a cat"], "seeds": [0], "variants": ["a", "b", "c"],
                "images": [{"id": f"i-{v}", "variant": v, "step": k, "prompt": 0, "seed": 0} for k, v in enumerate("abc")]}
    (run / "ratings" / "manifest.json").write_text(json.dumps(manifest))
    return run
