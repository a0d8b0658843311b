"""`granucap extract` / `granucap recaption`: run one stage on one input, to try a backend or a prompt
before a long job. Same stage code, prompts and validation as a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.records import Record


def _backend_fields(args: argparse.Namespace) -> dict:
    fields: dict = {"backend": args.backend, "max_tokens": args.max_tokens}
    if args.model:
        fields["model"] = args.model
    if args.base_url:
        fields["openai"] = {"base_url": args.base_url}
    return fields


def _result(record: Record, *fields: str) -> dict:
    out = {f: getattr(record, f) for f in fields}
    out["status"] = record.status
    if record.error:
        out["error"] = record.error
    out["provenance"] = record.provenance
    return out


def cmd_extract(args: argparse.Namespace) -> int:
    from engine.config import ExtractSpec
    from engine.stages.extract import Extract

    fields = _backend_fields(args)
    if args.no_factual:
        fields["factual_prompt"] = None
    if args.fallback:
        fields["fallback"] = args.fallback
    stage = Extract(ExtractSpec(**fields), cache_dir=args.cache_dir)
    (record,) = stage([Record(key="cli", source="cli", raw_caption=args.caption, caption=args.caption)])
    print(json.dumps(_result(record, "factual_caption", "entities"), indent=2, ensure_ascii=False))
    return 0 if record.ok else 1


def cmd_recaption(args: argparse.Namespace) -> int:
    from engine.config import DecodeSpec, RecaptionSpec
    from engine.stages.decode import Decode
    from engine.stages.recaption import Recaption

    record = Record(key="cli", source=str(args.image), image=Path(args.image).read_bytes(), raw_caption=args.caption)
    (record,) = Decode(DecodeSpec())([record])
    (record,) = Recaption(RecaptionSpec(**_backend_fields(args)), cache_dir=args.cache_dir)([record])
    print(json.dumps(_result(record, "raw_caption", "caption"), indent=2, ensure_ascii=False))
    return 0 if record.ok else 1


def _common(p: argparse.ArgumentParser, default_backend: str) -> None:
    p.add_argument("--backend", default=default_backend, help="transformers | vllm | openai | ...")
    p.add_argument("--model", default=None, help="hub id, local dir or tiny:NAME")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (backend openai)")
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--cache-dir", default=None)


def add_parser(sub) -> None:
    p = sub.add_parser("extract", help="print the entities JSON the extract stage gives for one caption")
    p.add_argument("--caption", required=True)
    p.add_argument("--no-factual", action="store_true", help="skip the factual filter prompt")
    p.add_argument("--fallback", choices=["nltk"], default=None)
    _common(p, "nltk")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("recaption", help="print the description the recaption stage gives for one image")
    p.add_argument("--image", required=True)
    p.add_argument("--caption", required=True, help="the image's raw caption")
    _common(p, "transformers")
    p.set_defaults(func=cmd_recaption)
