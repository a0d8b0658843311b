"""Operations as an operator meets them, with the real `granucap run` command: two runs on one output, a
rerun with another config after a kill, SIGTERM and Ctrl-C, a full disk, a read-only file system, an output
that is a file. Each ends in a correct result or one line and a documented exit code (engine/errors.py), and
a rerun afterwards completes with every input sample exactly once."""

from __future__ import annotations

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
from engine.models.loading import tiny_path
from tests.reliability.test_kill_resume import kill_session

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = 24
ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def command(inp: Path, out: Path, cache: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "run", "pipelines/smoke.yaml", "-i", str(inp), "-o", str(out),
            "-q", "--set", f"cache_dir={cache}", "--set", "write.shard_size=4",
            "--set", "stages.recaption.backend=passthrough", "--set", "stages.extract.backend=nltk", *extra]


def _as_in_a_terminal() -> None:
    """SIGINT as a command typed in a terminal gets it: a test run started in the background (as CI may be)
    hands its children SIGINT ignored, and Python keeps an ignored SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(cmd: list[str], logs: Path) -> subprocess.Popen:
    """The command in a session of its own (Ray's processes join it), its output to files."""
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, start_new_session=True, stdout=open(logs / "stdout", "w"),
                            stderr=open(logs / "stderr", "w"), preexec_fn=_as_in_a_terminal)


def finish(cmd: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Poll `condition` until it holds; fail if the process ends first or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the moment the test waits for"
        assert time.monotonic() < deadline, "the run did not get there in time"
        time.sleep(0.05)


def markers(out: Path) -> dict[int, dict]:
    folder = out / "shards"
    found = {}
    for path in folder.glob("*.stats.json") if folder.is_dir() else []:
        try:
            found[int(path.name.split(".")[0])] = json.loads(path.read_text())
        except (ValueError, FileNotFoundError):
            pass  # being renamed into place this instant
    return found


def units_of(ranges: str) -> set[int]:
    units: set[int] = set()
    for part in filter(None, ranges.split(",")):
        a, _, b = part.partition("-")
        units.update(range(int(a), int(b or a) + 1))
    return units


def assert_exactly_once(out: Path, samples: int = SAMPLES) -> None:
    rows = pq.read_table(out / "index", columns=["key", "source", "position", "unit"]).to_pylist()
    assert len(rows) == samples
    assert len({(r["unit"], r["position"]) for r in rows}) == samples
    assert len({r["key"] for r in rows}) == samples
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["read"] == samples
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "temporary files left behind"


def assert_manifest_matches_markers(out: Path) -> dict:
    """The manifest counts exactly the units whose markers exist, with their sums."""
    manifest = json.loads((out / "manifest.json").read_text())
    found = markers(out)
    assert units_of(manifest["complete_units"]) == set(found)
    assert manifest["units"]["complete"] == len(found)
    for key in ("read", "ok", "rejected", "failed", "boxes"):
        assert manifest["counts"][key] == sum(m[key] for m in found.values()), key
    return manifest


def one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


@pytest.fixture
def dump(tmp_path) -> Path:
    inp = tmp_path / "in"
    write_demo_input(inp, samples=SAMPLES, per_tar=12, seed=5)
    return inp


@pytest.mark.slow
def test_a_second_run_on_the_same_output_stops_naming_the_first(tmp_path, dump, model_cache):
    out = tmp_path / "out"
    first = start(command(dump, out, model_cache), tmp_path)

    def locked_by_first() -> bool:
        try:
            return json.loads((out / ".granucap-lock.json").read_text())["pid"] == first.pid
        except (FileNotFoundError, ValueError, KeyError):
            return False

    wait_until(locked_by_first, first)
    second = finish(command(dump, out, model_cache, "--set", "stages.ground.box_threshold=0.5"))
    assert second.returncode == 3
    line = one_line_error(second.stderr)
    assert line.startswith("error:") and f"pid {first.pid}" in line and "in use by run" in line
    assert first.wait(timeout=400) == 0, (tmp_path / "stderr").read_text()[-3000:]
    assert_exactly_once(out)
    # the second run changed nothing: every unit was made with the first run's config
    assert len({m["fingerprint"] for m in markers(out).values()}) == 1


@pytest.mark.slow
def test_a_rerun_with_another_config_after_a_kill_stops_unless_allowed(tmp_path, dump, model_cache):
    out = tmp_path / "out"
    proc = start(command(dump, out, model_cache), tmp_path)
    wait_until(lambda: bool(markers(out)), proc)
    kill_session(proc)
    before = markers(out)
    assert 0 < len(before) < 6
    original = {m["fingerprint"] for m in before.values()}
    manifest_before = (out / "manifest.json").read_bytes()

    changed = finish(command(dump, out, model_cache, "--set", "stages.ground.box_threshold=0.9"))
    assert changed.returncode == 2
    line = one_line_error(changed.stderr)
    assert "stages.ground.box_threshold: 0.05 -> 0.9" in line and "--allow-config-change" in line
    assert (out / "manifest.json").read_bytes() == manifest_before and markers(out) == before

    mixed = finish(command(dump, out, model_cache, "--set", "stages.ground.box_threshold=0.9",
                           "--allow-config-change"))
    assert mixed.returncode == 0, mixed.stderr[-3000:]
    assert_exactly_once(out)
    manifest = assert_manifest_matches_markers(out)
    after = markers(out)
    new = {m["fingerprint"] for u, m in after.items() if u not in before}
    assert len(original) == 1 and len(new) == 1 and original != new
    assert manifest["configs"] == {
        fp: {"units": sum(m["fingerprint"] == fp for m in after.values()),
             "samples": sum(m["read"] for m in after.values() if m["fingerprint"] == fp),
             "record": f"configs/{fp}.json"}
        for fp in original | new
    }
    assert manifest["config"] is None and manifest["fingerprint"] is None  # no one config made these shards
    for fp in original | new:  # what each fingerprint stands for is kept beside the shards
        threshold = json.loads((out / f"configs/{fp}.json").read_text())["config"]["stages"]["ground"]["box_threshold"]
        assert threshold == (0.05 if fp in original else 0.9)

    # a finished run rerun with a third config: nothing to do, and the manifest does not claim it
    third = finish(command(dump, out, model_cache, "--set", "stages.ground.box_threshold=0.5",
                           "--allow-config-change"))
    assert third.returncode == 0, third.stderr[-3000:]
    manifest = assert_manifest_matches_markers(out)
    assert set(manifest["configs"]) == original | new and manifest["config"] is None


@pytest.mark.slow
def test_sigterm_and_ctrl_c_stop_cleanly_and_a_rerun_completes(tmp_path, model_cache):
    # units finish in bursts (a teacher batch holds several): with 36 units of 2, each signal lands with many
    # still to do, where with a few units the last burst could finish the run before its signal arrived
    inp, out, samples, units = tmp_path / "in", tmp_path / "out", 72, 36
    write_demo_input(inp, samples=samples, per_tar=24, seed=7)
    small = ("--set", "write.shard_size=2")
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        already = set(markers(out))
        proc = start(command(inp, out, model_cache, *small), tmp_path)
        wait_until(lambda: bool(set(markers(out)) - already), proc)
        os.kill(proc.pid, signum)  # the driver only, as `kill PID` or Ctrl-C in its terminal does
        assert proc.wait(timeout=120) == code, (tmp_path / "stderr").read_text()[-3000:]
        stderr = (tmp_path / "stderr").read_text()
        assert one_line_error(stderr) == "stopped; rerun the same command to resume"
        manifest = assert_manifest_matches_markers(out)
        assert manifest["status"] == "interrupted" and signal.Signals(signum).name in manifest["error"]
        assert len(markers(out)) < units
    rerun = finish(command(inp, out, model_cache, *small))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_exactly_once(out, samples)


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.mark.slow
def test_a_full_disk_fails_in_one_line_and_a_rerun_with_space_completes(tmp_path, dump, model_cache):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "160k")
    try:
        out = disk / "out"
        full = finish(command(dump, out, model_cache))
        assert full.returncode == 1
        line = one_line_error(full.stderr)
        assert line.startswith("error: no space left on the device writing " + str(out)) and "free of" in line
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        rerun = finish(command(dump, out, model_cache))
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert_exactly_once(out)
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_an_output_that_cannot_be_a_folder_fails_in_one_line(tmp_path, dump, model_cache):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "1m")
    try:
        (disk / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        done = finish(command(dump, disk / "out", model_cache), timeout=120)
        assert done.returncode == 1
        line = one_line_error(done.stderr)
        assert line.startswith(f"error: cannot write {disk / 'out'}") and "read-only" in line
    finally:
        subprocess.run(["umount", "-l", str(disk)])
    (tmp_path / "a-file").write_text("not a folder")
    done = finish(command(dump, tmp_path / "a-file", model_cache), timeout=120)
    assert done.returncode == 1
    assert "is a file, not a folder" in one_line_error(done.stderr)
    assert (tmp_path / "a-file").read_text() == "not a folder"


# `granucap run` with libraries that write while the run goes on, the four ways Ray and the model libraries do on
# the driver: a logger whose handler took the stderr stream of import time, a record for the root logger, a print,
# a write to file descriptor 2 (from C); each once per Ray Dataset, while the run is under way.
NOISY_DRIVER = """
import logging, os, sys
from engine.cli import main
from engine.runner import loop

held = logging.getLogger("noisylib.held")
held.addHandler(logging.StreamHandler(sys.stderr))
held.propagate = False
build_dataset = loop.build_dataset

def noisy_build_dataset(*args, **kwargs):
    held.warning("noisylib held-stream line")
    logging.getLogger("noisylib").warning("noisylib root-logger line")
    print("noisylib stdout line")
    os.write(2, b"noisylib fd-2 line\\n")
    return build_dataset(*args, **kwargs)

loop.build_dataset = noisy_build_dataset
sys.exit(main(sys.argv[1:]))
"""
NOISE = ("noisylib held-stream line", "noisylib root-logger line", "noisylib stdout line", "noisylib fd-2 line")


@pytest.mark.slow
def test_a_quiet_run_prints_its_summary_only_and_keeps_the_library_logs(tmp_path, dump, model_cache):
    out = tmp_path / "out"
    # the workers' transformers log at INFO (an operator's setting reaches the workers)
    env = dict(ENV, TRANSFORMERS_VERBOSITY="info")
    argv = command(dump, out, model_cache)[3:]  # what follows `-m engine.cli`
    done = subprocess.run([sys.executable, "-c", NOISY_DRIVER, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # stdout is the summary, one JSON line
    assert summary["read"] == SAMPLES and summary["logs"] == str(out / "logs" / json.loads(
        (out / "manifest.json").read_text())["run_id"])
    # the terminal's stderr holds granucap's own note on dummy models and nothing of Ray's or the libraries'
    assert " ".join(done.stderr.split()) == ("note: this pipeline uses dummy (random-weight) models; its boxes are "
                                             "random by design")
    logs = Path(summary["logs"])
    driver = (logs / "driver.log").read_text()
    assert [line for line in NOISE if line not in driver] == []  # all of it went to the run's driver log
    # the ground actor's transformers named the teacher's files it loaded, at the operator's INFO level
    workers = "".join(p.read_text() for p in logs.glob("workers-*.log"))
    assert str(tiny_path("grounding-dino", model_cache)) in workers, workers[:2000]
