"""`granucap recaption`: decode one image and run the recaption stage on it, to try a backend or a prompt
before a long job. Same stage code and prompts as a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.commands.one_sample import add_backend_options, backend_fields, result
from engine.records import Record


def cmd_recaption(args: argparse.Namespace) -> int:
    from engine.config import DecodeSpec, RecaptionSpec
    from engine.stages.decode import Decode
    from engine.stages.recaption import Recaption

    record = Record(key="cli", source=str(args.image), image=Path(args.image).read_bytes(), raw_caption=args.caption)
    (record,) = Decode(DecodeSpec())([record])
    (record,) = Recaption(RecaptionSpec(**backend_fields(args)), cache_dir=args.cache_dir)([record])
    print(json.dumps(result(record, "raw_caption", "caption"), indent=2, ensure_ascii=False))
    return 0 if record.ok else 1


def add_parser(sub) -> None:
    p = sub.add_parser("recaption", help="print the description the recaption stage gives for one image")
    p.add_argument("--image", required=True)
    p.add_argument("--caption", required=True, help="the image's raw caption")
    add_backend_options(p, "transformers")
    p.set_defaults(func=cmd_recaption)
