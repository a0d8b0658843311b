"""Dirty web data through the whole CLI: every sample ends as exactly one row, with the documented outcome."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.reliability.badcorpus import write_bad_dump

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=400)


def test_bad_dump_every_sample_accounted_for(tmp_path, model_cache):
    expected = write_bad_dump(tmp_path / "in")
    out = tmp_path / "out"
    proc = run_cli("run", "pipelines/smoke.yaml", "-i", str(tmp_path / "in"), "-o", str(out), "-q",
                   "--set", f"cache_dir={model_cache}", "--set", "stages.recaption.backend=passthrough",
                   "--set", "stages.extract.backend=nltk", "--set", "stages.filter.min_boxes=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["key"]: r for r in pq.read_table(out / "index").to_pylist()}
    assert set(rows) == set(expected)
    for key, outcome in expected.items():
        row = rows[key]
        got = "ok" if row["status"] == "ok" else f"{row['status']}:{row['error']['stage']}/{row['error']['kind']}"
        assert got == outcome, (key, row["error"])
    assert rows["rotated"]["width"] == 64 and rows["rotated"]["height"] == 96
    assert len(rows["huge_caption"]["raw_caption"]) <= 4000
    assert "\ufffd" in rows["latin1_caption"]["raw_caption"]
    assert not (tmp_path / "escape.jpg").exists() and not Path("/abs/path.jpg").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["read"] == len(expected) == c["ok"] + c["rejected"] + c["failed"]


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("run", "pipelines/smoke.yaml", "-i", str(tmp_path / "empty"), "-o", str(tmp_path / "out"), "-q")
    assert proc.returncode == 2
    assert "no input" in proc.stderr.lower()


def test_an_empty_tar_gives_an_empty_complete_run(tmp_path, model_cache):
    import tarfile

    (tmp_path / "in").mkdir()
    tarfile.open(tmp_path / "in" / "empty.tar", "w").close()
    proc = run_cli("run", "pipelines/smoke.yaml", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-q",
                   "--set", f"cache_dir={model_cache}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["read"] == 0


def test_actor_pools_that_cannot_fit_are_refused_not_left_waiting(tmp_path, demo_input, model_cache):
    proc = run_cli("run", "pipelines/glip.yaml", "-i", str(demo_input), "-o", str(tmp_path / "out"), "-q",
                   "--set", "ray.num_cpus=2", "--set", "stages.ground.model=tiny:grounding-dino",
                   "--set", "stages.ground.resources.num_gpus=0", "--set", f"cache_dir={model_cache}")
    assert proc.returncode == 1
    assert "actor pools need 3 CPUs" in proc.stderr and "Ray has 2" in proc.stderr
    assert "Traceback" not in proc.stderr
