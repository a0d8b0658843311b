"""`granucap export FORMAT RUN_DIR DEST`: write a finished run in another tool's format."""

from __future__ import annotations

import argparse
import json


def cmd_export(args: argparse.Namespace) -> int:
    from engine.export import export

    summary = export(args.format, args.run_dir, args.dest)
    print(json.dumps(summary, default=str))
    return 0


def add_parser(sub) -> None:
    from engine.export import EXPORTERS

    p = sub.add_parser("export", help="export a run to another format (" + ", ".join(sorted(EXPORTERS)) + ")")
    p.add_argument("format", choices=sorted(EXPORTERS) or None, help="target format")
    p.add_argument("run_dir", help="a granucap run directory (has manifest.json)")
    p.add_argument("dest", help="where to write the export")
    p.set_defaults(func=cmd_export)
