"""Captions: the trigger word, auto-captioning (BLIP, Florence-2 or Qwen-VL; stoppable), every image with its
editable caption (paginated), bulk find/replace, and the tokenizer's warnings next to the caption they concern."""

from __future__ import annotations

import math
import threading

import gradio as gr

from ... import captioners, captioning, intake, trigger
from ...errors import LoraStudioError
from .. import fields
from ..common import Shared, code, md_escape, user_errors
from ..workspace import Session, thumbnail

PAGE_SIZE = 12
COLUMNS = 4
STYLE_CHOICES = [
    ("Sparse: subject only, style words removed", "sparse"),
    ("Full: everything the captioner says", "full"),
    ("Trigger only: just the trigger word (no model needed)", "trigger"),
]
CAPTIONER_CHOICES = [(info.label, kind) for kind, info in captioners.CAPTIONERS.items()]
DETAIL_CHOICES = [("Short: a phrase", "short"), ("Detailed: a sentence or two", "detailed"),
                  ("Paragraph: often past CLIP's 77 tokens", "paragraph")]


class Slot:
    """One image card on a caption page."""

    def __init__(self) -> None:
        with gr.Column(min_width=200, elem_classes=["caption-card"]) as self.card:
            self.image = gr.Image(show_label=False, interactive=False, height=150, container=False,
                                  buttons=[], elem_classes=["caption-thumb"])
            # The file this card edits, sent with every save. Shown (read-only): the page drops the value of a
            # hidden component, and the name is worth seeing anyway.
            self.name = gr.Textbox(interactive=False, show_label=False, container=False, max_lines=1,
                                   elem_classes=["caption-name"])
            self.text = gr.Textbox(show_label=False, lines=2, max_lines=6, placeholder="caption (empty = trigger word alone)",
                                   elem_classes=["caption-text"])
            self.note = gr.Markdown(elem_classes=["caption-note"])


def build(shared: Shared) -> None:
    with gr.Tab("2 · Captions", id="captions"):
        with gr.Row(equal_height=False):
            trigger_box = fields.control("data.trigger", label="Trigger word", scale=1)
            style = gr.Dropdown(STYLE_CHOICES, value="sparse", label="Caption style", scale=2,
                                info="How new captions are written. Captions you already have are kept unless you tick Replace.")
            captioner = gr.Dropdown(CAPTIONER_CHOICES, value="blip", label="Captioner", scale=2,
                                    info=captioner_info("blip"), elem_id="captioner")
        trigger_note = gr.Markdown(elem_classes=["caption-note"])
        with gr.Accordion("Caption options", open=False):
            with gr.Row():
                template = gr.Textbox(captioning.DEFAULT_TEMPLATE, label="Template", info="Where the trigger word goes: {trigger} and {caption}.")
                suffix = gr.Textbox("", label="Suffix", info="Added to every new caption, e.g. 'in the style of {trigger}'.")
            with gr.Row():
                overwrite = gr.Checkbox(False, label="Replace existing captions")
                model = gr.Textbox(captioners.CAPTIONERS["blip"].model, label="Captioning model", info=model_info("blip"),
                                   elem_id="caption-model")
            with gr.Row():
                detail = gr.Dropdown(DETAIL_CHOICES, value="short", label="Florence-2 caption", visible=False,
                                     info="Florence-2's own caption tasks.", elem_id="caption-detail")
                instruction = gr.Textbox(captioners.DEFAULT_INSTRUCTION, label="Qwen-VL instruction", lines=2,
                                         visible=False, elem_id="caption-instruction",
                                         info="What Qwen-VL is asked about each image. Leave the style to the trigger word.")
        with gr.Row():
            write = gr.Button("Write captions", variant="primary", scale=3, elem_id="write-captions")
            stop = gr.Button("Stop", variant="stop", scale=1, min_width=100, elem_id="stop-captions")
        status = gr.Markdown()
        with gr.Accordion("Edit all captions", open=False):
            with gr.Row(equal_height=True):
                find = gr.Textbox(label="Find", scale=2)
                replace_with = gr.Textbox(label="Replace with", scale=2)
                regex = gr.Checkbox(False, label="Regular expression", scale=1)
                replace_btn = gr.Button("Replace in all", scale=1)
            with gr.Row(equal_height=True):
                affix = gr.Textbox(label="Text", scale=4, placeholder="e.g. the trigger word, or 'in the style of ohwx'")
                prepend_btn = gr.Button("Add to the start of all", scale=1)
                append_btn = gr.Button("Add to the end of all", scale=1)
        with gr.Row(equal_height=True, elem_classes=["pager"]):
            prev_btn = gr.Button("◀ Previous", size="sm", scale=0, min_width=110)
            page = gr.Number(1, precision=0, minimum=1, show_label=False, container=False, scale=0, min_width=70)
            page_info = gr.Markdown(scale=1)
            next_btn = gr.Button("Next ▶", size="sm", scale=0, min_width=110)
        slots: list[Slot] = []
        for _ in range(PAGE_SIZE // COLUMNS):
            with gr.Row(equal_height=False):
                slots += [Slot() for _ in range(COLUMNS)]
        gr.Markdown("Captions save when you leave the box. Token counts use the base model's tokenizer: "
                    f"CLIP reads {trigger.CAPTION_TOKEN_LIMIT} tokens, the rest is cut off.", elem_classes=["caption-note"])

    shared.trigger, shared.caption_style = trigger_box, style
    session, base = shared.session, shared.base
    page_outputs = [page, page_info] + [c for s in slots for c in (s.card, s.image, s.name, s.text, s.note)]

    def show_page(event, fn, inputs, **kw):
        return event(fn, [session, *inputs, base, trigger_box], page_outputs, **kw)

    show_page(page.submit, captions_page, [page], api_name="captions_page")
    show_page(prev_btn.click, lambda s, p, b, t: captions_page(s, (p or 1) - 1, b, t), [page], api_visibility="private")
    show_page(next_btn.click, lambda s, p, b, t: captions_page(s, (p or 1) + 1, b, t), [page], api_visibility="private")

    captioner.input(choose_captioner, [captioner], [captioner, model, detail, instruction], show_progress="hidden",
                     api_visibility="private")
    # the captioner's settings come last, so API calls made before they existed still work
    write.click(write_captions, [session, trigger_box, style, template, suffix, overwrite, model, captioner, detail,
                                 instruction], [status],
                api_name="write_captions").then(captions_page, [session, page, base, trigger_box], page_outputs,
                                                  api_visibility="private")
    stop.click(stop_captions, [session], None, concurrency_limit=None, show_progress="hidden", api_name="stop_captions")
    for button, fn, inputs in (
        (replace_btn, replace_all, [find, replace_with, regex]),
        (prepend_btn, prepend_all, [affix]),
        (append_btn, append_all, [affix]),
    ):
        button.click(fn, [session, *inputs], [status], api_name=fn.__name__).then(
            captions_page, [session, page, base, trigger_box], page_outputs, api_visibility="private")

    for i, slot in enumerate(slots):
        # One public endpoint is enough for API clients: every card saves the same way.
        visibility = {"api_name": "save_caption"} if i == 0 else {"api_visibility": "private"}
        for event in (slot.text.blur, slot.text.submit):
            event(save_caption, [session, slot.name, slot.text, base, trigger_box], [slot.note],
                  show_progress="hidden", trigger_mode="always_last", **visibility)
            visibility = {"api_visibility": "private"}
    for event in (trigger_box.blur, trigger_box.submit):
        event(check_trigger, [trigger_box, base], [trigger_note], show_progress="hidden", api_visibility="private")
    base.input(check_trigger, [trigger_box, base], [trigger_note], show_progress="hidden", api_visibility="private")
    shared.on_run_change(captions_page, [session, page, base, trigger_box], page_outputs)
    shared.on_run_change(check_trigger, [trigger_box, base], [trigger_note])


# -- the tokenizer, loaded in the background (a Hub id offline can take half a minute to fail) -----------
_TOKENIZERS: dict[str, object] = {}
_LOADING: dict[str, threading.Event] = {}
_LOCK = threading.Lock()


def tokenizer_for(base: str, wait: float = 3.0):
    """The base model's tokenizer, an error message if it cannot be loaded, or None while it still loads.

    Loading runs in a thread and is waited for `wait` seconds at most: a Hub id on a machine without
    network takes half a minute to fail, and the captions must not wait for that.
    """
    base = (base or "").strip()
    with _LOCK:
        if base in _TOKENIZERS:
            return _TOKENIZERS[base]
        done = _LOADING.get(base)
        if done is None:
            done = _LOADING[base] = threading.Event()
            threading.Thread(target=_load_tokenizer, args=(base, done), daemon=True).start()
    done.wait(wait)
    with _LOCK:
        return _TOKENIZERS.get(base)


def _load_tokenizer(base: str, done: threading.Event) -> None:
    from ...models import load_tokenizer

    try:
        result = load_tokenizer(base)
    except LoraStudioError as e:
        result = f"Token counts are unavailable: {e}"
    except Exception as e:  # noqa: BLE001 - the checks are advice; their absence must not break the tab
        result = f"Token counts are unavailable ({type(e).__name__})."
    with _LOCK:
        _TOKENIZERS[base] = result
        _LOADING.pop(base, None)
    done.set()


def caption_note(caption: str, trigger_word: str, tokenizer) -> str:
    notes = []
    if not caption:
        notes.append("no caption: trains with the trigger word alone")
    elif trigger_word.strip() and trigger_word.strip().lower() not in caption.lower():
        notes.append(f"⚠️ no trigger word {code(trigger_word.strip())}: this image will not teach it")
    if tokenizer is not None and not isinstance(tokenizer, str) and caption:
        length = trigger.caption_length(caption, tokenizer)
        notes.append(("⚠️ " if length.too_long else "") + md_escape(length.message()))
    return " · ".join(notes)


# -- handlers ---------------------------------------------------------------------------------------------
@user_errors
def captions_page(session: Session, page: float | None, base: str, trigger_word: str) -> list:
    run = session.current()
    entries = intake.scan_captions(run / "dataset") if run else []
    pages = max(1, math.ceil(len(entries) / PAGE_SIZE))
    page = min(max(1, int(page or 1)), pages)
    tokenizer = tokenizer_for(base) if entries else None
    shown = entries[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]
    info = f"Page {page} of {pages} · {len(entries)} images" if entries else "No images yet: add some on the Upload tab."
    if isinstance(tokenizer, str):
        info += f"  \n{md_escape(tokenizer)}"
    elif tokenizer is None and entries:
        info += " · loading the tokenizer for token counts…"
    out: list = [page, info]
    for i in range(PAGE_SIZE):
        if i < len(shown):
            entry = shown[i]
            out += [
                gr.update(visible=True),
                thumbnail(entry.image, run),
                entry.image.relative_to(run / "dataset").as_posix(),
                entry.caption,
                caption_note(entry.caption, trigger_word or "", tokenizer),
            ]
        else:
            out += [gr.update(visible=False), None, "", "", ""]
    return out


@user_errors
def save_caption(session: Session, name: str, text: str, base: str, trigger_word: str) -> str:
    if not name:
        gr.Warning("The page was still loading, so this caption was not saved: type it again.")
        return gr.skip()
    image = session.dataset_image(name)
    intake.write_caption(image, text or "")
    return caption_note(intake.read_caption_file(image), trigger_word or "", tokenizer_for(base))


def check_trigger(trigger_word: str, base: str) -> str:
    tokenizer = tokenizer_for(base)
    if tokenizer is None or isinstance(tokenizer, str):
        return ""
    analysis = trigger.analyse_trigger(trigger_word or "", tokenizer)
    if analysis.ok:
        return f"Trigger word {code(analysis.word)} → {len(analysis.tokens)} token(s): " + " ".join(code(t) for t in analysis.tokens)
    text = "⚠️ " + "; ".join(md_escape(w) for w in analysis.warnings)
    if analysis.suggestions:
        text += ". Try: " + ", ".join(code(s) for s in analysis.suggestions)
    return text


def captioner_info(kind: str) -> str:
    info = captioners.CAPTIONERS[kind]
    return f"{info.choose[0].upper()}{info.choose[1:]} ({info.size})."


def model_info(kind: str) -> str:
    info = captioners.CAPTIONERS[kind]
    return f"{info.label}: a Hub id or a local folder; {info.light} is lighter."


def choose_captioner(kind: str) -> tuple:
    kind = kind if kind in captioners.CAPTIONERS else "blip"
    return (gr.update(info=captioner_info(kind)),
            gr.update(value=captioners.CAPTIONERS[kind].model, info=model_info(kind)),
            gr.update(visible=kind == "florence2"), gr.update(visible=kind == "qwen-vl"))


_STOPS: dict[str, threading.Event] = {}  # dataset folder -> the Stop button's flag while it is being captioned


@user_errors
def write_captions(session: Session, trigger_word: str, style: str, template: str, suffix: str, overwrite: bool,
                   model: str, captioner: str = "blip", detail: str = "short",
                   instruction: str = captioners.DEFAULT_INSTRUCTION, progress=gr.Progress()) -> str:
    dataset = session.dataset_dir()
    if dataset is None:
        raise gr.Error("No images yet: add some on the Upload tab first.")
    kind = captioner or "blip"
    info = captioners.check_kind(kind)
    stop = _STOPS[str(dataset)] = threading.Event()
    try:
        model_captioner = None
        if style != "trigger":
            options = captioners.captioner_options(kind, detail=detail, instruction=instruction)
            model_captioner = _load(kind, (model or "").strip() or info.model, options, progress)
        if stop.is_set():
            return "Stopped before captioning: nothing was written."

        def step(done: int, total: int) -> None:
            progress((done, max(total, 1)), desc=f"Writing captions ({info.label})" if model_captioner else
                     "Writing captions", unit="images")

        result = captioning.caption_folder(
            dataset, model_captioner, trigger=trigger_word or "", style=style,
            template=template or captioning.DEFAULT_TEMPLATE, suffix=suffix or "", overwrite=bool(overwrite),
            progress=step, should_stop=stop.is_set,
        )
    finally:
        if _STOPS.get(str(dataset)) is stop:
            del _STOPS[str(dataset)]
    if result.left:
        return md_escape(result.summary()) + ". *Write captions* again continues with the rest (existing captions are kept)."
    note = "" if overwrite or not result.kept else " Tick *Replace existing captions* (Caption options) to rewrite those too."
    return md_escape(result.summary()) + "." + note


def _load(kind: str, model: str, options: dict, progress) -> captioners.ModelCaptioner:
    info = captioners.CAPTIONERS[kind]
    if not captioners.is_loaded(kind, model):
        progress(None, desc=f"Loading the captioning model {model} (the first time takes a while)…")
    try:
        return captioning.shared_captioner(kind, model, **options)
    except LoraStudioError as e:
        raise gr.Error(
            f"{str(e).rstrip('.')}.\n\nAuto-captioning needs the {info.label} model's weights. Without them, choose another captioner, "
            "the caption style 'Trigger only', or type captions below. Nothing was changed.",
            duration=None, print_exception=False,
        ) from None


def stop_captions(session: Session) -> None:
    """Stop auto-captioning this run after the current batch; what was written stays."""
    dataset = session.dataset_dir()
    stop = _STOPS.get(str(dataset)) if dataset is not None else None
    if stop is None:
        gr.Info("Nothing is being captioned.")
        return
    stop.set()
    gr.Info("Stopping after the current batch; the captions written so far are kept.")


@user_errors
def replace_all(session: Session, find: str, replace_with: str, regex: bool) -> str:
    changed = captioning.replace_in_captions(_dataset(session), find or "", replace_with or "", regex=bool(regex))
    return f"Replaced in {changed} caption{'s' * (changed != 1)}."


@user_errors
def prepend_all(session: Session, text: str) -> str:
    if not (text or "").strip():
        raise gr.Error("Type the text to add first.")
    changed = captioning.prepend_to_captions(_dataset(session), text)
    return f"Added to the start of {changed} caption{'s' * (changed != 1)}."


@user_errors
def append_all(session: Session, text: str) -> str:
    if not (text or "").strip():
        raise gr.Error("Type the text to add first.")
    changed = captioning.append_to_captions(_dataset(session), text)
    return f"Added to the end of {changed} caption{'s' * (changed != 1)}."


def _dataset(session: Session):
    dataset = session.dataset_dir()
    if dataset is None:
        raise gr.Error("No images yet: add some on the Upload tab first.")
    return dataset
