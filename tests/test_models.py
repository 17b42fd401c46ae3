"""Resolving a base model: every kind of source, and one clear line when it can't be used."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lora_trainer import models
from lora_trainer.errors import ModelLoadError
from lora_trainer.tiny import tiny_model_path


@pytest.mark.parametrize("spec, kind", [("builtin:tiny-sd", "sd"), ("builtin:tiny-sdxl", "sdxl")])
def test_builtin_models_resolve_to_a_diffusers_folder(spec, kind):
    base = models.resolve(spec)
    assert (base.kind, base.loader, base.is_builtin) == (kind, "pretrained", True)
    assert (tiny_model_path(spec) / "model_index.json").exists()


def test_a_local_diffusers_folder_is_loaded_with_from_pretrained():
    folder = str(tiny_model_path("builtin:tiny-sdxl"))
    base = models.resolve(folder)
    assert (base.kind, base.loader, base.source) == ("sdxl", "pretrained", folder)
    assert type(models.load_pipeline(base)).__name__ == "StableDiffusionXLPipeline"


@pytest.mark.parametrize("key, kind", [("conditioner.embedders.1.model.ln_final.weight", "sdxl"), ("cond_stage_model.transformer.x", "sd")])
def test_a_single_checkpoint_file_is_recognised_by_its_keys(tmp_path, key, kind):
    path = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(1)}, path)
    assert models.resolve(str(path)) == models.BaseModel(str(path), kind, str(path), "single_file")


@pytest.mark.parametrize(
    "make, spec, message",
    [
        (None, "builtin:tiny-sd3", "unknown built-in model 'builtin:tiny-sd3'"),
        ("folder", "{tmp}/empty", "has no model_index.json"),
        ("file", "{tmp}/weights.bin", "is a .bin file; expected .safetensors or .ckpt"),
        (None, "./models/missing", "base model './models/missing' not found"),
        (None, "nobody/no-such-model-anywhere", "base model 'nobody/no-such-model-anywhere' could not be loaded: tried a local path"),
    ],
)
def test_unusable_models_give_one_line_naming_them(tmp_path, make, spec, message):
    spec = spec.format(tmp=tmp_path)
    if make == "folder":
        (tmp_path / "empty").mkdir()
    elif make == "file":
        (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError) as err:
        models.resolve(spec)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_lora_targets_that_match_nothing_are_a_clear_error():
    pipe = models.load_pipeline(models.resolve("builtin:tiny-sd"))
    config = models.lora_config(4, 4.0, 0.0, ["no_such_layer"], use_dora=False, use_rslora=False)
    with pytest.raises(ModelLoadError, match="match no layer of the UNet"):
        models.attach_lora(pipe.unet, config, "UNet")


def test_the_tokenizer_loads_without_model_weights():
    tokenizer = models.load_tokenizer("builtin:tiny-sd")
    assert tokenizer.model_max_length == 77 and tokenizer.tokenize("a photo")[0] == "a</w>"


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    import socket

    import huggingface_hub.constants as constants

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))


def test_an_unreachable_hub_is_reported_at_once_for_a_base_model(unreachable_hub):
    with pytest.raises(ModelLoadError, match="'someone/model' could not be loaded: it is not in this machine's cache and"):
        models.resolve("someone/model")


def test_an_unreachable_hub_is_reported_at_once_for_the_captioning_model(unreachable_hub):
    from lora_trainer.captioning import BlipCaptioner

    with pytest.raises(ModelLoadError, match="captioning model 'Salesforce/blip-image-captioning-base'.*cannot be reached"):
        BlipCaptioner("Salesforce/blip-image-captioning-base").load()


def test_a_broken_tiny_model_cache_is_rebuilt_not_trusted(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("LORA_STUDIO_CACHE", str(tmp_path / "cache"))
    folder = tiny_model_path("builtin:tiny-sdxl")
    for weights in (folder / "text_encoder").iterdir():  # as a multi-process build of an older version left it
        weights.unlink()
    shutil.rmtree(folder / "text_encoder_2")
    assert tiny_model_path("builtin:tiny-sdxl") == folder
    assert (folder / "text_encoder" / "model.safetensors").exists() and (folder / "text_encoder_2" / "config.json").exists()


# -- geometry: read from the model's own configs ----------------------------------------------------------
@pytest.fixture(scope="module")
def model_32px(tmp_path_factory):
    from conftest import make_32px_model

    return make_32px_model(tmp_path_factory.mktemp("m32") / "model")


@pytest.mark.parametrize(
    "spec, vae_scale, step, native",
    [("builtin:tiny-sd", 8, 16, 64), ("builtin:tiny-sdxl", 8, 16, 64), ("32px", 2, 8, 32)],
)
def test_geometry_comes_from_the_models_own_configs(spec, vae_scale, step, native, model_32px):
    base = models.resolve(str(model_32px) if spec == "32px" else spec)
    geo = models.geometry(base)
    assert (geo.vae_scale, geo.bucket_step, geo.min_resolution, geo.default_resolution) == (vae_scale, step, step, native)


@pytest.mark.parametrize("kind, step, native", [("sd", 64, 512), ("sdxl", 32, 1024)])
def test_published_configs_and_single_files_give_the_standard_geometry(tmp_path, kind, step, native):
    from conftest import config_only_model

    folder = models.geometry(models.resolve(str(config_only_model(tmp_path / "m", kind))))
    single = models.geometry(models.BaseModel("x.safetensors", kind, "x.safetensors", "single_file"))
    assert (folder.bucket_step, folder.default_resolution) == (single.bucket_step, single.default_resolution) == (step, native)


def test_a_hub_models_geometry_is_read_from_its_cached_configs(tmp_path, monkeypatch):
    import huggingface_hub
    from conftest import config_only_model

    folder = config_only_model(tmp_path / "hub", "sdxl")
    asked = []

    def from_cache(repo_id, filename, revision=None, **kwargs):
        asked.append((repo_id, filename, revision))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", from_cache)
    base = models.resolve("someone/sdxl-finetune", revision="v2")
    assert base.kind == "sdxl" and models.geometry(base).default_resolution == 1024
    assert ("someone/sdxl-finetune", "unet/config.json", "v2") in asked
    assert all(f.endswith(".json") for _, f, _ in asked)  # configs only, never weights


def test_a_folder_without_its_vae_config_names_the_missing_file(tmp_path):
    from conftest import config_only_model

    folder = config_only_model(tmp_path / "m", "sd")
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="cannot read vae/config.json"):
        models.geometry(models.resolve(str(folder)))


def test_the_toy_base_resolves_to_its_committed_folder_or_says_how_to_build_it(monkeypatch, tmp_path):
    from conftest import config_only_model

    monkeypatch.setattr(models, "TOY_BASE_DIR", tmp_path / "missing")
    with pytest.raises(ModelLoadError, match=r"toy-world base is not built: run `python -m lora_trainer.toyworld.build`"):
        models.resolve("builtin:toy")
    monkeypatch.setattr(models, "TOY_BASE_DIR", config_only_model(tmp_path / "toy", "sd"))
    base = models.resolve("builtin:toy")
    assert (base.kind, base.source, base.is_builtin) == ("sd", str(tmp_path / "toy"), True)
