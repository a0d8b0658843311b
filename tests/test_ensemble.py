"""Teacher ensembles: several grounding models on the same prompts, their boxes fused per entity."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.boxes import Boxes, fuse_teachers
from engine.config import GroundSpec

ROOT = Path(__file__).resolve().parent.parent


def _teacher(name, rows):
    return Boxes(xyxy=[r[0] for r in rows], scores=[r[1] for r in rows], entity=[r[2] for r in rows],
                 matched=[r[3] for r in rows], teacher=[name] * len(rows))


def test_weighted_boxes_fusion_by_hand():
    a = _teacher("a", [([0, 0, 10, 10], 0.8, 0, "phrase"), ([50, 50, 60, 60], 0.5, 0, "category"),
                       ([0, 0, 10, 10], 0.9, 1, "category")])
    b = _teacher("b", [([1, 1, 11, 11], 0.6, 0, "category"), ([2, 0, 12, 10], 0.4, 0, "phrase")])
    fused = fuse_teachers([a, b], iou=0.55)
    rows = {(r["entity"], r["teacher"]): r for r in fused.to_rows()}
    both = rows[(0, "a+b")]
    # a's 0.8 box, then b's 0.6 (IoU 81/119 with it) and b's 0.4 (IoU about 0.68 with their fused box) join it:
    # corners weighted by score, score the mean of each teacher's best (0.8 and 0.6)
    assert both["xyxy"] == pytest.approx([(0 * .8 + 1 * .6 + 2 * .4) / 1.8, (0 * .8 + 1 * .6 + 0 * .4) / 1.8,
                                          (10 * .8 + 11 * .6 + 12 * .4) / 1.8, (10 * .8 + 11 * .6 + 10 * .4) / 1.8])
    assert both["score"] == pytest.approx(0.7) and both["matched"] == "phrase"
    # entity 1's box and the far box of entity 0: one teacher each, kept without a single-teacher threshold
    assert rows[(1, "a")]["score"] == 0.9 and rows[(0, "a")]["xyxy"] == [50, 50, 60, 60]
    assert [r["score"] for r in fused.to_rows()] == sorted((r["score"] for r in fused.to_rows()), reverse=True)
    strict = fuse_teachers([a, b], iou=0.55, single_threshold=0.85)
    assert {(r["entity"], r["teacher"]) for r in strict.to_rows()} == {(0, "a+b"), (1, "a")}
    # boxes of different entities never fuse, however much they overlap
    assert len(fuse_teachers([_teacher("a", [([0, 0, 10, 10], 0.5, 0, "phrase")]),
                              _teacher("b", [([0, 0, 10, 10], 0.5, 1, "phrase")])], iou=0.5)) == 2


def test_an_ensemble_names_distinct_teachers_and_not_with_rescore_or_candidates():
    with pytest.raises(ValueError, match="differ"):
        GroundSpec(model="tiny:owlv2", teachers=["tiny:owlv2"])
    with pytest.raises(ValueError, match="ensemble"):
        GroundSpec(model="m", teachers=["n"], keep_candidates=0.1, box_threshold=0.3)


@pytest.mark.slow
def test_two_tiny_teachers_run_end_to_end_and_each_box_names_who_found_it(tmp_path, demo_input, model_cache):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", "pipelines/smoke.yaml", "-i", str(demo_input), "-o", str(out),
         "-q", "--set", f"cache_dir={model_cache}", "--set", "stages.ground.teachers=[tiny:owlv2]",
         "--set", "stages.ground.box_threshold=0.1", "--set", "stages.ground.fusion_iou=0.1"],
        cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = pq.read_table(out / "index").to_pylist()
    teachers = {b["teacher"] for r in rows for b in r["boxes"]}
    assert teachers <= {"tiny:grounding-dino", "tiny:owlv2", "tiny:grounding-dino+tiny:owlv2"}
    assert "tiny:grounding-dino+tiny:owlv2" in teachers  # random tiny teachers: fused at a low IoU
    ground = next(p for r in rows if r["status"] == "ok" for p in r["provenance"] if p["stage"] == "ground")
    assert ground["model"].startswith("tiny:grounding-dino + tiny:owlv2")
    assert json.loads(ground["params"])["teachers"] == ["tiny:grounding-dino", "tiny:owlv2"]
