"""Publishing to the Hub, checkpoints off the box and LoRA downloads, against a local fake Hub.

The real huggingface_hub client talks HTTP to tests/fake_hub.py; assertions are on what the fake
Hub stored and on what landed on disk.
"""

from __future__ import annotations

import io
import json
import math
import socket
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from fake_hub import FINE_GRAINED_TOKEN, READ_TOKEN, WRITE_TOKEN, FakeHub
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.numpy import save_file

from lora_trainer import cli, config, hub
from lora_trainer.events import EventWriter
from lora_trainer.hub import HubError, client, publish
from lora_trainer.hub import checkpoints as hub_checkpoints

PROMPTS = ["ohwx", "a portrait of ohwx"]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A running fake Hub; no token from the environment or a login; retries without pauses."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(client, "RETRY_BASE_DELAY", 0.0)
    with FakeHub() as server:
        yield server


def make_run(run: Path, base: str = "runwayml/stable-diffusion-v1-5", kind: str = "sd", final: bool = True) -> Path:
    """A run folder as the trainer leaves it: config, events, samples at steps 50 and 100, final/, a checkpoint."""
    run.mkdir(parents=True)
    cfg = config.TrainConfig()
    cfg.model.base, cfg.data.trigger, cfg.output.name = base, "ohwx", "my-lora"
    cfg.sampling.prompts = PROMPTS
    config.save(cfg, run)
    events = EventWriter(run / "events.jsonl")
    events.emit("started", step=0, total_steps=100, base=base, kind=kind, resumed=False)
    for step in range(1, 101):  # a falling loss with noise
        events.emit("step", step=step, total_steps=100, loss=0.3 * math.exp(-step / 40) + 0.02 * math.sin(step), lr=1e-4)
        if step % 50 == 0:
            images = []
            for i in range(len(PROMPTS)):
                image = run / "samples" / f"step-{step:06d}" / f"{i}.png"
                image.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (16, 16), (step, 60 * i, 0)).save(image)
                images.append(image.relative_to(run).as_posix())
            events.emit("sample", step=step, images=images, prompts=PROMPTS, seed=1234)
            write_adapter(run / "checkpoints" / f"step-{step:06d}", base, kind, step, seed=step)
            ckpt = run / "checkpoints" / f"step-{step:06d}"
            (ckpt / "trainer_state.json").write_text(json.dumps({"step": step}))
            (ckpt / "state").mkdir()
            (ckpt / "state" / "optimizer.bin").write_bytes(np.random.default_rng(step).bytes(2048))
            (ckpt / "state" / "random_states_0.pkl").write_bytes(b"rng state %d" % step)
    if final:
        write_adapter(run / "final", base, kind, 100, seed=7)
        events.emit("finished", step=100, final="final", files=["final/pytorch_lora_weights.safetensors"])
    events.close()
    return run


def write_adapter(folder: Path, base: str, kind: str, steps: int, seed: int) -> None:
    """Both LoRA files (small random tensors) and lora_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {"unet.down.lora_A.weight": rng.standard_normal((4, 8), dtype=np.float32)}
    save_file(tensors, folder / "pytorch_lora_weights.safetensors")
    version = "sdxl_base_v1-0" if kind == "sdxl" else "sd_v1"
    metadata = {"ss_base_model_version": version, "ss_network_dim": "4", "ss_steps": str(steps)}
    save_file({"lora_unet_down.lora_down.weight": tensors["unet.down.lora_A.weight"]}, folder / "my-lora.safetensors", metadata)
    info = {"kind": kind, "base": base, "trigger": "ohwx", "rank": 4, "alpha": 4, "steps": steps, "resolution": 512, "name": "my-lora"}
    (folder / "lora_info.json").write_text(json.dumps(info))


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


def stored(fake: FakeHub, repo_id: str) -> dict[str, bytes]:
    return fake.repos[repo_id].files


# -- publishing a run -----------------------------------------------------------------------------
def test_push_uploads_loras_samples_config_card_and_loss_curve_in_one_commit(fake, tmp_path):
    run = make_run(tmp_path / "run")

    result = hub.push_run(run, "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url)

    files = stored(fake, "alice/my-lora")
    local = {
        "pytorch_lora_weights.safetensors": run / "final/pytorch_lora_weights.safetensors",
        "my-lora.safetensors": run / "final/my-lora.safetensors",
        "lora_info.json": run / "final/lora_info.json",
        "config.toml": run / "config.toml",
        **{f"samples/step-{s:06d}/{i}.png": run / f"samples/step-{s:06d}/{i}.png" for s in (50, 100) for i in (0, 1)},
    }
    assert set(files) == set(local) | {"README.md", "loss.png"}
    assert all(files[name] == path.read_bytes() for name, path in local.items())
    assert Image.open(io.BytesIO(files["loss.png"])).format == "PNG"
    assert len(fake.repos["alice/my-lora"].commits) == 2  # the empty initial one + this push
    assert result.url == f"{fake.url}/alice/my-lora"
    assert result.files == sorted(files)


def test_model_card_yaml_follows_the_diffusers_lora_convention(fake, tmp_path):
    hub.push_run(make_run(tmp_path / "run"), "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url)

    card = ModelCard(stored(fake, "alice/my-lora")["README.md"].decode())

    assert card.data.base_model == "runwayml/stable-diffusion-v1-5"
    assert card.data.instance_prompt == "ohwx"
    assert card.data.library_name == "diffusers"
    assert card.data.license == "creativeml-openrail-m"
    assert set(card.data.tags) == {"text-to-image", "diffusers", "lora", "template:sd-lora", "stable-diffusion", "lora-studio"}
    # The gallery shows the newest sampled step, each image with its prompt, and every image was uploaded.
    assert card.data.widget == [
        {"text": "ohwx", "output": {"url": "samples/step-000100/0.png"}},
        {"text": "a portrait of ohwx", "output": {"url": "samples/step-000100/1.png"}},
    ]
    assert all(w["output"]["url"] in stored(fake, "alice/my-lora") for w in card.data.widget)


def test_model_card_body_says_how_to_use_the_lora(tmp_path):
    text = ModelCard(hub.render_model_card(make_run(tmp_path / "run"), "alice/my-lora")).text

    assert 'pipe.load_lora_weights("alice/my-lora", weight_name="pytorch_lora_weights.safetensors")' in text
    assert "`ohwx`" in text
    assert "[`my-lora.safetensors`](./my-lora.safetensors)" in text
    assert "| lora.rank | 16 |" in text and "| optim.learning_rate | 0.0001 |" in text
    assert "![Training loss](loss.png)" in text


@pytest.mark.parametrize("use_dora", [True, False])
def test_model_card_tells_a1111_users_not_to_use_a_dora_lora(tmp_path, use_dora):
    run = make_run(tmp_path / "run")
    info = json.loads((run / "final" / "lora_info.json").read_text())
    (run / "final" / "lora_info.json").write_text(json.dumps({**info, "use_dora": use_dora}))
    text = ModelCard(hub.render_model_card(run, "alice/my-lora")).text

    assert ("Do not use it in AUTOMATIC1111 or Forge" in text) is use_dora
    assert ("<lora:my-lora:1>" in text) is not use_dora  # the A1111 prompt syntax only where it works
    assert "ComfyUI" in text and "[`my-lora.safetensors`](./my-lora.safetensors)" in text


@pytest.mark.parametrize(
    ("base", "kind", "base_model", "license", "family_tag"),
    [
        ("runwayml/stable-diffusion-v1-5", "sd", "runwayml/stable-diffusion-v1-5", "creativeml-openrail-m", "stable-diffusion"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "openrail++", "stable-diffusion-xl"),
        ("builtin:tiny-sd", "sd", None, "creativeml-openrail-m", "stable-diffusion"),
        ("builtin:tiny-sdxl", "sdxl", None, "openrail++", "stable-diffusion-xl"),
        ("/models/my-merge.safetensors", "sd", None, "creativeml-openrail-m", "stable-diffusion"),
    ],
)
def test_model_card_names_a_hub_base_model_only_when_it_is_one(tmp_path, base, kind, base_model, license, family_tag):
    card = ModelCard(hub.render_model_card(make_run(tmp_path / "run", base=base, kind=kind), "alice/my-lora"))

    assert card.data.base_model == base_model
    assert card.data.license == license
    assert family_tag in card.data.tags
    assert "/models/" not in card.content  # a local path is not published


def test_model_card_treats_an_existing_local_folder_as_local(tmp_path):
    local_base = tmp_path / "sd15-local"
    local_base.mkdir()
    card = ModelCard(hub.render_model_card(make_run(tmp_path / "run", base=str(local_base)), "alice/my-lora"))

    assert card.data.base_model is None
    assert str(tmp_path) not in card.content


def test_loss_curve_draws_a_falling_smoothed_line_for_a_falling_loss():
    events = [{"type": "step", "step": s, "loss": 1.0 - s / 200} for s in range(1, 201)]

    png = Image.open(io.BytesIO(hub.loss_curve_png(events))).convert("RGB")

    assert png.size == (640, 320)
    pixels = np.asarray(png).astype(int)
    smoothed = np.all(np.abs(pixels - [25, 70, 170]) < 20, axis=-1)  # the dark line's colour
    smoothed[:30] = False  # ignore the legend
    rows_left, rows_right = np.nonzero(smoothed[:, 70:120])[0], np.nonzero(smoothed[:, 560:610])[0]
    assert rows_left.size and rows_right.size
    assert rows_left.mean() < rows_right.mean()  # high on the left (small y), low on the right


def test_loss_curve_without_steps_is_still_a_png():
    assert Image.open(io.BytesIO(hub.loss_curve_png([{"type": "started", "step": 0}]))).size == (640, 320)


def test_pushing_the_same_run_again_changes_nothing(fake, tmp_path):
    run = make_run(tmp_path / "run")
    first = hub.push_run(run, "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url)
    before = dict(stored(fake, "alice/my-lora"))

    second = hub.push_run(run, "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url)

    assert stored(fake, "alice/my-lora") == before
    assert len(fake.repos["alice/my-lora"].commits) == 2  # no empty second commit
    assert second.files == first.files


def test_a_new_push_removes_samples_the_run_no_longer_has(fake, tmp_path):
    run = make_run(tmp_path / "run")
    hub.push_run(run, "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url)
    for image in (run / "samples" / "step-000050").iterdir():
        image.unlink()

    hub.push_run(run, "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url)

    assert not [p for p in stored(fake, "alice/my-lora") if p.startswith("samples/step-000050/")]
    assert "samples/step-000100/0.png" in stored(fake, "alice/my-lora")


def test_a_bare_repo_name_goes_to_the_token_owner(fake, tmp_path):
    result = hub.push_run(make_run(tmp_path / "run"), "my-lora", token=WRITE_TOKEN, endpoint=fake.url)

    assert result.url.endswith("/alice/my-lora")
    assert "pytorch_lora_weights.safetensors" in stored(fake, "alice/my-lora")


def test_push_to_an_org_the_token_may_write(fake, tmp_path):
    hub.push_run(make_run(tmp_path / "run"), "alice-org/team-lora", token=WRITE_TOKEN, endpoint=fake.url, private=True)

    assert fake.repos["alice-org/team-lora"].private
    assert "README.md" in stored(fake, "alice-org/team-lora")


def test_push_refuses_a_run_without_a_final_lora(fake, tmp_path):
    with pytest.raises(HubError, match="no finished LoRA yet"):
        hub.push_run(make_run(tmp_path / "run", final=False), "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url)
    assert fake.requests == []


# -- tokens ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("token", "namespace", "message"),
    [
        (None, None, "No Hugging Face token"),
        ("hf_notARealToken000000000000000000", None, "401 Unauthorized"),
        (READ_TOKEN, None, "read-only"),
        (WRITE_TOKEN, "stranger", "cannot write to 'stranger'"),
        (WRITE_TOKEN, "viewers-org", "'read' role"),
        (FINE_GRAINED_TOKEN, "alice-org", "fine-grained token"),
    ],
)
def test_check_token_says_what_is_wrong(fake, token, namespace, message):
    with pytest.raises(HubError, match=message) as error:
        hub.check_token(token, namespace, endpoint=fake.url)
    assert "settings/tokens" in str(error.value) or "push to 'alice/<name>'" in str(error.value).lower()
    assert token is None or token not in str(error.value)


@pytest.mark.parametrize(
    ("token", "namespace"),
    [(WRITE_TOKEN, None), (WRITE_TOKEN, "alice"), (WRITE_TOKEN, "alice-org"), (FINE_GRAINED_TOKEN, "alice")],
)
def test_check_token_returns_the_user_when_it_may_write(fake, token, namespace):
    assert hub.check_token(token, namespace, endpoint=fake.url) == "alice"


def test_check_token_falls_back_to_HF_TOKEN(fake, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)
    assert hub.check_token(None, endpoint=fake.url) == "alice"


@pytest.mark.parametrize(("token", "repo_id"), [(READ_TOKEN, "alice/my-lora"), (WRITE_TOKEN, "stranger/my-lora")])
def test_a_refused_token_uploads_nothing(fake, tmp_path, token, repo_id):
    with pytest.raises(HubError):
        hub.push_run(make_run(tmp_path / "run"), repo_id, token=token, endpoint=fake.url)
    assert fake.repos == {}


def test_the_token_lands_in_no_file_of_the_run_or_the_repo(fake, tmp_path):
    run = make_run(tmp_path / "run")
    hub.push_run(run, "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url)
    hub_checkpoints.push_checkpoint(run, "checkpoints/step-000100", "alice/my-lora-ckpt", token=WRITE_TOKEN, endpoint=fake.url)
    hub_checkpoints.fetch_checkpoint("hub:alice/my-lora-ckpt", tmp_path / "resumed", token=WRITE_TOKEN, endpoint=fake.url)

    secret = WRITE_TOKEN.encode()
    local = [p for folder in (run, tmp_path / "resumed") for p in folder.rglob("*") if p.is_file()]
    assert local and not [p for p in local if secret in p.read_bytes()]
    remote = [data for repo in fake.repos.values() for data in repo.files.values()]
    assert remote and not [data for data in remote if secret in data]


# -- network and server failures --------------------------------------------------------------------
def test_server_errors_are_retried_until_the_push_goes_through(fake, tmp_path):
    run = make_run(tmp_path / "run")
    fake.fail_next(2, status=503, path_contains="/commit/")

    hub.push_run(run, "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url)

    assert [p for m, p in fake.requests if p.endswith("/commit/main")] == ["/api/models/alice/my-lora/commit/main"] * 3
    assert stored(fake, "alice/my-lora")["pytorch_lora_weights.safetensors"] == (
        run / "final/pytorch_lora_weights.safetensors"
    ).read_bytes()


def test_a_hub_that_keeps_failing_gives_a_clear_error_and_leaves_the_run_alone(fake, tmp_path):
    run = make_run(tmp_path / "run")
    before = snapshot(run)
    fake.fail_next(1000, status=503, path_contains="/commit/")

    with pytest.raises(HubError, match=r"Gave up uploading to alice/my-lora after 4 tries: the Hub answered 503") as error:
        hub.push_run(run, "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url)

    assert "Nothing in the run folder was changed." in str(error.value)
    assert snapshot(run) == before
    assert stored(fake, "alice/my-lora") == {}  # the repo was created, but no commit went through


def test_an_unreachable_hub_is_a_clear_error(tmp_path, fake):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(HubError, match=r"the connection failed \(ConnectError\)"):
        hub.push_run(make_run(tmp_path / "run"), "alice/my-lora", token=WRITE_TOKEN, endpoint=closed)


# -- checkpoints off the box ----------------------------------------------------------------------
def test_a_pushed_checkpoint_comes_back_byte_identical_in_a_fresh_run_folder(fake, tmp_path):
    run = make_run(tmp_path / "run")
    hub_checkpoints.push_checkpoint(run, run / "checkpoints/step-000050", "alice/ckpts", token=WRITE_TOKEN, endpoint=fake.url)
    assert fake.repos["alice/ckpts"].private  # created private
    fresh = tmp_path / "fresh-machine" / "run"

    local = hub_checkpoints.fetch_checkpoint("hub:alice/ckpts", fresh, token=WRITE_TOKEN, endpoint=fake.url)

    assert local == fresh / "checkpoints" / "step-000050"
    original = run / "checkpoints" / "step-000050"
    assert {k: v[0] for k, v in snapshot(local).items()} == {k: v[0] for k, v in snapshot(original).items()}
    assert "state/optimizer.bin" in snapshot(local)
    assert (fresh / "config.toml").read_bytes() == (run / "config.toml").read_bytes()
    assert [p.name for p in (fresh / "checkpoints").iterdir()] == ["step-000050"]  # no staging folder left


def test_a_checkpoint_of_a_run_given_by_a_relative_path_is_pushed(fake, tmp_path, monkeypatch):
    make_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    hub_checkpoints.push_checkpoint(Path("run"), Path("run/checkpoints/step-000050"), "alice/ckpts", token=WRITE_TOKEN, endpoint=fake.url)
    assert "checkpoints/step-000050/trainer_state.json" in stored(fake, "alice/ckpts")


def test_fetch_takes_the_newest_checkpoint_and_keeps_an_existing_config(fake, tmp_path):
    run = make_run(tmp_path / "run")
    for step in ("step-000050", "step-000100"):
        hub_checkpoints.push_checkpoint(run, run / "checkpoints" / step, "alice/ckpts", token=WRITE_TOKEN, endpoint=fake.url)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.toml").write_text("# mine\n")

    local = hub_checkpoints.fetch_checkpoint("alice/ckpts", other, token=WRITE_TOKEN, endpoint=fake.url)

    assert local.name == "step-000100"
    assert json.loads((local / "trainer_state.json").read_text()) == {"step": 100}
    assert (other / "config.toml").read_text() == "# mine\n"


def test_a_failed_fetch_leaves_no_half_checkpoint(fake, tmp_path):
    run = make_run(tmp_path / "run")
    hub_checkpoints.push_checkpoint(run, "checkpoints/step-000050", "alice/ckpts", token=WRITE_TOKEN, endpoint=fake.url)
    fake.fail_next(1, status=403, path_contains="optimizer.bin")  # one file of the checkpoint cannot be read
    fresh = tmp_path / "fresh"

    with pytest.raises(HubError, match="Could not download"):
        hub_checkpoints.fetch_checkpoint("alice/ckpts", fresh, token=WRITE_TOKEN, endpoint=fake.url)

    assert not (fresh / "checkpoints").exists() and not list(fresh.glob(".fetch-*"))  # no step-000050/, no staging folder


def test_fetch_from_a_repo_without_checkpoints_says_so(fake, tmp_path):
    hub.push_run(make_run(tmp_path / "run"), "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url)
    with pytest.raises(HubError, match="holds no checkpoint"):
        hub_checkpoints.fetch_checkpoint("alice/my-lora", tmp_path / "fresh", token=WRITE_TOKEN, endpoint=fake.url)
    assert not (tmp_path / "fresh" / "checkpoints").exists()


def test_push_checkpoint_safely_returns_the_problem_instead_of_raising(fake, tmp_path):
    run = make_run(tmp_path / "run")
    bad = "hf_notARealToken000000000000000000"

    message = hub_checkpoints.push_checkpoint_safely(run, "checkpoints/step-000050", "alice/ckpts", token=bad, endpoint=fake.url)
    ok = hub_checkpoints.push_checkpoint_safely(run, "checkpoints/step-000050", "alice/ckpts", token=WRITE_TOKEN, endpoint=fake.url)

    assert "401" in message and bad not in message
    assert ok is None
    assert "checkpoints/step-000050/trainer_state.json" in stored(fake, "alice/ckpts")


# -- LoRAs for the Generate tab -------------------------------------------------------------------
def test_download_lora_takes_the_diffusers_file_of_a_published_run(fake, tmp_path):
    run = make_run(tmp_path / "run")
    hub.push_run(run, "alice/my-lora", token=WRITE_TOKEN, endpoint=fake.url)

    path = hub.download_lora("alice/my-lora", endpoint=fake.url, cache_dir=tmp_path / "cache")

    assert path.name == "pytorch_lora_weights.safetensors"
    assert path.read_bytes() == (run / "final/pytorch_lora_weights.safetensors").read_bytes()


def test_download_lora_picks_the_final_file_of_a_kohya_only_repo(fake, tmp_path):
    fake.add_repo("someone/style", {"style-000004.safetensors": b"epoch 4", "style.safetensors": b"final", "README.md": b"hi"})

    path = hub.download_lora("someone/style", endpoint=fake.url, cache_dir=tmp_path / "cache")

    assert path.read_bytes() == b"final"


def test_download_lora_takes_a_named_file(fake, tmp_path):
    fake.add_repo("someone/style", {"style-000004.safetensors": b"epoch 4", "style.safetensors": b"final"})

    path = hub.download_lora("someone/style", filename="style-000004.safetensors", endpoint=fake.url, cache_dir=tmp_path)

    assert path.read_bytes() == b"epoch 4"


@pytest.mark.parametrize(
    ("repo_id", "files", "filename", "message"),
    [
        ("someone/missing", None, None, "was not found"),
        ("someone/docs", {"README.md": b"no weights"}, None, "has no .safetensors file"),
        ("someone/full", {"model_index.json": b"{}", "unet/diffusion_pytorch_model.safetensors": b"x"}, None, "full diffusion model"),
        ("someone/style", {"style.safetensors": b"x"}, "other.safetensors", "has no file 'other.safetensors'"),
        ("not a repo id", None, None, "is not a repo id"),
    ],
)
def test_download_lora_explains_what_is_missing(fake, tmp_path, repo_id, files, filename, message):
    if files is not None:
        fake.add_repo(repo_id, files)
    with pytest.raises(HubError, match=message):
        hub.download_lora(repo_id, filename=filename, endpoint=fake.url, cache_dir=tmp_path)


def test_a_private_repo_needs_a_token_that_can_read_it(fake, tmp_path):
    fake.add_repo("alice/secret", {"pytorch_lora_weights.safetensors": b"x"}, private=True)

    with pytest.raises(HubError, match="if it is private, use a token"):
        hub.download_lora("alice/secret", endpoint=fake.url, cache_dir=tmp_path)
    assert hub.download_lora("alice/secret", token=WRITE_TOKEN, endpoint=fake.url, cache_dir=tmp_path).read_bytes() == b"x"


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["a.safetensors", "pytorch_lora_weights.safetensors"], "pytorch_lora_weights.safetensors"),
        (["name-000010.safetensors", "name.safetensors"], "name.safetensors"),
        (["nested/x.safetensors", "top.safetensors"], "top.safetensors"),
        (["checkpoints/step-000100/a.safetensors", "folder/b.safetensors"], "folder/b.safetensors"),
    ],
)
def test_the_most_likely_lora_file_comes_first(files, expected):
    assert publish.lora_candidates(files)[0] == expected


# -- command line -----------------------------------------------------------------------------------
def test_push_command_prints_the_url(fake, tmp_path, capsys):
    run = make_run(tmp_path / "run")
    argv = ["push", str(run), "--repo", "alice/cli-lora", "--token", WRITE_TOKEN, "--endpoint", fake.url]

    assert cli.main(argv) == 0
    assert capsys.readouterr().out.strip() == f"{fake.url}/alice/cli-lora"


def test_push_command_prints_the_problem_and_returns_1(fake, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)  # --token defaults to HF_TOKEN
    argv = ["push", str(make_run(tmp_path / "run")), "--repo", "alice/cli-lora", "--endpoint", fake.url]

    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "read-only" in err and READ_TOKEN not in err


def test_token_false_reads_anonymously_even_with_a_token_in_the_environment(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)  # e.g. a Space owner's token: a visitor must not borrow it
    fake.add_repo("alice/secret", {"pytorch_lora_weights.safetensors": b"x"}, private=True)
    fake.add_repo("someone/public", {"pytorch_lora_weights.safetensors": b"public"})

    assert hub.download_lora("someone/public", token=False, endpoint=fake.url, cache_dir=tmp_path).read_bytes() == b"public"
    with pytest.raises(HubError, match="if it is private"):
        hub.download_lora("alice/secret", token=False, endpoint=fake.url, cache_dir=tmp_path / "other")
    assert hub.download_lora("alice/secret", endpoint=fake.url, cache_dir=tmp_path / "env").read_bytes() == b"x"
