"""How a run starts and ends the Ray session it started (engine/runner.py `_ray_init`, `_stop_embedded_ray`), in
fresh Python processes: the settings the session starts with, and what happens at interpreter exit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GLIP = ["stages.recaption.backend=passthrough", "stages.extract.backend=nltk"]
ROOT = Path(__file__).resolve().parents[1]

# Starts Ray as a run does (embedded, or joined to ADDRESS), runs a task, and at exit (this hook is registered
# first, so it runs last) writes what the session's processes looked like when `ray.shutdown` began and after.
DRIVER = """
import atexit, base64, json, sys
import ray
from ray._private import worker
from engine.config import load_config
from engine.runner import _ray_init, worker_allocator

report, address = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
seen = {}
atexit.register(lambda: json.dump(seen, open(report, "w")))
config = load_config("pipelines/smoke.yaml", %r)
_ray_init(config, address, worker_allocator(config, address))
assert ray.get(ray.remote(lambda: 1).remote()) == 1
node = worker._global_node
processes = {kind: [info.process for info in infos] for kind, infos in node.all_processes.items()}
seen["pids"] = {kind: [p.pid for p in ps] for kind, ps in processes.items()}
for gcs in processes.get("gcs_server", []):  # the settings the GCS holds for the raylet and the workers
    args = open(f"/proc/{gcs.pid}/cmdline").read().split("\\0")
    encoded = next(a for a in args if a.startswith("--config_list="))
    seen["system_config"] = json.loads(base64.b64decode(encoded.split("=", 1)[1]))
shutdown = ray.shutdown

def watched_shutdown(*args, **kwargs):
    seen["at_shutdown"] = {kind: [p.poll() for p in ps] for kind, ps in processes.items()}
    shutdown(*args, **kwargs)
    seen["after"] = {kind: [p.poll() for p in ps] for kind, ps in processes.items()}
    seen["initialized_after"] = ray.is_initialized()

ray.shutdown = watched_shutdown
""" % GLIP


def _driver(tmp_path: Path, *address: str) -> tuple[dict, str]:
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(report), *address], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(report.read_text()), proc.stderr


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> tuple[dict, str]:
    """One run of the driver with a session of its own."""
    return _driver(tmp_path_factory.mktemp("embedded"))


def test_an_embedded_session_stops_at_exit_with_the_autoscaler_monitor_killed_first(embedded):
    seen, stderr = embedded
    # The monitor is gone (killed: -9) before Ray's shutdown starts, while the GCS it would report to is up;
    # stopped by Ray after the GCS instead, it hangs in its SIGTERM handler until killed a second later.
    assert seen["at_shutdown"]["monitor"] == [-9]
    assert seen["at_shutdown"]["gcs_server"] == [None] and seen["at_shutdown"]["raylet"] == [None]
    # then Ray's shutdown stops everything else the session started
    assert all(code is not None for codes in seen["after"].values() for code in codes), seen["after"]
    assert seen["initialized_after"] is False
    assert "autoscaler failed" not in stderr  # a monitor killed this way reports nothing to the driver


def test_an_embedded_raylet_retries_its_start_up_connects_every_100_ms_for_as_long_as_rays_default(embedded):
    config = embedded[0]["system_config"]
    # Ray's default waits a whole second after a failed connect to the object store's socket, which the
    # raylet often tries before the store listens: one run start in two lost that second
    assert config["raylet_client_connect_timeout_milliseconds"] == 100
    # the raylet and the workers still give up only after Ray's default 10 attempts x 1000 ms
    assert config["raylet_client_num_connect_attempts"] * 100 == 10 * 1000
    assert config["prestart_worker_first_driver"] is False


def test_a_driver_joined_to_a_cluster_leaves_the_clusters_processes_alone(tmp_path):
    # the "cluster": a head started by another process, which a driver joins by address
    head = subprocess.Popen(
        [sys.executable, "-c", "import ray, sys\n"
         "ctx = ray.init(num_cpus=2, include_dashboard=False)\n"
         "node = ray._private.worker._global_node\n"
         "print(ctx.address_info['gcs_address'], node.all_processes['monitor'][0].process.pid, flush=True)\n"
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=dict(os.environ, RAY_AUTH_MODE="disabled"))  # no token: the driver is no child of the head
    try:
        address, monitor = head.stdout.readline().split()
        seen, _ = _driver(tmp_path, address)
        assert seen["pids"] == {}  # a joined driver started nothing, so it stops nothing
        os.kill(int(monitor), 0)  # the cluster's monitor outlived the driver (ProcessLookupError otherwise)
    finally:
        head.stdin.close()
        head.wait(timeout=60)
