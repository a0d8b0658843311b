"""Exporters from a finished run directory to other tools' formats, one module each.

An exporter is a function `export(run_dir: Path, dest: Path, **options) -> dict` (a summary: files written,
counts) registered here by format name; `granucap export FORMAT RUN_DIR DEST` dispatches on the name.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable, Iterator

# format -> "module:function"; modules are imported only when their format is asked for.
EXPORTERS: dict[str, str] = {
    "sft": "engine.export.sft:export",
    "coco": "engine.export.coco:export_coco",
    "odvg": "engine.export.odvg:export_odvg",
    "odvg-grounding": "engine.export.odvg:export_odvg_grounding",
    "yolo": "engine.export.yolo:export_yolo",
    "labelstudio": "engine.export.labelstudio:export_labelstudio",
}


def complete_shards(run_dir: str | Path) -> list[Path]:
    """The run's finished shard tars (their stats marker exists), in shard order."""
    shards = Path(run_dir) / "shards"
    return [p for p in sorted(shards.glob("[0-9]*.tar")) if (shards / f"{p.stem}.stats.json").is_file()]


def iter_run_samples(run_dir: str | Path) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Stream (record json, jpeg bytes) for every ok sample of a run, shard by shard, with webdataset."""
    import json

    import webdataset as wds

    urls = [str(p) for p in complete_shards(run_dir)]
    if not urls:
        return
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        yield json.loads(sample["json"]), sample["jpg"]


def get_exporter(fmt: str) -> Callable[..., dict[str, Any]]:
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; known: {', '.join(sorted(EXPORTERS)) or 'none'}")
    module, _, func = EXPORTERS[fmt].partition(":")
    return getattr(importlib.import_module(module), func)


def export(fmt: str, run_dir: str | Path, dest: str | Path, **options: Any) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a granucap run directory (no manifest.json)")
    return get_exporter(fmt)(run_dir, Path(dest), **options)
