"""`granucap export FORMAT RUN DEST [--allow-partial]`: write a finished run (a folder or a URI) in another
tool's format to the local folder DEST; an unfinished run only with --allow-partial (its complete units)."""

from __future__ import annotations

import argparse
import json


def cmd_export(args: argparse.Namespace) -> int:
    from engine.export import export

    summary = export(args.format, args.run_dir, args.dest, allow_partial=args.allow_partial)
    print(json.dumps(summary, default=str))
    return 0


def add_parser(sub) -> None:
    from engine.export import EXPORTERS

    p = sub.add_parser("export", help="export a run to another format (" + ", ".join(sorted(EXPORTERS)) + ")")
    p.add_argument("format", choices=sorted(EXPORTERS) or None, help="target format")
    p.add_argument("run_dir", help="a granucap run (has manifest.json): a folder or a URI (s3://bucket/run, ...)")
    p.add_argument("dest", help="the local folder to write the export to")
    p.add_argument("--allow-partial", action="store_true",
                   help="export the complete units of a run whose plan has units still to write (else refused)")
    p.set_defaults(func=cmd_export)
