"""Open one untrusted image safely and normalise it to an 8-bit sRGB `RGB` image.

Every failure becomes a `Rejected(kind, reason)`; nothing here lets a bad file crash intake.
Normalisation: EXIF orientation applied; an embedded ICC profile (Display P3, Adobe RGB, CMYK
print profiles) converted to sRGB; 16-bit and float greyscale scaled, not clipped; palette, LA,
CMYK and the rest converted to RGB; transparency composited on white.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError, features

# Formats Pillow may decode for us. Restricting `Image.open` to these keeps exotic decoders
# (EPS calls Ghostscript, for one) away from untrusted uploads. The JPEG opener also reads MPO
# (what many phone cameras write).
ALLOWED_FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"] + (["AVIF"] if features.check("avif") else [])
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".gif", ".bmp", ".tif", ".tiff"} | (
    {".avif"} if features.check("avif") else set()
)
# Image formats people upload that Pillow cannot read (or we will not): say so, rather than "not an image".
UNSUPPORTED_IMAGE_EXTS = {
    ".heic", ".heif", ".avif", ".jxl", ".psd", ".psb", ".xcf", ".kra", ".svg", ".svgz", ".eps", ".ai", ".ico",
    ".icns", ".tga", ".dds", ".exr", ".hdr", ".raw", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2",
    ".raf", ".srw", ".pef",
} - IMAGE_EXTS
# Lossy sources are written as high-quality JPEG (a PNG of a phone photo is 5-10x larger and no
# better); everything else as PNG.
LOSSY_FORMATS = {"JPEG", "MPO"}
HASH_KEY = "lora-studio:sha256"  # pixel hash stored in written files, so later uploads dedupe cheaply
WHITE = (255, 255, 255)


class Rejected(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class Normalised:
    """A decoded image ready to write, plus what the user should hear about it."""

    def __init__(self, image: Image.Image, source_format: str, notes: list[str]):
        self.image = image
        self.source_format = source_format
        self.notes = notes
        self.sha256 = pixel_hash(image)


def pixel_hash(image: Image.Image) -> str:
    """Hash of the normalised pixels: the same picture re-saved or with other metadata matches."""
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def open_normalised(fp: BinaryIO | str, *, min_side: int, max_pixels: int) -> Normalised:
    """Decode and normalise one image, or raise `Rejected` saying why it cannot be used."""
    notes: list[str] = []
    Image.init()  # register every plugin, or `formats=` below cannot name MPO, WEBP, ...
    try:
        # Pillow's own bomb check warns at ~89 MP and fails at twice that; ours runs below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise Rejected("decompression-bomb", f"claims more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} MP; refused before decoding") from None
    except UnidentifiedImageError:
        raise Rejected("corrupt-image", "cannot be read as an image: the file is damaged or not really an image") from None
    except Exception as e:  # Pillow raises many types on malformed headers
        raise Rejected("corrupt-image", f"damaged image header ({_short(e)})") from None
    with im:
        w, h = im.size
        if w * h > max_pixels:
            raise Rejected("decompression-bomb", f"{w}x{h} = {w * h / 1e6:.0f} MP is over the {max_pixels / 1e6:.0f} MP limit")
        if min(w, h) < min_side:
            raise Rejected("too-small", f"{w}x{h} px; the shorter side must be at least {min_side} px")
        if getattr(im, "n_frames", 1) > 1 and im.format != "MPO":  # an MPO's extra frames are previews/depth
            notes.append(f"{im.n_frames} frames (animated or multi-page); using the first")
        source_format = im.format or "PNG"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "Palette images with transparency ..." - handled below
                im.load()
        except OSError as e:
            if "truncat" in str(e).lower():
                raise Rejected("truncated-image", "the file ends early: re-export or re-copy it") from None
            raise Rejected("corrupt-image", f"cannot decode: {_short(e)}") from None
        except Exception as e:
            raise Rejected("corrupt-image", f"cannot decode: {_short(e)}") from None
        try:
            rgb = _to_srgb(_apply_orientation(im, notes), notes)
        except Exception as e:  # a conversion Pillow cannot do means a malformed file, not a bug to crash on
            raise Rejected("corrupt-image", f"cannot convert to RGB: {_short(e)}") from None
    return Normalised(rgb, source_format, notes)


def _apply_orientation(im: Image.Image, notes: list[str]) -> Image.Image:
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:  # broken EXIF should not cost the user the picture
        notes.append("unreadable EXIF orientation ignored")
        return im.copy()  # a copy: the caller closes `im`
    return out if out is not None else im.copy()


def _to_srgb(im: Image.Image, notes: list[str]) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc and im.mode in ("RGB", "CMYK"):
        try:
            srgb = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, io.BytesIO(icc), srgb, outputMode="RGB")
        except Exception:
            notes.append("embedded colour profile could not be applied; colours may look slightly off")
    if im.mode.startswith("I") or im.mode == "F":
        im = _high_bit_depth_to_l(im)
    if im.mode in ("P", "PA", "L", "RGB", "1") and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        return Image.alpha_composite(Image.new("RGBA", im.size, (*WHITE, 255)), im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float greyscale -> 8-bit, scaled (Pillow's convert would clip to white)."""
    a = np.asarray(im)
    if im.mode == "F":
        a = a * 255.0 if a.size and float(a.max()) <= 1.0 else a
    elif im.mode.startswith("I;16") or (a.size and int(a.max()) > 255):
        a = a.astype(np.float64) / 257.0  # 0..65535 -> 0..255
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def encode(n: Normalised, max_side: int) -> tuple[bytes, str, bool]:
    """The bytes to write, the file extension, and whether the image was downscaled to `max_side`."""
    image, downscaled = n.image, False
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        downscaled = True
    buf = io.BytesIO()
    if n.source_format in LOSSY_FORMATS:
        image.save(buf, "JPEG", quality=95, subsampling=0, comment=f"{HASH_KEY}={n.sha256}".encode())
        return buf.getvalue(), ".jpg", downscaled
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(HASH_KEY, n.sha256)
    image.save(buf, "PNG", pnginfo=info)
    return buf.getvalue(), ".png", downscaled


def stored_hash(path: str) -> str | None:
    """The pixel hash intake embedded in a file it wrote (read from the header only), if any."""
    try:
        with Image.open(path) as im:
            if im.format == "PNG":
                return im.info.get(HASH_KEY)
            comment = im.info.get("comment", b"")
            text = comment.decode("ascii", "replace") if isinstance(comment, bytes) else str(comment)
            key, _, value = text.partition("=")
            return value if key == HASH_KEY else None
    except Exception:
        return None


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:120]
