"""The allocator Ray's workers run with (`ray.worker_allocator`, engine/allocator.py)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time

import pytest

from engine import allocator
from engine.allocator import AllocatorError, driver_malloc, find_library, resolve
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
def test_ray_workers_run_with_tcmalloc_and_the_driver_keeps_its_own_and_no_worker_idles_without_them():
    import ray

    from engine.runner import _ray_init, worker_allocator

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

    @ray.remote(num_cpus=0.25)
    def raylet_pid() -> str:
        return os.environ["RAY_RAYLET_PID"]

    def idle_workers(raylet: str) -> dict[int, set[str]]:
        """The idle worker processes of this Ray session -> the names of their environment variables."""
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                title = open(f"/proc/{pid}/cmdline", "rb").read()
                variables = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            env = dict(v.split(b"=", 1) for v in variables if b"=" in v)
            if title.startswith(b"ray::IDLE") and env.get(b"RAY_RAYLET_PID") == raylet.encode():
                found[int(pid)] = {k.decode() for k in env}
        return found

    config = load_config("pipelines/smoke.yaml", GLIP)
    _ray_init(config, None, worker_allocator(config))
    try:
        actor = Actor.remote()
        pid, actor_mapped = ray.get(actor.mapped.remote())
        assert ray.get(task.remote()) and actor_mapped and pid != os.getpid()
        assert not mapped()  # the driver was started before; it keeps the allocator it has
        # every idle worker has the run's environment: Ray prestarts workers without it for a new driver (within
        # about a second) unless told not to, and no task or actor of the run could ever use those
        raylet = ray.get(raylet_pid.remote())
        time.sleep(2)
        idle = idle_workers(raylet)
        assert idle, "the task's worker should be idle now"
        assert all("TRANSFORMERS_VERBOSITY" in env for env in idle.values()), idle.keys()
    finally:
        ray.shutdown()


GLIBC = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# four threads that each allocate while all are alive, then glibc's per-arena statistics (on stderr)
ARENAS_SCRIPT = """
import ctypes, sys, threading
from engine.allocator import driver_malloc
if sys.argv[1] != "default":
    print(driver_malloc(int(sys.argv[1]), apply=True))
barrier, kept = threading.Barrier(4), []
def work():
    kept.append([bytearray(65536) for _ in range(8)])  # below the mmap threshold: from an arena
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
ctypes.CDLL(None).malloc_stats()
"""


@pytest.mark.skipif(not GLIBC, reason="ray.driver_malloc_arenas is a glibc setting")
@pytest.mark.parametrize("setting, arenas", [("default", None), ("1", 1), ("2", 2)])
def test_the_drivers_malloc_arenas_are_capped_for_the_threads_to_come(setting, arenas):
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "LD_PRELOAD")}
    proc = subprocess.run([sys.executable, "-c", ARENAS_SCRIPT, setting], capture_output=True, text=True, env=env,
                          check=True)
    count = sum(line.startswith("Arena ") for line in proc.stderr.splitlines())
    if arenas is None:
        assert count >= 5  # glibc's default: the main thread's arena and one for each new thread
    else:
        assert count == arenas
        assert proc.stdout.strip() == f"glibc malloc, at most {arenas} arena{'s' if arenas > 1 else ''}"


def test_the_drivers_malloc_is_left_alone_when_the_user_chose(monkeypatch):
    def no_glibc_call(*args, **kwargs):
        raise AssertionError("mallopt must not be called")

    monkeypatch.setattr(allocator.ctypes, "CDLL", no_glibc_call)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert "default" in driver_malloc(None, apply=True)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert driver_malloc(1, apply=True) == "MALLOC_ARENA_MAX=4 from the environment"
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("LD_PRELOAD", "/opt/libother.so /usr/lib/libtcmalloc_minimal.so.4")
    assert driver_malloc(1, apply=True) == "libtcmalloc_minimal.so.4 (preloaded)"
