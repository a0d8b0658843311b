"""`engine.boxes.Boxes`: what it refuses to hold, its round trip to the record's rows (as a run writes them to
shards and index parts), and selections that keep its columns aligned."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from tests.fakerun import make_run

from detector.data import record_to_sample
from engine.boxes import Boxes
from engine.export.common import iter_index_rows, iter_samples
from engine.records import BOX_TYPE, Record, from_table, to_table


def columns(n: int = 3, **changes) -> dict:
    values = {
        "xyxy": [[10.0 * i, 5.0, 10.0 * i + 8, 9.0] for i in range(n)],
        "scores": [0.9 - 0.1 * i for i in range(n)],
        "entity": list(range(n)),
        "matched": ["phrase", "category", "exemplar"][:n],
        "teacher": ["gdino", "gdino", "owlv2"][:n],
    }
    values.update(changes)
    return values


@pytest.mark.parametrize(("changes", "message"), [
    ({"xyxy": [[0, 0, 8, 9], [20, 5, 12, 9], [0, 0, 1, 1]]}, r"box 1 has x0 > x1: \[20.0, 5.0, 12.0, 9.0\]"),
    ({"xyxy": [[0, 0, 8, 9], [0, 0, 1, 1], [0, 9, 1, 2]]}, "box 2 has y0 > y1"),
    ({"xyxy": [[0, 0, 8, 9], [0, float("nan"), 1, 1], [0, 0, 1, 1]]}, "box 1 has a non-finite xyxy"),
    ({"xyxy": [[0, 0, 8, 9], [0, 0, float("inf"), 1], [0, 0, 1, 1]]}, "box 1 has a non-finite xyxy"),
    ({"scores": [0.5, float("nan"), 0.2]}, "box 1 has a non-finite score"),
    ({"scores": [0.5, 0.4]}, r"one entry per box: xyxy \(3, 4\), scores \(2,\)"),
    ({"teacher": ["gdino"]}, r"one entry per box: .*teacher \(1,\)"),
    ({"entity": [[0], [1], [2]]}, r"one entry per box: .*entity \(3, 1\)"),
    ({"xyxy": [[0, 0, 8], [0, 0, 1], [0, 0, 1]]}, r"xyxy has shape \(3, 3\), expected \(N, 4\)"),
    ({"xyxy": [[0, 0, 8, 9], [0, 0, 1], [0, 0, 1, 1]]}, "every xyxy must be 4 numbers"),
    ({"entity": [0, 1.5, 2]}, "entity indices must be integers"),
])
def test_construction_refuses_what_a_record_cannot_hold(changes, message):
    with pytest.raises(ValueError, match=message):
        Boxes(**columns(**changes))


def test_a_zero_size_box_is_allowed():
    assert len(Boxes(**columns(1, xyxy=[[3, 4, 3, 4]]))) == 1


def test_from_rows_names_the_box_that_lacks_a_field():
    rows = Boxes(**columns()).to_rows()
    del rows[2]["score"]
    with pytest.raises(ValueError, match="box 2 has no score"):
        Boxes.from_rows(rows)


def test_rows_a_run_wrote_come_back_unchanged(tmp_path):
    """Shard json and index parts as the real writer leaves them: rows -> Boxes -> rows is the identity, and
    the Arrow column built from the returned rows equals the one on disk."""
    run = make_run(tmp_path / "run")
    from_shards = [sample.record["boxes"] for sample in iter_samples(run)]
    from_index = [row["boxes"] for row in iter_index_rows(run, ["boxes"])]
    assert sum(map(len, from_shards)) > 0
    for rows in [*from_shards, *from_index]:
        assert Boxes.from_rows(rows).to_rows() == rows
    column = [rows or [] for rows in from_index]
    again = [Boxes.from_rows(rows).to_rows() for rows in column]
    box_list = pa.list_(BOX_TYPE)
    assert pa.array(again, type=box_list).equals(pa.array(column, type=box_list))


def test_rows_without_matched_or_teacher_keep_them_none_through_the_record_table():
    rows = [{"xyxy": [1.0, 2.0, 3.0, 4.0], "score": 0.5, "entity": 0, "matched": None, "teacher": None,
             "label_agreement": None, "described": None},
            {"xyxy": [0.0, 0.0, 10.0, 10.0], "score": 1.0, "entity": 1, "matched": "category", "teacher": "t",
             "label_agreement": False, "described": "a dog|dog|animal"}]
    record = Record(key="k", source="s", entities=[{"phrase": "a", "category": "a", "parent_category": None}] * 2,
                    boxes=rows)
    [read] = from_table(to_table([record]))
    boxes = Boxes.from_rows(read.boxes)
    assert boxes.to_rows() == rows
    assert Boxes.from_rows([{"xyxy": [1, 2, 3, 4], "score": 1, "entity": 0}]).to_rows() == [
        {"xyxy": [1.0, 2.0, 3.0, 4.0], "score": 1.0, "entity": 0, "matched": None, "teacher": None,
         "label_agreement": None, "described": None}]


@pytest.mark.parametrize("index", [[False, True, True], np.array([2, 1]), [1, 2]])
def test_select_keeps_every_column_aligned(index):
    boxes = Boxes(**columns())
    rows = boxes.to_rows()
    picked = np.arange(3)[np.asarray(index)]
    assert boxes.select(index).to_rows() == [rows[i] for i in picked]


def test_empty_boxes_behave_as_boxes():
    empty = Boxes.empty()
    assert len(empty) == 0 and empty.to_rows() == [] and empty.xyxy.shape == (0, 4)
    assert len(Boxes.from_rows([])) == 0
    boxes = Boxes(**columns())
    assert len(boxes.select([])) == 0 and len(boxes.select(np.zeros(3, dtype=bool))) == 0
    assert Boxes.concat([empty, boxes, Boxes.empty()]).to_rows() == boxes.to_rows()
    assert len(Boxes.concat([])) == 0
    assert empty.clip(10, 10).has_area().shape == (0,)


def test_concat_keeps_the_parts_in_order():
    boxes = Boxes(**columns())
    rows = boxes.to_rows()
    assert Boxes.concat([boxes.select([2]), boxes.select([0, 1])]).to_rows() == [rows[2], rows[0], rows[1]]


def test_clip_moves_coordinates_only_and_a_box_outside_has_no_area_left():
    boxes = Boxes(**columns(3, xyxy=[[-5, 10, 70, 47], [120, 0, 130, 10], [1, 1, 9, 9]]))
    clipped = boxes.clip(64, 48)
    assert clipped.xyxy.tolist() == [[0, 10, 64, 47], [64, 0, 64, 10], [1, 1, 9, 9]]
    assert clipped.has_area().tolist() == [True, False, True]
    assert [row["xyxy"] for row in boxes.to_rows()][0] == [-5.0, 10.0, 70.0, 47.0]  # the original is untouched
    assert [{k: v for k, v in row.items() if k != "xyxy"} for row in clipped.to_rows()] == \
        [{k: v for k, v in row.items() if k != "xyxy"} for row in boxes.to_rows()]


def test_student_drops_boxes_of_unknown_entities_and_refuses_malformed_ones():
    image = Image.new("RGB", (64, 48))
    entities = [{"phrase": "a cat", "category": "cat", "parent_category": "animal"}]
    rows = Boxes(**columns(3, entity=[0, 5, 0])).to_rows()
    sample = record_to_sample(image=image, record={"key": "k", "entities": entities, "boxes": rows})
    assert sample.boxes.tolist() == [rows[0]["xyxy"], rows[2]["xyxy"]]
    assert sample.concepts == ["cat", "cat"]
    rows[0]["xyxy"] = [30.0, 5.0, 10.0, 9.0]
    with pytest.raises(ValueError, match="box 0 has x0 > x1"):
        record_to_sample(image=image, record={"key": "k", "entities": entities, "boxes": rows})
