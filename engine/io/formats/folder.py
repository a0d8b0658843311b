"""Folders of images with a `captions.jsonl`, streamed a line at a time; samples counted as its non-empty
lines. The rules every format follows are in engine/io/readers.py; a folder's own:

  * `captions.jsonl` lines `{"file": ..., "caption": ...}` (optional "key"); other fields go to `meta`.
  * The key is "key" when given, else the file's path relative to the jsonl's folder without its suffix
    (= the file stem for a flat folder). `file` is read under the path rule of engine/io/readers.py.
  * A line that is not a JSON object is a rejected row ("read", "bad_input").
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from typing import Any

from engine.io import storage
from engine.io.formats.common import (
    Options,
    decode_text,
    derived_key,
    dump_meta,
    fill_corrupt,
    jsonable,
    load_image,
    open_input,
    sanitize_key,
    source_stem,
)
from engine.io.inputs import Unit
from engine.records import Record


def count_jsonl(path: str, options: Options = None) -> int:
    """Non-empty lines of a jsonl file, streamed."""
    n = 0
    with open_input(path, options) as f:
        for line in f:
            if line.strip():
                n += 1
    return n


def read_folder(unit: Unit, options: Options = None) -> Iterator[Record]:
    base_dir = storage.parent(unit.path)
    stem = source_stem(unit.path)
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
        yield from fill_corrupt(unit, position, stem, "jsonl has fewer lines than planned", None)


def _folder_record(
    unit: Unit, position: int, stem: str, base_dir: str, line: bytes, row: int, options: Options = None
) -> Record:
    meta: dict[str, Any] = {}
    text = decode_text(line, meta, "line")
    record = Record(key=derived_key(stem, row), source=unit.source or unit.path, unit=unit.index, position=position)
    try:
        obj = json.loads(text)
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    except ValueError as exc:
        record.meta = dump_meta(meta)
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
    meta.update({k: jsonable(v) for k, v in obj.items()})
    if file is not None:
        meta["file"] = file
    load_image(record, base_dir, file, options)
    record.meta = dump_meta(meta)
    return record
