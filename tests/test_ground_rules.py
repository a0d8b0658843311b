"""Constructed cases for the ground stage's DetCLIPv3 assignment rule, per-field thresholds and the filter's NMS.

A scripted backend returns chosen detections, so each rule is checked on boxes we know (no model needed).
"""

from __future__ import annotations

import io

from PIL import Image

from engine.backends.base import Detection
from engine.config import FilterSpec, GroundSpec
from engine.records import Record
from engine.stages.filter import Filter
from engine.stages.ground import Ground

ENTITIES = [
    {"phrase": "a black cat", "category": "cat", "parent_category": "animal"},
    {"phrase": "a white cat", "category": "cat", "parent_category": "animal"},
    {"phrase": "sofa", "category": "furniture", "parent_category": "object"},
    {"phrase": "red sofa", "category": "sofa", "parent_category": "furniture"},
]


class Scripted:
    """GroundingBackend that answers every image with the same detections (prompt 0), recording its prompts."""

    model_id = "scripted"
    max_text_tokens = 256

    def __init__(self, detections: list[Detection]) -> None:
        self.detections = detections
        self.prompts: list[list[str]] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def detect(self, images, prompts):
        self.prompts += prompts
        return [list(self.detections) for _ in images]


def ground(detections, **spec) -> tuple[Record, Scripted]:
    stage = Ground(GroundSpec(model="scripted", **spec))
    stage.backend = Scripted(detections)
    stage._ready = True  # setup() would load a model
    buf = io.BytesIO()
    Image.new("RGB", (100, 80)).save(buf, format="JPEG")
    rec = Record(key="k", source="s", image=buf.getvalue(), width=100, height=80, caption="c",
                 entities=[dict(e) for e in ENTITIES])
    return stage([rec])[0], stage.backend


def det(label: str, score: float, xyxy=(10, 10, 50, 50)) -> Detection:
    return Detection(xyxy=xyxy, score=score, label=label, prompt_index=0)


def test_prompt_is_glip_style_and_deduplicated():
    _, backend = ground([])
    assert backend.prompts == [["a black cat. cat. a white cat. sofa. furniture. red sofa."]]


def test_either_field_assigns_the_whole_entity_phrase_first():
    rec, _ = ground([det("cat", 0.9), det("a white cat", 0.8), det("sofa", 0.7), det("red sofa", 0.6),
                     det("furniture", 0.5), det("banana", 0.99)])
    got = [(b["entity"], b["matched"]) for b in rec.boxes]
    # "cat" is the category of entities 0 and 1: the first in caption order; "sofa" is entity 2's phrase and
    # entity 3's category: the phrase wins; an unknown label is dropped
    assert got == [(0, "category"), (1, "phrase"), (2, "phrase"), (3, "phrase"), (2, "category")]
    assert all(b["teacher"] == "scripted" for b in rec.boxes)


def test_per_field_thresholds():
    dets = [det("a black cat", 0.45), det("cat", 0.45), det("red sofa", 0.7), det("furniture", 0.7)]
    rec, _ = ground(dets, box_threshold=0.4)
    assert len(rec.boxes) == 4
    rec, _ = ground(dets, box_threshold=0.4, phrase_threshold=0.5)
    assert [(b["entity"], b["matched"]) for b in rec.boxes] == [(0, "category"), (3, "phrase"), (2, "category")]
    rec, _ = ground(dets, box_threshold=0.4, category_threshold=0.8)
    assert [(b["entity"], b["matched"]) for b in rec.boxes] == [(0, "phrase"), (3, "phrase")]


def test_nms_merges_one_objects_phrase_and_category_boxes_but_not_two_entities():
    rec, _ = ground([
        det("a black cat", 0.9, (10, 10, 50, 50)),
        det("cat", 0.8, (12, 11, 50, 52)),  # same object via its category: merged into the phrase box
        det("a white cat", 0.7, (11, 10, 50, 50)),  # another entity on the same spot: kept
        det("sofa", 0.6, (-20, 40, 130, 95)),  # out of the image: clipped
    ], box_threshold=0.1)
    assert len(rec.boxes) == 4
    kept = Filter(FilterSpec(nms_iou=0.5))([rec.copy()])[0].boxes
    assert [(b["entity"], b["matched"], b["score"]) for b in kept] == [(0, "phrase", 0.9), (1, "phrase", 0.7),
                                                                       (2, "phrase", 0.6)]
    assert kept[2]["xyxy"] == [0.0, 40.0, 100.0, 80.0]
    agnostic = Filter(FilterSpec(nms_iou=0.5, class_agnostic_nms_iou=0.5))([rec.copy()])[0].boxes
    assert [b["entity"] for b in agnostic] == [0, 2]
