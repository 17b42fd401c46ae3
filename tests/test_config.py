"""The config contract: defaults, help, TOML round trip, and rejection of bad values by name."""

from __future__ import annotations

import pytest

from lora_trainer import config
from lora_trainer.errors import ConfigError


def test_every_field_has_a_default_a_type_and_help_text():
    names = config.field_names()
    assert len(names) > 40
    for name in names:
        info = config.field_info(name)
        assert info["help"].strip(), name
        assert info["type"] in {"bool", "int", "float", "str", "list[str]"}, name


def test_toml_round_trip_keeps_every_value(tmp_path):
    cfg = config.TrainConfig()
    cfg.set("lora.rank", 32)
    cfg.set("sampling.prompts", ["a {trigger}", "b"])
    cfg.set("optim.mixed_precision", "bf16")
    path = config.save(cfg, tmp_path)
    assert path.name == "config.toml"
    assert config.load(tmp_path) == cfg


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("lora.rank", 0, "lora.rank = 0 is out of range; allowed [1, 1024]"),
        ("lora.rank", 5000, "lora.rank = 5000 is out of range"),
        ("lora.dropout", 0.95, "lora.dropout"),
        ("lora.targets", "everything", "lora.targets = 'everything' is not allowed; choose one of attention, attention+ff, attention+ff+conv, image-side, custom"),
        ("optim.optimizer", "sgd", "optim.optimizer = 'sgd' is not allowed"),
        ("optim.learning_rate", 0.0, "optim.learning_rate = 0.0 is out of range; allowed (0.0, 10.0]"),
        ("optim.mixed_precision", "fp8", "optim.mixed_precision"),
        ("optim.lr_scheduler", "step", "optim.lr_scheduler"),
        ("data.resolution", 500, "data.resolution = 500 must be a multiple of 8"),
        ("data.resolution", 4, "data.resolution = 4 must be a multiple of 8"),  # 0 = native; then 8 and up
        ("data.resolution", 8192, "data.resolution = 8192 is out of range"),
        ("data.caption_dropout", 1.5, "data.caption_dropout"),
        ("model.base", " ", "model.base must not be empty"),
        ("output.name", "../evil", "output.name = '../evil' is not a valid name"),
        ("output.push_checkpoints_to", "no-slash", "output.push_checkpoints_to"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(field, value, expected):
    section, name = field.split(".")
    with pytest.raises(ConfigError, match="invalid config") as err:
        config.from_dict({section: {name: value}})
    assert expected in str(err.value)


@pytest.mark.parametrize(
    "field, value",
    [("lora.rank", "sixteen"), ("optim.steps", 2.5), ("data.flip", "maybe"), ("sampling.prompts", 3)],
)
def test_values_of_the_wrong_type_are_rejected_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + ": expected"):
        config.TrainConfig().set(field, value)


def test_unknown_fields_and_sections_are_named():
    with pytest.raises(ConfigError, match="unknown config field 'lora.rnak'"):
        config.from_dict({"lora": {"rnak": 4}})
    with pytest.raises(ConfigError, match="unknown config section"):
        config.from_dict({"lroa": {}})


def test_custom_targets_need_a_list():
    with pytest.raises(ConfigError, match="lora.custom_targets must list"):
        config.from_dict({"lora": {"targets": "custom"}})


def test_strings_from_forms_and_flags_are_coerced():
    cfg = config.TrainConfig()
    cfg.set("data.flip", "yes")
    cfg.set("lora.rank", "8")
    cfg.set("lora.custom_targets", "to_q, to_v")
    assert (cfg.data.flip, cfg.lora.rank, cfg.lora.custom_targets) == (True, 8, ["to_q", "to_v"])


def test_invalid_toml_names_the_file(tmp_path):
    (tmp_path / "config.toml").write_text("[lora\nrank = ")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        config.load(tmp_path)


def test_sample_prompts_default_to_the_trigger_word():
    cfg = config.TrainConfig()
    cfg.set("data.trigger", "zwx")
    assert cfg.sample_prompts()[0] == "zwx"
    assert all("zwx" in p for p in cfg.sample_prompts())


@pytest.mark.parametrize("trigger", ["ohwx, style", "a,b"])
def test_a_trigger_with_a_comma_is_refused_with_the_reason(trigger):
    with pytest.raises(ConfigError, match="contains a comma: a trigger is one caption tag"):
        config.from_dict({"data": {"trigger": trigger}})
