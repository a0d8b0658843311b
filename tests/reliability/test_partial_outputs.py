"""Honest partial outputs: a real run that lost one unit's marker (as a run killed before writing it would
leave it) is refused by `granucap export` and `granucap inspect` with exit 1; with --allow-partial they give
exactly the complete units' samples and say how many of the planned units and samples those are."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.cli import main
from engine.demo import write_demo_input
from tests.test_inspect import page_completeness

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

LOST = 1  # the unit whose marker is deleted: demo tars of 6 in units of 4 give units of 4, 2, 4, 2 samples


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory, model_cache) -> Path:
    """A finished run of the smoke pipeline, then unit LOST's marker deleted (its shard and index part stay,
    as a killed writer can leave them)."""
    root = tmp_path_factory.mktemp("partial")
    inp, out = root / "in", root / "out"
    write_demo_input(inp, samples=12, per_tar=6, seed=5)
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", "pipelines/smoke.yaml", "-i", str(inp), "-o", str(out), "-q",
         "--set", f"cache_dir={model_cache}", "--set", "write.shard_size=4",
         "--set", "stages.recaption.backend=passthrough", "--set", "stages.extract.backend=nltk",
         "--set", "stages.filter.min_boxes=0"],
        cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / "shards").glob("*.stats.json")) == [f"{u:06d}.stats.json" for u in range(4)]
    (out / "shards" / f"{LOST:06d}.stats.json").unlink()
    return out


def index_rows(run: Path, units: list[int]) -> list[dict]:
    return [row for u in units for row in pq.read_table(run / "index" / f"{u:06d}.parquet").to_pylist()]


def cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_export_refuses_then_exports_exactly_the_complete_units(partial_run, tmp_path):
    from pycocotools.coco import COCO

    code, out, err = cli(["export", "coco", str(partial_run), str(tmp_path / "refused")])
    assert (code, out) == (1, "")
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {partial_run} is an incomplete run: ")
    assert "3 of 4 planned units (10 of 12 samples) complete" in err and "--allow-partial" in err
    assert not (tmp_path / "refused").exists()

    code, out, err = cli(["export", "coco", str(partial_run), str(tmp_path / "coco"), "--allow-partial"])
    assert code == 0, err
    summary = json.loads(out)
    completeness = summary["completeness"]
    assert completeness["complete"] is False
    assert (completeness["units"], completeness["samples"]) == ({"planned": 4, "complete": 3},
                                                                 {"planned": 12, "complete": 10})
    manifest = json.loads((partial_run / "manifest.json").read_text())
    assert completeness["manifest_status"] == manifest["status"]  # shown, whatever it claims

    want = {r["key"] for r in index_rows(partial_run, [0, 2, 3]) if r["status"] == "ok"}
    lost = {r["key"] for r in index_rows(partial_run, [LOST]) if r["status"] == "ok"}
    assert want and lost, "the test needs ok samples both in the lost unit and in the others"
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(summary["annotations_file"])
    got = [image["granucap_key"] for image in coco.loadImgs(coco.getImgIds())]
    assert sorted(got) == sorted(want) and summary["images"] == len(want)
    for image in coco.loadImgs(coco.getImgIds()):
        assert (tmp_path / "coco" / image["file_name"]).is_file()


def test_inspect_refuses_then_summarises_the_complete_units_and_says_so(partial_run, tmp_path):
    code, out, err = cli(["inspect", str(partial_run)])
    assert (code, out) == (1, "")
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {partial_run} is an incomplete run: ")
    assert "3 of 4 planned units (10 of 12 samples) complete" in err and "--allow-partial" in err

    code, out, err = cli(["inspect", str(partial_run), "--allow-partial", "--json", "--html", str(tmp_path / "site")])
    assert code == 0, err
    summary = json.loads(out)
    rows = index_rows(partial_run, [0, 2, 3])
    assert summary["samples"] == len(rows) == 10
    assert summary["ok"] == sum(r["status"] == "ok" for r in rows)
    assert summary["completeness"]["units"] == {"planned": 4, "complete": 3}
    assert summary["completeness"]["samples"] == {"planned": 12, "complete": 10}
    text, style = page_completeness(Path(summary["html"]))
    assert text.startswith("Partial run") and "3 of 4 planned units (10 of 12 samples) complete" in text
    assert style and "color" in style

    code, out, err = cli(["inspect", str(partial_run), "--allow-partial"])
    assert code == 0, err
    words = " ".join(out.split())
    assert "Partial run" in words and "3 of 4 planned units (10 of 12 samples) complete" in words
