"""Filter: box-level cleaning (score, area, NMS, cap) then sample-level rules (min boxes, min entities).

Dropped boxes simply leave the record; a sample that ends with too few boxes or entities is rejected with
the reason, so it is counted in the index rather than silently lost.
"""

from __future__ import annotations

import json

import numpy as np

from engine import boxes as B
from engine.boxes import Boxes
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
        boxes = self.filter_boxes(Boxes.from_rows(record.boxes), width=record.width or 0, height=record.height or 0)
        record.boxes = boxes.to_rows()
        record.stamp(self.name, "rules", params=self._params)
        rejected = sample_rules(len(record.entities), len(boxes), spec)
        if rejected is not None:
            record.reject(self.name, *rejected)

    def filter_boxes(self, boxes: Boxes, *, width: float, height: float) -> Boxes:
        return clean_boxes(boxes, self.spec, width=width, height=height)


def sample_rules(entities: int, boxes: int, spec: FilterSpec) -> tuple[str, str] | None:
    """(kind, message) when a sample with this many entities and kept boxes is rejected, else None."""
    if entities < spec.min_entities:
        return "too_few_entities", f"{entities} entities < {spec.min_entities}"
    if boxes < spec.min_boxes:
        return "too_few_boxes", f"{boxes} boxes < {spec.min_boxes}"
    return None


def clean_boxes(boxes: Boxes, spec: FilterSpec, *, width: float, height: float) -> Boxes:
    """Clipped to the image (when its size is known), over `min_score` and `min_area`, after NMS, the best
    `max_boxes`, best score first."""
    if width and height:
        boxes = boxes.clip(width, height)
    boxes = boxes.select((boxes.scores >= spec.min_score) & (boxes.area() > spec.min_area))
    if spec.nms_iou is not None:
        # One object found through both its phrase and its category: keep the best box per entity.
        boxes = boxes.select(B.nms(boxes.xyxy, boxes.scores, spec.nms_iou, groups=boxes.entity))
    if spec.class_agnostic_nms_iou is not None:
        boxes = boxes.select(B.nms(boxes.xyxy, boxes.scores, spec.class_agnostic_nms_iou))
    return boxes.select(np.argsort(-boxes.scores, kind="stable")[: spec.max_boxes])
