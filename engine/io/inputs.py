"""What the `--input` arguments name: input files of three kinds, local or in any fsspec filesystem, and the
work unit (a run of samples of one file) that the plan cuts them into.

Each input is a file, a directory or a glob, as a local path or a URI (`s3://bucket/dump/*.tar`):
  * `*.tar`, `*.tar.gz`, `*.tgz` -> "webdataset"; `*.parquet` -> "parquet"; a `*.jsonl` file or a directory
    holding `captions.jsonl` -> "folder" (the path is the jsonl file).
  * Any other directory is searched recursively (locally: symlinked directories not followed) for those
    files; a directory that holds `captions.jsonl` is a folder input and is not searched further.
  * A glob skips matched files of unknown kind; a file named explicitly must be of a known kind.
  * img2dataset writes `NAME.parquet` (its per-shard metadata, no images) beside each `NAME.tar`: such a
    parquet is the tar's metadata, not an input of its own, unless it is named explicitly.
  * Pairs are deduplicated and sorted by path. Nothing found (or a missing path) -> ValueError.
"""

from __future__ import annotations

import glob
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Mapping

from engine.io import storage

log = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("webdataset", "parquet", "folder")
FOLDER_JSONL = "captions.jsonl"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True, slots=True)
class Unit:
    """Samples [start, stop) of one input file in reading order; `index` is also the output shard number.

    `path` is where the file is read from (a local path or a URI); `source` is what records call it (its
    path relative to the folder that holds all of the run's inputs, so the same dump gives the same records
    wherever it lies). `to_end`: the last unit of a file planned from metadata the dump carries (img2dataset's
    stats) reads on to the file's end, so a file holding more samples than its metadata says loses none."""

    index: int
    kind: str
    path: str
    start: int
    stop: int
    source: str = ""
    to_end: bool = False

    @property
    def size(self) -> int:
        return self.stop - self.start


def kind_of_file(path: str) -> str | None:
    name = storage.basename(path).lower()
    if name.endswith(TAR_SUFFIXES):
        return "webdataset"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".jsonl"):
        return "folder"
    return None


def tar_stem(path: str) -> str | None:
    """`a/00001.tar` -> `a/00001` (None for other files): what img2dataset names a shard's side files after."""
    lower = path.lower()
    for suffix in TAR_SUFFIXES:
        if lower.endswith(suffix):
            return path[: -len(suffix)]
    return None


# --- local ------------------------------------------------------------------------------------------------


def _search_local_dir(root: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if FOLDER_JSONL in filenames:
            found.append(("folder", os.path.join(dirpath, FOLDER_JSONL)))
            dirnames[:] = []  # a folder input owns its subdirectories (images may live there)
            continue
        for name in sorted(filenames):
            kind = kind_of_file(name)
            if kind in ("webdataset", "parquet"):
                found.append((kind, os.path.join(dirpath, name)))
    return found


def _classify_local(path: str) -> list[tuple[str, str]]:
    if os.path.isdir(path):
        jsonl = os.path.join(path, FOLDER_JSONL)
        if os.path.isfile(jsonl):
            return [("folder", jsonl)]
        return _search_local_dir(path)
    return [(_known_kind(path), path)]


def _known_kind(path: str) -> str:
    kind = kind_of_file(path)
    if kind is None:
        raise ValueError(
            f"input {path!r}: unknown kind (expected .tar/.tar.gz/.tgz, .parquet, .jsonl or a directory)"
        )
    return kind


def _expand_local(item: str) -> list[tuple[str, str, bool]]:
    """(kind, path, named explicitly) for one local input."""
    item = storage.local_path(item)
    if os.path.exists(item):
        matches = [item]
    elif glob.has_magic(item):
        matches = sorted(glob.glob(item, recursive=True))
        if not matches:
            raise ValueError(f"input glob {item!r} matches nothing")
    else:
        raise ValueError(f"input {item!r} does not exist")
    out = []
    for match in matches:
        if not os.path.isdir(match) and kind_of_file(match) is None and glob.has_magic(item):
            continue  # a glob may match unrelated files; a file named explicitly must be known
        explicit = match == item and not os.path.isdir(match)
        out.extend((kind, path, explicit) for kind, path in _classify_local(match))
    return out


# --- fsspec filesystems -----------------------------------------------------------------------------------


def _search_remote_dir(fs, root: str) -> list[tuple[str, str]]:
    """The local directory search on an fsspec filesystem, from one recursive listing."""
    files = sorted(fs.find(root))
    folders = sorted({posixpath.dirname(f) for f in files if posixpath.basename(f) == FOLDER_JSONL})
    found: list[tuple[str, str]] = []
    owned: list[str] = []  # folder inputs own everything below them
    for folder in folders:
        if not any(folder == o or folder.startswith(o + "/") for o in owned):
            owned.append(folder)
            found.append(("folder", posixpath.join(folder, FOLDER_JSONL)))
    for f in files:
        if any(f.startswith(o + "/") for o in owned):
            continue
        kind = kind_of_file(f)
        if kind in ("webdataset", "parquet"):
            found.append((kind, f))
    return found


def _raise_if_unreachable(fs, path: str) -> None:
    """exists() and glob() answer "nothing" for a missing bucket and for unusable credentials alike: listing
    the bucket (the path's first part) raises what is really wrong, if anything is."""
    fs.ls(path.split("/", 1)[0], detail=False)


def _expand_remote(item: str, storage_options: Mapping[str, Any] | None) -> list[tuple[str, str, bool]]:
    fs, path = storage.filesystem(item, storage_options)
    try:
        if glob.has_magic(path):
            matches = sorted(fs.glob(path))
            if not matches:
                _raise_if_unreachable(fs, path)
                raise ValueError(f"input glob {item!r} matches nothing")
            explicit = False
        elif fs.isdir(path):
            matches, explicit = [path], False
        elif fs.exists(path):
            matches, explicit = [path], True
        else:
            _raise_if_unreachable(fs, path)
            raise ValueError(f"input {item!r} does not exist")
        out: list[tuple[str, str, bool]] = []
        for match in matches:
            if fs.isdir(match):
                jsonl = posixpath.join(match, FOLDER_JSONL)
                pairs = [("folder", jsonl)] if fs.exists(jsonl) else _search_remote_dir(fs, match)
                out.extend((kind, p, False) for kind, p in pairs)
            elif kind_of_file(match) is not None:
                out.append((kind_of_file(match), match, explicit))  # type: ignore[arg-type]
            elif explicit:
                _known_kind(item)
    except (ValueError, storage.StorageError):
        raise
    except Exception as exc:  # no credentials, endpoint down, no such bucket, ...: one line, before any work
        raise storage.StorageError(storage.describe(exc, item, "read")) from None
    return [(kind, fs.unstrip_protocol(p), explicit) for kind, p, explicit in out]


def expand_inputs(
    inputs: list[str] | str, storage_options: Mapping[str, Any] | None = None
) -> list[tuple[str, str]]:
    """Resolve files, directories and globs (local or URIs) to sorted, deduplicated (kind, path) pairs."""
    if isinstance(inputs, str):
        inputs = [inputs]
    pairs: dict[str, str] = {}
    explicit: set[str] = set()
    for item in inputs:
        item = os.fspath(item)
        found = _expand_remote(item, storage_options) if storage.is_remote(item) else _expand_local(item)
        for kind, path, named in found:
            pairs.setdefault(path, kind)
            if named:
                explicit.add(path)
    stems = {tar_stem(p) for p, kind in pairs.items() if kind == "webdataset"}
    metadata = [p for p, kind in pairs.items() if kind == "parquet" and p[: -len(".parquet")] in stems]
    metadata = [p for p in metadata if p not in explicit]
    if metadata:
        log.info("%d parquet files beside tars of the same name are img2dataset metadata, not inputs",
                 len(metadata))
        for p in metadata:
            del pairs[p]
    if not pairs:
        raise ValueError(
            f"no input found in {list(inputs)!r}: expected webdataset tars (.tar/.tar.gz/.tgz), "
            f"parquet files, or a folder with {FOLDER_JSONL}"
        )
    return [(kind, path) for path, kind in sorted(pairs.items())]


def source_names(paths: list[str]) -> dict[str, str]:
    """What records call each input file: its path relative to the deepest folder holding all of them ("/"
    separated), so a dump gives the same `source` fields on a local disk and in a bucket. Files on different
    filesystems keep their full URIs."""
    if not paths:
        return {}
    schemes = {storage.protocol(p) for p in paths}
    if len(schemes) > 1:
        return {p: p for p in paths}
    if storage.is_remote(paths[0]):
        bare = {p: p.partition("://")[2] for p in paths}
        root = posixpath.commonpath([posixpath.dirname(b) for b in bare.values()])
        return {p: posixpath.relpath(b, root) if root else b for p, b in bare.items()}
    full = {p: os.path.abspath(storage.local_path(p)) for p in paths}
    root = os.path.commonpath([os.path.dirname(f) for f in full.values()])
    return {p: os.path.relpath(f, root).replace(os.sep, "/") for p, f in full.items()}


__all__ = ["FOLDER_JSONL", "KINDS", "TAR_SUFFIXES", "Unit", "expand_inputs", "kind_of_file", "source_names",
           "tar_stem"]
