"""Decode stage: limits, EXIF, modes, animation, resizing, caption cleaning, per-sample rejections."""

from __future__ import annotations

import io
import json
import struct
import zlib

import pytest
from PIL import Image, ImageFile

from engine.config import DecodeSpec
from engine.images import open_rgb
from engine.records import Record
from engine.stages.decode import Decode, clean_caption


def _enc(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(size=(64, 48), mode="RGB") -> Image.Image:
    w, h = size
    im = Image.new("RGB", size)
    im.putdata([((x * 255) // w, (y * 255) // h, 90) for y in range(h) for x in range(w)])
    return im.convert(mode) if mode != "RGB" else im


def _rec(data: bytes | None, caption: str | None = "a photo", key: str = "k") -> Record:
    return Record(key=key, source="src", image=data, raw_caption=caption)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but holds almost no data (a bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    out = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    idat = b"IDAT" + zlib.compress(b"\x00" * 64)
    out += struct.pack(">I", len(idat) - 4) + idat + struct.pack(">I", zlib.crc32(idat))
    return out + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))


def _is_jpeg(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG" and im.mode == "RGB"
    im.load()
    return im


def test_good_images_and_mixed_batch_stays_in_order() -> None:
    stage = Decode(DecodeSpec())
    good_jpeg = _enc(_gradient(), "JPEG")
    jpeg_cut = good_jpeg[: len(good_jpeg) // 2]
    batch = [
        _rec(good_jpeg, key="jpeg"),
        _rec(b"\x00\x01garbage bytes", key="corrupt"),
        _rec(_enc(_gradient((30, 40)), "PNG"), key="png"),
        _rec(b"", key="zero"),
        _rec(jpeg_cut, key="truncated"),
        _rec(b"just some text, not an image\n", key="text"),
        _rec(_enc(_gradient(), "WEBP"), key="webp"),
        _rec(None, key="none"),
    ]
    out = stage(batch)
    assert out is batch and [r.key for r in out] == [
        "jpeg", "corrupt", "png", "zero", "truncated", "text", "webp", "none"
    ]
    ok = {r.key: r for r in out if r.ok}
    assert set(ok) == {"jpeg", "png", "webp"}
    assert (ok["jpeg"].width, ok["jpeg"].height) == (64, 48)
    assert (ok["png"].width, ok["png"].height) == (30, 40)
    for r in ok.values():
        im = _is_jpeg(r.image)
        assert im.size == (r.width, r.height)
        assert r.provenance[-1]["stage"] == "decode" and r.provenance[-1]["backend"] == "pil"
        assert json.loads(r.provenance[-1]["params"])["jpeg_quality"] == 95
    for r in out:
        if not r.ok:
            assert r.status == "rejected" and r.error["stage"] == "decode"
            assert r.error["kind"] == "undecodable_image" and r.error["message"]
    assert "truncated" in next(r for r in out if r.key == "truncated").error["message"].lower()


def test_modes_are_converted() -> None:
    stage = Decode(DecodeSpec())
    cmyk = _enc(_gradient(mode="CMYK"), "JPEG")
    i16 = Image.new("I;16", (40, 30))
    i16.putdata([(x * 1600) for y in range(30) for x in range(40)])
    i16_png = _enc(i16, "PNG")
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (8, 8, 24, 24))
    pal_png = _enc(pal, "PNG", transparency=0)
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 10, 20))
    la = Image.new("LA", (16, 16), (0, 0))
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif = _enc(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    bw = Image.new("1", (20, 20), 1)
    records = [
        _rec(cmyk, key="cmyk"),
        _rec(i16_png, key="i16"),
        _rec(pal_png, key="pal"),
        _rec(_enc(rgba, "PNG"), key="rgba"),
        _rec(_enc(la, "PNG"), key="la"),
        _rec(gif, key="gif"),
        _rec(_enc(bw, "PNG"), key="bw"),
        _rec(_enc(_gradient((40, 40)), "TIFF"), key="tiff"),
    ]
    stage(records)
    assert all(r.ok for r in records), [(r.key, r.error) for r in records if not r.ok]
    by = {r.key: open_rgb(r.image) for r in records}
    assert all(im.mode == "RGB" for im in by.values())
    # palette transparency and alpha composite on white
    assert by["pal"].getpixel((0, 0))[0] > 240 and by["pal"].getpixel((0, 0))[1] > 240
    assert by["pal"].getpixel((16, 16))[0] > 200 and by["pal"].getpixel((16, 16))[1] < 60
    assert min(by["rgba"].getpixel((18, 10))) > 240
    assert by["rgba"].getpixel((2, 10))[2] > 200 and by["rgba"].getpixel((2, 10))[0] < 60
    assert min(by["la"].getpixel((8, 8))) > 240
    # 16-bit scaled to 8 bits, not clipped: left dark, right bright
    assert by["i16"].getpixel((0, 15))[0] < 20 and by["i16"].getpixel((39, 15))[0] > 200
    assert by["i16"].getpixel((20, 15))[0] < 200
    # animated GIF: first frame, frame count noted
    r, g, b = by["gif"].getpixel((12, 12))
    assert r > 200 and g < 60 and b < 60
    assert json.loads(records[5].meta)["frames"] == 3


def test_exif_orientation_swaps_size() -> None:
    im = _gradient((60, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    record = _rec(_enc(im, "JPEG", exif=exif))
    Decode(DecodeSpec())([record])
    assert record.ok and (record.width, record.height) == (20, 60)
    assert open_rgb(record.image).size == (20, 60)
    assert json.loads(record.meta)["exif_orientation"] == 6


def test_pixel_limit_rejects_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self, *a, **k):
        raise AssertionError("pixel data decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    stage = Decode(DecodeSpec(max_pixels=1000))
    small_limit = _rec(_enc(_gradient((64, 48)), "JPEG"), key="over")
    header_bomb = _rec(_png_header_only(60000, 60000), key="bomb")  # 3.6e9 px, a few bytes
    stage([small_limit, header_bomb])
    assert small_limit.error["kind"] == "decompression_bomb" and "1000" in small_limit.error["message"]
    assert header_bomb.error["kind"] == "decompression_bomb"
    # default spec: PIL's own 2x limit trips first, same kind
    default = _rec(_png_header_only(60000, 60000))
    Decode(DecodeSpec())([default])
    assert default.error["kind"] == "decompression_bomb"


def test_resize_and_too_small() -> None:
    stage = Decode(DecodeSpec(max_side=100, min_side=10))
    big_jpeg = _rec(_enc(_gradient((400, 250)), "JPEG"), key="big_jpeg")
    tall_png = _rec(_enc(_gradient((30, 300)), "PNG"), key="tall_png")
    tiny = _rec(_enc(_gradient((50, 8)), "PNG"), key="tiny")
    stage([big_jpeg, tall_png, tiny])
    assert (big_jpeg.width, big_jpeg.height) == (100, 62) or (big_jpeg.width, big_jpeg.height) == (100, 63)
    assert (tall_png.width, tall_png.height) == (10, 100)
    assert open_rgb(big_jpeg.image).size == (big_jpeg.width, big_jpeg.height)
    assert tiny.error["kind"] == "too_small"


def test_captions() -> None:
    stage = Decode(DecodeSpec(max_caption_chars=20))
    img = _enc(_gradient(), "JPEG")
    records = [
        _rec(img, None, key="none"),
        _rec(img, "", key="empty"),
        _rec(img, " \n\t ", key="ws"),
        _rec(img, "  a   dog\n on\tthe\x00 grass  ", key="messy"),
        _rec(img, "one two three four five six seven", key="long"),
    ]
    records[4].meta = json.dumps({"url": "http://x"})
    stage(records)
    assert [r.error["kind"] for r in records[:3]] == ["empty_caption"] * 3
    assert all(r.image == img for r in records[:3])  # rejected records keep their bytes
    assert records[3].raw_caption == "a dog on the grass"
    assert records[4].raw_caption == "one two three four"
    assert json.loads(records[4].meta) == {
        "url": "http://x",
        "caption_truncated_from": 33,
        "source_format": "JPEG",
    }
    assert clean_caption("abcdefghijklmnopqrstuvwxyz", max_chars=5) == ("abcde", 26)


def test_not_ok_records_pass_untouched() -> None:
    record = _rec(b"garbage", key="already")
    record.reject("read", "missing_image", "no image")
    before = record.copy()
    out = Decode(DecodeSpec())([record])
    assert out == [before]
