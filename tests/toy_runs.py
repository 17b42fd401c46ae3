"""Style LoRAs trained in the toy world as a user would: what the quality tests (test_toyworld.py,
test_toy_sizing.py) train and judge."""

from __future__ import annotations

from lora_trainer import toyworld

STYLE = "stripes"


def train_style_lora(run, *, trigger_in_captions: bool = True, **settings):
    """A LoRA trained with the Style preset (and `settings`) on 16 pictures of a style, as a user would."""
    from accelerate.state import AcceleratorState

    from lora_trainer import config as config_mod
    from lora_trainer.presets import preset_settings
    from lora_trainer.train import train

    toyworld.make_style_dataset(run / "dataset", STYLE, n=16, seed=0)
    if not trigger_in_captions:
        for caption in (run / "dataset").glob("*.txt"):
            caption.write_text(caption.read_text().replace(f"{toyworld.TRIGGER}, ", ""))
    cfg = config_mod.TrainConfig()
    for key, value in {**preset_settings("Style", toyworld.BASE_SPEC), "model.base": toyworld.BASE_SPEC,
                       "sampling.every": 0, "eval.after_training": "off", **settings}.items():
        cfg.set(key, value)
    config_mod.save(config_mod.validate(cfg), run)
    try:
        train(run)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return run
