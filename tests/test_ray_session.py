"""How a run starts and ends the Ray session it started (engine/runner/session.py), seen from outside: fresh
Python processes, each in a session of its own, whose Ray processes are found in /proc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import session_pids

pytestmark = pytest.mark.slow

GLIP = ["stages.recaption.backend=passthrough", "stages.extract.backend=nltk"]
ROOT = Path(__file__).resolve().parents[1]
DAEMONS = ("gcs_server", "raylet")

# Starts Ray as a run does (embedded, or joined to ADDRESS), runs a task (and, embedded, an actor), writes the Ray daemons
# of its own session to REPORT; with MODE "stop" it then stops the session as a run that ends early does, and
# writes what is left of them while it is still alive.
DRIVER = """
import json, os, sys, time
import ray
from engine.config import load_config
from engine.runner.session import _ray_init, stop_session, worker_allocator
from tests.test_ray_session import daemons

report, mode, address = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
config = load_config("pipelines/smoke.yaml", %r)
_ray_init(config, address, worker_allocator(config, address))
assert ray.get(ray.remote(lambda: 1).remote()) == 1
@ray.remote(num_cpus=0)
class Actor:
    def pid(self):
        return os.getpid()

if address is None:  # an actor's process must end with the embedded session too (a cluster's stay its own)
    actor = Actor.remote()
    assert ray.get(actor.pid.remote()) != os.getpid()
seen = {"running": daemons(os.getsid(0))}
if mode == "stop":
    stop_session()
    deadline = time.monotonic() + 30
    while daemons(os.getsid(0)) and time.monotonic() < deadline:
        time.sleep(0.2)
    seen["stopped"] = daemons(os.getsid(0))
    seen["initialized"] = ray.is_initialized()
json.dump(seen, open(report, "w"))
""" % GLIP


def daemons(sid: int) -> dict[str, str]:
    """The Ray daemons (GCS, raylet) of session `sid`: pid -> name."""
    found = {}
    for pid in session_pids(sid):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        name = Path(argv0).name
        if name in DAEMONS:
            found[str(pid)] = name
    return found


def _driver(tmp_path: Path, mode: str, *address: str) -> tuple[dict, subprocess.CompletedProcess, int]:
    """Run DRIVER in a session of its own to its end: (its report, the process, its session id)."""
    report = tmp_path / f"report-{mode}.json"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(report), mode, *address], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    sid = proc.pid  # a session leader's id is its pid
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(report.read_text()), subprocess.CompletedProcess(proc.args, 0, stdout, stderr), sid


def _left(sid: int, within: float = 10.0) -> list[int]:
    """The processes of session `sid` still alive after waiting up to `within` seconds for none to be. A session
    that was not stopped lingers far longer, until its daemons notice on their own that the driver is gone."""
    deadline = time.monotonic() + within
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return session_pids(sid)


def test_an_embedded_session_ends_with_the_process_that_started_it(tmp_path):
    seen, _, sid = _driver(tmp_path, "exit")
    assert sorted(seen["running"].values()) == sorted(DAEMONS)  # it started its own GCS and raylet
    assert _left(sid) == []  # and nothing of it outlives the driver: daemons, workers, the actor's process


def test_a_run_that_stops_early_stops_its_embedded_session_before_it_exits(tmp_path):
    seen, _, sid = _driver(tmp_path, "stop")
    assert sorted(seen["running"].values()) == sorted(DAEMONS)
    # gone while the driver still runs: no worker of the run can write after its last manifest
    assert seen["stopped"] == {} and seen["initialized"] is False
    assert _left(sid) == []


def test_a_driver_joined_to_a_cluster_leaves_the_clusters_processes_alone(tmp_path):
    # the "cluster": a head started by another process in its own session, which a driver joins by address
    head = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys\n"
         "ray.init(num_cpus=2, include_dashboard=False)\n"
         "print(ray.get_runtime_context().gcs_address, flush=True)\n"
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
        env=dict(os.environ, RAY_AUTH_MODE="disabled"))  # no token: the driver is no child of the head
    try:
        address = head.stdout.readline().strip()
        cluster = daemons(head.pid)
        assert sorted(cluster.values()) == sorted(DAEMONS)
        for mode in ("exit", "stop"):  # leaving at exit, and stopping early as a failed run does
            seen, _, sid = _driver(tmp_path, mode, address)
            assert seen["running"] == {}  # a joined driver started no daemon of its own
            assert _left(sid) == []
            assert daemons(head.pid) == cluster  # and the cluster's are the same processes, alive
    finally:
        head.stdin.close()
        head.wait(timeout=60)
