"""A real `kill -9` of `granucap run` mid-job, then the same command again: it completes, every input sample
is in the index exactly once, and shards finished before the kill are not rewritten."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.demo import write_demo_input
from tests.procs import session_pids

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def kill_session(proc: subprocess.Popen) -> None:
    for pid in session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def command(inp, out, cache):
    return [sys.executable, "-m", "engine.cli", "run", "pipelines/smoke.yaml", "-i", str(inp), "-o", str(out),
            "-q", "--set", f"cache_dir={cache}", "--set", "write.shard_size=4",
            "--set", "stages.recaption.backend=passthrough", "--set", "stages.extract.backend=nltk"]


def test_kill_9_then_rerun_completes_exactly_once(tmp_path, model_cache):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_demo_input(inp, samples=120, per_tar=60, seed=3)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(command(inp, out, model_cache), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    markers: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        markers = sorted((out / "shards").glob("*.stats.json")) if (out / "shards").is_dir() else []
        if markers:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    assert markers, "no shard completed within the deadline"
    kill_session(proc)

    done_before = {p.stem.split(".")[0] for p in (out / "shards").glob("*.stats.json")}
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "shards").iterdir()
              if p.name.split(".")[0] in done_before and ".tmp-" not in p.name}
    assert len(done_before) < 30, "everything was done before the kill"

    rerun = subprocess.run(command(inp, out, model_cache), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    after = {name: (p.stat().st_mtime_ns, p.read_bytes()) for name, p in
             ((n, out / "shards" / n) for n in before)}
    assert after == before, "shards completed before the kill were rewritten"
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "temporary files left behind"
    rows = pq.read_table(out / "index").to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == 120 and len(set(keys)) == 120
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["read"] == 120 == sum(manifest["counts"][s] for s in ("ok", "rejected", "failed"))
    assert manifest["units"] == {"planned": 30, "complete": 30}
