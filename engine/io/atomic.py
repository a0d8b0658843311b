"""Atomic file writes: the one way granucap writes a file that something else may read or resume from (shards,
index parts, stats, manifests, export side files, the NLTK data and the noun lexicon).

The bytes go to a temporary file beside the target (its name holds `TMP_MARK`, so a rerun can find and delete
what a killed write left), are fsynced, and the temporary is renamed over the target: a reader sees the old
file or the new one, never half of one. Standard library only, so every process can import it cheaply.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TMP_MARK = ".tmp-"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically, creating its folder if needed. The file gets the usual mode for the
    process's umask (a temporary file's own is 0600), so a folder shared between users stays readable; on any
    error the temporary is deleted and the target is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}{TMP_MARK}")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~umask)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
