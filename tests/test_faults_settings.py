"""Settings that would silently do nothing are named: Check, the log and the `started` event warn about them."""

from __future__ import annotations

import pytest
from conftest import make_images, tiny_config

from lora_trainer.plan import idle_settings
from lora_trainer.preflight import preflight

# field: (its value, the settings that leave it doing nothing, the settings under which it acts)
IDLE = {
    "data.keep_tokens": (3, {}, {"data.shuffle_captions": True}),
    "data.bucket_step": (32, {"data.buckets": False}, {"data.buckets": True}),
    "data.num_workers": (2, {"data.cache_latents": True}, {"data.cache_latents": False}),
    "lora.text_encoder_lr": (1e-4, {}, {"lora.train_text_encoder": True}),
    "lora.custom_targets": (["to_q"], {"lora.targets": "attention"}, {"lora.targets": "custom"}),
    "lora.embedding_lr": (1e-3, {}, {"lora.trigger_vectors": 1}),
    "lora.embedding_init": ("painting", {}, {"lora.trigger_vectors": 1}),
    "optim.warmup_steps": (5, {"optim.lr_scheduler": "constant"}, {"optim.lr_scheduler": "constant_with_warmup"}),
    "optim.preservation_class": ("shape", {}, {"optim.preservation_weight": 1.0}),
    "optim.train_guidance": (3.0, {}, {"optim.preservation_weight": 1.0}),
    "optim.prior_loss_weight": (0.5, {}, {"data.reg_images": "images"}),
    "data.reg_caption": ("a shape", {}, {"data.reg_images": "images"}),
    "data.reg_images": ("images", {"optim.prior_loss_weight": 0.0}, {"optim.prior_loss_weight": 1.0}),
}


def warnings_for(tmp_path, settings: dict) -> list[str]:
    images = tmp_path / "images"
    if not images.exists():
        make_images(images)
    cfg = tiny_config(images, **{k.replace(".", "__"): v for k, v in settings.items()})
    return preflight(tmp_path, cfg, gpu=False).warnings


@pytest.mark.parametrize("field", IDLE, ids=list(IDLE))
def test_a_setting_its_context_leaves_idle_is_warned_about_and_not_where_it_acts(field, tmp_path):
    value, idle, active = IDLE[field]
    said = f"{field} is set but does nothing here"
    assert any(said in w for w in warnings_for(tmp_path, {**idle, field: value})), field
    assert not any(said in w for w in warnings_for(tmp_path, {**active, field: value}))


def test_defaults_and_presets_leave_no_setting_idle(tmp_path):
    from lora_trainer.config import TrainConfig
    from lora_trainer.presets import PRESETS

    assert idle_settings(TrainConfig()) == []
    for preset in PRESETS.values():
        for base in ("builtin:toy", "stable-diffusion-v1-5/stable-diffusion-v1-5"):
            cfg = TrainConfig()
            for name, value in preset.settings(base).items():
                cfg.set(name, value)
            assert idle_settings(cfg) == [], (preset.name, base)
