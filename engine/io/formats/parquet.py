"""Parquet inputs, streamed a batch of rows at a time; rows counted from the footer. The rules every format
follows are in engine/io/readers.py; a parquet file's own:

  * Columns: `image` (binary; struct{bytes, path} as HF datasets write it; or a string, the image's file
    path) or `path`; `caption` or `text`; optional `key`. Other non-binary columns go to `meta`.
  * A row's image is its bytes when it has some, else the file at its `path` value, else at the image's path
    (the struct's `path` field or the string), each under the path rule of engine/io/readers.py.
  * Read with `iter_batches` from the row group holding `start` on; earlier row groups are skipped unread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack
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

log = logging.getLogger(__name__)

_PARQUET_BATCH_ROWS = 64


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



def read_parquet(unit: Unit, options: Options = None) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem = source_stem(unit.path)
    with ExitStack() as stack:
        try:
            pf = pq.ParquetFile(stack.enter_context(open_input(unit.path, options)))
        except (OSError, pa.ArrowException) as exc:
            yield from fill_corrupt(unit, 0, stem, f"{type(exc).__name__}: {exc}", None)
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
        yield from fill_corrupt(unit, position, stem, message, None)
        return
    if position < unit.size:
        yield from fill_corrupt(unit, position, stem, "parquet has fewer rows than planned", None)


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
        key=key or derived_key(stem, row), source=unit.source or unit.path, unit=unit.index, position=position
    )
    caption = values.get(caption_col) if caption_col else None
    if isinstance(caption, bytes):
        caption = decode_text(caption, meta, "caption")
    elif caption is not None and not isinstance(caption, str):
        caption = str(caption)
    record.raw_caption = caption
    for name in extras:
        if values.get(name) is not None:
            meta[name] = jsonable(values[name])
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
        load_image(record, base_dir, rel, options)
    if rel is not None:
        meta.setdefault("path", rel)
    record.meta = dump_meta(meta)
    return record
