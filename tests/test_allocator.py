"""The allocator Ray's workers run with (`ray.worker_allocator`, engine/allocator.py)."""

from __future__ import annotations

import os

import pytest

from engine import allocator
from engine.allocator import AllocatorError, find_library, resolve
from engine.config import load_config
from engine.runner import RunError, run

GLIP = ["stages.recaption.backend=passthrough", "stages.extract.backend=nltk", "write.shard_size=4"]


def test_auto_takes_tcmalloc_when_installed_and_the_system_allocator_otherwise(tmp_path):
    assert find_library("tcmalloc", [tmp_path]) is None
    plain = resolve("auto", dirs=[tmp_path])
    assert plain.name == "system" and plain.library is None and plain.env("libother.so") == {}
    assert "apt-get install libtcmalloc-minimal4" in plain.why

    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    chosen = resolve("auto", dirs=[tmp_path])
    assert chosen.name == "tcmalloc" and chosen.library == tmp_path / "libtcmalloc_minimal.so.4"
    env = chosen.env(f"libother.so:{chosen.library}")  # a preload the user set is kept, ours not doubled
    assert env["LD_PRELOAD"] == f"libother.so {chosen.library}"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 2**40  # no stderr line per large weight tensor

    # the driver cannot see a cluster's libraries: auto does not assume them; asked for, it is set
    assert resolve("auto", cluster=True, dirs=[tmp_path]).library is None
    assert resolve("tcmalloc", cluster=True, dirs=[tmp_path]).library == chosen.library
    assert resolve("system", dirs=[tmp_path]).env() == {}


def test_an_allocator_asked_for_by_name_must_be_installed(tmp_path):
    with pytest.raises(AllocatorError, match=r"libjemalloc\.so\.2.*apt-get install libjemalloc2"):
        resolve("jemalloc", dirs=[tmp_path])
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert resolve("jemalloc", dirs=[tmp_path]).env()["LD_PRELOAD"] == str(tmp_path / "libjemalloc.so.2")


def test_a_run_asking_for_a_missing_allocator_stops_before_writing(demo_input, tmp_path, monkeypatch):
    monkeypatch.setattr(allocator, "library_dirs", lambda: [tmp_path / "nothing"])
    config = load_config("pipelines/smoke.yaml", GLIP + ["ray.worker_allocator=tcmalloc"])
    with pytest.raises(RunError, match="libtcmalloc-minimal4"):
        run(config, inputs=[str(demo_input)], output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ray_workers_run_with_tcmalloc_and_the_driver_keeps_its_own():
    import ray

    from engine.runner.session import _ray_init, worker_allocator

    library = find_library("tcmalloc")
    if library is None:
        pytest.skip("libtcmalloc-minimal4 is not installed (install.sh installs it)")
    if ray.is_initialized():
        ray.shutdown()

    def mapped() -> bool:
        with open("/proc/self/maps") as maps:
            return any(str(library) in line for line in maps)

    @ray.remote(num_cpus=0.25)
    def task() -> bool:
        return mapped()

    @ray.remote(num_cpus=0.25)
    class Actor:
        def mapped(self) -> tuple[int, bool]:
            return os.getpid(), mapped()

    config = load_config("pipelines/smoke.yaml", GLIP)
    _ray_init(config, None, worker_allocator(config))
    try:
        actor = Actor.remote()
        pid, actor_mapped = ray.get(actor.mapped.remote())
        assert ray.get(task.remote()) and actor_mapped and pid != os.getpid()
        assert not mapped()  # the driver was started before; it keeps the allocator it has
    finally:
        ray.shutdown()

