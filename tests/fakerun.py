"""A small finished run directory written with the real ShardWriter, without models or Ray (≈ 0.1 s):
two shards of drawn images with known entities and boxes, a box that sticks out of its image (clipped by
the exporters), one wholly outside (dropped), a rejected and a failed sample."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from engine.records import Record
from engine.io.shards import ShardWriter

ENTITIES = [
    {"phrase": "a tabby cat", "category": "cat", "parent_category": "animal"},
    {"phrase": "the brown dog", "category": "dog", "parent_category": "animal"},
    {"phrase": "tv remote control", "category": "remote control", "parent_category": "device"},
    {"phrase": "café table", "category": "table", "parent_category": "furniture"},
]


def _jpeg(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _box(xyxy, score, entity, matched="phrase"):
    return {"xyxy": [float(v) for v in xyxy], "score": score, "entity": entity, "matched": matched, "teacher": "fake-teacher",
            "label_agreement": None, "described": None}


def make_records() -> list[Record]:
    """Six samples over two units: 4 ok (9 boxes, 1 partly outside, 1 wholly outside), 1 rejected, 1 failed."""
    rows = [
        # unit 0
        dict(key="img/0001", size=(64, 48), ents=[0, 1], caption="A tabby cat sleeps next to the brown dog.",
             boxes=[_box([2, 3, 30, 40], 0.91, 0), _box([-5, 10, 70, 47], 0.55, 1, "category")]),  # 2nd clipped
        dict(key="img/0002", size=(80, 60), ents=[2], caption="A remote lies on the sofa.",  # phrase not in caption
             boxes=[_box([10, 10, 40, 30], 0.42, 0), _box([50, 5, 79, 55], 0.73, 0, "category")]),
        dict(key="img/0003", size=(40, 40), ents=None, caption=None, boxes=[], status="rejected"),
        # unit 1
        dict(key="img/0004", size=(100, 50), ents=[3, 0], caption="A café table with a tabby cat on it.",
             boxes=[_box([0, 0, 100, 50], 0.99, 0), _box([20, 10, 35, 30], 0.35, 1), _box([120, 0, 130, 10], 0.5, 1)]),
        dict(key="img/0005", size=(50, 70), ents=[1], caption="The brown dog.",
             boxes=[_box([5, 5, 45, 65], 0.66, 0), _box([1, 1, 9, 9], 0.12, 0)]),
        dict(key="img/0006", size=(30, 30), ents=None, caption=None, boxes=[], status="failed"),
    ]
    records = []
    for i, row in enumerate(rows):
        unit, position = (0, i) if i < 3 else (1, i - 3)
        w, h = row["size"]
        record = Record(key=row["key"], source=f"fake-{unit}.tar", unit=unit, position=position,
                        image=_jpeg(w, h, (40 * i % 255, 120, 200)), width=w, height=h,
                        raw_caption=row["caption"] or "broken", caption=row["caption"],
                        factual_caption=row["caption"])
        if row.get("status") == "rejected":
            record.reject("decode", "undecodable_image", "cannot identify image file")
        elif row.get("status") == "failed":
            record.fail("ground", "exception", "RuntimeError: boom")
        else:
            record.entities = [dict(ENTITIES[e]) for e in row["ents"]]
            record.boxes = row["boxes"]
        records.append(record)
    return records


def make_run(out: Path) -> Path:
    """Write the fake run into `out` (shards, index, stats markers, manifest.json) and return it."""
    records = make_records()
    writer = ShardWriter(out, expected={0: 3, 1: 3})
    writer(records)
    (out / "manifest.json").write_text(
        json.dumps({"format": "granucap/1", "pipeline": "fake", "status": "complete", "dummy_models": False,
                    "units": {"planned": 2, "complete": 2}})
    )
    return out


# What the exporters must produce from make_run (boxes after clipping; the wholly outside one dropped).
OK_IMAGES = 4
BOXES_IN = 9
BOXES_OUT = 8
CATEGORIES = ["cat", "dog", "remote control", "table"]
