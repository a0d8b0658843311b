"""Exporters from a finished run to other tools' formats, one module each.

An exporter is a function `export(run: Location, dest: Path, **options) -> dict` (a summary: files written,
counts) registered here by format name; `granucap export FORMAT RUN DEST` dispatches on the name. The run
is a local folder or a URI of any fsspec filesystem (engine/io/storage.py); DEST is a local folder. Only
complete units are exported, and `export` refuses a run whose plan still has units to write unless it is
told that partial output is wanted (engine/io/completeness.py).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

from engine.io.shard_reader import open_run
from engine.io.storage import Location, basename

# format -> "module:function"; modules are imported only when their format is asked for.
EXPORTERS: dict[str, str] = {
    "sft": "engine.export.sft:export",
    "coco": "engine.export.coco:export_coco",
    "odvg": "engine.export.odvg:export_odvg",
    "odvg-grounding": "engine.export.odvg:export_odvg_grounding",
    "yolo": "engine.export.yolo:export_yolo",
    "labelstudio": "engine.export.labelstudio:export_labelstudio",
    "regions": "engine.export.regions:export_regions",
}


def run_name(run: Location) -> str:
    """The run folder's last path part (for titles)."""
    return basename(run.uri) if run.remote else Path(run.uri).name


def get_exporter(fmt: str) -> Callable[..., dict[str, Any]]:
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(sorted(EXPORTERS)) or 'none'}")
    module, _, func = EXPORTERS[fmt].partition(":")
    return getattr(importlib.import_module(module), func)


def export(
    fmt: str, run: str | Path | Location, dest: str | Path, *, allow_partial: bool = False, **options: Any
) -> dict[str, Any]:
    """Export `run` as `fmt` into `dest`; the summary says, under `completeness`, how many of the planned
    units and samples were complete (engine/io/completeness.py). A run with planned units still missing is
    refused (IncompleteRunError) unless `allow_partial`, and then only its complete units are exported."""
    from engine.io.completeness import require_complete

    location = open_run(run)
    if not location.exists("manifest.json"):
        raise FileNotFoundError(f"{location.uri} is not a granucap run directory (no manifest.json)")
    exporter = get_exporter(fmt)  # an unknown format is an error before the run is looked at
    completeness = require_complete(location, allow_partial=allow_partial, action="export")
    return {**exporter(location, Path(dest), **options), "completeness": completeness}
