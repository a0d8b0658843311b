"""`granucap doctor [--pipeline P ...] [--json]`: a table of what is installed and what is not; exits 0."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

STYLE = {"ok": "green", "missing": "red", "info": "yellow"}


def cmd_doctor(args: argparse.Namespace) -> int:
    from engine.doctor import run_checks

    checks = run_checks([Path(p) for p in args.pipeline] if args.pipeline else None)
    if args.json:
        print(json.dumps([asdict(c) for c in checks]))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="granucap doctor", title_justify="left", header_style="bold")
    for col in ("group", "name", "status", "detail"):
        table.add_column(col, overflow="fold")
    for c in checks:
        table.add_row(c.group, c.name, f"[{STYLE[c.status]}]{c.status}[/]", c.detail)
    console = Console()
    console.print(table)
    missing = [c.name for c in checks if c.status == "missing"]
    console.print(f"{len(missing)} missing" + (f": {', '.join(missing)}" if missing else ""))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="show what is installed (GPU, packages, NLTK data, models) and what is not")
    p.add_argument("--pipeline", action="append", default=[], help="pipeline YAML whose models to check; "
                   "default: pipelines/*.yaml of this checkout")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=cmd_doctor)
