"""Which memory allocator Ray's worker processes run with (`ray.worker_allocator`).

glibc's malloc keeps more of the freed memory of a model's batches of varying shapes than tcmalloc does, at the
same speed (docs/performance.md, "Memory", benchmarks/allocator.py); vLLM's CPU backend asks for tcmalloc too.
A preloaded allocator only applies to processes started with it, so it is set in the environment Ray starts
its workers with (the runtime environment of `ray.init`, a documented setting); the driver keeps its own.

Standard library only: `granucap doctor` and `--dry-run` look libraries up without starting anything.
"""

from __future__ import annotations

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


class AllocatorError(RuntimeError):
    """`ray.worker_allocator` names an allocator whose library is not installed."""


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

