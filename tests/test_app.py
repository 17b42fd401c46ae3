"""The web app driven through its HTTP API with gradio_client, as a browser session would.

The app runs in this process on a free port, with its workspace, model cache and Hub endpoint
(tests/fake_hub.py) in temporary places. Training is the real trainer in a subprocess on
builtin:tiny-sd at 64 px for 10 steps.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
from conftest import make_images
from fake_hub import WRITE_TOKEN, FakeHub
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from lora_trainer import config as config_mod
from lora_trainer.ui import build_app, launch_options, presets, queue, system

pytestmark = pytest.mark.slow
API_VIEW = ("status", "loss", "samples", "memory", "files", "console", "timer", "run")  # the live view (buttons are not API values)
TINY_TRAINING = {"model.base": system.TINY_SD, "optim.steps": 10, "sampling.every": 5, "sampling.steps": 2, "output.save_every": 5, "lora.rank": 4,
                 "optim.learning_rate": 1e-3, "output.name": "stripes"}


# -- fixtures ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hub():
    with FakeHub() as server:
        yield server


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("workspace")


# launch() asks its own URL for a reply within 3 s (to detect a notebook behind a proxy) and refuses to start
# without one: on a loaded machine that fails a test for no fault of the app. Tests skip that one check.
APP_PY = ("import runpy, gradio.networking as n; n.url_ok = lambda url: True; "
          "runpy.run_path({path!r}, run_name='__main__')")


def _always(*args) -> bool:
    return True


def serve(mp: pytest.MonkeyPatch, workspace: Path, hub_url: str, hf_home: Path, port: int | None = None) -> tuple[gr.Blocks, str]:
    """Launch the app in this process on a free port: no GPU, the given Hub, no token on this machine."""
    import huggingface_hub

    from lora_trainer.hub import client as hub_mod

    mp.setenv("LORA_STUDIO_WORKSPACE", str(workspace))
    mp.setenv("LORA_STUDIO_GPU", "0")
    mp.setenv("HF_ENDPOINT", hub_url)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "SPACE_ID", "OAUTH_CLIENT_ID"):
        mp.delenv(name, raising=False)
    mp.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(hf_home / "no-token"))
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "cache"))
    mp.setattr(hub_mod, "RETRY_BASE_DELAY", 0.0)
    mp.setattr(gr.networking, "url_ok", _always)  # see APP_PY
    system.has_gpu.cache_clear()
    demo = queue(build_app())
    port = port or _free_port()
    demo.launch(**launch_options(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True))
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def app(hub, workspace, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    demo, url = serve(mp, workspace, hub.url, tmp_path_factory.mktemp("hf"))
    yield demo, url
    demo.close()
    mp.undo()
    system.has_gpu.cache_clear()


@pytest.fixture
def url(app) -> str:
    return app[1]


def new_client(url: str, tmp_path: Path) -> Client:
    downloads = tmp_path / f"downloads-{time.monotonic_ns()}"
    downloads.mkdir()
    return Client(url, verbose=False, download_files=str(downloads))


def upload_images(client: Client, folder: Path) -> tuple:
    files = [handle_file(str(p)) for p in sorted(folder.iterdir())]
    return client.predict(files, system.TINY_SD, api_name="/upload")


def merge(view: dict, result: tuple) -> dict:
    """Fold one answer of the live view into what the page shows (gr.skip() leaves a part as it was)."""
    for name, value in zip(API_VIEW, result, strict=True):
        if not (isinstance(value, dict) and set(value) == {"__type__"}):
            view[name] = value
    return view


def start(client: Client, endpoint: str = "/start_training", **settings) -> dict:
    return merge({}, client.predict(**settings, api_name=endpoint))


def poll_until(client: Client, *words: str, view: dict | None = None, stall: float = 300) -> dict:
    """Poll like the page's timer until the status mentions one of `words`; the merged view.

    Follows progress: it gives up only when neither the status nor the trainer's console output has changed for
    `stall` seconds (a stuck run), however long a loaded machine takes over the whole run.
    """
    view = dict(view or {})
    last, since = None, time.monotonic()
    while not any(w in str(view.get("status", "")) for w in words):
        if (view.get("status"), view.get("console")) != last:
            last, since = (view.get("status"), view.get("console")), time.monotonic()
        elif time.monotonic() - since > stall:
            raise AssertionError(f"status never mentioned {words} and nothing moved; last: {view.get('status')}")
        merge(view, client.predict(api_name="/poll"))
        time.sleep(0.2)
    return view


def settle(client: Client, view: dict, stall: float = 300) -> dict:
    """Poll until the page's timer stops: the trainer reported its end and its process has exited."""
    since = time.monotonic()
    while view.get("timer", {}).get("active"):
        if time.monotonic() - since > stall:
            raise AssertionError(f"the trainer's process never exited; last: {view.get('status')}")
        merge(view, client.predict(api_name="/poll"))
        time.sleep(0.2)
    return view


def session_dirs(workspace: Path) -> set[Path]:
    return {p for p in workspace.iterdir() if p.is_dir()}


def current_run(client: Client) -> str:
    return client.predict(api_name="/list_runs")["value"]


@pytest.fixture(scope="module")
def trained(app, workspace, tmp_path_factory):
    """A session that uploaded four images and trained the tiny LoRA to the end."""
    tmp = tmp_path_factory.mktemp("trained")
    before = session_dirs(workspace)
    client = new_client(app[1], tmp)
    upload_images(client, make_images(tmp / "images", 4))
    view = poll_until(client, "Finished", "failed", view=start(client, **TINY_TRAINING))
    assert "Finished" in view["status"], view["status"]
    (session,) = session_dirs(workspace) - before
    return client, current_run(client), session / current_run(client)


# -- the whole flow ----------------------------------------------------------------------------------
def test_upload_caption_train_and_generate_end_to_end(url, workspace, tmp_path):
    client = new_client(url, tmp_path)
    images = make_images(tmp_path / "upload", 5)
    (images / "broken.png").write_bytes(b"this is not a png")
    (images / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (12, 12), "red").save(images / "tiny.png")
    before = session_dirs(workspace)

    # Upload: good images in, each bad file listed with its reason.
    report, gallery, cleared, picker = upload_images(client, images)
    assert "5 images added" in report
    for name, reason in [("broken.png", "damaged"), ("empty.jpg", "empty"), ("tiny.png", "small")]:
        line = next(line for line in report.splitlines() if name in line)
        assert reason in line.lower() or reason in report.lower()
    assert len(gallery) == 5 and all(Path(item["image"]).exists() for item in gallery)
    (session,) = session_dirs(workspace) - before
    run = session / picker["value"]
    dataset = run / "dataset"
    assert sorted(p.name for p in dataset.glob("*.png")) == [f"img{i:03d}.png" for i in range(5)]

    # Captions: a page lists every image with its caption and token count; edits land in the .txt files.
    page = client.predict(1, system.TINY_SD, "ohwx", api_name="/captions_page")
    while "loading the tokenizer" in page[1]:  # it loads in the background; a loaded machine takes a while
        page = client.predict(1, system.TINY_SD, "ohwx", api_name="/captions_page")
    names = [page[3 + 4 * i] for i in range(5)]
    assert names == [f"img{i:03d}.png" for i in range(5)]
    assert page[4] == "ohwx, stripes number 0"
    assert "tokens" in page[5]
    client.predict("img001.png", "ohwx, a striped card with blue bands", system.TINY_SD, "ohwx", api_name="/save_caption")
    assert (dataset / "img001.txt").read_text() == "ohwx, a striped card with blue bands"
    note = client.predict("img002.png", "a caption without the word", system.TINY_SD, "ohwx", api_name="/save_caption")
    assert "no trigger word" in note
    rambling = "ohwx, " + ", ".join(f"a red house number {i} by a lake" for i in range(15))
    note = client.predict("img003.png", rambling, system.TINY_SD, "ohwx", api_name="/save_caption")
    assert "too long" in note and "cut off" in note  # the tokenizer's warning, next to its caption
    client.predict("img003.png", "ohwx, stripes number 3", system.TINY_SD, "ohwx", api_name="/save_caption")
    changed = client.predict("stripes", "bands", False, api_name="/replace_all")
    assert changed.startswith("Replaced in 3 captions")  # img000, img003, img004
    assert (dataset / "img000.txt").read_text() == "ohwx, bands number 0"
    (dataset / "img004.txt").unlink()
    written = client.predict("ohwx", "trigger", "{trigger}, {caption}", "", False, "", api_name="/write_captions")
    assert written.startswith("1 captions written, 4 existing kept")
    assert (dataset / "img004.txt").read_text() == "ohwx"

    # Check: the plan, before any model loads.
    check = client.predict(**TINY_TRAINING, api_name="/check_run")
    assert "plan: 10 steps" in check and "estimated time: about" in check

    # Train: the trainer's events reach the page (loss, samples, files), and the run folder holds the results.
    started = start(client, **TINY_TRAINING)
    assert started["timer"]["active"] is True
    view = poll_until(client, "Finished", "failed", view=started)
    assert "Finished: step 10 / 10" in view["status"], view["status"]
    loss = view["loss"]["data"]
    assert [row[0] for row in loss if row[2] == "raw"] == list(range(1, 11))
    assert len([row for row in loss if row[2] == "smoothed"]) == 10
    captions = [item["caption"] for item in view["samples"]["value"]]
    assert captions[0].startswith("step 10 ·") and any(c.startswith("step 0 ·") for c in captions)
    downloaded = {Path(f).name: Path(f) for f in view["files"]}
    assert {"pytorch_lora_weights.safetensors", "stripes.safetensors", "lora_info.json"} <= set(downloaded)
    assert downloaded["stripes.safetensors"].stat().st_size > 1000
    assert downloaded["pytorch_lora_weights.safetensors"].read_bytes() == (run / "final/pytorch_lora_weights.safetensors").read_bytes()
    kinds = [json.loads(line)["type"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    assert kinds.count("step") == 10 and "sample" in kinds and "checkpoint" in kinds
    assert config_mod.load(run).data.resolution == 64  # the tiny model's size, whatever the form said
    assert settle(client, view)["timer"]["active"] is False and "Finished" in view["status"]

    # Generate: same seed, LoRA off and on; two strengths give two different images.
    lora = f"run:{current_run(client)}"
    pickers = client.predict("", "", "", api_name="/list_loras")
    assert lora in [value for _, value in pickers[0]["choices"]]

    def generate(strength: float) -> tuple[np.ndarray, np.ndarray]:
        off, on = client.predict(system.TINY_SD, "ohwx", "", 3, 2, 7.0, lora_1=lora, strength_1=strength, api_name="/generate")
        return np.asarray(Image.open(off)), np.asarray(Image.open(on))

    off_a, half = generate(0.5)
    off_b, full = generate(1.0)
    assert half.shape == (64, 64, 3)
    assert np.array_equal(off_a, off_b)  # the base image is reproducible
    assert not np.array_equal(half, full)
    assert not np.array_equal(off_a, full)


def test_a_zip_of_hundreds_of_images_is_unpacked_and_its_captions_paged(url, tmp_path):
    import zipfile

    client = new_client(url, tmp_path)
    folder = make_images(tmp_path / "many", 300, captions=False, sizes=((64, 64),))
    for i, path in enumerate(sorted(folder.iterdir())):  # make_images repeats patterns: make each one unique
        pixels = np.asarray(Image.open(path)).copy()
        pixels[0, 0] = (i % 256, i // 256, 7)
        Image.fromarray(pixels).save(path)
    archive = tmp_path / "dataset.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"photos/{path.name}")
        zf.writestr("photos/notes.txt", "not a caption of anything")
    report, gallery, _, _ = client.predict([handle_file(str(archive))], system.TINY_SD, api_name="/upload")
    assert "300 images added" in report and "notes.txt" in report
    assert len(gallery) == 300
    last = client.predict(25, system.TINY_SD, "ohwx", api_name="/captions_page")
    assert last[0] == 25 and "Page 25 of 25 · 300 images" in last[1]
    assert [last[3 + 4 * i] for i in range(12)] == [f"img{i:03d}.png" for i in range(288, 300)]
    beyond = client.predict(99, system.TINY_SD, "ohwx", api_name="/captions_page")
    assert beyond[0] == 25  # a page past the end shows the last one


def test_files_outside_the_served_folders_are_handed_out_as_copies(tmp_path, monkeypatch):
    from lora_trainer.ui.workspace import servable

    (tmp_path / "cwd").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    inside = tmp_path / "cwd" / "a.png"
    inside.write_bytes(b"x")
    assert servable(inside) == str(inside)
    persistent = tmp_path / "data" / "run" / "final" / "b.safetensors"  # e.g. /data on a Space
    persistent.parent.mkdir(parents=True)
    persistent.write_bytes(b"weights")
    copy = Path(servable(persistent))
    assert copy.is_relative_to(tmp_path / "tmp") and copy.name == "b.safetensors" and copy.read_bytes() == b"weights"


# -- sessions ------------------------------------------------------------------------------------------
def test_two_sessions_see_only_their_own_runs_and_files(trained, url, workspace, tmp_path):
    owner, owner_run, owner_dir = trained
    other = new_client(url, tmp_path)
    assert other.predict(api_name="/list_runs")["choices"] == []
    with pytest.raises(AppError, match="not in the list of choices|has no run"):
        other.predict(owner_run, api_name="/select_run")
    other.predict("", "", "", api_name="/list_loras")
    with pytest.raises(AppError, match="not in the list of choices|has no run"):
        other.predict(system.TINY_SD, "ohwx", "", 0, 2, 7.0, lora_1=f"run:{owner_run}", strength_1=1.0, api_name="/generate")

    upload_images(other, make_images(tmp_path / "other", 1))
    assert [c[1] for c in other.predict(api_name="/list_runs")["choices"]] != [owner_run]
    page = other.predict(1, system.TINY_SD, "ohwx", api_name="/captions_page")
    assert page[3] == "img000.png" and page[7] == ""  # one image: its own
    owner_caption = (owner_dir / "dataset" / "img000.txt").read_text()
    sneaky = f"../../{owner_dir.parent.name}/{owner_run}/dataset/img000.png"
    with pytest.raises(AppError, match="No image"):
        other.predict(sneaky, "stolen", system.TINY_SD, "ohwx", api_name="/save_caption")
    assert (owner_dir / "dataset" / "img000.txt").read_text() == owner_caption

    # The workspace is not served: a file's path is not a URL to it.
    for path in (owner_dir / "final" / "pytorch_lora_weights.safetensors", owner_dir / "dataset" / "img000.png"):
        assert httpx.get(f"{url}gradio_api/file={path}").status_code == 403
    view = other.predict(api_name="/poll")
    assert owner_run not in json.dumps(view)


def test_a_second_job_waits_in_line_stop_saves_and_resume_continues(url, workspace, tmp_path):
    first, second = new_client(url, tmp_path), new_client(url, tmp_path)
    upload_images(first, make_images(tmp_path / "a", 2))
    upload_images(second, make_images(tmp_path / "b", 2))
    long_run = {**TINY_TRAINING, "optim.steps": 5000, "sampling.every": 0, "output.save_every": 0}
    training = poll_until(first, "Training**: step", view=start(first, **long_run))
    assert "/ 5000" in training["status"]  # step events stream in while it trains

    assert "Waiting in line: number 1" in start(second, **TINY_TRAINING)["status"]
    assert "Ready" in start(second, "/stop_training")["status"]  # out of the line, nothing trained

    def stop() -> int:
        stopped = settle(first, poll_until(first, "Stopped at", "Finished", view=start(first, "/stop_training")))["status"]
        return int(stopped.split("Stopped at step ")[1].split(" ")[0])

    step = stop()
    assert 0 < step < 5000
    run = next(p for p in workspace.rglob(current_run(first)) if p.is_dir())
    assert (run / "checkpoints" / f"step-{step:06d}").is_dir()
    poll_until(first, "Training**: step", view=start(first, "/resume_training"))
    assert stop() > step  # it went on from the checkpoint, not from zero
    started = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if '"started"' in line]
    assert [e["resumed"] for e in started] == [False, True] and started[1]["step"] == step


def test_a_training_failure_shows_the_trainers_error_and_hint(url, tmp_path):
    client = new_client(url, tmp_path)
    upload_images(client, make_images(tmp_path / "images", 2))
    status = poll_until(client, "failed", "Finished", view=start(client, **{**TINY_TRAINING, "optim.mixed_precision": "fp16"}))["status"]
    assert "Training failed" in status
    assert "fp16" in status and "needs a CUDA GPU" in status  # the trainer's own error ...
    assert "What to do:" in status  # ... and its hint
    assert "exit status" not in status


def test_invalid_settings_are_refused_with_the_field_named_and_nothing_written(url, workspace, tmp_path):
    client = new_client(url, tmp_path)
    upload_images(client, make_images(tmp_path / "images", 2))
    with pytest.raises(AppError) as error:
        client.predict(**{**TINY_TRAINING, "output.name": "my lora!", "lora.targets": "custom"}, api_name="/start_training")
    assert "output.name" in str(error.value) and "lora.custom_targets" in str(error.value)  # every problem at once
    with pytest.raises(AppError, match="minimum"):  # gradio checks the control's own bounds first
        client.predict(**{**TINY_TRAINING, "lora.rank": 0}, api_name="/start_training")
    with pytest.raises(AppError, match="data.images"):
        client.predict(**{**TINY_TRAINING, "data.images": "../../elsewhere"}, api_name="/check_run")
    run = next(p for p in workspace.rglob(current_run(client)) if p.is_dir())
    assert not (run / "config.toml").exists()


def test_auto_captioning_without_model_weights_says_what_to_do_and_changes_nothing(url, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no weights here, and no network
    client = new_client(url, tmp_path)
    upload_images(client, make_images(tmp_path / "images", 2))
    with pytest.raises(AppError) as error:
        client.predict("ohwx", "sparse", "{trigger}, {caption}", "", True, "Salesforce/blip-image-captioning-base",
                       api_name="/write_captions")
    message = str(error.value)
    assert "Could not load the captioning model" in message and "Trigger only" in message
    assert "Traceback" not in message
    page = client.predict(1, system.TINY_SD, "ohwx", api_name="/captions_page")
    assert page[4] == "ohwx, stripes number 0"


def test_starting_without_images_says_to_upload_first(url, tmp_path):
    client = new_client(url, tmp_path)
    with pytest.raises(AppError, match="Upload tab"):
        client.predict(**TINY_TRAINING, api_name="/start_training")


def test_a_reloaded_page_takes_back_its_session_and_a_forged_one_gets_nothing(tmp_path, monkeypatch):
    from lora_trainer.ui.header import restore_session
    from lora_trainer.ui.live import full_view
    from lora_trainer.ui.workspace import Session

    monkeypatch.setenv("LORA_STUDIO_WORKSPACE", str(tmp_path))
    first_page = Session()
    run = first_page.run_dir(first_page.new_run())
    (run / "events.jsonl").write_text(
        json.dumps({"type": "started", "step": 0, "total_steps": 10}) + "\n"
        + json.dumps({"type": "step", "step": 3, "total_steps": 10, "loss": 0.5}) + "\n"
    )
    reloaded = Session()
    token, picker = restore_session(first_page.token, reloaded)  # what the page's load event does
    assert token == first_page.token and picker["value"] == run.name
    assert "Interrupted at step 3 / 10" in full_view(reloaded)[0]

    for forged in ("../" + run.parent.name, run.parent.name, None, 42):
        stranger = Session()
        token, picker = restore_session(forged, stranger)
        assert token != first_page.token and stranger.runs() == [] and picker["value"] is None


# -- generate: checkpoints, files, the Hub -------------------------------------------------------------
def test_checkpoint_grid_has_a_row_per_checkpoint_and_final(trained):
    client, _, _ = trained
    grid, rows = client.predict(system.TINY_SD, "ohwx\na house by a lake, ohwx", 1.0, 2, 0, api_name="/checkpoint_grid")
    cell = 3 * 64  # the 64 px renders enlarged to at least 160 px (pixels kept sharp), a label strip under each row
    assert Image.open(grid).size == (2 * cell, 18 + 3 * (cell + 30))  # two prompts x step-000005, step-000010, final
    assert "step-000005" in rows and "final" in rows


def test_an_uploaded_kohya_file_and_a_hub_lora_can_be_generated_with(trained, hub, tmp_path):
    client, _, run = trained
    client.predict("", "", "", api_name="/list_loras")
    note, _, *pickers = client.predict(handle_file(str(run / "final" / "stripes.safetensors")), api_name="/upload_lora")
    assert pickers[0]["value"] == "file:stripes.safetensors"
    off, on = client.predict(system.TINY_SD, "ohwx", "", 1, 2, 7.0, lora_1="file:stripes.safetensors", strength_1=1.0,
                             api_name="/generate")
    assert not np.array_equal(np.asarray(Image.open(off)), np.asarray(Image.open(on)))

    hub.add_repo("bob/stripes", {"pytorch_lora_weights.safetensors": (run / "final/pytorch_lora_weights.safetensors").read_bytes()})
    note, *pickers = client.predict("bob/stripes", api_name="/load_hub_lora")
    assert pickers[0]["value"] == "file:bob--stripes.safetensors"
    note, *pickers = client.predict("bob/missing", api_name="/load_hub_lora")  # said in the note, not as an error
    assert "Not loaded" in note and re.search("not found|does not exist|no repo|404|Repository", note)
    assert all(p == {"__type__": "update"} for p in pickers)


def test_a_safetensors_file_that_is_not_a_lora_is_refused_by_name(tmp_path):
    from safetensors.numpy import save_file

    from lora_trainer.errors import LoraStudioError
    from lora_trainer.ui.tabs.generate import check_lora_file

    cases = {
        "unet.safetensors": {"down_blocks.0.resnets.0.conv1.weight": np.zeros((4, 4), np.float32)},
        "empty.safetensors": {},
    }
    for name, tensors in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(LoraStudioError, match="not a LoRA"):
            check_lora_file(tmp_path / name)
    (tmp_path / "renamed.safetensors").write_bytes(b"a text file, renamed")
    with pytest.raises(LoraStudioError, match="not a readable .safetensors"):
        check_lora_file(tmp_path / "renamed.safetensors")
    for key in ("lora_unet_down_blocks_0.lora_down.weight", "unet.down_blocks.0.attn.to_q.lora_A.weight"):
        save_file({key: np.zeros((4, 4), np.float32)}, str(tmp_path / "lora.safetensors"))
        check_lora_file(tmp_path / "lora.safetensors")


def test_publish_pushes_the_run_to_the_hub_and_never_echoes_the_token(trained, hub, workspace):
    client, _, run = trained
    result = client.predict("stripes-lora", True, WRITE_TOKEN, api_name="/publish")
    assert "alice/stripes-lora" in result and WRITE_TOKEN not in result
    files = hub.repos["alice/stripes-lora"].files
    assert {"pytorch_lora_weights.safetensors", "stripes.safetensors", "README.md", "config.toml"} <= set(files)
    assert hub.repos["alice/stripes-lora"].private

    with pytest.raises(AppError) as error:
        client.predict("stripes-lora", True, "hf_wrongTOKENwrongTOKENwrong", api_name="/publish")
    assert "401" in str(error.value) and "hf_wrongTOKEN" not in str(error.value)
    secrets = (WRITE_TOKEN.encode(), b"hf_wrongTOKEN")
    assert not [p for p in workspace.rglob("*") if p.is_file() and any(s in p.read_bytes() for s in secrets)]


def test_publishing_with_no_token_anywhere_says_how_to_get_one(trained):
    client, _, _ = trained
    with pytest.raises(AppError, match="token"):
        client.predict("stripes-lora", True, "", api_name="/publish")


def test_publish_offers_the_evaluations_pick_first_and_publishes_the_chosen_checkpoint(trained, hub):
    import shutil

    from lora_trainer.evaluate import EvalSettings, Recommendation, Row, save_evaluation

    client, _, run = trained
    assert client.predict(api_name="/publish_checkpoints")["value"] == "final"  # not evaluated yet: only final/
    rows = [Row("base", 0, style=0.1, adherence=0.3, leak=0.1), Row("step-000005", 5, style=0.6, adherence=0.3, leak=0.1),
            Row("final", 10, style=0.7, adherence=0.1, leak=0.6)]
    save_evaluation(run, rows, Recommendation("step-000005", 5, "the most style that keeps the prompt", "clip", True),
                    EvalSettings(), [], 1.0)
    try:
        offered = client.predict(api_name="/publish_checkpoints")
        assert offered["value"] == "best"
        assert [label for label, _ in offered["choices"]] == ["Recommended by the evaluation: step 5 (best/)",
                                                               "The last step: step 10 (final/)"]
        assert "the most style that keeps the prompt" in offered["info"]

        result = client.predict("stripes-best", True, WRITE_TOKEN, "best", api_name="/publish")
        assert "recommended checkpoint" in result
        files = hub.repos["alice/stripes-best"].files
        checkpoint = run / "checkpoints/step-000005/pytorch_lora_weights.safetensors"
        assert files["pytorch_lora_weights.safetensors"] == checkpoint.read_bytes()
        assert "recommends: step 5 of 10" in files["README.md"].decode()

        client.predict("stripes-best", True, WRITE_TOKEN, "final", api_name="/publish")
        final = (run / "final/pytorch_lora_weights.safetensors").read_bytes()
        assert hub.repos["alice/stripes-best"].files["pytorch_lora_weights.safetensors"] == final
    finally:  # the shared trained run goes back to unevaluated for the tests after this one
        shutil.rmtree(run / "best", ignore_errors=True)
        (run / "evaluation.json").unlink(missing_ok=True)


# -- the page itself -------------------------------------------------------------------------------------
def test_every_config_field_has_a_control_with_its_own_help_text(app):
    demo, url = app
    fn = next(f for f in demo.fns.values() if f.api_name == "start_training")
    jobs_choice = {"where", "flavor", "timeout"}  # where to train (tests/test_jobs_ui.py), not config fields
    by_name = {name: component for name, component in zip(fn.input_parameter_names[1:], fn.inputs[1:], strict=True)
               if name not in jobs_choice}
    assert set(by_name) == set(config_mod.field_names())
    for dotted, component in by_name.items():
        info = config_mod.field_info(dotted)
        if dotted not in ("model.base", "data.trigger"):
            assert component.info.startswith(info["help"]), dotted
        if "choices" in info:
            assert component.get_config()["name"] in ("dropdown",), dotted
    assert by_name["lora.rank"].minimum == 1 and by_name["lora.rank"].maximum == 1024
    assert by_name["data.flip"].get_config()["name"] == "checkbox"
    assert by_name["sampling.prompts"].get_config()["name"] == "textbox"


@pytest.mark.parametrize(("gpu", "toy_base", "expected"), [
    ("0", True, system.TOY),  # the toy world's base learns on a CPU
    ("0", False, system.TINY_SD),  # an install without it: the random tiny model
    ("1", True, system.SD15),
])
def test_the_default_base_suits_the_machine_and_the_page_says_why(gpu, toy_base, expected, monkeypatch, tmp_path):
    index = tmp_path / "toyworld" / "base" / "model_index.json"
    if toy_base:
        index.parent.mkdir(parents=True)
        index.write_text("{}")
    monkeypatch.setattr(system, "TOY_BASE_INDEX", index)
    monkeypatch.setenv("LORA_STUDIO_GPU", gpu)
    monkeypatch.delenv("SPACE_ID", raising=False)
    system.has_gpu.cache_clear()
    try:
        assert system.default_base() == expected
        assert (system.TOY in [v for _, v in system.base_choices()]) == toy_base
        notice = system.hardware_notice()
        assert notice == "" if gpu == "1" else "need an NVIDIA GPU" in notice and ("toy world" in notice) == toy_base
        resolution = presets.settings("Style", expected)["data.resolution"]
        assert resolution == {system.TOY: 32, system.TINY_SD: 64, system.SD15: 512}[expected]
    finally:
        system.has_gpu.cache_clear()


def test_the_example_set_is_one_click_away_and_arrives_with_its_captions(app, tmp_path, monkeypatch):
    example = tmp_path / "toy-style"
    make_images(example, 3, sizes=((32, 32),))  # the toy world's size: below the intake's usual 64 px floor
    monkeypatch.setattr(system, "EXAMPLE_DATASET", example)
    client = new_client(app[1], tmp_path)
    report, gallery, _, picker = client.predict(system.TOY, api_name="/use_example")
    assert "3 images added (3 with captions)" in report and len(gallery) == 3
    page = client.predict(1, system.TINY_SD, "ohwx", api_name="/captions_page")
    assert [page[3 + 4 * i] for i in range(3)] == ["img000.png", "img001.png", "img002.png"]
    assert page[4] == "ohwx, stripes number 0"

    monkeypatch.setattr(system, "EXAMPLE_DATASET", tmp_path / "absent")
    with pytest.raises(AppError, match="no example images"):
        client.predict(system.TOY, api_name="/use_example")


def test_the_example_button_shows_only_where_the_example_set_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_STUDIO_WORKSPACE", str(tmp_path / "ws"))
    for present in (True, False):
        folder = tmp_path / ("here" if present else "absent")
        if present:
            make_images(folder, 1)
        monkeypatch.setattr(system, "EXAMPLE_DATASET", folder)
        demo = build_app()
        button = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "use-example")
        assert button.parent.visible is present


def test_a_finished_dora_run_tells_a1111_users_not_to_use_it_on_train_and_publish(url, hub, tmp_path):
    client = new_client(url, tmp_path)
    upload_images(client, make_images(tmp_path / "images", 2))
    short = {**TINY_TRAINING, "optim.steps": 2, "sampling.every": 0, "output.save_every": 0, "lora.use_dora": True}
    view = poll_until(client, "Finished", "failed", view=start(client, **short))
    assert "Finished" in view["status"] and "not for A1111" in view["status"] and "ComfyUI" in view["status"]
    result = client.predict("stripes-dora", True, WRITE_TOKEN, api_name="/publish")
    assert "Published" in result and "not for A1111" in result


def test_a_plain_lora_has_no_a1111_warning(trained):
    from lora_trainer.ui.live import status_markdown
    from lora_trainer.ui.monitor import RunMonitor, Status

    monitor = RunMonitor(trained[2])
    monitor.update()
    shown = status_markdown(monitor, Status("finished"))
    assert "Finished" in shown and "A1111" not in shown


def test_a_shared_space_without_a_gpu_offers_to_duplicate_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_STUDIO_WORKSPACE", str(tmp_path))
    monkeypatch.setenv("LORA_STUDIO_GPU", "0")
    monkeypatch.setenv("SPACE_ID", "someone/lora-studio")
    system.has_gpu.cache_clear()
    try:
        demo = build_app()
    finally:
        system.has_gpu.cache_clear()
    components = demo.get_config_file()["components"]
    duplicate = next(c for c in components if c["props"].get("value") == "Duplicate this Space")
    assert isinstance(demo.blocks[duplicate["id"]], gr.DuplicateButton)
    assert any(c["type"] == "markdown" and "This Space has no GPU" in str(c["props"].get("value")) for c in components)


def test_the_ui_imports_no_torch_diffusers_or_transformers_at_startup(tmp_path):
    code = ("import sys, lora_trainer.ui as ui; ui.build_app(); "
            "print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])")
    env = {**os.environ, "LORA_STUDIO_WORKSPACE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True, env=env)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_a_run_continues_from_checkpoints_pushed_to_the_hub_in_a_fresh_session(trained, hub, url, workspace, tmp_path, monkeypatch):
    from lora_trainer.checkpoints import latest_checkpoint
    from lora_trainer.events import read_events
    from lora_trainer.hub.checkpoints import push_checkpoint

    _, _, run = trained
    push_checkpoint(run, latest_checkpoint(run), "alice/stripes-ckpts", token=WRITE_TOKEN, endpoint=hub.url)
    monkeypatch.setenv("HF_TOKEN", WRITE_TOKEN)  # this machine's token (off a Space) reads the private repo

    before = session_dirs(workspace)
    client = new_client(url, tmp_path)  # a fresh browser session
    view = merge({}, client.predict("alice/stripes-ckpts", api_name="/continue_from_hub"))
    view = poll_until(client, "Finished", "failed", view=view)
    assert "Finished" in view["status"], view["status"]
    (session,) = session_dirs(workspace) - before
    fresh = session / current_run(client)
    assert fresh != run and (fresh / "final" / "pytorch_lora_weights.safetensors").exists()
    assert sorted(p.name for p in (fresh / "dataset").iterdir()) == sorted(p.name for p in (run / "dataset").iterdir())
    started = [e for e in read_events(fresh / "events.jsonl")[0] if e["type"] == "started"]
    assert started[0]["resumed"]

    with pytest.raises(AppError, match="holds no checkpoint|was not found"):
        client.predict("alice/stripes-lora-nothing-here", api_name="/continue_from_hub")
    assert current_run(client) == fresh.name  # a failed fetch leaves the session where it was


# -- sign-in on a Space ------------------------------------------------------------------------------------
class _HubSignIn:
    """huggingface.co's sign-in side, just enough for gradio: the OpenID discovery document (a Space's real
    OAuth) and whoami (gradio's mock OAuth off a Space asks whoami for the signed-in developer)."""

    def __enter__(self):
        import http.server
        import threading

        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                answers = {
                    "/.well-known/openid-configuration": {
                        "issuer": site.url, "authorization_endpoint": f"{site.url}/oauth/authorize",
                        "token_endpoint": f"{site.url}/oauth/token"},
                    "/api/whoami-v2": {"type": "user", "name": "alice", "fullname": "Alice", "avatarUrl": "",
                                       "orgs": [], "auth": {"type": "access_token", "accessToken": {"role": "write"}}},
                }
                body = json.dumps(answers.get(self.path, {})).encode()
                self.send_response(200 if self.path in answers else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def _readme_scopes() -> str:
    import yaml

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    return " ".join(["openid", "profile", *yaml.safe_load(readme.split("---")[1])["hf_oauth_scopes"]])


def _start_app_py_and_sign_in(tmp_path: Path, where: str, scopes: str, **extra_env: str) -> tuple[dict, httpx.URL]:
    """Start app.py with what a Space sets when the README enables hf_oauth (OAUTH_SCOPES: `scopes`), press sign-in;
    returns the page's /config and where sign-in redirects to. `where`: "space" (SYSTEM=spaces) or "local"."""
    port = _free_port()
    with _HubSignIn() as hf:
        env = {**os.environ, "SPACE_ID": "someone/lora-studio", "OAUTH_CLIENT_ID": "client-id",
               "OAUTH_CLIENT_SECRET": "client-secret", "OAUTH_SCOPES": scopes, "OPENID_PROVIDER_URL": hf.url,
               "GRADIO_SERVER_PORT": str(port), "LORA_STUDIO_WORKSPACE": str(tmp_path / "ws"), "LORA_STUDIO_GPU": "0",
               "HF_ENDPOINT": hf.url, "HF_TOKEN": "hf_theDevelopersOwnToken", "HF_HUB_OFFLINE": "0",
               "PYTHONPATH": str(Path(__file__).resolve().parent.parent), **extra_env}
        if where == "space":
            env["SYSTEM"] = "spaces"
        else:
            env.pop("SYSTEM", None)
        app_py = Path(__file__).resolve().parent.parent / "app.py"
        proc = subprocess.Popen([sys.executable, "-c", APP_PY.format(path=str(app_py))], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            while True:  # until it answers, or exits (the failure this test is about)
                if proc.poll() is not None:
                    raise AssertionError(f"app.py exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
                try:
                    config = httpx.get(f"{url}/config", timeout=5).json()
                    break
                except httpx.HTTPError:
                    time.sleep(0.2)
            login = httpx.get(f"{url}/login/huggingface", follow_redirects=False, timeout=30)
            assert login.status_code in (302, 307), login.text[:500]
            target = httpx.URL(login.headers["location"])
            if where == "space":
                assert str(target).startswith(f"{hf.url}/oauth/authorize")
            return config, target
        finally:
            proc.terminate()
            proc.wait(30)


@pytest.mark.parametrize("where", ["space", "local"])
def test_app_py_starts_with_the_spaces_sign_in_variables_and_offers_sign_in(where, tmp_path):
    """What a Space sets when the README enables hf_oauth. On a Space (SYSTEM=spaces) gradio signs in through
    huggingface.co with the README's scopes; elsewhere it mocks sign-in with the developer's own login."""
    scopes = _readme_scopes()
    config, target = _start_app_py_and_sign_in(tmp_path, where, scopes)
    buttons = [c["props"] for c in config["components"] if c["props"].get("variant") == "huggingface"]
    assert "Sign in with Hugging Face" in [b["value"] for b in buttons]  # gr.LoginButton (and DuplicateButton)
    if where == "space":
        assert target.params["scope"] == scopes
    else:
        assert target.path == "/login/callback"


def _by_elem_id(config: dict, elem_id: str) -> dict:
    return next(c["props"] for c in config["components"] if c["props"].get("elem_id") == elem_id)


@pytest.mark.parametrize(("jobs", "readme_lists_jobs", "asked", "offered"), [
    ("1", True, True, True),     # Jobs on, the README allows the scope: sign-in asks for it
    ("", True, False, False),    # Jobs off: never asked for, even where the README allows it
    ("1", False, False, False),  # Jobs on, the README lacks it (the Hub would refuse it): a line says what to add
])
def test_sign_in_asks_for_the_jobs_scope_only_where_the_train_tab_offers_jobs(tmp_path, jobs, readme_lists_jobs, asked, offered):
    readme = _readme_scopes() + (" jobs" if readme_lists_jobs else "")
    config, target = _start_app_py_and_sign_in(tmp_path, "space", readme, LORA_STUDIO_JOBS=jobs)
    assert target.params["scope"].split() == [s for s in readme.split() if s != "jobs" or asked]
    assert _by_elem_id(config, "jobs-controls")["visible"] is offered
    notice = _by_elem_id(config, "jobs-scope-missing")
    assert notice["visible"] is (jobs == "1" and not readme_lists_jobs)
    assert "add `- jobs` under `hf_oauth_scopes` in the Space's README.md" in notice["value"]


def test_sign_in_asks_for_no_more_than_creating_and_writing_your_own_repos():
    assert _readme_scopes().split() == ["openid", "profile", "write-repos", "contribute-repos"]


@pytest.mark.parametrize(("message", "shown"), [
    ("Push to 'alice/<name>' instead", "Push to 'alice/&lt;name&gt;' instead"),  # an unknown tag would vanish
    ("a <script>alert(1)</script> & more", "a &lt;script&gt;alert(1)&lt;/script&gt; &amp; more"),
    ("Press **Resume** to continue", "Press <strong>Resume</strong> to continue"),
    ("invalid settings:\n  - lora.rank", "invalid settings:<br>  - lora.rank"),
])
def test_every_toast_message_is_escaped_once_in_one_place(message, shown):
    from lora_trainer.errors import LoraStudioError
    from lora_trainer.ui.common import toast_html, user_errors

    assert toast_html(message) == shown

    @user_errors
    def inner():
        raise gr.Error(message)

    @user_errors
    def outer():
        inner()  # a handler calling a handler: escaped once, not twice

    @user_errors
    def engine():
        raise LoraStudioError(message)

    for handler in (outer, engine):
        with pytest.raises(gr.Error) as error:
            handler()
        assert error.value.message == shown
