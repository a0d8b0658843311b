"""Which memory allocator Ray's worker processes run with (`ray.worker_allocator`).

glibc's malloc keeps the freed memory of a model's batches of varying shapes: a teacher actor's heap grew by
≈ 360 MiB over 3,072 samples and kept growing after its first batches, where tcmalloc's grew by ≈ 210 MiB,
mostly in the first batches, at the same speed (docs/performance.md, "Memory"); vLLM's CPU backend asks for
tcmalloc too. A preloaded allocator only applies to processes started with it, so it is set in the
environment Ray starts its workers with (the runtime environment of `ray.init`); the driver keeps its own.

The driver's own malloc (`ray.driver_malloc_arenas`): with glibc's default of up to 8 arenas a core, the many
threads of Ray's core worker and Ray Data's executor spread their allocations over several arenas, and each
finished Ray Dataset left ≈ 2.8 KB a unit of fragments behind (13 → 38 MiB over ten Datasets of 1,000 units,
growing linearly); capped at one arena, 13 → 16 MiB and flat from the fifth on, at the same speed
(benchmarks/datasets.py, docs/performance.md).
glibc's `mallopt` caps arenas that are yet to be made, so it is called before Ray starts its threads.

Standard library only: `granucap doctor` and `--dry-run` look libraries up without starting anything.
"""

from __future__ import annotations

import ctypes
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# name -> (shared libraries to look for, in order of preference; the Debian/Ubuntu package that has the first)
ALLOCATORS: dict[str, tuple[tuple[str, ...], str]] = {
    "tcmalloc": (("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "libtcmalloc-minimal4"),
    "jemalloc": (("libjemalloc.so.2",), "libjemalloc2"),
}
# tcmalloc reports every allocation above 1 GiB on stderr (loading a large model's weights makes many)
QUIET = {"tcmalloc": {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40)}}


M_ARENA_MAX = -8  # glibc's malloc.h


class AllocatorError(RuntimeError):
    """`ray.worker_allocator` names an allocator whose library is not installed, or glibc refused
    `ray.driver_malloc_arenas`."""


def library_dirs() -> list[Path]:
    """Where shared libraries are looked for: LD_LIBRARY_PATH, this Python's prefix, the system's."""
    dirs = [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    dirs.append(Path(sys.prefix) / "lib")
    multiarch = sysconfig.get_config_var("MULTIARCH")
    for root in ("/usr/local/lib", "/usr/lib", "/lib"):
        if multiarch:
            dirs.append(Path(root) / multiarch)
        dirs.append(Path(root))
    dirs += [Path("/usr/lib64"), Path("/lib64")]
    return list(dict.fromkeys(dirs))


def preloads(value: str | None) -> list[str]:
    """The libraries an LD_PRELOAD value names (the loader takes spaces and colons between them)."""
    return (value or "").replace(":", " ").split()


def find_library(name: str, dirs: list[Path] | None = None) -> Path | None:
    """The first installed shared library of allocator `name`, or None."""
    libraries, _ = ALLOCATORS[name]
    for library in libraries:
        for folder in library_dirs() if dirs is None else dirs:
            if (folder / library).is_file():
                return folder / library
    return None


@dataclass(frozen=True, slots=True)
class WorkerAllocator:
    name: str  # tcmalloc | jemalloc | system
    library: Path | None  # what the workers preload; None: the system allocator
    why: str  # one line for logs, `--dry-run` and `doctor`

    def env(self, inherited: str | None = None) -> dict[str, str]:
        """Environment variables for Ray's workers: LD_PRELOAD (after any inherited preloads) and the
        allocator's own settings; nothing for the system allocator."""
        if self.library is None:
            return {}
        preload = [p for p in preloads(inherited) if p != str(self.library)]
        return {"LD_PRELOAD": " ".join([*preload, str(self.library)]), **QUIET.get(self.name, {})}


def resolve(setting: str, *, cluster: bool = False, dirs: list[Path] | None = None) -> WorkerAllocator:
    """What `ray.worker_allocator` = `setting` means on this machine.

    `auto`: tcmalloc when installed, else the system allocator; on a Ray cluster (`cluster`) the system
    allocator, because the driver cannot see the nodes' libraries. `tcmalloc` / `jemalloc`: that library,
    and an AllocatorError naming the package when it is missing here (on a cluster every node needs it too; a
    node without it starts its workers with the system allocator and logs that it could not preload it).
    """
    if setting == "system":
        return WorkerAllocator("system", None, "system allocator (set)")
    if setting == "auto":
        if cluster:
            return WorkerAllocator("system", None, "system allocator (a cluster: set ray.worker_allocator to "
                                   "tcmalloc when its nodes have it)")
        library = find_library("tcmalloc", dirs)
        if library is None:
            _, package = ALLOCATORS["tcmalloc"]
            return WorkerAllocator("system", None, f"system allocator (tcmalloc is not installed: apt-get install "
                                   f"{package})")
        return WorkerAllocator("tcmalloc", library, f"tcmalloc ({library})")
    if setting not in ALLOCATORS:
        raise AllocatorError(f"unknown allocator {setting!r} (auto, system, {', '.join(ALLOCATORS)})")
    library = find_library(setting, dirs)
    if library is None:
        libraries, package = ALLOCATORS[setting]
        raise AllocatorError(
            f"ray.worker_allocator is {setting} but none of {', '.join(libraries)} is installed "
            f"(apt-get install {package}); or set ray.worker_allocator=auto"
        )
    return WorkerAllocator(setting, library, f"{setting} ({library})")


def driver_malloc(arenas: int | None, *, apply: bool = False) -> str:
    """What `ray.driver_malloc_arenas` = `arenas` does in this process, as one line for logs and `--dry-run`;
    with `apply`, does it: glibc's `mallopt(M_ARENA_MAX, arenas)`. Left as it is when `arenas` is None, when
    MALLOC_ARENA_MAX is set (the user's choice, which glibc read at start), when another allocator is
    preloaded, and when the C library is not glibc."""
    if arenas is None:
        return "glibc's default malloc arenas (ray.driver_malloc_arenas: null)"
    if os.environ.get("MALLOC_ARENA_MAX"):
        return f"MALLOC_ARENA_MAX={os.environ['MALLOC_ARENA_MAX']} from the environment"
    preloaded = [p for p in preloads(os.environ.get("LD_PRELOAD"))
                 if any(Path(p).name in libraries for libraries, _ in ALLOCATORS.values())]
    if preloaded:
        return f"{Path(preloaded[0]).name} (preloaded)"
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):
        return "the C library's malloc (not glibc: ray.driver_malloc_arenas does not apply)"
    line = f"glibc malloc, at most {arenas} arena{'s' if arenas > 1 else ''}"
    if apply and libc.mallopt(M_ARENA_MAX, arenas) != 1:
        raise AllocatorError(f"glibc's mallopt(M_ARENA_MAX, {arenas}) failed")
    return line
