"""Images as the stages hand them on: `record.image` holds the JPEG bytes Decode wrote (engine/stages/decode.py),
and every later stage that looks at the pixels opens them here.
"""

from __future__ import annotations

import io

from PIL import Image


def open_rgb(data: bytes) -> Image.Image:
    """The RGB image of `record.image` (as written by Decode) for later stages."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB") if im.mode != "RGB" else im.copy()
