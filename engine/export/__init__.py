"""Exporters from a finished run directory to other tools' formats, one module each.

An exporter is a function `export(run_dir: Path, dest: Path, **options) -> dict` (a summary: files written,
counts) registered here by format name; `granucap export FORMAT RUN_DIR DEST` dispatches on the name.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

# format -> "module:function"; modules are imported only when their format is asked for.
EXPORTERS: dict[str, str] = {
}


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
