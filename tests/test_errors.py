"""Following an error to its causes: through Python's chain and through the task errors Ray hands on."""

from __future__ import annotations

import errno

import pytest

from engine.errors import causes, os_error_in

rex = pytest.importorskip("ray.exceptions")


def _chained() -> BaseException:
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/out/shards/000001.tar")
        except OSError as exc:
            raise RuntimeError("write failed") from exc
    except RuntimeError as exc:
        return exc


def test_causes_walk_python_chains_and_ray_task_errors_once_each():
    inner = _chained()
    task = rex.RayTaskError("write_unit", "traceback", inner)
    found = list(causes(task))
    assert found[0] is task and inner in found and isinstance(found[-1], OSError)
    assert len(found) == len({id(e) for e in found})
    loop = RuntimeError("a")
    loop.__context__ = RuntimeError("b")
    loop.__context__.__context__ = loop  # a cycle ends the walk instead of hanging it
    assert len(list(causes(loop))) == 2


def test_a_full_disk_is_found_behind_a_ray_task_error():
    err = os_error_in(rex.RayTaskError("write_unit", "traceback", _chained()))
    assert err is not None and err.errno == errno.ENOSPC and err.filename == "/out/shards/000001.tar"
    assert os_error_in(RuntimeError("nothing below")) is None


def test_a_lost_actor_inside_a_task_error_is_a_cluster_failure_and_a_bug_is_not():
    from engine.runner.loop import _system_failure

    assert _system_failure(rex.RayTaskError("stage", "traceback", rex.ActorDiedError()))
    assert _system_failure(rex.WorkerCrashedError())
    assert not _system_failure(rex.RayTaskError("stage", "traceback", ValueError("bad input")))
