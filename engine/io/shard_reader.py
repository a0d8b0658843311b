"""Reading GranuCap shards, and the layout of a run that the writer (engine/io/shards.py) follows:

    OUT/shards/{n:06d}.tar          webdataset: KEY.jpg + KEY.json (the record without image bytes), ok only
    OUT/index/{n:06d}.parquet       every sample of the unit, rejected and failed ones too
    OUT/shards/{n:06d}.stats.json   counts of the unit; written last, so it marks the shard complete

`OUT` is a local folder or a prefix on an object store (engine/io/storage.py). The marker goes last, so a unit
is complete exactly when its marker exists (`complete_unit_ids`, `complete_units`): the one rule the runner,
the exporters and the student's data loader all read a run by. Index parts are opened here only
(`read_index`, `iter_index`).
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from engine.io import storage
from engine.io.storage import Location

if TYPE_CHECKING:
    import pyarrow as pa

_MARKER = re.compile(r"^\d{6,}\.stats\.json$")


def shard_name(unit: int) -> str:
    return f"{unit:06d}"


def shard_files(unit: int) -> tuple[str, str, str]:
    """(tar, index part, marker) of a unit, relative to the run's folder."""
    name = shard_name(unit)
    return f"shards/{name}.tar", f"index/{name}.parquet", f"shards/{name}.stats.json"


def _as_location(run: str | Path | Location) -> Location:
    return run if isinstance(run, Location) else Location(run)


def open_run(run: str | Path | Location) -> Location:
    """A run to read, at a local path or a URI (a Location is taken as it is). A remote run is listed once
    here, so that unreachable storage is a one-line StorageError before any work rather than a traceback."""
    if isinstance(run, Location):
        return run
    text = os.fspath(run)
    if not storage.is_remote(text):
        return Location(Path(storage.local_path(text)))  # as Path spells it, as summaries always showed it
    location = Location(text)
    try:
        location.fs.ls(location.root, detail=False)
    except Exception as exc:  # botocore, gcsfs, adlfs each have their own exception trees
        raise storage.StorageError(storage.describe(exc, location.uri, "read")) from None
    return location


def complete_unit_ids(run: str | Path | Location) -> list[int]:
    """The units whose marker exists (their shard and index part are complete), from one listing."""
    names = _as_location(run).list("shards")
    return sorted(int(n[: -len(".stats.json")]) for n in names if _MARKER.match(n))


def complete_units(run: str | Path | Location, threads: int = 32) -> dict[int, dict[str, Any]]:
    """Units whose marker exists: unit -> the marker's stats. The one rule for "this unit is complete", for
    the runner, the exporters and the student's data loader."""
    location = _as_location(run)
    units = complete_unit_ids(location)
    if not units:
        return {}
    with ThreadPoolExecutor(max_workers=min(threads, len(units))) as pool:
        stats = list(pool.map(lambda u: json.loads(location.read_bytes(shard_files(u)[2])), units))
    return {int(s["unit"]): s for s in stats}


def read_shard(run: str | Path | Location, unit: int) -> Iterator[dict[str, Any]]:
    """The samples of one shard as webdataset groups them (`{"__key__", "__url__", "jpg", "json"}`, raw bytes),
    streamed from the run's filesystem with webdataset's own tar reader."""
    import webdataset as wds

    location = _as_location(run)
    tar_path = shard_files(unit)[0]
    with location.open(tar_path) as f:
        members = wds.tariterators.tar_file_expander([{"stream": f, "url": location.uri_of(tar_path)}])
        yield from wds.tariterators.group_by_keys(members)


def read_index(run: str | Path | Location, unit: int, columns: list[str] | None = None) -> pa.Table:
    """One unit's index part (every sample of the unit, without image bytes), `columns` only when given."""
    import pyarrow.parquet as pq

    with _as_location(run).open(shard_files(unit)[1]) as f:
        return pq.read_table(f, columns=columns)


def iter_index(
    run: str | Path | Location, unit: int, columns: list[str] | None = None, batch_size: int = 1024
) -> Iterator[pa.RecordBatch]:
    """One unit's index part a batch of rows at a time, `columns` only when given."""
    import pyarrow.parquet as pq

    with _as_location(run).open(shard_files(unit)[1]) as f:
        yield from pq.ParquetFile(f).iter_batches(columns=columns, batch_size=batch_size)
