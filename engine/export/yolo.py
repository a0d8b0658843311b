"""YOLO detection dataset (the Ultralytics / Darknet layout):

    DEST/images/train/{shard}/{key}.jpg
    DEST/labels/train/{shard}/{key}.txt   one line per box: `class cx cy w h`, normalised to 0..1
    DEST/dataset.yaml                     train, val, nc, names {0: cat, ...}; no `path`
    DEST/classes.txt                      the class names, one per line, line n = class n

A label file sits where Ultralytics and FiftyOne look for it (the last `/images/` -> `/labels/`, suffix
`.txt`). Classes are the entities' categories in name order. The whole corpus goes to `train`; `val` points at
the same images so that the yaml is complete, split it yourself for a real validation set.

The yaml is `dataset.yaml`, the name FiftyOne's YOLOv5 importer looks for; Ultralytics takes any name
(`data=DEST/dataset.yaml`), or DEST itself, where it wants exactly one yaml, so there is no second one. It
names no `path`: both then take the yaml's own folder as the dataset root, so a copied or moved export reads
its own images, not the original's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from engine.export.common import category_vocabulary, image_boxes, iter_samples, write_image
from engine.io.atomic import atomic_write_bytes
from engine.io.storage import Location

log = logging.getLogger(__name__)

SPLIT = "train"
DATASET_YAML = "dataset.yaml"


def label_line(cls: int, xyxy: Sequence[float], width: int, height: int) -> str:
    x0, y0, x1, y1 = xyxy
    cx, cy = (x0 + x1) / 2 / width, (y0 + y1) / 2 / height
    return f"{cls} {cx:.6f} {cy:.6f} {(x1 - x0) / width:.6f} {(y1 - y0) / height:.6f}"


def export_yolo(run: Location, dest: Path) -> dict[str, Any]:
    """Write images, one label file per image, dataset.yaml and classes.txt; returns a summary."""
    dest.mkdir(parents=True, exist_ok=True)
    vocab = category_vocabulary(run)
    classes = vocab.index()
    images = boxes = dropped = 0
    for sample in iter_samples(run):
        record = sample.record
        w, h = record["width"], record["height"]
        clipped, _ = image_boxes(record)
        dropped += len(record["boxes"]) - len(clipped)
        lines = [label_line(classes[record["entities"][index]["category"]], xyxy, w, h)
                 for xyxy, index in zip(clipped.xyxy.tolist(), clipped.entity.tolist())]
        write_image(dest / "images" / SPLIT, sample.image_name(), sample.jpg)
        write_image(dest / "labels" / SPLIT, sample.image_name("txt"), "".join(f"{line}\n" for line in lines).encode())
        images += 1
        boxes += len(lines)
    data = {
        "train": f"images/{SPLIT}",
        "val": f"images/{SPLIT}",
        "nc": len(vocab.names),
        "names": dict(enumerate(vocab.names)),
    }
    atomic_write_bytes(dest / DATASET_YAML, yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode())
    atomic_write_bytes(dest / "classes.txt", "".join(f"{n}\n" for n in vocab.names).encode())
    log.info("yolo: %d images, %d boxes, %d classes", images, boxes, len(vocab.names))
    return {
        "format": "yolo",
        "dataset_yaml": str(dest / DATASET_YAML),
        "images": images,
        "boxes": boxes,
        "classes": len(vocab.names),
        "dropped_boxes": dropped,
    }
