"""Generates a raw dump full of what web data throws at a pipeline, with the outcome each sample must get."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

from PIL import Image


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A PNG whose header claims width x height pixels; the data is tiny (decoding would explode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def samples() -> list[tuple[str, str, bytes | None, bytes | None, str]]:
    """(key, image extension, image bytes, caption bytes, expected outcome: ok | rejected:STAGE/KIND)."""
    rgb = Image.new("RGB", (96, 64), (200, 40, 40))
    good = _jpeg(rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: width and height swap
    palette = Image.new("P", (80, 60))
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 255, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return [
        ("good", "jpg", good, b"a red square on a table", "ok"),
        ("zero_bytes", "jpg", b"", b"a red square", "rejected:decode/undecodable_image"),
        ("truncated", "jpg", good[: len(good) // 3], b"a red square", "rejected:decode/undecodable_image"),
        ("not_an_image", "jpg", b"<html>404 not found</html>", b"a red square", "rejected:decode/undecodable_image"),
        ("bomb", "png", bomb_png(), b"a red square", "rejected:decode/decompression_bomb"),
        ("cmyk", "jpg", _jpeg(Image.new("CMYK", (64, 64), (0, 255, 255, 0))), b"a red square", "ok"),
        ("sixteen_bit", "png", _png(Image.new("I;16", (64, 64), 4000)), b"a grey square", "ok"),
        ("palette", "png", _png(palette), b"a red square", "ok"),
        ("animated", "gif", gif.getvalue(), b"a red square", "ok"),
        ("rotated", "jpg", _jpeg(rgb, exif=exif.tobytes()), b"a red square", "ok"),
        ("empty_caption", "jpg", good, b"   ", "rejected:decode/empty_caption"),
        ("huge_caption", "jpg", good, b"a red square " * 5000, "ok"),
        ("latin1_caption", "jpg", good, "a red caf\xe9 square".encode("latin-1"), "ok"),
        ("no_caption", "jpg", good, None, "rejected:decode/empty_caption"),
        ("no_image", "jpg", None, b"a caption without its image", "rejected:read/missing_image"),
    ]


def write_bad_dump(dest: Path) -> dict[str, str]:
    """Writes dest/bad.tar (plus unsafe members) and returns key -> expected outcome."""
    dest.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    with tarfile.open(dest / "bad.tar", "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for key, ext, image, caption, outcome in samples():
            if image is not None:
                add(f"{key}.{ext}", image)
            if caption is not None:
                add(f"{key}.txt", caption)
            else:
                add(f"{key}.json", json.dumps({"url": "https://example.com/x.jpg"}).encode())
            expected[key] = outcome
        good = _jpeg(Image.new("RGB", (64, 64), (0, 0, 200)))
        add("../escape.jpg", good)  # path traversal: never extracted, key cleaned
        add("../escape.txt", b"a blue square")
        expected["escape"] = "ok"
        add("/abs/path.jpg", good)
        add("/abs/path.txt", b"a blue square")
        expected["abs/path"] = "ok"
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
        add("link.txt", b"a symlink pretending to be an image")
        expected["link"] = "rejected:read/unsafe_member"
    # a second dump numbering its samples like the first: the repeated key is renamed, not dropped
    with tarfile.open(dest / "bad2.tar", "w") as tar:
        for name, data in (("good.jpg", _jpeg(Image.new("RGB", (64, 64), (0, 200, 0)))), ("good.txt", b"a green square")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    expected["good-dup1"] = "ok"
    return expected
