"""Style LoRAs trained in the toy world as a user would: what the quality tests (test_toyworld.py,
test_toy_sizing.py) train and judge."""

from __future__ import annotations

from lora_trainer import toyworld

STYLE = "stripes"


def train_style_lora(run, *, preset: str | None = "Style", trigger_in_captions: bool = True, **settings):
    """A LoRA trained with a preset (None: the defaults) and `settings` on 16 pictures of a style, as a user would."""
    from accelerate.state import AcceleratorState

    from lora_trainer import config as config_mod
    from lora_trainer.presets import preset_settings
    from lora_trainer.train import train

    toyworld.make_style_dataset(run / "dataset", STYLE, n=16, seed=0)
    if not trigger_in_captions:
        for caption in (run / "dataset").glob("*.txt"):
            caption.write_text(caption.read_text().replace(f"{toyworld.TRIGGER}, ", ""))
    cfg = config_mod.TrainConfig()
    chosen = preset_settings(preset, toyworld.BASE_SPEC) if preset else {"data.trigger": toyworld.TRIGGER}
    for key, value in {**chosen, "model.base": toyworld.BASE_SPEC, "sampling.every": 0, "eval.after_training": "off",
                       **settings}.items():
        cfg.set(key, value)
    config_mod.save(config_mod.validate(cfg), run)
    try:
        train(run)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return run
