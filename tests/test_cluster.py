"""granucap on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`: separate raylets on this machine)
reading from and writing to a real S3 API server: the same shards as a local run, a worker node lost mid-run,
the driver killed mid-run. Every input sample must end up in the output exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.demo import write_demo_input
from engine.io.readers import count_tar
from tests.conftest import S3_ENV, s3_fs

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

GLIP = ["--set", "write.shard_size=4", "--set", "stages.recaption.backend=passthrough",
        "--set", "stages.extract.backend=nltk"]


@pytest.fixture(scope="module")
def s3_env(s3_server):
    """The S3 server's endpoint and credentials in this process's environment for the whole module: the
    cluster's nodes are started from here and inherit it, as nodes of a real cluster carry their own."""
    env = {"AWS_ENDPOINT_URL": s3_server, **S3_ENV}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def start_cluster(head_cpus: int, workers: list[int]):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=n) for n in workers]
    cluster.wait_for_nodes()
    return cluster, nodes


@pytest.fixture(scope="module")
def cluster(s3_env):
    """Three nodes: a head and two workers with 2 CPUs each."""
    cluster, _ = start_cluster(1, [2, 2])
    yield cluster
    cluster.shutdown()


def new_bucket() -> str:
    import uuid

    name = f"granucap-{uuid.uuid4().hex[:12]}"
    s3_fs().mkdir(name)
    return name


def upload_demo(tmp_path: Path, bucket: str, samples: int, per_tar: int, seed: int = 1) -> Path:
    """A demo dump in img2dataset layout (tars with their `_stats.json`), on disk and in the bucket."""
    local = tmp_path / "in"
    paths = write_demo_input(local, samples=samples, per_tar=per_tar, seed=seed)
    for path in paths:
        n = count_tar(str(path))
        (local / f"{Path(path).stem}_stats.json").write_text(json.dumps({"count": n, "successes": n}))
    s3_fs().put(str(local) + "/", f"{bucket}/in/", recursive=True)
    return local


def granucap(args: list[str], model_cache: str, **kwargs):
    cmd = [sys.executable, "-m", "engine.cli", "run", "pipelines/smoke.yaml", "-q",
           "--set", f"cache_dir={model_cache}", *GLIP, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def finish(proc: subprocess.Popen, timeout: int = 500) -> str:
    out, err = proc.communicate(timeout=timeout)
    if os.environ.get("DEBUG_CLUSTER"):
        Path("/tmp/cluster-debug.log").open("a").write(err)
    assert proc.returncode == 0, err[-4000:]
    return out


def markers(bucket: str) -> list[str]:
    fs = s3_fs()
    try:
        return sorted(p for p in fs.ls(f"{bucket}/out/shards") if p.endswith(".stats.json"))
    except FileNotFoundError:
        return []


def wait_for_a_marker(bucket: str, proc: subprocess.Popen, timeout: float = 300) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before any unit was complete: {proc.communicate()[1][-3000:]}"
        found = markers(bucket)
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError("no unit completed within the deadline")


def index_rows(bucket: str) -> list[dict]:
    fs = s3_fs()
    rows = []
    for path in sorted(fs.ls(f"{bucket}/out/index")):
        with fs.open(path) as f:
            rows += pq.read_table(f).to_pylist()
    return rows


def assert_exactly_once(bucket: str, samples: int) -> dict:
    keys = [r["key"] for r in index_rows(bucket)]
    assert len(keys) == samples and len(set(keys)) == samples
    manifest = json.loads(s3_fs().cat_file(f"{bucket}/out/manifest.json"))
    assert manifest["status"] == "complete"
    assert manifest["counts"]["read"] == samples == sum(manifest["counts"][s] for s in ("ok", "rejected", "failed"))
    return manifest


def test_s3_to_s3_on_three_nodes_writes_the_shards_of_the_local_run(cluster, tmp_path, model_cache):
    import ray

    from engine.config import load_config
    from engine.runner import run

    bucket = new_bucket()
    local_in = upload_demo(tmp_path, bucket, samples=24, per_tar=12)
    finish(granucap(["-i", str(local_in), "-o", str(tmp_path / "out")], model_cache))

    config = load_config("pipelines/smoke.yaml", [f"cache_dir={model_cache}"] + GLIP[1::2])
    seen = []
    try:
        manifest = run(config, inputs=[f"s3://{bucket}/in"], output=f"s3://{bucket}/out",
                       ray_address=cluster.address, on_progress=seen.append)
    finally:
        ray.shutdown()
    progress = seen[-1]
    assert manifest["units"] == {"planned": 6, "complete": 6} and progress.done == 24
    # the driver got a report per unit, never the records, which the writers got
    assert progress.received_bytes / progress.done < 1024 < progress.rows_bytes / progress.done

    fs = s3_fs()
    local = tmp_path / "out"
    plan = json.loads(fs.cat_file(f"{bucket}/out/plan.json"))
    assert {f["how"] for f in plan["files"]} == {"img2dataset_stats"}  # no tar was read to plan
    for unit in range(6):
        name = f"{unit:06d}"
        assert fs.cat_file(f"{bucket}/out/shards/{name}.tar") == (local / "shards" / f"{name}.tar").read_bytes()
        with fs.open(f"{bucket}/out/index/{name}.parquet") as f:
            assert pq.read_table(f).to_pylist() == pq.read_table(local / "index" / f"{name}.parquet").to_pylist()
    assert_exactly_once(bucket, 24)


def test_a_worker_node_lost_mid_run_loses_and_repeats_nothing(s3_env, tmp_path, model_cache):
    # The head takes no work: everything starts on one worker, which is removed once a unit is done and a
    # second worker is there to take over.
    cluster, [first] = start_cluster(0, [2])
    try:
        bucket = new_bucket()
        upload_demo(tmp_path, bucket, samples=96, per_tar=48)
        proc = granucap(["-i", f"s3://{bucket}/in", "-o", f"s3://{bucket}/out", "--ray-address", cluster.address],
                        model_cache)
        done_before = wait_for_a_marker(bucket, proc)
        cluster.add_node(num_cpus=2)
        cluster.remove_node(first)
        finish(proc)
        assert len(done_before) < 24, "every unit was complete before the node was lost"
        assert_exactly_once(bucket, 96)
    finally:
        cluster.shutdown()


def test_driver_killed_mid_run_then_rerun_completes_exactly_once_and_leaves_finished_units_alone(
    cluster, tmp_path, model_cache
):
    bucket = new_bucket()
    upload_demo(tmp_path, bucket, samples=96, per_tar=48)
    args = ["-i", f"s3://{bucket}/in", "-o", f"s3://{bucket}/out", "--ray-address", cluster.address]
    proc = granucap(args, model_cache)
    wait_for_a_marker(bucket, proc)
    proc.kill()  # SIGKILL, the driver only: the cluster and its object store stay
    proc.communicate(timeout=60)

    fs = s3_fs()
    done = [m.rsplit("/", 1)[1].split(".")[0] for m in markers(bucket)]
    assert 0 < len(done) < 24, "the run was not mid-way when the driver was killed"
    objects = [f"{bucket}/out/{p}" for n in done for p in (f"shards/{n}.tar", f"index/{n}.parquet",
                                                           f"shards/{n}.stats.json")]
    before = {o: (fs.info(o)["ETag"], fs.info(o)["LastModified"], fs.cat_file(o)) for o in objects}

    finish(granucap(args, model_cache))
    after = {o: (fs.info(o)["ETag"], fs.info(o)["LastModified"], fs.cat_file(o)) for o in objects}
    assert after == before, "units completed before the kill were written again"
    assert_exactly_once(bucket, 96)


def test_a_node_that_cannot_reach_the_output_stops_the_run_before_any_work(s3_env, tmp_path, model_cache):
    from tests.conftest import free_port

    cluster, _ = start_cluster(1, [1])
    try:
        # a node set up without the store's endpoint: the driver can write, that node cannot
        cluster.add_node(num_cpus=1, env_vars={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})
        cluster.wait_for_nodes()
        bucket = new_bucket()
        upload_demo(tmp_path, bucket, samples=8, per_tar=8)
        proc = granucap(["-i", f"s3://{bucket}/in", "-o", f"s3://{bucket}/out", "--ray-address", cluster.address],
                        model_cache)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-3000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: node ") and "cannot write the output" in line
        assert "the endpoint cannot be reached" in line and f"s3://{bucket}/out" in line
        assert s3_fs().find(f"{bucket}/out") == []  # nothing written, the probe removed
    finally:
        cluster.shutdown()
