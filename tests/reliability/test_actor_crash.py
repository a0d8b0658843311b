"""A model actor that dies mid-batch: Ray restarts it, the batch is redone, no sample is lost or doubled."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.demo import write_demo_input
from engine.runner import CHAOS_ENV

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_ground_actor_killed_mid_batch(tmp_path, model_cache):
    inp, out, marker = tmp_path / "in", tmp_path / "out", tmp_path / "killed"
    write_demo_input(inp, samples=16, per_tar=16, seed=5)
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{CHAOS_ENV: f"ground:{marker}"})
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", "pipelines/smoke.yaml", "-i", str(inp), "-o", str(out), "-q",
         "--set", f"cache_dir={model_cache}", "--set", "stages.recaption.backend=passthrough",
         "--set", "stages.extract.backend=nltk"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists(), "the fault was not injected"
    rows = pq.read_table(out / "index").to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == 16 and len(set(keys)) == 16
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["read"] == 16
    # the crash cost no sample: everything that passed decode and had entities reached the ground stage
    assert not [r for r in rows if r["error"] and r["error"]["stage"] == "ground"]
    grounded = [r for r in rows if any(p["stage"] == "ground" for p in r["provenance"])]
    assert len(grounded) == sum(1 for r in rows if not r["error"] or r["error"]["stage"] == "filter")
    assert all([p["stage"] for p in r["provenance"]].count("ground") == 1 for r in grounded)


def test_an_actor_that_dies_past_its_restarts_fails_the_dataset_and_the_run_goes_on_with_the_rest(tmp_path,
                                                                                                 model_cache):
    # Five deaths in a row: Ray restarts the ground actor three times, then the Ray Dataset fails with the actor
    # dead; the runner starts a new Dataset on the units without a marker, and the run completes.
    inp, out, marker = tmp_path / "in", tmp_path / "out", tmp_path / "killed"
    write_demo_input(inp, samples=16, per_tar=8, seed=6)
    env = dict(os.environ, HF_HUB_OFFLINE="1", **{CHAOS_ENV: f"ground:{marker}:5"})
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", "pipelines/smoke.yaml", "-i", str(inp), "-o", str(out),
         "-q", "--set", f"cache_dir={model_cache}", "--set", "stages.recaption.backend=passthrough",
         "--set", "stages.extract.backend=nltk", "--set", "write.shard_size=4"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "killed.5").exists(), "the fault was not injected five times"
    assert "running it again on the" in proc.stderr and "(attempt 2 of 3)" in proc.stderr
    keys = [r["key"] for r in pq.read_table(out / "index").to_pylist()]
    assert len(keys) == 16 and len(set(keys)) == 16
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["units"] == {"planned": 4, "complete": 4} and manifest["counts"]["read"] == 16
