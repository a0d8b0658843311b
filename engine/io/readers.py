"""Streamed readers of the three input kinds: one work unit in, its records out; and sample counts per file.

Inputs and units: engine/io/inputs.py; the plan: engine/io/plan.py. Files are local paths or URIs of any
fsspec filesystem (engine/io/storage.py); both read the same way.

Reading (`read_unit`) yields exactly `stop - start` records, positions 0..n-1, in order. Nothing is ever
extracted to disk, nor a whole file read into memory. Rules:
  * Tar grouping (webdataset/img2dataset): consecutive members with the same key form one sample; the key
    is the member path up to the first dot of its basename (`a/b/000123.jpg` -> `a/b/000123`). Directories
    and members whose basename has no dot or starts with a dot are not samples (webdataset skips them too).
    A key that comes back later, not next to its first run, is a second sample (webdataset does the same).
  * Image member: first of jpg/jpeg/png/webp/gif/bmp/tif/tiff (case-insensitive). Caption: `KEY.txt` wins over
    the `caption` field of `KEY.json`; the other json fields go to `meta` (a differing json caption is kept
    as `meta.json_caption`). Non-UTF-8 caption bytes are decoded with errors="replace" and
    `meta.caption_invalid_utf8 = true`. A member over MAX_MEMBER_BYTES -> "member_too_large" row.
  * Unsafe members (symlinks, hard links, devices, fifos): the whole sample becomes a rejected row
    ("read", "unsafe_member"), image None; the member's data is never read.
  * Keys are sanitised: backslashes become "/", leading slashes and "." / ".." / empty parts are dropped
    (`../evil` -> `evil`, `/abs/x` -> `abs/x`); a key that sanitises to "" falls back to the derived key.
    The original name is kept in `meta.original_key` when it changed. Keys may contain "/".
  * Derived key (no key in the source): f"{stem-of-source}-{row:08d}", row = sample index in the file; the
    stem of a folder input is its directory name.
  * Corrupt input: a tar sample is planned from its first member header. When the stream breaks (ReadError,
    truncated data, bad gzip), the sample in progress (possibly incomplete) and every remaining planned
    position are yielded as rejected rows ("read", "corrupt_input"), so counts still add up. A file that
    cannot be read at all at planning time (not a tar / not a parquet) is planned as one unit of one sample,
    which reads as one "corrupt_input" row: broken inputs stay visible in the index. tarfile ends silently
    on a bad header mid-file; planning and reading then see the same samples. Member data is read right
    after its header, never seeking back, so a .tar.gz is decompressed once.
  * Parquet: columns `image` (binary; struct{bytes, path} as HF datasets write it; or a string, the image's
    file path) or `path`; `caption` or `text`; optional `key`. Other non-binary columns go to `meta`. A row's
    image is its bytes when it has some, else the file at its `path` value, else at the image's path (the
    struct's `path` field or the string), each under the path rule below. Read with `iter_batches` from the
    row group holding `start` on.
  * Folder: `captions.jsonl` lines `{"file": ..., "caption": ...}` (optional "key"); the key is the file's
    path relative to the jsonl directory without its suffix (= the file stem for a flat folder). Invalid
    JSON lines are rejected rows ("read", "bad_input").
  * Paths from parquet/jsonl are resolved (symlinks too) relative to that file's directory and must stay
    inside it (absolute paths, `..` escapes, links pointing out -> "unsafe_path"); a missing or unreadable
    file -> "missing_image".
  * A sample without image -> rejected row ("read", "missing_image").
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Mapping

from engine.io import storage
from engine.io.inputs import FOLDER_JSONL, Unit
from engine.records import Record

log = logging.getLogger(__name__)

IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_PARQUET_BATCH_ROWS = 64
MAX_MEMBER_BYTES = 512 * 1024 * 1024  # a larger tar member makes its sample a "member_too_large" row
# Errors that mean "the tar stream is broken" rather than a bug.
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


# ---------------------------------------------------------------------------------------------- tar


def _split_name(name: str) -> tuple[str, str] | None:
    """Member name -> (raw key, extension) webdataset style, or None when it is not part of a sample."""
    name = name.replace("\\", "/")
    dirname, base = posixpath.split(name)
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{dirname}/{stem}" if dirname else stem), ext


def sanitize_key(raw: str) -> str:
    """Drop leading slashes and "."/".."/empty parts so a key can never name a path outside the output."""
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return "/".join(parts)


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


@contextmanager
def _open_tar(path: str, options: Options = None):
    with open_input(path, options) as f, tarfile.open(fileobj=f, mode="r:*") as tf:
        yield tf


def _iter_members(tf: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Iterate member headers without keeping them all (TarFile otherwise remembers every TarInfo)."""
    while True:
        member = tf.next()
        if member is None:
            return
        tf.members.clear()  # bounded memory for tars with millions of members; we never look back
        yield member


def count_tar(path: str, options: Options = None) -> int:
    """Number of samples in a tar, reading member headers only; -1 when it cannot be read at all."""
    n = 0
    key: str | None = None
    try:
        with _open_tar(path, options) as tf:
            for member in _iter_members(tf):
                split = None if member.isdir() else _split_name(member.name)
                if split is not None and split[0] != key:
                    key = split[0]
                    n += 1  # counted at its first header: a sample cut by corruption still gets a row
    except _TAR_ERRORS as exc:
        log.warning("%s: tar breaks after %d samples (%s); planning what was readable", path, n, exc)
        return n if n else -1
    return n


def _unsafe(member: tarfile.TarInfo) -> bool:
    return not member.isfile()  # symlinks, hard links, devices, fifos, ... (directories are filtered earlier)


def _decode_text(data: bytes, meta: dict[str, Any], what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        meta[f"{what}_invalid_utf8"] = True
        return data.decode("utf-8", errors="replace")


class _Group:
    """Members of one tar sample, with the data of the members we use read as they stream by."""

    __slots__ = ("raw_key", "members", "data")

    def __init__(self, raw_key: str) -> None:
        self.raw_key = raw_key
        self.members: list[tarfile.TarInfo] = []
        self.data: dict[str, bytes] = {}  # lower-case extension -> bytes (first member of each ext)


def _wanted_ext(ext: str) -> bool:
    return ext in IMAGE_EXTS or ext in ("txt", "json")


def _tar_record(unit: Unit, position: int, stem: str, group: _Group) -> Record:
    raw_key = group.raw_key
    row = unit.start + position
    key = sanitize_key(raw_key) or _derived_key(stem, row)
    meta: dict[str, Any] = {}
    if key != raw_key:
        meta["original_key"] = raw_key
    record = Record(key=key, source=unit.source or unit.path, unit=unit.index, position=position)
    bad = [m for m in group.members if _unsafe(m)]
    if bad:
        meta["unsafe_members"] = [m.name for m in bad]
        record.meta = _dump_meta(meta)
        kinds = ", ".join(f"{m.name} ({_member_type(m)})" for m in bad)
        record.reject("read", "unsafe_member", f"tar member(s) that are not regular files: {kinds}")
        return record
    too_big = [m for m in group.members if m.size > MAX_MEMBER_BYTES]
    if too_big:
        record.meta = _dump_meta(meta)
        big = too_big[0]
        record.reject("read", "member_too_large", f"{big.name}: {big.size} bytes > {MAX_MEMBER_BYTES}")
        return record
    data = group.data
    image_ext = next((e for e in IMAGE_EXTS if e in data), None)
    caption: str | None = None
    if "json" in data:
        try:
            extra = json.loads(_decode_text(data["json"], meta, "json"))
        except ValueError as exc:
            meta["json_error"] = str(exc)
            extra = None
        if isinstance(extra, dict):
            json_caption = extra.pop("caption", None)
            if json_caption is not None and not isinstance(json_caption, str):
                json_caption = str(json_caption)
            for k, v in extra.items():
                meta.setdefault(k, v)
            caption = json_caption
        elif extra is not None:
            meta["json"] = extra
    if "txt" in data:
        txt = _decode_text(data["txt"], meta, "caption")
        if caption is not None and caption != txt:
            meta["json_caption"] = caption
        caption = txt
    record.raw_caption = caption
    if image_ext is not None:
        record.image = data[image_ext]
        meta.setdefault("image_ext", image_ext)
    record.meta = _dump_meta(meta)
    if image_ext is None:
        exts = sorted({(_split_name(m.name) or ("", "?"))[1].lower() for m in group.members})
        record.reject("read", "missing_image", f"sample {raw_key!r} has no image member (found: {exts})")
    return record


def _member_type(m: tarfile.TarInfo) -> str:
    if m.issym():
        return "symlink"
    if m.islnk():
        return "hardlink"
    if m.isdev():
        return "device/fifo"
    return f"type {m.type!r}"


def _read_tar(unit: Unit, options: Options = None) -> Iterator[Record]:
    # Member data is read as soon as its header is seen (never seeking back: .tar.gz stays a single pass).
    stem = _source_stem(unit.path)
    position = 0
    index = -1  # sample index in the file of `group`
    group: _Group | None = None
    try:
        with _open_tar(unit.path, options) as tf:
            for member in _iter_members(tf):
                if member.isdir():
                    continue
                split = _split_name(member.name)
                if split is None:
                    continue
                raw_key, ext = split
                if group is None or raw_key != group.raw_key:
                    if group is not None and index >= unit.start:
                        yield _tar_record(unit, position, stem, group)
                        position += 1
                    group = None
                    index += 1
                    if index >= unit.stop and not unit.to_end:
                        break
                    group = _Group(raw_key)
                group.members.append(member)
                ext = ext.lower()
                if (
                    index >= unit.start
                    and member.isfile()
                    and _wanted_ext(ext)
                    and ext not in group.data
                    and member.size <= MAX_MEMBER_BYTES
                ):
                    f = tf.extractfile(member)
                    assert f is not None
                    group.data[ext] = f.read()
            if group is not None and unit.start <= index and (index < unit.stop or unit.to_end):
                yield _tar_record(unit, position, stem, group)
                position += 1
    except _TAR_ERRORS as exc:
        message = f"{type(exc).__name__}: {exc}"
        log.warning("%s: corrupt input at sample %d (%s)", unit.path, unit.start + position, message)
        pending = group.raw_key if group is not None and index >= unit.start else None
        yield from _fill_corrupt(unit, position, stem, message, pending)
        return
    if position < unit.size:
        message = f"input has fewer samples than planned ({unit.start + position} < {unit.stop})"
        log.warning("%s: %s", unit.path, message)
        yield from _fill_corrupt(unit, position, stem, message, None)


def _fill_corrupt(
    unit: Unit, position: int, stem: str, message: str, pending: str | None
) -> Iterator[Record]:
    """Rejected rows for the positions a broken input could not deliver (keeps counts = plan)."""
    for pos in range(position, unit.size):
        key = _derived_key(stem, unit.start + pos)
        if pos == position and pending is not None:
            key = sanitize_key(pending) or key
        record = Record(key=key, source=unit.source or unit.path, unit=unit.index, position=pos)
        record.reject("read", "corrupt_input", message)
        yield record


# ---------------------------------------------------------------------------------------------- parquet


def count_parquet(path: str, options: Options = None) -> int:
    """Rows of a parquet file from its footer; -1 when it is not a readable parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_input(path, options) as f:
            return pq.ParquetFile(f).metadata.num_rows
    except (OSError, pa.ArrowException) as exc:
        log.warning("%s: not a readable parquet file (%s)", path, exc)
        return -1


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


def _load_image(record: Record, base_dir: str, rel: Any, options: Options = None) -> None:
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


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _read_parquet(unit: Unit, options: Options = None) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem = _source_stem(unit.path)
    with ExitStack() as stack:
        try:
            pf = pq.ParquetFile(stack.enter_context(open_input(unit.path, options)))
        except (OSError, pa.ArrowException) as exc:
            yield from _fill_corrupt(unit, 0, stem, f"{type(exc).__name__}: {exc}", None)
            return
        yield from _parquet_rows(unit, pf, stem, options)


def _parquet_rows(unit: Unit, pf: Any, stem: str, options: Options) -> Iterator[Record]:
    import pyarrow as pa

    schema = pf.schema_arrow
    names = schema.names
    base_dir = storage.parent(unit.path)
    caption_col = "caption" if "caption" in names else ("text" if "text" in names else None)
    if "image" not in names and "path" not in names:
        log.warning("%s: no `image` or `path` column; every row is missing its image", unit.path)
    extras = [
        n
        for n in names
        if n not in ("image", "path", "key", caption_col)
        and not pa.types.is_binary(schema.field(n).type)
        and not pa.types.is_large_binary(schema.field(n).type)
    ]
    # Skip whole row groups before `start`.
    first_rg, row = 0, 0
    meta_rg = pf.metadata
    while first_rg < meta_rg.num_row_groups and row + meta_rg.row_group(first_rg).num_rows <= unit.start:
        row += meta_rg.row_group(first_rg).num_rows
        first_rg += 1
    position = 0
    try:
        if first_rg < meta_rg.num_row_groups:
            batches = pf.iter_batches(
                batch_size=_PARQUET_BATCH_ROWS,
                row_groups=list(range(first_rg, meta_rg.num_row_groups)),
                use_threads=False,
            )
            for batch in batches:
                if row + batch.num_rows <= unit.start:
                    row += batch.num_rows
                    continue
                for i, values in enumerate(batch.to_pylist()):
                    if row + i < unit.start:
                        continue
                    if row + i >= unit.stop:
                        break
                    yield _parquet_record(
                        unit, position, stem, base_dir, values, caption_col, extras, row + i, options
                    )
                    position += 1
                row += batch.num_rows
                if row >= unit.stop:
                    break
    except (OSError, pa.ArrowException) as exc:
        message = f"{type(exc).__name__}: {exc}"
        log.warning("%s: corrupt input at row %d (%s)", unit.path, unit.start + position, message)
        yield from _fill_corrupt(unit, position, stem, message, None)
        return
    if position < unit.size:
        yield from _fill_corrupt(unit, position, stem, "parquet has fewer rows than planned", None)


def _parquet_record(
    unit: Unit,
    position: int,
    stem: str,
    base_dir: str,
    values: dict[str, Any],
    caption_col: str | None,
    extras: list[str],
    row: int,
    options: Options = None,
) -> Record:
    meta: dict[str, Any] = {}
    raw_key = values.get("key")
    key = sanitize_key(str(raw_key)) if raw_key not in (None, "") else ""
    if raw_key not in (None, "") and key != str(raw_key):
        meta["original_key"] = str(raw_key)
    record = Record(
        key=key or _derived_key(stem, row), source=unit.source or unit.path, unit=unit.index, position=position
    )
    caption = values.get(caption_col) if caption_col else None
    if isinstance(caption, bytes):
        caption = _decode_text(caption, meta, "caption")
    elif caption is not None and not isinstance(caption, str):
        caption = str(caption)
    record.raw_caption = caption
    for name in extras:
        if values.get(name) is not None:
            meta[name] = _jsonable(values[name])
    image = values.get("image")
    rel = values.get("path")
    if isinstance(image, dict):  # HF datasets Image feature: {bytes, path}
        rel = rel if rel is not None else image.get("path")
        if image.get("path") is not None:
            meta.setdefault("image_path", image.get("path"))
        image = image.get("bytes")
    elif isinstance(image, str):  # a string column of file names: a path, under the same rule as `path`
        if rel is not None and rel != image:
            meta.setdefault("image_path", image)
        rel = rel if rel is not None else image
        image = None
    if isinstance(image, (bytes, bytearray)) and len(image) > 0:
        record.image = bytes(image)
    elif isinstance(image, (bytes, bytearray)):
        record.image = b""  # zero bytes: decode rejects it with PIL's message
    else:
        _load_image(record, base_dir, rel, options)
    if rel is not None:
        meta.setdefault("path", rel)
    record.meta = _dump_meta(meta)
    return record


# ---------------------------------------------------------------------------------------------- folder


def count_jsonl(path: str, options: Options = None) -> int:
    """Non-empty lines of a jsonl file, streamed."""
    n = 0
    with open_input(path, options) as f:
        for line in f:
            if line.strip():
                n += 1
    return n


def _read_folder(unit: Unit, options: Options = None) -> Iterator[Record]:
    base_dir = storage.parent(unit.path)
    stem = _source_stem(unit.path)
    position = 0
    row = -1
    with open_input(unit.path, options) as f:
        for line in f:
            if not line.strip():
                continue
            row += 1
            if row < unit.start:
                continue
            if row >= unit.stop:
                break
            yield _folder_record(unit, position, stem, base_dir, line, row, options)
            position += 1
    if position < unit.size:
        yield from _fill_corrupt(unit, position, stem, "jsonl has fewer lines than planned", None)


def _folder_record(
    unit: Unit, position: int, stem: str, base_dir: str, line: bytes, row: int, options: Options = None
) -> Record:
    meta: dict[str, Any] = {}
    text = _decode_text(line, meta, "line")
    record = Record(key=_derived_key(stem, row), source=unit.source or unit.path, unit=unit.index, position=position)
    try:
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    except ValueError as exc:
        record.meta = _dump_meta(meta)
        record.reject("read", "bad_input", f"line {row + 1} of {unit.path}: {exc}")
        return record
    file = obj.pop("file", None)
    caption = obj.pop("caption", None)
    raw_key = obj.pop("key", None)
    if raw_key not in (None, ""):
        key = sanitize_key(str(raw_key))
    elif isinstance(file, str) and file:
        key = sanitize_key(posixpath.splitext(file.replace("\\", "/"))[0])
    else:
        key = ""
    if key:
        record.key = key
    record.raw_caption = caption if caption is None or isinstance(caption, str) else str(caption)
    meta.update({k: _jsonable(v) for k, v in obj.items()})
    if file is not None:
        meta["file"] = file
    _load_image(record, base_dir, file, options)
    record.meta = _dump_meta(meta)
    return record


# ---------------------------------------------------------------------------------------------- read


def _source_stem(path: str) -> str:
    name = storage.basename(path)
    if name == FOLDER_JSONL:
        return storage.basename(storage.parent(path) if storage.is_remote(path) else os.path.abspath(
            os.path.dirname(storage.local_path(path)) or ".")) or "folder"
    for suffix in (".tar.gz", ".tgz", ".tar", ".parquet", ".jsonl"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return posixpath.splitext(name)[0]


def _derived_key(stem: str, row: int) -> str:
    return f"{stem}-{row:08d}"


def _dump_meta(meta: dict[str, Any]) -> str | None:
    return json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str) if meta else None


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
        yield from _read_tar(unit, options)
    elif unit.kind == "parquet":
        yield from _read_parquet(unit, options)
    elif unit.kind == "folder":
        yield from _read_folder(unit, options)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


__all__ = ["count_samples", "open_input", "read_bytes", "read_unit", "sanitize_key"]
