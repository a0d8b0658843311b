"""Label Studio tasks with pre-annotations, to review and correct the teacher's boxes by hand.

    DEST/tasks.json          a JSON list of tasks: {"data": {"image", "caption", "key"}, "predictions": [...]}
    DEST/label_config.xml    the labelling config: <Image name="image"> + <RectangleLabels name="label">
    DEST/images/{shard}/{key}.jpg

Each box is a prediction result `{"id", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
"original_width", "original_height", "image_rotation": 0, "value": {"x", "y", "width", "height",
"rotation": 0, "rectanglelabels": [category]}, "score", "meta": {"text": [phrase / parent]}}` with x, y, width,
height in percent of the image (Label Studio's convention). `data.image` is `image_url_prefix` + the
path relative to DEST. The default, `/data/local-files/?d=`, is Label Studio's Local Files URL: it serves
`LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT/images/...` once serving is on
(`LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`), the document root is DEST, and the project has a Local Files
source storage whose path holds the image (DEST/images; without one Label Studio answers 403). Nothing in
the files names DEST, so a moved export works with the root and storage pointed at its new place. With a
parent folder as the root, the prefix is `/data/local-files/?d=SUBDIR/`; with a web server, its URL.
docs/formats.md gives the steps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from engine.export.common import (PartFile, assemble_json, category_vocabulary, image_boxes, iter_samples,
                                  write_image)
from engine.io.atomic import atomic_write_bytes
from engine.io.storage import Location

log = logging.getLogger(__name__)

FROM_NAME, TO_NAME = "label", "image"
DEFAULT_URL_PREFIX = "/data/local-files/?d="


def label_config(names: list[str]) -> str:
    labels = "\n".join(f"    <Label value={quoteattr(n)}/>" for n in names)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="$image"/>\n'
        f'  <RectangleLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </RectangleLabels>\n'
        '  <Text name="caption" value="$caption"/>\n'
        "</View>\n"
    )


def rectangle(box_id: str, xyxy: Sequence[float], width: int, height: int,
              category: str, score: float, note: str) -> dict[str, Any]:
    x0, y0, x1, y1 = xyxy
    return {
        "id": box_id,
        "from_name": FROM_NAME,
        "to_name": TO_NAME,
        "type": "rectanglelabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {
            "x": 100.0 * x0 / width,
            "y": 100.0 * y0 / height,
            "width": 100.0 * (x1 - x0) / width,
            "height": 100.0 * (y1 - y0) / height,
            "rotation": 0,
            "rectanglelabels": [category],
        },
        "score": score,
        "meta": {"text": [note]},
    }


def export_labelstudio(run: Location, dest: Path, *, image_url_prefix: str = DEFAULT_URL_PREFIX) -> dict[str, Any]:
    """Write tasks.json with one prediction per image, label_config.xml and the images."""
    dest.mkdir(parents=True, exist_ok=True)
    vocab = category_vocabulary(run)
    target = dest / "tasks.json"
    tasks = PartFile(target, "tasks")
    boxes = dropped = 0
    for sample in iter_samples(run):
        record = sample.record
        w, h = record["width"], record["height"]
        rel = "images/" + sample.image_name()
        write_image(dest, rel, sample.jpg)
        clipped, positions = image_boxes(record)
        dropped += len(record["boxes"]) - len(clipped)
        results, scores = [], clipped.scores.tolist()
        for i, xyxy, index, matched, score in zip(positions.tolist(), clipped.xyxy.tolist(), clipped.entity.tolist(),
                                                  clipped.matched, scores):
            entity = record["entities"][index]
            note = f"{entity['phrase']} | {entity.get('parent_category') or ''} | matched {matched}"
            results.append(rectangle(f"{sample.shard}-{sample.stem}-{i}", xyxy, w, h, entity["category"], score, note))
        teachers = {teacher or "teacher" for teacher in clipped.teacher}
        boxes += len(results)
        tasks.add(
            {
                "data": {
                    "image": image_url_prefix + rel,
                    "caption": record.get("factual_caption") or record.get("caption") or "",
                    "key": record["key"],
                },
                "predictions": [
                    {
                        "model_version": ",".join(sorted(teachers)) or "granucap",
                        "score": sum(scores) / len(scores) if scores else 0.0,
                        "result": results,
                    }
                ],
            }
        )
    n_tasks = tasks.count
    assemble_json(target, {}, {"tasks": tasks}, array="tasks")
    atomic_write_bytes(dest / "label_config.xml", label_config(vocab.names).encode())
    log.info("labelstudio: %d tasks, %d boxes", n_tasks, boxes)
    return {
        "format": "labelstudio",
        "tasks_file": str(target),
        "label_config": str(dest / "label_config.xml"),
        "tasks": n_tasks,
        "boxes": boxes,
        "labels": len(vocab.names),
        "dropped_boxes": dropped,
    }
