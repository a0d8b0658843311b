"""`granucap refilter RUN OUT --set ...`: a new run from RUN's kept candidates at other thresholds (engine/refilter.py)."""

from __future__ import annotations

import argparse
import json


def cmd_refilter(args: argparse.Namespace) -> int:
    from engine.refilter import refilter

    manifest = refilter(args.run_dir, args.output, args.set, allow_partial=args.allow_partial)
    print(json.dumps({"output": args.output, **manifest["counts"], "parent": manifest["parent"],
                      "refilter": manifest["refilter"]}))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("refilter", help="a new run from a run's kept candidates at other thresholds (no model)")
    p.add_argument("run_dir", help="a run made with stages.ground.keep_candidates (a folder or a URI)")
    p.add_argument("output", help="where the new run goes (a folder or a URI); rerun the command to resume")
    p.add_argument("--set", action="append", default=[], metavar="A.B=C",
                   help="stages.ground.{box,phrase,category}_threshold or stages.filter.*")
    p.add_argument("--allow-partial", action="store_true", help="refilter the complete units of a partial run")
    p.set_defaults(func=cmd_refilter)
