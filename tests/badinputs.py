"""An adversarial corpus for intake: good images in every awkward mode and every kind of bad input.

Everything is generated into a folder the test gives (tmp_path); nothing is stored in the repo.
`GOOD` lists images that must arrive intact, with a check of their pixels; `BAD` lists inputs that
must be skipped, each with the skip kind it must get and a marker found in the skipped source.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def noise(w: int, h: int, seed: int) -> Image.Image:
    """A unique RGB image (random pixels never collide as duplicates)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def halves(w: int, h: int, left, right, mode: str = "RGB") -> Image.Image:
    im = Image.new(mode, (w, h), right)
    im.paste(Image.new(mode, (w // 2, h), left), (0, 0))
    return im


def close(a, b, tol: int = 12) -> bool:
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b, strict=True))


# -- good images: (file name, bytes maker, check of the ingested RGB image) ----------------------
def _rotated_jpeg() -> bytes:
    # stored 80 wide x 120 tall, left half red; EXIF orientation 6 means "rotate 90 deg clockwise
    # to display", so it must arrive 120 wide x 80 tall with the red half on top
    exif = Image.Exif()
    exif[0x0112] = 6
    return jpeg_bytes(halves(80, 120, RED, BLUE), exif=exif)


def _palette_gif() -> bytes:
    im = Image.new("P", (64, 64), 0)
    im.putpalette([*WHITE, *GREEN, *BLACK] + [0] * (256 - 3) * 3)
    im.paste(1, (32, 0, 64, 64))  # right half green, left half index 0 = transparent
    buf = io.BytesIO()
    im.save(buf, "GIF", transparency=0)
    return buf.getvalue()


def _sixteen_bit_png() -> bytes:
    a = np.full((64, 64), 40000, dtype=np.uint16)  # 40000 / 257 = 155.6: scaled, not clipped to 255
    a[:, 32:] = 1000
    return png_bytes(Image.fromarray(a))


def _webp() -> bytes:
    buf = io.BytesIO()
    halves(96, 64, GREEN, RED).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def _cmyk_jpeg() -> bytes:
    return jpeg_bytes(Image.new("CMYK", (72, 72), (0, 255, 255, 0)))  # pure red in CMYK


def _tiff_l() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (64, 80), 200).save(buf, "TIFF")
    return buf.getvalue()


@dataclass
class Good:
    name: str
    make: Callable[[], bytes]
    size: tuple[int, int]  # expected output size (width, height)
    check: Callable[[Image.Image], bool]
    ext: str  # expected output extension


GOOD = [
    Good("rotated.jpg", _rotated_jpeg, (120, 80),
         lambda im: close(im.getpixel((60, 10)), RED, 40) and close(im.getpixel((60, 70)), BLUE, 40), ".jpg"),
    Good("rgba.png", lambda: png_bytes(halves(96, 96, (0, 0, 0, 0), (*GREEN, 255), "RGBA")), (96, 96),
         lambda im: im.getpixel((10, 50)) == WHITE and im.getpixel((80, 50)) == GREEN, ".png"),
    Good("palette.gif", _palette_gif, (64, 64),
         lambda im: im.getpixel((5, 5)) == WHITE and im.getpixel((60, 5)) == GREEN, ".png"),
    Good("cmyk.jpg", _cmyk_jpeg, (72, 72), lambda im: close(im.getpixel((36, 36)), RED, 30), ".jpg"),
    Good("sixteen.png", _sixteen_bit_png, (64, 64),
         lambda im: close(im.getpixel((5, 5)), (156,) * 3, 1) and close(im.getpixel((60, 5)), (4,) * 3, 1), ".png"),
    Good("la.png", lambda: png_bytes(halves(64, 64, (0, 255), (0, 0), "LA")), (64, 64),
         lambda im: im.getpixel((5, 5)) == BLACK and im.getpixel((60, 5)) == WHITE, ".png"),
    Good("photo.webp", _webp, (96, 64), lambda im: im.getpixel((5, 5)) == GREEN and im.getpixel((90, 5)) == RED, ".png"),
    Good("grey.tif", _tiff_l, (64, 80), lambda im: im.getpixel((5, 5)) == (200, 200, 200), ".png"),
]


def write_good(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for g in GOOD:
        (folder / g.name).write_bytes(g.make())
        paths.append(folder / g.name)
    (folder / "rotated.txt").write_text("a photo turned sideways", encoding="utf-8")
    return paths


# -- byte-level helpers for hostile files -------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height`: a decompression bomb as far as a decoder can tell."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buf.getvalue()


def _central_entries(data: bytes):
    """(offset of the central-directory entry, its ZipInfo) for each member."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    pos = zf.start_dir
    for info in zf.infolist():
        assert data[pos:pos + 4] == b"PK\x01\x02"
        yield pos, info
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[pos + 28:pos + 34])
        pos += 46 + name_len + extra_len + comment_len


def patch_zip(data: bytes, member: str, *, encrypted: bool = False, claimed_size: int | None = None,
              corrupt_data: bool = False) -> bytes:
    """Rewrite one member's headers: mark it encrypted, make it claim another size, or flip a data byte."""
    out = bytearray(data)
    for pos, info in list(_central_entries(data)):
        if info.filename != member:
            continue
        local = info.header_offset
        if encrypted:
            for flag_at in (pos + 8, local + 6):
                out[flag_at] |= 0x1
        if claimed_size is not None:
            struct.pack_into("<I", out, pos + 24, claimed_size)
        if corrupt_data:
            name_len, extra_len = struct.unpack("<HH", data[local + 26:local + 30])
            out[local + 30 + name_len + extra_len] ^= 0xFF
    return bytes(out)


def _symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("link.png")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
    return buf.getvalue()


# -- bad inputs: each makes its files in `folder` and returns the sources to ingest -------------
def _file(name: str, data: bytes | Callable[[], bytes]) -> Callable[[Path], list[Path]]:
    def make(folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data() if callable(data) else data)
        return [folder / name]
    return make


def _files(files: dict[str, bytes | Callable[[], bytes]], source: str | None = None) -> Callable[[Path], list[Path]]:
    """Several files in a sub-folder; the sub-folder (or the one file `source`) is the source."""
    def make(folder: Path) -> list[Path]:
        for name, data in files.items():
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data() if callable(data) else data)
        return [folder / source] if source else [folder]
    return make


def _sparse(name: str, size: int) -> Callable[[Path], list[Path]]:
    def make(folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / name, "wb") as f:
            f.truncate(size)  # sparse: no disk or memory used
        return [folder / name]
    return make


def _truncated(data: Callable[[], bytes]) -> Callable[[], bytes]:
    return lambda: data()[: len(data()) * 2 // 3]


def _good_zip() -> bytes:
    return make_zip({"inzip/good.png": png_bytes(noise(64, 64, 7))})


@dataclass
class Bad:
    name: str  # test id
    kind: str  # the skip kind intake must report
    marker: str  # a substring of the skipped source
    make: Callable[[Path], list[Path]]


BAD = [
    Bad("not-an-image-pdf", "not-image", "notes.pdf", _file("notes.pdf", b"%PDF-1.4\n% not an image\n")),
    Bad("not-an-image-video", "not-image", "clip.mp4", _file("clip.mp4", b"\0\0\0\x18ftypmp42" + b"\0" * 64)),
    Bad("random-bytes-named-jpg", "corrupt-image", "random.jpg", _file("random.jpg", bytes(range(256)) * 8)),
    Bad("text-named-png", "corrupt-image", "liar.png", _file("liar.png", b"hello, I am text")),
    Bad("truncated-jpeg", "truncated-image", "cut.jpg", _file("cut.jpg", _truncated(lambda: jpeg_bytes(noise(96, 96, 1))))),
    Bad("truncated-png", "truncated-image", "cut.png", _file("cut.png", _truncated(lambda: png_bytes(noise(96, 96, 2))))),
    Bad("zero-bytes", "empty-file", "empty.png", _file("empty.png", b"")),
    Bad("bomb-over-pillow-limit", "decompression-bomb", "bomb.png", _file("bomb.png", png_header_only(30000, 30000))),
    Bad("bomb-over-our-limit", "decompression-bomb", "big.png", _file("big.png", png_header_only(12000, 10000))),
    Bad("too-small", "too-small", "tiny.png", _file("tiny.png", lambda: png_bytes(noise(40, 30, 3)))),
    Bad("file-too-large", "too-large", "huge.png", _sparse("huge.png", 201 * 2**20)),
    Bad("heic", "unsupported-format", "phone.heic", _file("phone.heic", b"\0\0\0\x18ftypheic" + b"\0" * 64)),
    Bad("psd", "unsupported-format", "layers.psd", _file("layers.psd", b"8BPS" + b"\0" * 64)),
    Bad("zip-dotdot", "zip-unsafe-path", "../evil.png",
        _file("dotdot.zip", lambda: make_zip({"../evil.png": png_bytes(noise(64, 64, 4))}))),
    Bad("zip-absolute", "zip-unsafe-path", "/abs/evil.png",
        _file("absolute.zip", lambda: make_zip({"/abs/evil.png": png_bytes(noise(64, 64, 5))}))),
    Bad("zip-symlink", "zip-symlink", "link.png", _file("symlink.zip", _symlink_zip)),
    Bad("zip-ratio-bomb", "zip-bomb", "zeros.bmp", _file("ratio.zip", lambda: make_zip({"zeros.bmp": b"\0" * 4 * 2**20}))),
    Bad("zip-total-size-bomb", "zip-bomb", "lying.zip", _file("lying.zip", lambda: _lying_zip())),
    Bad("zip-member-count-bomb", "zip-bomb", "many.zip",
        _file("many.zip", lambda: make_zip({f"f{i}.txt": b"" for i in range(20_001)}, zipfile.ZIP_STORED))),
    Bad("zip-encrypted-member", "zip-encrypted", "secret.png",
        _file("encrypted.zip", lambda: patch_zip(make_zip({"secret.png": png_bytes(noise(64, 64, 6))}), "secret.png",
                                                 encrypted=True))),
    Bad("zip-corrupt", "zip-corrupt", "broken.zip", _file("broken.zip", b"PK\x03\x04 this is not really a zip")),
    Bad("zip-truncated", "zip-corrupt", "half.zip", _file("half.zip", _truncated(_good_zip))),
    Bad("zip-member-bad-crc", "zip-corrupt", "crc.png",
        _file("crc.zip", lambda: patch_zip(make_zip({"crc.png": png_bytes(noise(64, 64, 8))}, zipfile.ZIP_STORED),
                                           "crc.png", corrupt_data=True))),
    Bad("zip-in-zip", "zip-nested", "inner.zip", _file("outer.zip", lambda: make_zip({"inner.zip": _good_zip()}))),
    Bad("macosx-folder-in-zip", "hidden", "__MACOSX/._a.png",
        _file("mac.zip", lambda: make_zip({"__MACOSX/._a.png": b"\0\5\26\7", "a.png": png_bytes(noise(64, 64, 9))}))),
    Bad("ds-store", "hidden", ".DS_Store",
        _files({"withjunk/.DS_Store": b"\0\0\0\1Bud1", "withjunk/k.png": lambda: png_bytes(noise(64, 64, 10))}, "withjunk")),
    Bad("caption-without-image", "orphan-caption", "lonely.txt", _files({"orph/lonely.txt": b"nobody"}, "orph")),
    Bad("caption-not-utf8", "caption-not-utf8", "latin.txt",
        _files({"latin/latin.png": lambda: png_bytes(noise(64, 64, 11)), "latin/latin.txt": b"caf\xe9 au lait"}, "latin")),
    Bad("caption-too-large", "caption-too-large", "long.txt",
        _files({"long/long.png": lambda: png_bytes(noise(64, 64, 12)), "long/long.txt": b"word " * 20_000}, "long")),
    Bad("same-name-two-extensions", "ambiguous-caption", "twin.txt",
        _files({"twins/twin.jpg": lambda: jpeg_bytes(noise(64, 64, 13)), "twins/twin.png": lambda: png_bytes(noise(64, 64, 14)),
                "twins/twin.txt": b"which one am I?"}, "twins")),
    Bad("two-captions-one-image", "extra-caption", "two.caption",
        _files({"two/two.png": lambda: png_bytes(noise(64, 64, 15)), "two/two.txt": b"first",
                "two/two.caption": b"second"}, "two")),
    Bad("duplicate-same-bytes", "duplicate", "b_again.png",
        _files({"dupes/a_orig.png": lambda: png_bytes(noise(64, 64, 16)),
                "dupes/b_again.png": lambda: png_bytes(noise(64, 64, 16))}, "dupes")),
    Bad("duplicate-same-pixels-other-file", "duplicate", "resaved.png",
        _files({"dupes2/first.png": lambda: png_bytes(noise(64, 64, 17)),
                "dupes2/resaved.png": lambda: png_bytes(noise(64, 64, 17), compress_level=1)}, "dupes2")),
    Bad("missing-source", "not-found", "nowhere", lambda folder: [folder / "nowhere"]),
    Bad("metadata-bad-line", "bad-metadata", "metadata.jsonl line 2",
        _files({"hf/a.png": lambda: png_bytes(noise(64, 64, 18)),
                "hf/metadata.jsonl": b'{"file_name": "a.png", "text": "fine"}\n{not json\n'}, "hf")),
    Bad("metadata-for-missing-image", "orphan-caption", "gone.png",
        _files({"hf2/b.png": lambda: png_bytes(noise(64, 64, 19)),
                "hf2/metadata.jsonl": b'{"file_name": "gone.png", "text": "where?"}\n'}, "hf2")),
]


def _lying_zip() -> bytes:
    """Three small members whose headers claim 3.75 GiB each: over the total-size limit before any read."""
    data = make_zip({f"m{i}.png": png_bytes(noise(64, 64, 30 + i)) for i in range(3)})
    for i in range(3):
        data = patch_zip(data, f"m{i}.png", claimed_size=0xF0000000)
    return data


def write_bad(folder: Path) -> list[Path]:
    """Every bad input in its own sub-folder of `folder`; the sources to ingest."""
    sources: list[Path] = []
    for bad in BAD:
        sources += bad.make(folder / bad.name)
    return sources


def kohya_dataset(root: Path) -> Path:
    """A kohya training folder: 10_ohwx (2 captioned images) and 3_style (1 image)."""
    train = root / "train"
    (train / "10_ohwx").mkdir(parents=True)
    (train / "3_style").mkdir()
    for i in range(2):
        (train / "10_ohwx" / f"k{i}.png").write_bytes(png_bytes(noise(64, 64, 100 + i)))
        (train / "10_ohwx" / f"k{i}.txt").write_text(f"ohwx, picture {i}", encoding="utf-8")
    (train / "3_style" / "s0.jpg").write_bytes(jpeg_bytes(noise(64, 64, 110)))
    (train / "3_style" / "s0.caption").write_text("style image", encoding="utf-8")
    return train


def hf_imagefolder(root: Path) -> Path:
    folder = root / "hf"
    (folder / "train").mkdir(parents=True)
    rows = []
    for i in range(3):
        (folder / "train" / f"h{i}.png").write_bytes(png_bytes(noise(64, 64, 200 + i)))
        rows.append({"file_name": f"train/h{i}.png", "text": f"hub caption {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return folder
