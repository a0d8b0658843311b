"""Decode stage: validate the raw bytes with Pillow and normalise them to an RGB JPEG; clean the caption.

Rules, in order (first failure rejects the sample with stage "decode"):
  1. Caption: None / empty / whitespace-only -> "empty_caption". Otherwise whitespace runs (newlines, tabs,
     unicode spaces) collapse to one space, other control characters are dropped, and the text is cut to
     `max_caption_chars` (at the last space when it lies in the second half of the cut); the cleaned text
     replaces `raw_caption` and `meta.caption_truncated_from` keeps the original length when cut.
  2. Image header: only JPEG/MPO/PNG/WEBP/GIF/BMP/TIFF (and AVIF where built in) are opened; anything else,
     zero bytes or garbage -> "undecodable_image" with PIL's message. width*height > `max_pixels` ->
     "decompression_bomb", decided from the header before any pixel data is decoded (PIL's own 2x bomb
     error is mapped to the same kind). min(width, height) < `min_side` (header size) -> "too_small".
  3. Pixels: JPEGs are DCT-downscaled while decoding (`draft`) when larger than `max_side`; EXIF orientation
     is applied (a broken EXIF block is ignored, noted in meta); animated images keep frame 0
     (`meta.frames`); modes become RGB: alpha (RGBA, LA, PA, P with transparency) is composited on white,
     16/32-bit integer and float images are scaled to 8 bits, CMYK/L/1/P/YCbCr converted by Pillow.
     Truncated or corrupt data -> "undecodable_image".
  4. The longer side is resized to <= `max_side` (LANCZOS, reducing_gap=3), the image re-encoded as JPEG at
     `jpeg_quality` into `image`; `width`/`height` are the final size. Pillow warnings go to
     `meta.decode_warnings`.
Rejected samples keep their original bytes; later stages open the JPEG with `engine.images.open_rgb`.
"""

from __future__ import annotations

import io
import json
import logging
import unicodedata
import warnings
from typing import Any, ClassVar

import PIL
from PIL import Image, ImageOps

from engine.config import DecodeSpec
from engine.records import Record, merge_meta
from engine.stages.base import Stage

log = logging.getLogger(__name__)

_WANTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
_WHITE = (255, 255, 255)


def _formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in _WANTED_FORMATS if f in Image.OPEN)


class DecodeReject(Exception):
    """A sample does not qualify: carries the rejection kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def clean_caption(text: str | None, *, max_chars: int) -> tuple[str, int | None]:
    """(cleaned caption, original length if it was cut else None); "" means empty."""
    if text is None:
        return "", None
    joined = " ".join(text.split())
    if any(unicodedata.category(c) == "Cc" for c in joined):
        joined = " ".join("".join(c for c in joined if unicodedata.category(c) != "Cc").split())
    if len(joined) <= max_chars:
        return joined, None
    cut = joined[:max_chars]
    if not joined[max_chars].isspace():
        space = cut.rfind(" ")
        if space > max_chars // 2:
            cut = cut[:space]
    return cut.rstrip(), len(joined)


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if (mode == "P" and "transparency" in im.info) or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        wide = im.convert("F")
        lo, hi = wide.getextrema()
        if mode == "F" and hi <= 1.0:
            scale = 255.0
        elif hi > 255:
            scale = 1 / 256  # 16-bit data
        else:
            scale = 1.0
        return wide.point(lambda v: v * scale).convert("L").convert("RGB")
    return im.convert("RGB")


class Decode(Stage):
    """Bytes -> validated, EXIF-rotated, RGB, size-bounded JPEG; caption cleaned."""

    name: ClassVar[str] = "decode"
    requires: ClassVar[tuple[str, ...]] = ("image", "raw_caption")
    provides: ClassVar[tuple[str, ...]] = ("image", "width", "height", "raw_caption")

    def __init__(self, spec: DecodeSpec | None = None) -> None:
        super().__init__(spec or DecodeSpec())
        self.formats = _formats()
        values = self.spec.model_dump(exclude={"resources"})
        values["pillow"] = PIL.__version__
        self.params = json.dumps(values, sort_keys=True)

    def setup(self) -> None:
        """Let our own max_pixels decide: raise PIL's process-wide bomb limit if ours is higher."""
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and self.spec.max_pixels > limit:
            Image.MAX_IMAGE_PIXELS = self.spec.max_pixels

    def process_one(self, record: Record) -> None:
        spec = self.spec
        notes: dict[str, Any] = {}
        try:
            caption, original_len = clean_caption(record.raw_caption, max_chars=spec.max_caption_chars)
            if not caption:
                raise DecodeReject("empty_caption", f"caption is empty: {record.raw_caption!r}"[:200])
            if original_len is not None:
                notes["caption_truncated_from"] = original_len
            image, width, height = self._decode(record.image, notes)
        except DecodeReject as rej:
            if notes:
                record.meta = merge_meta(record.meta, notes)
            record.reject(self.name, rej.kind, str(rej))
            return
        record.raw_caption = caption
        record.image, record.width, record.height = image, width, height
        record.meta = merge_meta(record.meta, notes)
        record.stamp(self.name, "pil", params=self.params)

    def _decode(self, data: bytes | None, notes: dict[str, Any]) -> tuple[bytes, int, int]:
        spec = self.spec
        if not data:
            raise DecodeReject("undecodable_image", "no image bytes (zero length)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                im = Image.open(io.BytesIO(data), formats=self.formats)
            except Image.DecompressionBombError as exc:
                raise DecodeReject("decompression_bomb", str(exc)) from None
            except Exception as exc:  # noqa: BLE001 - any parser error means the bytes are not an image
                raise DecodeReject("undecodable_image", f"{type(exc).__name__}: {exc}") from None
            with im:
                w, h = im.size
                if w * h > spec.max_pixels:
                    raise DecodeReject(
                        "decompression_bomb", f"{w}x{h} = {w * h} pixels > max_pixels {spec.max_pixels}"
                    )
                if min(w, h) < spec.min_side:
                    raise DecodeReject("too_small", f"{w}x{h}: shorter side < min_side {spec.min_side}")
                notes["source_format"] = im.format
                if getattr(im, "n_frames", 1) > 1:
                    notes["frames"] = im.n_frames
                try:
                    if im.format == "JPEG" and max(w, h) > spec.max_side:
                        im.draft(None, (spec.max_side, spec.max_side))
                    im.load()
                    out = self._normalise(im, notes)
                    buf = io.BytesIO()
                    out.save(buf, format="JPEG", quality=spec.jpeg_quality)
                except DecodeReject:
                    raise
                except Image.DecompressionBombError as exc:
                    raise DecodeReject("decompression_bomb", str(exc)) from None
                except Exception as exc:  # noqa: BLE001 - truncated/corrupt pixel data
                    raise DecodeReject("undecodable_image", f"{type(exc).__name__}: {exc}") from None
        if caught:
            notes["decode_warnings"] = sorted({str(w.message)[:200] for w in caught})[:5]
        return buf.getvalue(), out.width, out.height

    def _normalise(self, im: Image.Image, notes: dict[str, Any]) -> Image.Image:
        try:
            rotated = ImageOps.exif_transpose(im)
        except Exception as exc:  # noqa: BLE001 - broken EXIF should not cost the image
            notes["exif_error"] = f"{type(exc).__name__}: {exc}"[:200]
            rotated = im
        if rotated is None:
            rotated = im
        else:
            orientation = im.getexif().get(0x0112)
            if orientation not in (None, 1):
                notes["exif_orientation"] = orientation
        rgb = _to_rgb(rotated)
        w, h = rgb.size
        longer = max(w, h)
        if longer > self.spec.max_side:
            scale = self.spec.max_side / longer
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            size = (min(size[0], self.spec.max_side), min(size[1], self.spec.max_side))
            rgb = rgb.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        return rgb


__all__ = ["Decode", "DecodeReject", "clean_caption"]
