"""Student detector: shard streaming, prompt/label building (the loss: test_detector_loss.py)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

webdataset = pytest.importorskip("webdataset")

from detector.data import build_prompt, collate, iter_shard_samples  # noqa: E402
from engine.io.shard_reader import complete_unit_ids  # noqa: E402

SHAPES = {  # name -> (colour, drawing method)
    "square": ((220, 30, 30), "rectangle"),
    "circle": ((30, 60, 220), "ellipse"),
}
COLOURS = {"square": "red", "circle": "blue"}


def _make_sample(index: int, rng: np.random.Generator) -> tuple[bytes, dict]:
    """A noisy 128x96 image with one or two shapes, and its GranuCap record."""
    width, height = 128, 96
    noise = rng.integers(0, 80, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(noise)
    draw = ImageDraw.Draw(image)
    names = ["square", "circle"] if index % 2 == 0 else ["circle"]
    entities, boxes = [], []
    for slot, name in enumerate(names):
        colour, method = SHAPES[name]
        x0 = 8 + slot * 60 + int(rng.integers(0, 10))
        y0 = 10 + int(rng.integers(0, 30))
        x1, y1 = x0 + 40, y0 + 40
        getattr(draw, method)([x0, y0, x1, y1], fill=colour)
        entities.append({"phrase": f"{COLOURS[name]} {name}", "category": name, "parent_category": "shape"})
        boxes.append({"xyxy": [x0, y0, x1, y1], "score": 0.9, "entity": slot, "matched": "category",
                      "teacher": "hand"})
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    key = f"sample{index:04d}"
    record = {
        "key": key, "source": "synthetic", "width": width, "height": height, "raw_caption": "shapes",
        "caption": "shapes on noise", "factual_caption": "shapes on noise", "entities": entities,
        "boxes": boxes, "status": "ok", "provenance": {},
    }
    return buffer.getvalue(), record


def write_run(run_dir, *, shard_sizes=(3, 2), extra_incomplete=True, seed=0):
    """A hand-made GranuCap run: complete shards with markers, plus a marker-less shard and a .tmp file."""
    shard_dir = run_dir / "shards"
    shard_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    records, index = [], 0
    sizes = list(shard_sizes) + ([2] if extra_incomplete else [])
    for n, size in enumerate(sizes):
        complete = n < len(shard_sizes)
        with webdataset.TarWriter(str(shard_dir / f"{n:06d}.tar")) as sink:
            for _ in range(size):
                jpg, record = _make_sample(index, rng)
                index += 1
                sink.write({"__key__": record["key"], "jpg": jpg, "json": record})
                if complete:
                    records.append(record)
        if complete:
            (shard_dir / f"{n:06d}.stats.json").write_text(json.dumps({"count": size}))
    (shard_dir / f"{len(sizes):06d}.tar.tmp").write_bytes(b"partial")
    return records


def test_stream_reads_complete_shards_only(tmp_path):
    records = write_run(tmp_path)
    assert complete_unit_ids(tmp_path) == [0, 1]
    samples = list(iter_shard_samples(tmp_path))
    assert [s.key for s in samples] == [r["key"] for r in records]
    for sample, record in zip(samples, records):
        assert sample.image.mode == "RGB" and sample.image.size == (record["width"], record["height"])
        expected = torch.tensor([b["xyxy"] for b in record["boxes"]], dtype=torch.float32)
        assert torch.equal(sample.boxes, expected)
        assert sample.concepts == [record["entities"][b["entity"]]["category"] for b in record["boxes"]]
        assert sample.phrases == [record["entities"][b["entity"]]["phrase"] for b in record["boxes"]]


def test_stream_shuffle_is_seeded_and_complete(tmp_path):
    records = write_run(tmp_path, shard_sizes=(4, 4, 4), extra_incomplete=False)
    first = [s.key for s in iter_shard_samples(tmp_path, shuffle_buffer=8, seed=1)]
    again = [s.key for s in iter_shard_samples(tmp_path, shuffle_buffer=8, seed=1)]
    assert first == again
    assert sorted(first) == sorted(r["key"] for r in records)
    assert first != [r["key"] for r in records]


def test_build_prompt_dedups_and_spans():
    text, spans = build_prompt(["Red Square", "square", "red square", "st. louis", "", "square"])
    assert text == "red square. square. st louis."
    assert list(spans) == ["red square", "square", "st louis"]
    for concept, (start, end) in spans.items():
        assert text[start:end] == concept
    assert build_prompt([]) == ("", {})


def test_collate_labels(tmp_path, gdino_processor):
    write_run(tmp_path)
    samples = list(iter_shard_samples(tmp_path))[:3]
    batch = collate(samples, gdino_processor)
    assert batch["pixel_values"].shape[0] == 3 and batch["input_ids"].shape[0] == 3
    assert len(batch["labels"]) == 3
    for sample, target in zip(samples, batch["labels"]):
        n = len(sample.boxes)
        assert target["boxes"].shape == (n, 4) and target["class_labels"].shape == (n,)
        assert target["class_labels"].dtype == torch.long
        assert float(target["boxes"].min()) >= 0.0 and float(target["boxes"].max()) <= 1.0
        # cxcywh normalised by the image size gives back the pixel box
        width, height = sample.image.size
        cx, cy, w, h = target["boxes"].unbind(-1)
        back = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                            (cy + h / 2) * height], -1)
        assert torch.allclose(back, sample.boxes, atol=1e-3)
        # without an rng the prompt is the box categories in order; a label is its concept's position there
        _, spans = build_prompt(sample.concepts)
        assert [list(spans)[i] for i in target["class_labels"].tolist()] == sample.concepts

