"""The embedded Ray session is granucap's own: with a real Ray cluster started on the host (`ray start`),
RAY_ADDRESS pointing at it, and later its stale address file, `granucap run` without --ray-address runs in a
session of its own; with --ray-address it runs on exactly that cluster. Which Ray node wrote each unit is in
its marker (`written_by`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.demo import write_demo_input
from tests.conftest import free_port
from tests.reliability.test_kill_resume import kill_session
from tests.reliability.test_operations import ROOT, command, markers

pytestmark = pytest.mark.slow

NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps([n["NodeID"] for n in ray.nodes() if n["Alive"]]))
"""


def cluster_nodes(address: str, env: dict[str, str], deadline: float) -> list[str]:
    """The alive node ids of the cluster at `address`, once it answers."""
    while True:
        done = subprocess.run([sys.executable, "-c", NODES, address], capture_output=True, text=True, timeout=120,
                              env=env)
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
        assert time.monotonic() < deadline, done.stderr[-2000:]
        time.sleep(0.5)


def test_embedded_ray_ignores_the_hosts_cluster_and_ray_address_joins_it(tmp_path, model_cache):
    inp = tmp_path / "in"
    write_demo_input(inp, samples=8, per_tar=8, seed=2)
    port = free_port()
    address = f"127.0.0.1:{port}"
    ray_bin = Path(sys.executable).with_name("ray")
    # `ray start` turns Ray's token authentication on; a client joins with RAY_AUTH_MODE=token (and the token
    # that `ray start` saved in ~/.ray), as an operator's would
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_AUTH_MODE="token")
    head = subprocess.Popen([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=4",
                             "--include-dashboard=false", "--block"], cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        external = cluster_nodes(address, env, time.monotonic() + 120)
        assert len(external) == 1

        # RAY_ADDRESS names the host's cluster: the embedded run must not join it
        own = subprocess.run(command(inp, tmp_path / "own", model_cache), cwd=ROOT, capture_output=True,
                             text=True, timeout=400, env=dict(env, RAY_ADDRESS=address))
        assert own.returncode == 0, own.stderr[-3000:]
        writers = {m["written_by"] for m in markers(tmp_path / "own").values()}
        assert writers and not writers & set(external)

        joined = subprocess.run(command(inp, tmp_path / "joined", model_cache) + ["--ray-address", address],
                                cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert {m["written_by"] for m in markers(tmp_path / "joined").values()} == set(external)
    finally:
        kill_session(head)

    # the killed cluster left its address file behind (/tmp/ray/ray_current_cluster): still a session of its own
    after = subprocess.run(command(inp, tmp_path / "after", model_cache), cwd=ROOT, capture_output=True, text=True,
                           timeout=400, env=env)
    assert after.returncode == 0, after.stderr[-3000:]
    assert len(markers(tmp_path / "after")) == 2
