"""The Ray workers' output kept in the run's output instead of the driver's terminal
(engine/runner/worker_logs.py), on real Ray sessions: an embedded one (with a second job joined to it, as on a
shared cluster) and a two-node `ray.cluster_utils.Cluster` whose second node keeps its logs in a folder of its
own."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.io.storage import Location
from engine.runner.worker_logs import KEEP_RUNS, LOGS, WorkerLogs, ray_init_kwargs

ROOT = Path(__file__).resolve().parents[1]

SECRET_VAR, SECRET = "GRANUCAP_WORKER_LOGS_TEST_TOKEN", "wl-s3cr3t-7f31c9"


def chatty(tag: str) -> str:
    """What a model library does in a stage: log through its logger, print, write to stderr."""
    import ray

    logging.getLogger("transformers").warning("%s transformers warning", tag)
    print(f"{tag} stdout line")
    print(f"{tag} stderr line", file=sys.stderr)
    return ray.get_runtime_context().get_node_id()


def kept(out: Location, run_id: str) -> dict[str, str]:
    """The run's kept files: name -> text."""
    folder = f"{LOGS}/{run_id}"
    return {name: out.read_bytes(f"{folder}/{name}").decode() for name in out.list(folder)}


def run_dirs(out: Location) -> list[str]:
    if out.remote:
        out.fs.invalidate_cache(out.path(LOGS))
    return sorted(os.path.basename(e["name"].rstrip("/")) for e in out.fs.ls(out.path(LOGS), detail=True)
                  if e["type"] == "directory")


# Another job on the same session, as another user's run on a shared cluster: it prints from a worker, waits
# for a line on stdin (at most 2 minutes) before it leaves, so that its driver can echo the line (Ray's default).
OTHER_JOB = """
import select, sys
import ray

ray.init(address=sys.argv[1])

@ray.remote
def other():
    print("other-job stdout line")

ray.get(other.remote())
select.select([sys.stdin], [], [], 120)
"""


@pytest.fixture(scope="class")
def session():
    """An embedded session started as a run starts it (the workers' environment in the job's runtime_env, which
    makes Ray start workers for the job, their files named after it), with a secret-looking variable in that
    environment; its GCS address."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    before = os.environ.get(SECRET_VAR)
    os.environ[SECRET_VAR] = SECRET
    ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env={"env_vars": {SECRET_VAR: SECRET}},
             **ray_init_kwargs())
    yield ray.get_runtime_context().gcs_address
    if ray.is_initialized():
        ray.shutdown()
    if before is None:
        os.environ.pop(SECRET_VAR, None)
    else:
        os.environ[SECRET_VAR] = before


def test_a_nodes_file_holds_the_jobs_lines_of_every_worker_file_ray_writes(tmp_path):
    """The files as Ray 2.60 writes them (seen on real sessions): a worker started for the job is named after
    it; one started before any job (`ffffffff`) says which job took it in a `:job_id:` line; with
    `RAY_ROTATION_MAX_BYTES` a file has older parts `.1`, `.2` (the highest the oldest); Ray's log monitor moves
    a dead worker's file into `old/`."""
    from engine.runner.worker_logs import node_log

    logs = tmp_path / "logs"
    (logs / "old").mkdir(parents=True)
    files = {
        "worker-aa-01000000-11.out": ":job_id:01000000\n:task_name:read\n:task_name:load\nnamed line\n",
        "worker-aa-01000000-11.err": ":job_id:01000000\n:task_name:read\n",  # no output: left out
        "worker-bb-ffffffff-12.out": "start-up line\n:job_id:01000000\n:actor_name:Stage\nprestarted line\n",
        "worker-cc-ffffffff-13.out": "start-up of another\n:job_id:02000000\n:task_name:x\nother job's line\n",
        "worker-dd-ffffffff-14.out": "idle worker's line\n",  # never taken by a job
        "worker-ee-02000000-15.out": ":job_id:02000000\nanother job's named line\n",
        "worker-ff-01000000-16.out.2": ":job_id:01000000\n:task_name:t\nrotated part 1\n",
        "worker-ff-01000000-16.out.1": "rotated part 2\n",
        "worker-ff-01000000-16.out": "rotated part 3\n",
        "old/worker-9a-01000000-17.err": ":job_id:01000000\n:task_name:t\ndead worker's line\n",
        "raylet.out": "raylet line\n",
        "python-core-worker-aa_11.log": "core worker line\n",
        "io_worker-hh-18.out": "spill worker line\n",
    }
    for name, text in files.items():
        (logs / name).write_text(text)
    data = node_log(str(logs), "01000000", "title line")
    assert data is not None
    text = data.decode()
    assert text.startswith("# title line\n")
    for line in ("named line", "start-up line", "prestarted line", "dead worker's line", ":actor_name:Stage"):
        assert f"\n{line}\n" in text
    assert "rotated part 1\nrotated part 2\nrotated part 3\n" in text
    for absent in ("other", "another", "idle", "raylet", "core worker", "spill", ":job_id:", ":task_name:read",
                   "worker-aa-01000000-11.err"):
        assert absent not in text
    assert node_log(str(logs), "03000000", "title line") is None


def test_a_worker_file_larger_than_the_limit_keeps_its_end_and_says_what_it_left_out(tmp_path):
    from engine.runner.worker_logs import MAX_STREAM_BYTES, node_log

    lines = [f"line {i:09d}\n" for i in range(MAX_STREAM_BYTES // 15 + 1000)]  # 15 bytes a line
    (tmp_path / "worker-ab-01000000-11.out").write_text(":job_id:01000000\n" + "".join(lines))
    text = node_log(str(tmp_path), "01000000", "title").decode()
    fit = MAX_STREAM_BYTES // 15  # whole lines only
    assert text.endswith(lines[-1]) and lines[-fit] in text and lines[-fit - 1] not in text
    assert f"==> worker-ab-01000000-11.out (its first {(len(lines) - fit) * 15} bytes left out) <==" in text


@pytest.mark.slow
class TestEmbedded:
    def test_workers_lines_go_to_the_runs_log_folder_not_to_the_terminal_nor_another_jobs(
            self, session, tmp_path, capfd):
        import ray

        out = Location(tmp_path / "out")
        logs = WorkerLogs.start(out, "20260101T000000Z-aaaaaa")
        ray.get(ray.remote(chatty).remote("ours-4b1d"))
        # Another job prints on this session with Ray's default echo; once its driver has shown its line, the
        # session's log monitor has read the files written before it, ours included, so had this driver
        # echoed them, they would have been shown by now.
        other = subprocess.Popen([sys.executable, "-c", OTHER_JOB, session], cwd=ROOT, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            echoed = next((line for line in other.stdout if "other-job stdout line" in line), None)
        finally:
            other.stdin.write("\n")
            other.stdin.close()
            other.wait(timeout=60)
        assert echoed, other.stderr.read()[-3000:]  # Ray's default does echo a worker's line to its driver

        uri = logs.collect()
        assert uri == out.uri_of(f"{LOGS}/20260101T000000Z-aaaaaa")
        files = kept(out, "20260101T000000Z-aaaaaa")
        assert len(files) == 1  # one node
        text = next(iter(files.values()))
        for line in ("ours-4b1d transformers warning", "ours-4b1d stdout line", "ours-4b1d stderr line"):
            assert line in text
        assert "other-job" not in text
        terminal = capfd.readouterr()
        assert "ours-4b1d" not in terminal.out and "ours-4b1d" not in terminal.err

    def test_secrets_in_the_environment_are_blanked_in_the_kept_lines(self, session, tmp_path):
        import ray

        @ray.remote
        def leak() -> None:
            print(f"connecting with {os.environ[SECRET_VAR]}")

        out = Location(tmp_path / "out")
        logs = WorkerLogs.start(out, "20260101T000000Z-bbbbbb")
        ray.get(leak.remote())
        logs.collect()
        text = "".join(kept(out, "20260101T000000Z-bbbbbb").values())
        assert "connecting with ***" in text
        assert SECRET not in text

    def test_a_worker_finds_its_log_folder_by_its_open_files_as_by_its_temp_dir(self, session):
        """The fallback for a Ray without `get_temp_dir` names the same folder."""
        import ray

        from engine.runner.worker_logs import logs_dir, open_logs_dir

        by_api, by_files = ray.get(ray.remote(lambda: (logs_dir(), open_logs_dir())).remote())
        assert by_api == by_files and os.path.isdir(by_files) and Path(by_files).name == "logs"

    @pytest.mark.parametrize("where", ["local", "s3"])
    def test_only_the_newest_runs_folders_are_kept_never_the_current_runs(self, session, where, tmp_path,
                                                                          request):
        import ray

        uri = str(tmp_path / "out") if where == "local" else request.getfixturevalue("s3") + "/out"
        out = Location(uri)
        ray.get(ray.remote(chatty).remote("rotation"))  # something to keep in every run
        runs = [f"20260102T0000{i:02d}Z-cccccc" for i in range(KEEP_RUNS + 2)]
        for run_id in runs:
            assert WorkerLogs.start(out, run_id).collect() == out.uri_of(f"{LOGS}/{run_id}")
            assert kept(out, run_id)
        assert run_dirs(out) == runs[-KEEP_RUNS:]
        # a run whose id sorts first (a clock set back) still keeps its own folder: the oldest other one goes
        WorkerLogs.start(out, "19990101T000000Z-dddddd").collect()
        assert run_dirs(out) == ["19990101T000000Z-dddddd"] + runs[-KEEP_RUNS + 1:]
        # a run with nothing kept (yet) counts too: the driver's log may go into its folder afterwards
        assert WorkerLogs(out, "20260102T000099Z-cccccc").collect() is None
        assert run_dirs(out) == runs[-KEEP_RUNS + 1:]

    def test_collect_after_ray_has_shut_down_still_keeps_this_machines_workers_lines(self, session, tmp_path,
                                                                                      caplog):
        """Last in the class: it stops the session."""
        import ray

        out = Location(tmp_path / "out")
        logs = WorkerLogs.start(out, "20260103T000000Z-eeeeee")
        ray.get(ray.remote(chatty).remote("before-shutdown"))
        ray.shutdown()
        with caplog.at_level(logging.WARNING, logger="engine.runner.worker_logs"):
            uri = logs.collect()
        assert uri == out.uri_of(f"{LOGS}/20260103T000000Z-eeeeee")
        text = "".join(kept(out, "20260103T000000Z-eeeeee").values())
        assert "before-shutdown stdout line" in text and "before-shutdown stderr line" in text
        assert not caplog.records  # nothing missed: the session had no other node


@pytest.mark.slow
def test_a_second_nodes_own_log_folder_is_kept_too_and_named_in_a_warning_when_ray_is_down(tmp_path, caplog):
    import shutil
    import tempfile

    import ray
    from ray.cluster_utils import Cluster
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if ray.is_initialized():
        ray.shutdown()
    # a temp dir of its own: its logs are not in the folder the driver reads (as on another machine); short,
    # for the node's socket paths
    own = tempfile.mkdtemp(prefix="granucap-second-node-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, temp_dir=own)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, **ray_init_kwargs())
        out = Location(tmp_path / "out")
        logs = WorkerLogs.start(out, "20260104T000000Z-ffffff")
        head = ray.get_runtime_context().get_node_id()  # the driver joins through the head's raylet
        second = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head)
        task = ray.remote(chatty)
        where = [ray.get(task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                         .remote(tag)) for node, tag in ((head, "head-node"), (second, "second-node"))]
        assert where == [head, second]

        assert logs.collect() == out.uri_of(f"{LOGS}/20260104T000000Z-ffffff")
        files = kept(out, "20260104T000000Z-ffffff")
        assert len(files) == 2
        on_second = [text for text in files.values() if "second-node stdout line" in text]
        assert len(on_second) == 1 and own in on_second[0]
        assert "head-node" not in on_second[0] and "second-node stderr line" in on_second[0]
        on_head = [text for text in files.values() if "head-node stdout line" in text]
        assert len(on_head) == 1 and "second-node" not in on_head[0]

        # with Ray down only this machine's folder can be read: the second node's is reported, not lost silently
        ray.shutdown()
        with caplog.at_level(logging.WARNING, logger="engine.runner.worker_logs"):
            assert logs.collect() == out.uri_of(f"{LOGS}/20260104T000000Z-ffffff")
        assert any(own in r.getMessage() and "Ray is not up" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(own, ignore_errors=True)
