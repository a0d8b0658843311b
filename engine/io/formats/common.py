"""What the input formats share: opening input files (local or fsspec), keys (sanitised from the source or
derived from the file and row), a record's meta, images a row names by path, and the rows that stand for
positions a broken input could not deliver. The rules these implement are in engine/io/readers.py."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Mapping

from engine.io import storage
from engine.io.inputs import FOLDER_JSONL, Unit
from engine.records import Record

Options = Mapping[str, Any] | None  # the pipeline's storage_options


@contextmanager
def open_input(path: str, options: Options = None, **kwargs: Any):
    """A binary file object of an input file, local or on any fsspec filesystem (random access: on an object
    store a seek is a ranged read)."""
    if storage.is_remote(path):
        fs, inner = storage.filesystem(path, options)
        with fs.open(inner, "rb", **kwargs) as f:
            yield f
    else:
        with open(storage.local_path(path), "rb") as f:
            yield f


def read_bytes(path: str, options: Options = None) -> bytes:
    """A small file's bytes in one request (on an object store, a GET without the HEAD that opening costs)."""
    if storage.is_remote(path):
        fs, inner = storage.filesystem(path, options)
        return fs.cat_file(inner)
    with open(storage.local_path(path), "rb") as f:
        return f.read()


def sanitize_key(raw: str) -> str:
    """Drop leading slashes and "."/".."/empty parts so a key can never name a path outside the output."""
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts)


def source_stem(path: str) -> str:
    """The stem derived keys start with: the file name without its input suffix, or a folder's name."""
    name = storage.basename(path)
    if name == FOLDER_JSONL:
        return storage.basename(storage.parent(path) if storage.is_remote(path) else os.path.abspath(
            os.path.dirname(storage.local_path(path)) or ".")) or "folder"
    for suffix in (".tar.gz", ".tgz", ".tar", ".parquet", ".jsonl"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return posixpath.splitext(name)[0]


def derived_key(stem: str, row: int) -> str:
    return f"{stem}-{row:08d}"


def dump_meta(meta: dict[str, Any]) -> str | None:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str) if meta else None


def decode_text(data: bytes, meta: dict[str, Any], what: str) -> str:
    """UTF-8 text; undecodable bytes are replaced and flagged as `meta[what + "_invalid_utf8"]`."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        meta[f"{what}_invalid_utf8"] = True
        return data.decode("utf-8", errors="replace")


def jsonable(value: Any) -> Any:
    """`value` with binary parts dropped, so that it can go into meta."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def fill_corrupt(unit: Unit, position: int, stem: str, message: str, pending: str | None) -> Iterator[Record]:
    """Rejected rows for the positions a broken input could not deliver (keeps counts = plan)."""
    for pos in range(position, unit.size):
        key = derived_key(stem, unit.start + pos)
        if pos == position and pending is not None:
            key = sanitize_key(pending) or key
        record = Record(key=key, source=unit.source or unit.path, unit=unit.index, position=pos)
        record.reject("read", "corrupt_input", message)
        yield record


def _resolve_local(base_dir: str, rel: str) -> tuple[str | None, str | None]:
    """(path, None) for a file path inside base_dir, else (None, reason kind)."""
    if not rel or os.path.isabs(rel) or rel.startswith(("/", "\\")):
        return None, "unsafe_path"
    base = os.path.realpath(base_dir)
    full = os.path.realpath(os.path.join(base, rel))
    if os.path.commonpath([base, full]) != base:
        return None, "unsafe_path"
    return full, None


def _resolve_remote(base_dir: str, rel: str) -> tuple[str | None, str | None]:
    """`_resolve_local` for a folder on an fsspec filesystem (no links there: the path itself must stay in)."""
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if not rel or "://" in rel or posixpath.isabs(norm) or norm == ".." or norm.startswith("../"):
        return None, "unsafe_path"
    return f"{base_dir.rstrip('/')}/{norm}", None


def load_image(record: Record, base_dir: str, rel: Any, options: Options = None) -> None:
    """Read an image referenced by a path relative to `base_dir` (the input file's folder) into the record,
    or reject it."""
    if rel is None or not isinstance(rel, str) or not rel.strip():
        record.reject("read", "missing_image", "sample has neither image bytes nor a file path")
        return
    if storage.is_remote(base_dir):
        full, problem = _resolve_remote(base_dir, rel)
        if problem:
            record.reject("read", problem, f"image path {rel!r} is absolute or leaves {base_dir!r}")
            return
        try:
            fs, inner = storage.filesystem(full, options)  # type: ignore[arg-type]
            record.image = fs.cat_file(inner)
        except FileNotFoundError as exc:
            record.reject("read", "missing_image", f"cannot read image {rel!r}: {exc}")
        return
    full, problem = _resolve_local(base_dir, rel)
    if problem:
        record.reject("read", problem, f"image path {rel!r} is absolute or leaves {base_dir!r}")
        return
    try:
        with open(full, "rb") as f:  # type: ignore[arg-type]
            record.image = f.read()
    except OSError as exc:
        record.reject("read", "missing_image", f"cannot read image {rel!r}: {exc}")
