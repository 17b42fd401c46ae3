"""Captions: auto-captioning a folder (BLIP, Florence-2 or Qwen-VL, see `captioners`), `.txt` captions
beside each image, and bulk edits.

Caption styles:
  sparse  - describe the subject only; style and medium words ("a painting of", "watercolor",
            "anime", "in the style of ...") are stripped, so the LoRA, not the words, carries
            the style. The default, and what a style LoRA wants.
  full    - everything the captioner says (minus known artefacts such as BLIP's "arafed").
  trigger - the trigger word alone, no model needed.
The trigger word is placed by a template (`{trigger}, {caption}`) plus an optional suffix
(`in the style of {trigger}`). Existing captions are kept unless `overwrite=True`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

# Re-exported (`X as X`): the captioners live in captioners.py; cli.py and the app import them from here.
from .captioners import CAPTIONERS as CAPTIONERS
from .captioners import DETAILS as DETAILS
from .captioners import KINDS as KINDS
from .captioners import BlipCaptioner as BlipCaptioner
from .captioners import Captioner
from .captioners import Florence2Captioner as Florence2Captioner
from .captioners import QwenVLCaptioner as QwenVLCaptioner
from .captioners import captioner_options as captioner_options
from .captioners import make_captioner as make_captioner
from .captioners import shared_captioner as shared_captioner
from .captioners import unload_all as unload_all
from .errors import DatasetError, LoraStudioError
from .intake import iter_images, read_caption_file, write_caption

STYLES = ("sparse", "full", "trigger")
DEFAULT_TEMPLATE = "{trigger}, {caption}"


# -- caption text -------------------------------------------------------------------------------
_MEDIUMS = (r"(?:painting|drawing|illustration|sketch|artwork|art|rendering|render|cartoon|watercolou?r|anime|manga|"
            r"comic|print|poster|picture|image|photograph|photo|screenshot|character design)")
_STYLE_ADJECTIVES = (r"(?:close[- ]up|black and white|colou?red|colou?rful|highly detailed|detailed|digital|oil|acrylic|"
                     r"watercolou?r|pencil|ink|charcoal|pastel|cartoon|anime|manga|comic|vintage|realistic|stylized|"
                     r"abstract|3d|cgi|concept|pixel|line|fan|simple|painted|drawn|illustrated|chibi|cel[- ]shaded)")
# style adjectives that are never the subject ("a pencil" or "a painted wall" can be)
_NOUN_MODIFIERS = r"(?:anime|manga|cartoon|cartoonish|chibi|watercolou?r|3d|cgi|cel[- ]shaded|stylized)"
_NOT_A_NOUN = r"(?:of|on|in|at|with|and|or|by|for|to|from|is|are|style)\b"
_STYLE_TAG_WORDS = rf"(?:{_STYLE_ADJECTIVES}|{_MEDIUMS}s?|style|masterpiece|trending on artstation|artstation|best quality|high quality)"

_BLIP_ARTEFACT = re.compile(r"\b(?:an?\s+)?ar+af+\w*\b", re.I)  # "arafed", "araffe": BLIP-large noise for "a"
# fillers the models open with; "this painting shows" stays (its medium is a style word for `sparse` to judge)
_OPENERS = re.compile(r"^(?:there (?:is|are)|this is|it is|in (?:the|this) (?:image|picture),?|(?:the|this) (?:image|picture) "
                      r"(?:shows|depicts|features|contains|captures|portrays|is of|is))\s+", re.I)
_LEADING_ARTICLE = re.compile(r"^(A|An|The)\b")  # "A cat ..." reads "ohwx, a cat ..." after the trigger
_MEDIUM_OF = re.compile(rf"(?:^|(?<=,))\s*(?:(?:an?|the)\s+)?(?:{_STYLE_ADJECTIVES}\s+)*{_MEDIUMS}s?\s+(?:of|showing|depicting)\s+", re.I)
_IN_THE_STYLE_OF = re.compile(r"\s*\bin the style of\b[^,]*", re.I)
_IN_STYLE = re.compile(
    rf"\s*\bin (?:an?\s+)?(?:{_STYLE_ADJECTIVES}\s+)*{_STYLE_ADJECTIVES}(?:\s+style\b|(?=\s*(?:,|$)))", re.I)
_X_STYLE = re.compile(rf"\b{_STYLE_ADJECTIVES}[- ]style\b", re.I)
_MODIFIER = re.compile(rf"\b{_NOUN_MODIFIERS}\s+(?=[a-z])(?!{_NOT_A_NOUN})", re.I)
_TRAILING_MEDIUM = re.compile(r"\b(\w+)\s+(?:painting|drawing|illustration|sketch|artwork|art|render)s?\b(?=\s*(?:,|$))", re.I)
_STYLE_TAG = re.compile(rf"(?:(?:an?|the|in)\s+)?(?:{_STYLE_TAG_WORDS}\s*)+", re.I)
_DETERMINERS = {"a", "an", "the", "of", "his", "her", "their", "my", "your", "its", "this", "that", "holding", "with"}


def clean_generated(text: str) -> str:
    """A model's raw caption, tidied: BLIP's artefacts and the models' "the image shows" removed, one line."""
    # no control characters in a caption file, nor the replacement marks of a token cut mid-character
    text = "".join(ch if ch.isprintable() and ch != "\ufffd" else " " for ch in text)
    text = _BLIP_ARTEFACT.sub("a", text)
    text = _OPENERS.sub("", " ".join(text.split()))
    text = _LEADING_ARTICLE.sub(lambda m: m[1].lower(), text)
    return _tidy(text)


def strip_style_words(caption: str) -> str:
    """The sparse caption: the subject without style and medium words (for style LoRAs)."""
    text = clean_generated(caption)
    text = _IN_THE_STYLE_OF.sub("", text)
    text = _IN_STYLE.sub("", text)
    text = _X_STYLE.sub("", text)
    text = _MEDIUM_OF.sub(" ", text)
    text = _MODIFIER.sub("", text)
    first, *rest = text.split(",")
    tags = [first] + [t for t in rest if t.strip() and not _STYLE_TAG.fullmatch(t.strip())]  # ", digital art"
    # "a cat drawing" loses "drawing", but "holding a painting" keeps its painting
    return _tidy(_TRAILING_MEDIUM.sub(lambda m: m[0] if m[1].lower() in _DETERMINERS else m[1], ", ".join(tags)))


def compose_caption(caption: str, trigger: str, template: str = DEFAULT_TEMPLATE, suffix: str = "") -> str:
    """Place the trigger word: `template` with {trigger} and {caption}, then `suffix` (which may use {trigger})."""
    text = template.replace("{trigger}", trigger).replace("{caption}", caption)
    if suffix.strip() and (trigger.strip() or "{trigger}" not in suffix):  # no "in the style of" dangling
        text = f"{text}, {suffix.replace('{trigger}', trigger)}"
    return _tidy(text)


def _tidy(text: str) -> str:
    text = " ".join(text.split())
    text = re.sub(r"\s+([,.])", r"\1", text)
    text = re.sub(r"(?:,\s*)+,", ",", text)
    text = re.sub(r"\b(a|an|the)\s+(?:(?:a|an|the)\s+)+", r"\1 ", text, flags=re.I)  # "a the" left by a removal
    text = re.sub(r"\b(a|an)\s+(\w+)", _fix_article, text, flags=re.I)
    return text.strip(" ,.;:")


def _fix_article(m: re.Match) -> str:
    word = m[2].lower()
    vowel_sound = (word[0] in "aeiou" and not word.startswith(("uni", "use", "one", "eu", "ut"))) or word.startswith(
        ("hour", "honest", "heir"))
    article = "an" if vowel_sound else "a"
    return f"{article.capitalize() if m[1][0].isupper() else article} {m[2]}"


# -- captioning a folder ------------------------------------------------------------------------
@dataclass
class CaptionResult:
    written: dict[Path, str] = field(default_factory=dict)  # image -> the caption written
    kept: list[Path] = field(default_factory=list)  # images whose existing caption was kept
    failed: list[tuple[Path, str]] = field(default_factory=list)  # image, reason
    left: int = 0  # images not captioned because captioning was stopped

    def summary(self) -> str:
        text = f"{len(self.written)} captions written, {len(self.kept)} existing kept"
        if self.failed:
            text += f", {len(self.failed)} failed: " + "; ".join(f"{p.name}: {why}" for p, why in self.failed[:10])
        if self.left:
            text += f"; stopped with {self.left} image{'s' * (self.left != 1)} left uncaptioned"
        return text


def caption_folder(
    folder: str | Path,
    captioner: Captioner | None,
    *,
    trigger: str,
    style: str = "sparse",
    template: str = DEFAULT_TEMPLATE,
    suffix: str = "",
    overwrite: bool = False,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CaptionResult:
    """Write a `.txt` caption beside every image in `folder` (recursively) that has none (or all, with overwrite).

    `progress(done, total)` follows the images; `should_stop()` is asked before each batch, and a stop
    keeps every caption written so far (run again without overwrite to caption the rest).
    """
    if style not in STYLES:
        raise LoraStudioError(f"caption style '{style}' is unknown; use one of {', '.join(STYLES)}")
    if style == "trigger" and not trigger.strip():
        raise LoraStudioError("caption style 'trigger' needs a trigger word; set one (e.g. ohwx)")
    if style != "trigger" and captioner is None:
        raise LoraStudioError(f"caption style '{style}' needs a captioning model; use style 'trigger' to caption without one")
    images = list(iter_images(folder))
    if not images:
        raise DatasetError(f"no images in {folder}; add images first (the Upload tab or `check --images`)")

    result = CaptionResult()
    todo = []
    for image in images:
        if read_caption_file(image) and not overwrite:
            result.kept.append(image)
        else:
            todo.append(image)
    if progress:
        progress(0, len(todo))
    for start in range(0, len(todo), max(1, batch_size)):
        if should_stop and should_stop():
            result.left = len(todo) - start
            break
        batch = todo[start:start + max(1, batch_size)]
        if style == "trigger":
            captions = [trigger.strip()] * len(batch)
        else:
            captions = _caption_batch(batch, captioner, result)
        for image, raw in zip(batch, captions, strict=True):
            if raw is None:
                continue
            text = raw if style == "trigger" else compose_caption(
                strip_style_words(raw) if style == "sparse" else clean_generated(raw), trigger, template, suffix)
            if not text:
                result.failed.append((image, "the model gave no caption; write one by hand or set a trigger word"))
                continue
            write_caption(image, text)
            result.written[image] = text
        if progress:
            progress(start + len(batch), len(todo))
    return result


def _caption_batch(batch: list[Path], captioner: Captioner, result: CaptionResult) -> list[str | None]:
    """Captions for the images that open; None (and a `failed` entry) for those that do not."""
    opened: list[Image.Image] = []
    slots: list[int] = []
    for i, path in enumerate(batch):
        try:
            with Image.open(path) as im:
                opened.append(ImageOps.exif_transpose(im).convert("RGB"))
            slots.append(i)
        except Exception as e:  # one unreadable file must not stop the folder
            result.failed.append((path, f"cannot open: {e}"))
    captions: list[str | None] = [None] * len(batch)
    if opened:
        for i, text in zip(slots, captioner.caption(opened), strict=True):
            captions[i] = text
    return captions


# -- bulk edits ---------------------------------------------------------------------------------
def edit_captions(folder: str | Path, edit: Callable[[str], str], *, include_uncaptioned: bool = False) -> int:
    """Apply `edit` to every caption in `folder`; returns how many captions changed."""
    changed = 0
    for image in iter_images(folder):
        old = read_caption_file(image)
        if not old and not include_uncaptioned:
            continue
        new = _tidy(edit(old))
        if new != old:
            write_caption(image, new)
            changed += 1
    return changed


def replace_in_captions(folder: str | Path, find: str, replace: str, *, regex: bool = False,
                        ignore_case: bool = False) -> int:
    """Find/replace in every caption (plain text, or a Python regular expression); returns how many changed."""
    if not find:
        raise LoraStudioError("find/replace needs some text to find")
    flags = re.IGNORECASE if ignore_case else 0
    try:
        pattern = re.compile(find if regex else re.escape(find), flags)
    except re.error as e:
        raise LoraStudioError(f"'{find}' is not a valid regular expression ({e}); fix it or search for plain text") from None
    # for plain text the replacement is literal too (no backslash escapes)
    return edit_captions(folder, lambda c: pattern.sub(replace if regex else replace.replace("\\", "\\\\"), c))


def prepend_to_captions(folder: str | Path, text: str, *, separator: str = ", ") -> int:
    """Put `text` at the start of every caption that does not start with it (uncaptioned images get it alone)."""
    text = text.strip()
    return edit_captions(folder, lambda c: c if c.startswith(text) else (f"{text}{separator}{c}" if c else text),
                         include_uncaptioned=True)


def append_to_captions(folder: str | Path, text: str, *, separator: str = ", ") -> int:
    """Put `text` at the end of every caption that does not end with it (uncaptioned images get it alone)."""
    text = text.strip()
    return edit_captions(folder, lambda c: c if c.endswith(text) else (f"{c}{separator}{text}" if c else text),
                         include_uncaptioned=True)


# -- command line -------------------------------------------------------------------------------
