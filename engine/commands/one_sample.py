"""What `granucap extract` and `granucap recaption` share: both run one chat stage on one sample, with the
same backend options, and print the fields it filled as JSON. Not a command itself."""

from __future__ import annotations

import argparse

from engine.records import Record


def add_backend_options(p: argparse.ArgumentParser, default_backend: str) -> None:
    p.add_argument("--backend", default=default_backend, help="transformers | vllm | openai | ...")
    p.add_argument("--model", default=None, help="hub id, local dir or tiny:NAME")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (backend openai)")
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--cache-dir", default=None)


def backend_fields(args: argparse.Namespace) -> dict:
    """The stage spec's fields the backend options set."""
    fields: dict = {"backend": args.backend, "max_tokens": args.max_tokens}
    if args.model:
        fields["model"] = args.model
    if args.base_url:
        fields["openai"] = {"base_url": args.base_url}
    return fields


def result(record: Record, *fields: str) -> dict:
    """The record's `fields`, its status, error and provenance: what the command prints."""
    out = {f: getattr(record, f) for f in fields}
    out["status"] = record.status
    if record.error:
        out["error"] = record.error
    out["provenance"] = record.provenance
    return out
