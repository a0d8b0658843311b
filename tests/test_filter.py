import numpy as np
import pytest

from engine import boxes as B
from engine.config import FilterSpec
from engine.records import Record
from engine.stages.filter import Filter


def box(xyxy, score, entity=0, matched="phrase"):
    return {"xyxy": list(map(float, xyxy)), "score": score, "entity": entity, "matched": matched, "teacher": "t"}


def record(boxes, entities=1, key="k"):
    ents = [{"phrase": f"p{i}", "category": f"c{i}", "parent_category": "x"} for i in range(entities)]
    return Record(key=key, source="s", width=100, height=100, entities=ents, boxes=boxes)


def test_iou_matrix_known_values():
    a = np.array([[0, 0, 10, 10]], dtype=float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], dtype=float)
    assert B.iou_matrix(a, b) == pytest.approx(np.array([[1.0, 50 / 150, 0.0]]))


def test_nms_groups_only_suppress_within_group():
    xyxy = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10]], dtype=float)
    scores = np.array([0.9, 0.8, 0.7])
    assert B.nms(xyxy, scores, 0.5).tolist() == [0]
    assert sorted(B.nms(xyxy, scores, 0.5, groups=np.array([0, 0, 1])).tolist()) == [0, 2]


def test_same_object_via_phrase_and_category_is_merged():
    # one entity, found twice (its phrase and its category) at nearly the same place: one box survives
    r = record([box([10, 10, 50, 50], 0.6, 0, "category"), box([11, 10, 50, 51], 0.8, 0, "phrase")])
    Filter(FilterSpec())([r])
    assert len(r.boxes) == 1 and r.boxes[0]["score"] == 0.8 and r.boxes[0]["matched"] == "phrase"


def test_overlapping_boxes_of_different_entities_kept_unless_class_agnostic():
    boxes = [box([10, 10, 50, 50], 0.9, 0), box([10, 10, 50, 50], 0.5, 1)]
    r = record([dict(b) for b in boxes], entities=2)
    Filter(FilterSpec())([r])
    assert len(r.boxes) == 2
    r2 = record([dict(b) for b in boxes], entities=2)
    Filter(FilterSpec(class_agnostic_nms_iou=0.5))([r2])
    assert [b["entity"] for b in r2.boxes] == [0]


def test_score_area_cap_and_clipping():
    boxes = [
        box([-10, -10, 40, 40], 0.9, 0),  # clipped to the image
        box([60, 60, 61, 61], 0.95, 1),  # area 1 < min_area
        box([0, 50, 50, 100], 0.2, 2),  # below min_score
        box([50, 0, 100, 50], 0.7, 3),
        box([50, 50, 100, 100], 0.6, 4),
    ]
    r = record(boxes, entities=5)
    Filter(FilterSpec(min_score=0.3, min_area=4, max_boxes=2))([r])
    assert [b["entity"] for b in r.boxes] == [0, 3]  # best two by score
    assert r.boxes[0]["xyxy"] == [0.0, 0.0, 40.0, 40.0]


def test_sample_rules_reject_with_reason_and_skip_not_ok():
    no_boxes = record([], key="a")
    no_entities = record([box([0, 0, 10, 10], 0.9)], entities=0, key="b")
    already = record([], key="c")
    already.reject("decode", "undecodable_image", "bad")
    out = Filter(FilterSpec(min_boxes=1, min_entities=1))([no_boxes, no_entities, already])
    assert [r.key for r in out] == ["a", "b", "c"]
    assert no_boxes.status == "rejected" and no_boxes.error["kind"] == "too_few_boxes"
    assert no_entities.error["kind"] == "too_few_entities"
    assert already.error["stage"] == "decode" and already.provenance == []
