"""End to end: the CLI runs the smoke pipeline on embedded Ray over a demo dump with a broken image."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from engine.config import load_config
from engine.io.plan import plan_units
from engine.io.readers import read_unit
from engine.runner import run_stage_locally

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def granucap(*args, cwd=ROOT):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=540
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, demo_input, model_cache):
    out = tmp_path_factory.mktemp("smoke-out")
    args = ["run", "pipelines/smoke.yaml", "--input", str(demo_input), "--output", str(out), "--quiet",
            "--set", f"cache_dir={model_cache}", "--set", "stages.ground.keep_candidates=0.02"]
    proc = granucap(*args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, args, proc


def test_full_layout_and_counts_add_up(smoke_run):
    out, _, proc = smoke_run
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["read"] == 12
    assert counts["read"] == counts["ok"] + counts["rejected"] + counts["failed"]
    assert manifest["status"] == "complete" and manifest["units"] == {"planned": 2, "complete": 2}
    assert manifest["dummy_models"] is True
    assert set(manifest["prompts"]) >= {"recaption", "factual", "entities", "system"}
    assert json.loads(proc.stdout.strip().splitlines()[-1])["read"] == 12
    assert sorted(p.name for p in (out / "shards").iterdir()) == [
        "000000.stats.json", "000000.tar", "000001.stats.json", "000001.tar"]
    assert sorted(p.name for p in (out / "index").iterdir()) == ["000000.parquet", "000001.parquet"]


def test_corrupt_image_is_a_rejected_row(smoke_run):
    out = smoke_run[0]
    rows = pq.read_table(out / "index").to_pylist()
    assert len(rows) == 12 and len({r["key"] for r in rows}) == 12
    broken = next(r for r in rows if r["key"] == "000000002")
    assert broken["status"] == "rejected"
    assert broken["error"]["stage"] == "decode"


def test_shards_read_back_with_webdataset(smoke_run):
    out = smoke_run[0]
    rows = {r["key"]: r for r in pq.read_table(out / "index").to_pylist()}
    ok_keys = {k for k, r in rows.items() if r["status"] == "ok"}
    tars = sorted(str(p) for p in (out / "shards").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert {s["__key__"] for s in samples} == ok_keys
    assert ok_keys, "the smoke run should keep some samples"
    for s in samples:
        record = s["json"]
        assert s["jpg"].size == (record["width"], record["height"])
        assert record["entities"] and record["boxes"]
        stages = [p["stage"] for p in record["provenance"]]
        assert stages == ["decode", "recaption", "extract", "ground", "filter"]
        for box in record["boxes"]:
            x0, y0, x1, y1 = box["xyxy"]
            assert 0 <= x0 <= x1 <= record["width"] and 0 <= y0 <= y1 <= record["height"]
            assert 0 <= box["entity"] < len(record["entities"])
            assert box["matched"] in ("phrase", "category")


def test_rerun_skips_complete_shards(smoke_run):
    out, args, _ = smoke_run
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "shards").iterdir()}
    proc = granucap(*args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "shards").iterdir()}
    assert after == before
    assert json.loads((out / "manifest.json").read_text())["counts"]["read"] == 12


def test_other_input_into_same_output_is_refused(smoke_run, tmp_path):
    from engine.demo import write_demo_input

    out, _, _ = smoke_run
    write_demo_input(tmp_path, samples=3, per_tar=3, seed=1)
    proc = granucap("run", "pipelines/smoke.yaml", "-i", str(tmp_path), "-o", str(out), "-q")
    assert proc.returncode == 1 and "different input plan" in proc.stderr


def test_glip_path_without_ray_uses_raw_captions_and_noun_phrases(demo_input, model_cache):
    config = load_config(ROOT / "pipelines" / "glip.yaml",
                         ["stages.ground.model=tiny:grounding-dino", "stages.ground.box_threshold=0.05",
                          "stages.ground.text_threshold=0.05", f"cache_dir={model_cache}"])
    unit = plan_units([str(demo_input)], shard_size=6)[0]
    records = run_stage_locally(list(read_unit(unit)), config)
    assert len(records) == 6
    good = [r for r in records if r.ok]
    assert good
    for r in good:
        assert r.caption == r.raw_caption
        categories = {e["category"] for e in r.entities}
        assert categories & {"square", "circle", "triangle"}, (r.raw_caption, r.entities)


def test_eval_run_scores_the_smoke_run_against_the_demo_annotations(smoke_run, demo_input, tmp_path):
    """The demo input carries its drawn shapes as COCO boxes: every demo image is scored, the broken one as
    rejected, and the counts tie out with the run's index and the annotations."""
    out, _, _ = smoke_run
    scores = tmp_path / "scores.json"
    proc = granucap("eval", "--run", str(out), "--coco", str(demo_input / "annotations.json"),
                    "--json-out", str(scores))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "images: 12 of 12 in GT scored" in proc.stdout
    result = json.loads(scores.read_text())
    index = pq.read_table(out / "index").to_pylist()
    assert result["images"]["rejected"] == sum(r["status"] == "rejected" for r in index) >= 1
    assert result["run_boxes"]["total"] == sum(len(r["boxes"]) for r in index if r["status"] == "ok")
    gt = json.loads((demo_input / "annotations.json").read_text())
    assert result["gt_boxes"] == len(gt["annotations"]) == result["tp"] + result["fn"]
    assert result["boxes"] == result["tp"] + result["fp"] == result["run_boxes"]["scored"]


def test_replaying_the_runs_own_thresholds_on_its_candidates_gives_its_boxes(smoke_run, demo_input, tmp_path):
    """What `eval --sweep` (and refilter) rely on: ground's thresholds and the filter, replayed without the
    teacher on the candidates the run kept, give every sample the boxes and the verdict the run gave it."""
    from engine.boxes import Boxes
    from engine.quality import replay, run_stage_specs
    from engine.stages.ground import field_thresholds

    out, _, _ = smoke_run
    ground, spec = run_stage_specs(out)
    replayed = 0
    for row in pq.read_table(out / "index").to_pylist():
        if row["status"] == "ok" or (row["error"] or {}).get("stage") == "filter":
            kept, rejected = replay(Boxes.from_rows(row["candidates"]), field_thresholds(ground), spec,
                                    entities=len(row["entities"]), width=row["width"], height=row["height"])
            assert (rejected is not None) == (row["status"] != "ok"), row["key"]
            if rejected is None:
                assert kept.to_rows() == row["boxes"], row["key"]
                replayed += 1
    assert replayed == sum(r["status"] == "ok" for r in pq.read_table(out / "index").to_pylist()) > 0
    proc = granucap("eval", "--run", str(out), "--coco", str(demo_input / "annotations.json"), "--sweep",
                    "--thresholds", "0.02,0.05,0.3,0.6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "best F1:" in proc.stdout and "0.05" in proc.stdout


def test_refilter_gives_what_a_fresh_run_at_that_threshold_gives(smoke_run, tmp_path):
    """The same tiny teacher: refiltering the smoke run at 0.5 writes the keys, verdicts and boxes that a new
    run of the pipeline at 0.5 writes."""
    out, args, _ = smoke_run
    again = granucap(*[a if a != str(out) else str(tmp_path / "fresh") for a in args],
                     "--set", "stages.ground.box_threshold=0.5")
    assert again.returncode == 0, again.stderr[-2000:]
    proc = granucap("refilter", str(out), str(tmp_path / "refiltered"), "--set", "stages.ground.box_threshold=0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]

    def rows(run):
        return {r["key"]: (r["status"], r["boxes"]) for r in pq.read_table(run / "index").to_pylist()}

    fresh, refiltered = rows(tmp_path / "fresh"), rows(tmp_path / "refiltered")
    assert refiltered == fresh
    assert sum(len(b) for _, b in fresh.values()) < sum(len(r["boxes"]) for r in pq.read_table(out / "index").to_pylist())
