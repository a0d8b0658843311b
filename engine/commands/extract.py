"""`granucap extract`: run the extract stage on one caption, to try a backend or a prompt before a long job.
Same stage code, prompts and validation as a run."""

from __future__ import annotations

import argparse
import json

from engine.commands.one_sample import add_backend_options, backend_fields, result
from engine.records import Record


def cmd_extract(args: argparse.Namespace) -> int:
    from engine.config import ExtractSpec
    from engine.stages.extract import Extract

    fields = backend_fields(args)
    if args.no_factual:
        fields["factual_prompt"] = None
    if args.fallback:
        fields["fallback"] = args.fallback
    stage = Extract(ExtractSpec(**fields), cache_dir=args.cache_dir)
    (record,) = stage([Record(key="cli", source="cli", raw_caption=args.caption, caption=args.caption)])
    print(json.dumps(result(record, "factual_caption", "entities"), indent=2, ensure_ascii=False))
    return 0 if record.ok else 1


def add_parser(sub) -> None:
    p = sub.add_parser("extract", help="print the entities JSON the extract stage gives for one caption")
    p.add_argument("--caption", required=True)
    p.add_argument("--no-factual", action="store_true", help="skip the factual filter prompt")
    p.add_argument("--fallback", choices=["nltk"], default=None)
    add_backend_options(p, "nltk")
    p.set_defaults(func=cmd_extract)
