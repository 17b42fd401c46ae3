"""Upload: images or a zip in, the intake report (what was left out and why) and thumbnails out."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ... import intake
from ...errors import DatasetError
from ...models import native_resolution
from .. import system
from ..common import Shared, code, md_escape, user_errors
from ..header import run_picker
from ..workspace import Session, thumbnail

MAX_LISTED = 8  # files listed per reason; the rest are counted


def build(shared: Shared) -> None:
    with gr.Tab("1 · Upload", id="upload"):
        gr.Markdown(
            "Drop images (PNG, JPEG, WebP, ...) or a **.zip** of them. Captions come along when they sit next to "
            "their image as a same-named `.txt` file (or in a `metadata.jsonl`). Anything unusable is left out "
            "and listed below with the reason. Uploading again adds to this run's images."
        )
        files = gr.File(file_count="multiple", label="Images or a zip", height=140, elem_id="upload-files")
        example = system.example_dataset()
        with gr.Row(visible=example is not None):
            use_example = gr.Button("No images at hand? Use the example set (toy world style, with captions)",
                                    size="sm", variant="secondary", elem_id="use-example")
        report = gr.Markdown(elem_classes=["report"], elem_id="upload-report")
        gallery = gr.Gallery(label="Images in this run", columns=8, height=420, object_fit="cover", allow_preview=True)
        with gr.Row():
            selected = gr.Textbox(label="Selected image", interactive=False, scale=3, placeholder="click an image above")
            remove = gr.Button("Remove selected image", variant="secondary", scale=1)

    upload = files.upload(
        add_files, [shared.session, files, shared.base], [report, gallery, files, shared.run], api_name="upload",
        concurrency_limit=2,
    )
    shared.then_refresh(upload)
    shared.then_refresh(use_example.click(add_example, [shared.session, shared.base], [report, gallery, files, shared.run],
                                          api_name="use_example"))
    gallery.select(pick_image, None, [selected], api_visibility="private", show_progress="hidden")
    remove.click(remove_image, [shared.session, selected], [report, gallery, selected], api_name="remove_image")
    shared.on_run_change(refresh, [shared.session], [gallery])


def gallery_items(session: Session) -> list[tuple[str, str]]:
    run = session.current()
    if run is None:
        return []
    dataset = run / "dataset"
    return [(thumbnail(image, run), image.relative_to(dataset).as_posix()) for image in intake.iter_images(dataset)]


@user_errors
def add_files(session: Session, files: list[str] | None, base: str, progress=gr.Progress()) -> tuple:
    if not files:
        raise gr.Error("No files arrived. Drop images or a .zip onto the box, or click it to choose files.")
    return _ingest(session, [Path(f) for f in files], base, progress)


@user_errors
def add_example(session: Session, base: str, progress=gr.Progress()) -> tuple:
    """The bundled example images and their captions into the current run, as if uploaded."""
    example = system.example_dataset()
    if example is None:
        raise gr.Error("This installation has no example images; upload your own.")
    return _ingest(session, sorted(p for p in example.iterdir() if p.is_file()), base, progress)


def _ingest(session: Session, sources: list[Path], base: str, progress) -> tuple:
    """Sources through the intake into the current run: the report, the gallery, an emptied upload box, the picker."""
    dataset = session.dataset_dir(create=True)
    resolution = native_resolution(base)  # intake refuses images under half of it (at most 64 px)

    def step(done: int, total: int) -> None:
        progress((done, total), desc="Adding images", unit="files")

    try:
        report = intake.ingest(sources, dataset, resolution=resolution, progress=step)
    except DatasetError as e:
        report = getattr(e, "report", None)
        if report is None:
            raise
        return (f"### Nothing could be used\n{md_escape(e)}\n\n" + format_report(report, headline=False),
                gallery_items(session), None, run_picker(session))
    return format_report(report), gallery_items(session), None, run_picker(session)


def format_report(report: intake.IntakeReport, *, headline: bool = True) -> str:
    """The intake report as Markdown: the count, then each reason with the files it concerns."""
    lines = []
    if headline:
        total = sum(report.dest_counts.values())
        lines.append(f"### {len(report.images)} image{'s' * (len(report.images) != 1)} added "
                     f"({report.captions_found} with captions) · {total} in this run")
    if report.skipped:
        lines.append(f"**Left out {len(report.skipped)} file{'s' * (len(report.skipped) != 1)}:**")
        for kind, items in report.skipped_by_kind().items():
            lines.append(f"- **{md_escape(intake.SKIP_KINDS.get(kind, kind))}** ({len(items)})")
            lines += [f"    - {code(s.source)}: {md_escape(s.reason)}" for s in items[:MAX_LISTED]]
            if len(items) > MAX_LISTED:
                lines.append(f"    - ... and {len(items) - MAX_LISTED} more")
    if report.warnings:
        lines.append(f"**{len(report.warnings)} warning{'s' * (len(report.warnings) != 1)}** (these images are kept):")
        lines += [f"- {code(w.source)}: {md_escape(w.message)}" for w in report.warnings[: MAX_LISTED * 2]]
        if len(report.warnings) > MAX_LISTED * 2:
            lines.append(f"- ... and {len(report.warnings) - MAX_LISTED * 2} more")
    if report.config_overrides:
        settings = ", ".join(f"{code(k)} = {code(v)}" for k, v in report.config_overrides.items())
        lines.append(f"**Settings in the uploaded dataset.toml** (set them on the Train tab if you want them): {settings}")
    return "\n".join(lines)


def pick_image(evt: gr.SelectData) -> str:
    value = evt.value if isinstance(evt.value, dict) else {}
    return value.get("caption") or ""


@user_errors
def remove_image(session: Session, relative: str) -> tuple:
    if not relative:
        raise gr.Error("Click an image in the gallery first, then remove it.")
    image = session.dataset_image(relative)
    image.unlink()
    intake.caption_path(image).unlink(missing_ok=True)
    return f"Removed {code(relative)} and its caption.", gallery_items(session), ""


def refresh(session: Session) -> list:
    return gallery_items(session)
