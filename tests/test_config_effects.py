"""Every config field does something: changing it changes the plan, the events, the samples or the weights.

One row per field: the value to try, the settings it needs to matter (its context), and what it
changes. A field that cannot be shown to change anything does not belong in the config.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import config_only_model, make_images, tiny_config
from safetensors.torch import load_file

from lora_trainer import config as config_mod
from lora_trainer.events import read_events
from lora_trainer.preflight import preflight

# field: (value, context {field: value}, what changes)
ROWS: dict[str, tuple] = {
    "model.base": ("builtin:tiny-sdxl", {}, "plan"),
    "model.revision": ("v2", {}, "hub-request"),
    "model.variant": ("fp16", {}, "outcome"),
    "data.images": ("other-images", {}, "plan"),
    "data.trigger": ("zwx", {}, "weights"),  # the uncaptioned image's caption
    "data.resolution": (32, {}, "plan"),
    "data.buckets": (False, {}, "plan"),
    "data.bucket_step": (32, {}, "plan"),
    "data.repeats": (2, {}, "plan"),
    "data.flip": (True, {}, "weights"),
    "data.caption_dropout": (0.9, {}, "weights"),
    "data.shuffle_captions": (True, {}, "weights"),
    "data.keep_tokens": (0, {"data.shuffle_captions": True}, "weights"),
    "data.cache_latents": (False, {}, "events"),
    "data.cache_text_embeddings": (False, {}, "events"),
    "data.num_workers": (1, {"data.cache_latents": False}, "events"),
    "lora.rank": (2, {}, "weights"),
    "lora.alpha": (8.0, {}, "weights"),
    "lora.dropout": (0.5, {}, "weights"),
    "lora.targets": ("attention+ff", {}, "weights"),
    "lora.custom_targets": (["to_q"], {"lora.targets": "custom", "lora.custom_targets": ["to_k"]}, "weights"),
    "lora.train_text_encoder": (True, {}, "weights"),
    "lora.text_encoder_lr": (1e-2, {"lora.train_text_encoder": True}, "weights"),
    "lora.use_dora": (True, {}, "weights"),
    "lora.use_rslora": (True, {}, "weights"),
    "optim.optimizer": ("prodigy", {}, "weights"),
    "optim.learning_rate": (5e-4, {}, "weights"),
    "optim.weight_decay": (0.5, {}, "weights"),
    "optim.lr_scheduler": ("cosine", {}, "weights"),
    "optim.warmup_steps": (2, {"optim.lr_scheduler": "constant_with_warmup"}, "weights"),  # 'constant' has no warm-up
    "optim.steps": (5, {}, "plan"),
    "optim.epochs": (2, {}, "plan"),
    "optim.batch_size": (2, {}, "plan"),
    "optim.gradient_accumulation": (2, {}, "plan"),
    "optim.gradient_checkpointing": (True, {}, "events"),  # and the same weights: test_train proves it
    "optim.mixed_precision": ("bf16", {}, "weights"),
    "optim.memory": ("off", {}, "gpu-plan"),  # on a CPU a no-op: the plan for an 8 GiB GPU shows it
    "optim.max_grad_norm": (1e-4, {}, "weights"),
    # Min-SNR only weighs down timesteps whose SNR is above gamma: at 1.0 three random timesteps of the tiny
    # model's schedule (SNR < 1 above t ~ 350) can all be left at weight 1, so try a gamma nearly all exceed.
    "optim.min_snr_gamma": (0.05, {}, "weights"),
    "optim.noise_offset": (0.5, {}, "weights"),
    "optim.seed": (7, {}, "weights"),
    "sampling.every": (1, {"sampling.every": 3}, "samples"),
    "sampling.prompts": (["zwx, a cat"], {"sampling.every": 3}, "samples"),
    "sampling.seed": (5, {"sampling.every": 3}, "samples"),
    "sampling.steps": (2, {"sampling.every": 3}, "samples"),
    "sampling.guidance": (1.0, {"sampling.every": 3}, "samples"),
    "sampling.negative_prompt": ("blurry", {"sampling.every": 3}, "samples"),
    "output.name": ("other-name", {}, "files"),
    "output.save_every": (1, {}, "checkpoints"),
    "output.keep_checkpoints": (1, {"output.save_every": 1}, "checkpoints"),
    "output.push_checkpoints_to": ("someone/checkpoints", {}, "uploads"),
    "optim.preservation_weight": (1.0, {}, "weights"),
    "optim.preservation_class": ("shape", {"optim.preservation_weight": 1.0}, "weights"),
    "optim.train_guidance": (3.0, {"optim.preservation_weight": 1.0}, "weights"),
    "optim.lora_plus_ratio": (16.0, {}, "weights"),
    "optim.timestep_sampling": ("logit_normal", {}, "weights"),
    "optim.logit_mean": (1.0, {"optim.timestep_sampling": "logit_normal"}, "weights"),
    "optim.logit_std": (0.3, {"optim.timestep_sampling": "logit_normal"}, "weights"),
    "optim.timestep_shift": (6.0, {"optim.timestep_sampling": "shifted"}, "weights"),
    "optim.ema_decay": (0.9, {}, "weights"),
    "lora.trigger_vectors": (1, {}, "weights"),
    "lora.embedding_lr": (0.5, {"lora.trigger_vectors": 1}, "weights"),
    "lora.embedding_init": ("stripes", {"lora.trigger_vectors": 1}, "weights"),
    "data.reg_images": ("reg-images", {"data.reg_caption": "a shape"}, "weights"),
    "data.reg_caption": ("a circle", {"data.reg_images": "reg-images", "data.reg_caption": "a shape"}, "weights"),
    "optim.prior_loss_weight": (0.25, {"data.reg_images": "reg-images", "data.reg_caption": "a shape"}, "weights"),
}
# The [eval] section's fields change how checkpoints are scored, not the run: tests/test_evaluate.py covers them.
EVAL_FIELDS = {f for f in config_mod.field_names() if f.startswith("eval.")}
# (`version`, the config format's version, is no setting: one value is allowed.)


def test_every_config_field_has_a_row():
    assert set(ROWS) == set(config_mod.field_names()) - EVAL_FIELDS


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images with several tags per caption and one uncaptioned image, and a cache of baseline observations."""
    tmp = tmp_path_factory.mktemp("effects")
    images = make_images(tmp / "images", 4)
    for i in range(3):
        (images / f"img{i:03d}.txt").write_text(f"ohwx, stripes, number {i}, bright, lines")
    (images / "img003.txt").unlink()
    make_images(tmp / "other-images", 2)
    make_images(tmp / "reg-images", 2, captions=False)  # uncaptioned: they take data.reg_caption
    return {"tmp": tmp, "images": images, "baselines": {}}


def _config(world, settings: dict):
    values = {"optim.steps": 3, "optim.learning_rate": 1e-3, "sampling.every": 0, **settings}
    if values.get("data.images") == "other-images":
        values["data.images"] = str(world["tmp"] / "other-images")
    if values.get("data.reg_images") == "reg-images":
        values["data.reg_images"] = str(world["tmp"] / "reg-images")
    return tiny_config(world["images"], **{k.replace(".", "__"): v for k, v in values.items()})


def _train(world, cfg) -> Path:
    from accelerate.state import AcceleratorState

    from lora_trainer.train import train

    run = Path(world["tmp"]) / f"run-{len(list(world['tmp'].glob('run-*')))}"
    config_mod.save(cfg, run)
    try:
        train(run, cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return run


def _events(run: Path, kind: str) -> list[dict]:
    return [e for e in read_events(run / "events.jsonl")[0] if e["type"] == kind]


def observe(world, what: str, cfg, monkeypatch):
    """What a run with `cfg` shows of the kind `what`, in a form that compares with ==."""
    if what == "plan":
        report = preflight(world["tmp"], cfg, gpu=False)
        return report.to_dict() | {"resolution": report.resolution}
    if what == "gpu-plan":
        return preflight(world["tmp"], cfg, gpu=False, gpu_memory=8 * 2**30).to_dict()
    if what == "hub-request":
        return _hub_request(world, cfg, monkeypatch)
    if what == "outcome":
        try:
            _train(world, cfg)
        except Exception as e:  # noqa: BLE001 - the message is the observation
            return f"{type(e).__name__}: {e}"
        return "trained"
    if what == "uploads":
        return _uploads(world, cfg, monkeypatch)
    run = _train(world, cfg)
    if what == "weights":
        tensors = {**load_file(run / "final" / "pytorch_lora_weights.safetensors"),
                   **{f"kohya.{k}": v for k, v in load_file(next((run / "final").glob("*.safetensors"))).items()}}
        return {k: hashlib.sha256(v.float().numpy().tobytes()).hexdigest() for k, v in tensors.items()}
    if what == "events":
        return _events(run, "started")[0]["plan"]
    if what == "samples":
        return [(e["step"], e["prompts"], [hashlib.sha256((run / p).read_bytes()).hexdigest() for p in e["images"]])
                for e in _events(run, "sample")]
    if what == "checkpoints":
        return [e["step"] for e in _events(run, "checkpoint")], sorted(p.name for p in (run / "checkpoints").iterdir())
    if what == "files":
        return sorted(p.name for p in (run / "final").iterdir())
    raise AssertionError(what)


def _hub_request(world, cfg, monkeypatch) -> list:
    """The revision the trainer asks the Hub for, with a Hub id whose configs are in a (fake) cache."""
    import huggingface_hub

    from lora_trainer.plan import plan_run

    folder = config_only_model(world["tmp"] / "hub-model", "sd")
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, filename, revision=None, **kw: asked.append(revision) or str(folder / filename))
    cfg.model.base = "someone/sd-model"
    cfg.data.resolution = 512
    plan_run(cfg, world["tmp"])
    return asked


def _uploads(world, cfg, monkeypatch) -> list:
    from lora_trainer import recorder

    pushed = []

    class FakeUploader:
        def __init__(self, run_dir, repo, keep=0, **_):
            self.repo = repo

        def submit(self, checkpoint):
            pushed.append((self.repo, checkpoint.name))

        def close(self):
            pass

    monkeypatch.setattr(recorder, "Uploader", FakeUploader)
    _train(world, cfg)
    return pushed


@pytest.mark.parametrize("field", list(ROWS))
def test_changing_a_field_changes_what_the_run_does(world, field, monkeypatch):
    value, context, what = ROWS[field]
    key = (what, tuple(sorted((k, str(v)) for k, v in context.items())))
    if key not in world["baselines"]:
        world["baselines"][key] = observe(world, what, _config(world, context), monkeypatch)
    changed = observe(world, what, _config(world, {**context, field: value}), monkeypatch)
    assert changed != world["baselines"][key], f"{field} = {value!r} changed nothing in the {what}"


def test_the_weights_observation_sees_a_real_change_only(world, monkeypatch):
    """The same settings twice observe the same: a difference above is the field's doing."""
    first = observe(world, "weights", _config(world, {}), monkeypatch)
    assert first and observe(world, "weights", _config(world, {}), monkeypatch) == first
