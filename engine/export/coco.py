"""COCO detection JSON: `DEST/annotations.json` + `DEST/images/{shard}/{key}.jpg`.

Categories are the entities' categories (ids 1..K in name order) with their most frequent parent category
as COCO's `supercategory`. Each annotation keeps what COCO has no field for: the entity's `phrase`,
`parent_category`, the teacher's `score`, which field `matched` and the `teacher` model. Boxes are clipped
to the image; a box with nothing left is dropped and counted. The file loads in `pycocotools.COCO`, and
because every annotation has a score it also works as a results file (`COCO.loadRes`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from engine.export import run_name
from engine.export.common import (PartFile, assemble_json, category_vocabulary, image_boxes, iter_samples,
                                  write_image)
from engine.io.storage import Location

log = logging.getLogger(__name__)

ANNOTATIONS = "annotations.json"


def export_coco(run: Location, dest: Path, *, write_images: bool = True) -> dict[str, Any]:
    """Write the run's ok samples as a COCO detection dataset; returns a summary."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest = run.read_json("manifest.json")
    vocab = category_vocabulary(run)
    cat_ids = {name: i + 1 for i, name in enumerate(vocab.names)}
    target = dest / ANNOTATIONS
    images, annotations = PartFile(target, "images"), PartFile(target, "annotations")
    dropped = 0
    for image_id, sample in enumerate(iter_samples(run), start=1):
        record = sample.record
        file_name = "images/" + sample.image_name()
        if write_images:
            write_image(dest, file_name, sample.jpg)
        images.add(
            {
                "id": image_id,
                "file_name": file_name,
                "width": record["width"],
                "height": record["height"],
                "granucap_key": record["key"],
                "caption": record.get("factual_caption") or record.get("caption") or record.get("raw_caption"),
            }
        )
        boxes, _ = image_boxes(record)
        dropped += len(record["boxes"]) - len(boxes)
        for (x0, y0, x1, y1), score, index, matched, teacher in zip(
                boxes.xyxy.tolist(), boxes.scores.tolist(), boxes.entity.tolist(), boxes.matched, boxes.teacher):
            entity = record["entities"][index]
            annotations.add(
                {
                    "id": annotations.count + 1,
                    "image_id": image_id,
                    "category_id": cat_ids[entity["category"]],
                    "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": round((x1 - x0) * (y1 - y0), 2),
                    "iscrowd": 0,
                    "score": round(score, 5),
                    "phrase": entity["phrase"],
                    "parent_category": entity.get("parent_category"),
                    "matched": matched,
                    "teacher": teacher,
                }
            )
    head = {
        "info": {
            "description": f"granucap run {run_name(run)} (pipeline {manifest.get('pipeline')})",
            "version": manifest.get("format", ""),
            "date_created": time.strftime("%Y-%m-%d"),
            "contributor": "granucap",
            "dummy_models": bool(manifest.get("dummy_models")),
        },
        "licenses": [],
        "categories": [
            {"id": cat_ids[n], "name": n, "supercategory": vocab.parents[n]} for n in vocab.names
        ],
    }
    n_images, n_annotations = images.count, annotations.count
    assemble_json(target, head, {"images": images, "annotations": annotations})
    log.info("coco: %d images, %d annotations, %d categories", n_images, n_annotations, len(vocab.names))
    return {
        "format": "coco",
        "annotations_file": str(target),
        "images": n_images,
        "annotations": n_annotations,
        "categories": len(vocab.names),
        "dropped_boxes": dropped,
    }
