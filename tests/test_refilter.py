"""`granucap refilter`: a new run from a run's candidates at other thresholds, no model, exactly once."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from engine.cli import main
from engine.config import ConfigError
from engine.io.inputs import Unit
from engine.io.plan import FileCount, Plan, save_plan
from engine.io.shards import ShardWriter
from engine.io.storage import Location
from engine.records import Record
from engine.refilter import refilter
from tests.test_quality import CANDIDATES, DOG, OTHER_DOG, STAGES, _jpeg


def write_parent(dest, units: int = 2) -> str:
    """A run of `units` units of two samples: one with the candidates of tests/test_quality.py (boxes kept
    at the run's 0.3), one the extract stage rejected; with its plan and config record."""
    writer = ShardWriter(dest, expected={u: 2 for u in range(units)}, fingerprint="parentfp")
    (dest / "configs").mkdir(parents=True)
    (dest / "configs" / "parentfp.json").write_text(json.dumps({"config": {"name": "p", "stages": STAGES}}))
    for unit in range(units):
        kept = Record(key=f"u{unit}/img", source="s.tar", unit=unit, position=0, image=_jpeg() + bytes([unit]),
                      width=200, height=100, caption="c", entities=[DOG, OTHER_DOG],
                      boxes=[CANDIDATES[0], CANDIDATES[2], CANDIDATES[1]], candidates=CANDIDATES)
        dropped = Record(key=f"u{unit}/bad", source="s.tar", unit=unit, position=1)
        dropped.reject("extract", "no_entities", "by hand")
        writer([kept, dropped])
    plan = Plan(shard_size=2, inputs=["s.tar"],
                files=[FileCount("webdataset", "s.tar", "s.tar", 2 * units, "tar_headers")],
                units=[Unit(index=u, kind="webdataset", path="s.tar", start=2 * u, stop=2 * u + 2, source="s.tar")
                       for u in range(units)],
                fingerprint="parentfp")
    save_plan(Location(dest), plan)
    return str(dest)


def _index(run) -> list[dict]:
    return sorted(pq.read_table(f"{run}/index").to_pylist(), key=lambda r: (r["unit"], r["position"]))


def test_a_higher_threshold_keeps_fewer_boxes_and_the_new_run_is_a_whole_run(tmp_path):
    parent = write_parent(tmp_path / "parent")
    out = tmp_path / "out"
    manifest = refilter(parent, out, ["stages.ground.box_threshold=0.7"])
    rows = _index(out)
    assert [(r["key"], r["status"]) for r in rows] == [(r["key"], r["status"]) for r in _index(parent)]
    for row in rows:
        if row["status"] == "ok":
            assert [b["score"] for b in row["boxes"]] == [0.9]  # dog A alone is over 0.7
            assert row["candidates"] == [dict(c, xyxy=[float(v) for v in c["xyxy"]]) for c in CANDIDATES]
            assert json.loads(row["provenance"][-1]["params"])["ground"]["box_threshold"] == 0.7
    assert manifest["status"] == "complete" and manifest["parent"]["fingerprint"] == "parentfp"
    assert manifest["counts"]["ok"] == 2 and manifest["counts"]["boxes"] == 2
    # the images came along, byte for byte, and the run exports like any other
    images = {s["__key__"]: s["jpg"] for s in wds.WebDataset(str(out / "shards" / "000001.tar"), shardshuffle=False)}
    assert images == {"u1_img": _jpeg() + bytes([1])}
    assert main(["export", "coco", str(out), str(tmp_path / "coco")]) == 0


def test_a_threshold_no_box_passes_rejects_the_sample_as_the_filter_would(tmp_path):
    parent = write_parent(tmp_path / "parent", units=1)
    manifest = refilter(parent, tmp_path / "out", ["stages.ground.box_threshold=0.95"])
    row = _index(tmp_path / "out")[0]
    assert row["status"] == "rejected" and row["error"]["stage"] == "filter" and row["boxes"] == []
    assert manifest["refilter"]["rejected_now"] == 1 and manifest["counts"]["ok"] == 0


def test_filter_settings_replay_too(tmp_path):
    parent = write_parent(tmp_path / "parent", units=1)
    refilter(parent, tmp_path / "out", ["stages.filter.max_boxes=3", "stages.filter.nms_iou=null"])
    scores = [b["score"] for b in _index(tmp_path / "out")[0]["boxes"]]
    assert scores == [0.9, 0.6, 0.5]  # no NMS: A's twin (0.5) is back, and the cap leaves B (0.4) out


def test_only_thresholds_and_the_filter_may_change_and_not_under_the_floor(tmp_path, capsys):
    parent = write_parent(tmp_path / "parent", units=1)
    with pytest.raises(ConfigError, match="stages.ground.model needs a new run"):
        refilter(parent, tmp_path / "a", ["stages.ground.model=other"])
    with pytest.raises(ConfigError, match="keep_candidates must not exceed"):
        refilter(parent, tmp_path / "b", ["stages.ground.box_threshold=0.1"])
    assert main(["refilter", parent, str(tmp_path / "c"), "--set", "stages.filter.resources.num_cpus=2"]) == 2
    assert "needs a new run" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="must not be RUN"):
        refilter(parent, parent, ["stages.ground.box_threshold=0.5"])


def test_an_interrupted_refilter_finishes_what_is_missing_and_nothing_twice(tmp_path):
    parent = write_parent(tmp_path / "parent", units=3)
    out = tmp_path / "out"
    refilter(parent, out, ["stages.ground.box_threshold=0.7"])
    kept = (out / "shards" / "000000.tar").stat().st_mtime_ns
    for name in ("000001.stats.json", "000001.tar"):  # a refilter stopped while writing unit 1
        (out / "shards" / name).unlink()
    manifest = refilter(parent, out, ["stages.ground.box_threshold=0.7"])
    assert manifest["refilter"]["units_written"] == 1 and manifest["counts"]["read"] == 6
    assert (out / "shards" / "000000.tar").stat().st_mtime_ns == kept
    assert [r["key"] for r in _index(out)] == [r["key"] for r in _index(parent)]
    with pytest.raises(ConfigError, match="other settings"):
        refilter(parent, out, ["stages.ground.box_threshold=0.5"])


def test_a_sample_the_new_filter_rejects_says_why_as_the_filter_stage_does(tmp_path):
    parent = write_parent(tmp_path / "parent", units=1)
    refilter(parent, tmp_path / "out", ["stages.filter.min_entities=3"])
    row = _index(tmp_path / "out")[0]
    assert row["status"] == "rejected" and row["error"]["kind"] == "too_few_entities"
    assert row["error"]["message"] == "2 entities < 3" and len(row["boxes"]) == 3  # kept, as the stage keeps them
