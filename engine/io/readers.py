"""Streamed readers of the input formats: one work unit in, its records out; and sample counts per file. The
rest of the engine reads inputs through this module; each format lives in its own module under
engine/io/formats/ (webdataset.py: tars, parquet.py, folder.py: images + captions.jsonl), whose docstring
holds that format's rules, and what they share in engine/io/formats/common.py.

Inputs and units: engine/io/inputs.py; the plan: engine/io/plan.py. Files are local paths or URIs of any
fsspec filesystem (engine/io/storage.py); both read the same way.

Reading (`read_unit`) yields exactly `stop - start` records, positions 0..n-1, in order. Nothing is ever
extracted to disk, nor a whole file read into memory. Rules every format follows:
  * Keys are sanitised: backslashes become "/", leading slashes and "." / ".." / empty parts are dropped
    (`../evil` -> `evil`, `/abs/x` -> `abs/x`); a key that sanitises to "" falls back to the derived key.
    The original name is kept in `meta.original_key` when it changed. Keys may contain "/".
  * Derived key (no key in the source): f"{stem-of-source}-{row:08d}", row = sample index in the file; the
    stem of a folder input is its directory name.
  * Corrupt input: when a file breaks while it is read, or holds fewer samples than planned, every remaining
    planned position is yielded as a rejected row ("read", "corrupt_input"), so counts still add up. A file
    that cannot be read at all at planning time (not a tar / not a parquet) is planned as one unit of one
    sample, which reads as one "corrupt_input" row: broken inputs stay visible in the index.
  * Paths from parquet/jsonl are resolved (symlinks too) relative to that file's directory and must stay
    inside it (absolute paths, `..` escapes, links pointing out -> "unsafe_path"); a missing or unreadable
    file -> "missing_image".
  * A sample without image -> rejected row ("read", "missing_image").
"""

from __future__ import annotations

from collections.abc import Iterator

from engine.io.formats.common import Options, open_input, read_bytes, sanitize_key
from engine.io.formats.folder import count_jsonl, read_folder
from engine.io.formats.parquet import count_parquet, read_parquet
from engine.io.formats.webdataset import count_tar, read_tar
from engine.io.inputs import Unit
from engine.records import Record


def count_samples(kind: str, path: str, options: Options = None) -> int:
    """Samples in one input file, counted without decoding anything (-1: unreadable file): a tar's member
    headers (its data streams by), a parquet footer, a jsonl's non-empty lines."""
    if kind == "webdataset":
        return count_tar(path, options)
    if kind == "parquet":
        return count_parquet(path, options)
    if kind == "folder":
        return count_jsonl(path, options)
    raise ValueError(f"unknown input kind {kind!r}")


def read_unit(unit: Unit, options: Options = None) -> Iterator[Record]:
    """Yield the records of one unit, positions 0..n-1 in order: exactly `unit.size` of them, or (a `to_end`
    unit) at least that many, the file's samples up to its end."""
    if unit.kind == "webdataset":
        yield from read_tar(unit, options)
    elif unit.kind == "parquet":
        yield from read_parquet(unit, options)
    elif unit.kind == "folder":
        yield from read_folder(unit, options)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


__all__ = [
    "Options",
    "count_jsonl",
    "count_parquet",
    "count_samples",
    "count_tar",
    "open_input",
    "read_bytes",
    "read_unit",
    "sanitize_key",
]
