"""A synthetic labelled set to check that the student learns: coloured shapes on noise.

`write_shapes(dest)` writes `dest/train`, a GranuCap run (shards, parquet index, stats markers, written by
the engine's own `ShardWriter`), and `dest/val`, a COCO-format set (`images/`, `annotations.json`) whose
category names ("red square", "blue circle") are the prompts `granucap eval` uses.

It produces shards, so it sits with the engine (`granucap shapes`, the student's tests) rather than in
`detector/`, which only reads them.
"""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from engine.io.shards import ShardWriter
from engine.records import Record

logger = logging.getLogger(__name__)

# name -> (colour word, RGB, PIL drawing method); the entity's phrase is "colour name", its category "name"
SHAPES: dict[str, tuple[str, tuple[int, int, int], str]] = {
    "square": ("red", (220, 30, 30), "rectangle"),
    "circle": ("blue", (30, 60, 220), "ellipse"),
}


def shapes_image(rng: random.Random, *, width: int = 128, height: int = 96) -> tuple[bytes, list[tuple[str, list[float]]]]:
    """A JPEG of one or two shapes on dark noise, and its objects as (shape name, xyxy pixels)."""
    noise = np.random.default_rng(rng.getrandbits(32)).integers(0, 80, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    draw = ImageDraw.Draw(image)
    names = rng.sample(sorted(SHAPES), k=rng.choice([1, 2]))
    objects = []
    for slot, name in enumerate(names):
        _, colour, method = SHAPES[name]
        side = rng.randint(24, 44)
        # two shapes go to the left and right halves so that they never overlap
        left = 0 if len(names) == 1 else slot * width // 2
        span = width if len(names) == 1 else width // 2
        x0 = left + rng.randint(2, max(2, span - side - 2))
        y0 = rng.randint(2, height - side - 2)
        xyxy = [float(x0), float(y0), float(x0 + side), float(y0 + side)]
        getattr(draw, method)(xyxy, fill=colour)
        objects.append((name, xyxy))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue(), objects


def _entity(name: str) -> dict[str, str]:
    return {"phrase": f"{SHAPES[name][0]} {name}", "category": name, "parent_category": "shape"}


def write_train_run(dest: str | Path, *, samples: int, shard_size: int, seed: int) -> Path:
    """A GranuCap run dir of `samples` ok records, written with the engine's ShardWriter."""
    dest = Path(dest)
    rng = random.Random(seed)
    units = {u: min(shard_size, samples - u * shard_size) for u in range((samples + shard_size - 1) // shard_size)}
    writer = ShardWriter(dest, expected=units)
    for i in range(samples):
        jpg, objects = shapes_image(rng)
        entities, boxes = [], []
        for name, xyxy in objects:
            boxes.append({"xyxy": xyxy, "score": 1.0, "entity": len(entities), "matched": "category",
                          "teacher": "synthetic"})
            entities.append(_entity(name))
        caption = " and a ".join(e["phrase"] for e in entities)
        writer([Record(key=f"shape{i:05d}", source="synthetic", unit=i // shard_size, position=i % shard_size,
                       image=jpg, width=128, height=96, raw_caption=caption, caption=caption,
                       factual_caption=caption, entities=entities, boxes=boxes)])
    if writer.incomplete():
        raise RuntimeError(f"synthetic run left units incomplete: {writer.incomplete()}")
    return dest


def write_coco_set(dest: str | Path, *, samples: int, seed: int) -> tuple[Path, Path]:
    """A COCO-format set: `dest/images/*.jpg` and `dest/annotations.json`; returns both paths."""
    dest = Path(dest)
    images_dir = dest / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = sorted(SHAPES)
    categories = [{"id": i + 1, "name": _entity(n)["phrase"], "supercategory": "shape"} for i, n in enumerate(names)]
    cat_id = {n: i + 1 for i, n in enumerate(names)}
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(samples):
        jpg, objects = shapes_image(rng)
        file_name = f"val{i:05d}.jpg"
        (images_dir / file_name).write_bytes(jpg)
        images.append({"id": i + 1, "file_name": file_name, "width": 128, "height": 96})
        for name, (x0, y0, x1, y1) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cat_id[name],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    path = dest / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, images_dir


def write_shapes(dest: str | Path, *, train: int = 64, val: int = 16, shard_size: int = 32,
                 seed: int = 0) -> dict[str, str]:
    """Both halves of the synthetic set under `dest`; returns their paths."""
    dest = Path(dest)
    run = write_train_run(dest / "train", samples=train, shard_size=shard_size, seed=seed)
    coco, images = write_coco_set(dest / "val", samples=val, seed=seed + 1_000_003)
    logger.info("synthetic shapes: %d train samples in %s, %d val images in %s", train, run, val, images)
    return {"shards": str(run), "coco": str(coco), "images": str(images)}
