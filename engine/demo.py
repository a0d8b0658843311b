"""A small raw dump to try granucap on without any download: img2dataset-style webdataset tars of drawn
scenes (coloured shapes on textured backgrounds) with web-like captions, one broken image included, and
`annotations.json`, the drawn shapes' boxes in COCO format (categories square, circle, triangle), to try
`granucap eval --run` with (input discovery skips .json files, so the folder stays a valid input).
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 170),
    "orange": (240, 140, 30),
}
SHAPES = ("square", "circle", "triangle")
NOISE = ("Best price!! free shipping", "photo by user123", "#art #design", "stock image, all rights reserved")


def draw_scene(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, list[tuple[str, str, list[int]]]]:
    """An image with 1-3 shapes; returns it with the (colour, shape, xyxy box) of each."""
    w, h = size
    base = tuple(rng.randint(90, 200) for _ in range(3))
    image = Image.effect_noise((w, h), rng.randint(20, 60)).convert("RGB")
    image = Image.blend(image, Image.new("RGB", (w, h), base), 0.6).filter(ImageFilter.GaussianBlur(1))
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(rng.randint(1, 3)):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        s = rng.randint(min(w, h) // 6, min(w, h) // 3)
        x, y = rng.randint(0, w - s), rng.randint(0, h - s)
        if shape == "square":
            draw.rectangle([x, y, x + s, y + s], fill=COLOURS[colour])
        elif shape == "circle":
            draw.ellipse([x, y, x + s, y + s], fill=COLOURS[colour])
        else:
            draw.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=COLOURS[colour])
        objects.append((colour, shape, [x, y, x + s, y + s]))
    return image, objects


def caption_for(rng: random.Random, objects: list[tuple[str, str, list[int]]]) -> str:
    parts = [f"a {c} {s}" for c, s, _ in objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text.capitalize()} on a textured background. {rng.choice(NOISE)}"


def add_pair(tar: tarfile.TarFile, key: str, image: bytes, caption: str, meta: dict | None = None) -> None:
    """One image-text pair into an open tar as img2dataset lays it out: `key.jpg`, `key.txt` (the caption)
    and `key.json` (the caption, the key and `meta`)."""
    meta = {"caption": caption, **(meta or {}), "key": key}
    for name, payload in ((f"{key}.jpg", image), (f"{key}.txt", caption.encode()),
                          (f"{key}.json", json.dumps(meta).encode())):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


def write_demo_input(dest: str | Path, *, samples: int = 24, per_tar: int = 12, seed: int = 0) -> list[Path]:
    """Write `samples` pairs as tars of `per_tar` into `dest`, and their boxes as `dest/annotations.json`; the
    third sample's image is broken on purpose (it stays in the annotations: a run rejects it)."""
    rng = random.Random(seed)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    category = {shape: n + 1 for n, shape in enumerate(SHAPES)}
    coco: dict[str, list] = {"images": [], "annotations": [],
                             "categories": [{"id": n, "name": shape} for shape, n in category.items()]}
    for start in range(0, samples, per_tar):
        path = dest / f"{start // per_tar:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_tar, samples)):
                key = f"{i:09d}"
                image, objects = draw_scene(rng, (rng.randint(200, 400), rng.randint(200, 400)))
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=90)
                data = buf.getvalue() if i != 2 else buf.getvalue()[:200]  # truncated JPEG: a rejected row
                caption = caption_for(rng, objects)
                coco["images"].append({"id": i + 1, "file_name": f"{key}.jpg", "width": image.width,
                                       "height": image.height})
                for _, shape, (x0, y0, x1, y1) in objects:
                    coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1,
                                                "category_id": category[shape], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                                "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
                add_pair(tar, key, data, caption, {"url": f"https://example.com/{key}.jpg"})
        paths.append(path)
    (dest / "annotations.json").write_text(json.dumps(coco))
    return paths
