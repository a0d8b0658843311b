"""Filter: box-level cleaning (score, area, NMS, cap) then sample-level rules (min boxes, min entities).

Dropped boxes simply leave the record; a sample that ends with too few boxes or entities is rejected with
the reason, so it is counted in the index rather than silently lost.
"""

from __future__ import annotations

import json

import numpy as np

from engine import boxes as B
from engine.config import FilterSpec
from engine.records import Record
from engine.stages.base import Stage


class Filter(Stage):
    name = "filter"
    requires = ("entities", "boxes", "width", "height")
    provides = ("boxes",)

    def __init__(self, spec: FilterSpec) -> None:
        super().__init__(spec)
        self._params = json.dumps(spec.model_dump(exclude={"resources"}), sort_keys=True)

    def process_one(self, record: Record) -> None:
        spec: FilterSpec = self.spec
        record.boxes = self.filter_boxes(record.boxes, width=record.width or 0, height=record.height or 0)
        record.stamp(self.name, "rules", params=self._params)
        if len(record.entities) < spec.min_entities:
            record.reject(self.name, "too_few_entities", f"{len(record.entities)} entities < {spec.min_entities}")
        elif len(record.boxes) < spec.min_boxes:
            record.reject(self.name, "too_few_boxes", f"{len(record.boxes)} boxes < {spec.min_boxes}")

    def filter_boxes(self, boxes: list[dict], *, width: float, height: float) -> list[dict]:
        spec: FilterSpec = self.spec
        if not boxes:
            return []
        xyxy = B.as_array([b["xyxy"] for b in boxes])
        if width and height:
            xyxy = B.clip(xyxy, width, height)
        scores = np.asarray([b["score"] for b in boxes], dtype=np.float64)
        entity = np.asarray([b["entity"] for b in boxes], dtype=np.int64)
        keep = np.flatnonzero((scores >= spec.min_score) & (B.area(xyxy) > spec.min_area))
        if spec.nms_iou is not None and len(keep):
            # One object found through both its phrase and its category: keep the best box per entity.
            keep = keep[B.nms(xyxy[keep], scores[keep], spec.nms_iou, groups=entity[keep])]
        if spec.class_agnostic_nms_iou is not None and len(keep):
            keep = keep[B.nms(xyxy[keep], scores[keep], spec.class_agnostic_nms_iou)]
        keep = keep[np.argsort(-scores[keep], kind="stable")][: spec.max_boxes]
        out = []
        for i in keep:
            box = dict(boxes[i])
            box["xyxy"] = [float(v) for v in xyxy[i]]
            out.append(box)
        return out
