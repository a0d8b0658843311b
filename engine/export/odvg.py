"""ODVG jsonl, the training format of Open-GroundingDino and MM-Grounding-DINO (mmdet `ODVGDataset`).

Two variants, as in those projects:
- `odvg` (detection): `DEST/odvg.jsonl` lines `{"filename", "height", "width", "detection": {"instances":
  [{"bbox": [x0, y0, x1, y1], "label": int, "category": str}]}}` plus `DEST/label_map.json`
  (`{"0": "cat", ...}`, keys from "0"), categories in name order.
- `odvg-grounding`: lines with `"grounding": {"caption": str, "regions": [{"bbox": [x0, y0, x1, y1],
  "phrase": str, "tokens_positive": [[start, end]]}]}`, one region per box. The caption is the factual
  caption (else the caption); a phrase found in it (case-insensitive) points at that span, a phrase that is
  not is appended as "phrase." and points there, so `caption[start:end]` is always the phrase.

Boxes are pixel xyxy, clipped to the image; images go to `DEST/images/{shard}/{key}.jpg` and `filename` is
relative to DEST (the dataset's `data_root` / image prefix).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from engine.export.common import category_vocabulary, image_boxes, iter_samples, write_image
from engine.io.atomic import atomic_write_bytes
from engine.io.storage import Location

log = logging.getLogger(__name__)

JSONL = "odvg.jsonl"
LABEL_MAP = "label_map.json"


def grounding_caption(record: dict[str, Any], phrases: list[str]) -> tuple[str, dict[str, list[int]]]:
    """The caption and, for each phrase, a [start, end) character span of it inside the caption."""
    caption = (record.get("factual_caption") or record.get("caption") or record.get("raw_caption") or "").strip()
    spans: dict[str, list[int]] = {}
    for phrase in phrases:
        if phrase in spans:
            continue
        at = caption.lower().find(phrase.lower()) if phrase else -1
        if at < 0:
            sep = " " if caption and caption.endswith((".", "!", "?")) else (". " if caption else "")
            caption = f"{caption}{sep}{phrase}"
            at = len(caption) - len(phrase)
            caption += "."
        spans[phrase] = [at, at + len(phrase)]
    return caption, spans


def _export(run: Location, dest: Path, *, variant: str, write_images: bool) -> dict[str, Any]:
    dest.mkdir(parents=True, exist_ok=True)
    vocab = category_vocabulary(run)
    labels = vocab.index()
    target = dest / JSONL
    tmp = target.with_name(f"{target.name}.tmp")
    lines = boxes = dropped = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for sample in iter_samples(run):
            record = sample.record
            filename = "images/" + sample.image_name()
            if write_images:
                write_image(dest, filename, sample.jpg)
            clipped, _ = image_boxes(record)
            dropped += len(record["boxes"]) - len(clipped)
            kept = [([round(v, 2) for v in xyxy], record["entities"][index])
                    for xyxy, index in zip(clipped.xyxy.tolist(), clipped.entity.tolist())]
            row: dict[str, Any] = {"filename": filename, "height": record["height"], "width": record["width"]}
            if variant == "detection":
                row["detection"] = {
                    "instances": [
                        {"bbox": xyxy, "label": labels[e["category"]], "category": e["category"]} for xyxy, e in kept
                    ]
                }
            else:
                caption, spans = grounding_caption(record, [e["phrase"] for _, e in kept])
                row["grounding"] = {
                    "caption": caption,
                    "regions": [
                        {"bbox": xyxy, "phrase": e["phrase"], "tokens_positive": [spans[e["phrase"]]]}
                        for xyxy, e in kept
                    ],
                }
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            lines += 1
            boxes += len(kept)
    tmp.replace(target)
    summary: dict[str, Any] = {
        "format": "odvg" if variant == "detection" else "odvg-grounding",
        "jsonl": str(target),
        "images": lines,
        "boxes": boxes,
        "dropped_boxes": dropped,
    }
    if variant == "detection":
        label_map = {str(i): name for i, name in enumerate(vocab.names)}
        atomic_write_bytes(dest / LABEL_MAP, json.dumps(label_map, indent=1, ensure_ascii=False).encode())
        summary["label_map"] = str(dest / LABEL_MAP)
        summary["categories"] = len(label_map)
    log.info("odvg %s: %d images, %d boxes", variant, lines, boxes)
    return summary


def export_odvg(run: Location, dest: Path, *, write_images: bool = True) -> dict[str, Any]:
    """ODVG detection variant: jsonl + label_map.json."""
    return _export(run, dest, variant="detection", write_images=write_images)


def export_odvg_grounding(run: Location, dest: Path, *, write_images: bool = True) -> dict[str, Any]:
    """ODVG grounding variant: caption + regions with phrase and tokens_positive."""
    return _export(run, dest, variant="grounding", write_images=write_images)
