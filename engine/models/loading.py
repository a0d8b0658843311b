"""Model references -> local paths, and device/dtype choice.

A reference is a hub id, a local directory, or `tiny:NAME`: a random-weight model that granucap builds
itself (engine/models/tiny.py) into a cache folder the first time it is asked for. Builds go to a temp
folder that is renamed into place under a file lock, so concurrent processes (Ray actors) never see a
half-written model; a marker written last says a build is complete.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
TINY_VERSION = "v1"  # bump when a builder changes, so old caches are not reused
MARKER = ".granucap-complete"


def is_dummy(ref: str | None) -> bool:
    """True for `tiny:NAME` references (random weights, built locally)."""
    return bool(ref) and ref.startswith(TINY_PREFIX)


def model_label(ref: str | None) -> str:
    """The model as provenance names it: the reference, marked when its weights are random."""
    return (ref or "") + (" (dummy weights)" if is_dummy(ref) else "")


def cache_root(cache_dir: str | None = None) -> Path:
    """`cache_dir`, else $GRANUCAP_CACHE, else ~/.cache/granucap."""
    root = cache_dir or os.environ.get("GRANUCAP_CACHE") or Path.home() / ".cache" / "granucap"
    return Path(root).expanduser()


def tiny_path(name: str, cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / "models" / f"tiny-{name}-{TINY_VERSION}"


def resolve_model(ref: str, cache_dir: str | None = None) -> str:
    """Return a path or hub id that `from_pretrained` can load; builds `tiny:NAME` on first use."""
    if not is_dummy(ref):
        return ref
    name = ref[len(TINY_PREFIX):]
    from engine.models.tiny import BUILDERS, build_tiny

    if name not in BUILDERS:
        raise ValueError(f"unknown tiny model {ref!r}; known: {', '.join(TINY_PREFIX + n for n in sorted(BUILDERS))}")
    target = tiny_path(name, cache_dir)
    if (target / MARKER).is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (target / MARKER).is_file():  # another process built it while we waited
                return str(target)
            if target.exists():  # incomplete leftover of a crashed build
                shutil.rmtree(target)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            try:
                build_tiny(name, tmp)
                (tmp / MARKER).write_text(ref + "\n")
                os.rename(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            log.info("built %s into %s", ref, target)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(target)


def pick_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else is returned as given."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str) -> Any:
    """'auto' -> bfloat16 on CUDA, float32 elsewhere; else the torch dtype of that name ('float16', ...)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value
