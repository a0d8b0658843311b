"""`granucap` command line: run a pipeline, make demo input, check a config; more subcommands in engine/commands/."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from engine import __version__
from engine.config import ConfigError, load_config

log = logging.getLogger("granucap")


def _progress_view(progress):
    from rich.table import Table

    table = Table(title="granucap", show_header=True, header_style="bold")
    for col in ("samples", "done", "ok", "rejected", "failed", "boxes", "samples/s"):
        table.add_column(col, justify="right")
    table.add_row(
        str(progress.total),
        f"{progress.done + progress.skipped}" + (f" ({progress.skipped} earlier)" if progress.skipped else ""),
        str(progress.ok),
        str(progress.rejected),
        str(progress.failed),
        str(progress.boxes),
        f"{progress.rate:.1f}",
    )
    if progress.by_stage:
        stages = Table(title="not ok, by stage/reason", show_header=False)
        for key, n in sorted(progress.by_stage.items()):
            stages.add_row(key, str(n))
        from rich.console import Group

        return Group(table, stages)
    return table


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from rich.markup import escape

    from engine.io.storage import StorageError
    from engine.runner import RunError, run

    config = load_config(args.pipeline, args.set + (["stages.ground.dummy_weights=true"] if args.dummy_weights else []))
    if args.dry_run:
        from engine.commands.inspect import show_plan

        return show_plan(config, args.input, args.output, ray_address=args.ray_address)
    console = Console(stderr=True)
    if args.quiet:
        manifest = run(config, inputs=args.input, output=args.output, ray_address=args.ray_address)
    else:
        with Live(console=console, refresh_per_second=4, transient=False) as live:

            def show(progress):
                live.update(_progress_view(progress))

            try:
                manifest = run(
                    config, inputs=args.input, output=args.output, ray_address=args.ray_address, on_progress=show
                )
            except (RunError, StorageError) as exc:
                console.print("[red]error:[/red] " + escape(str(exc)))
                return 1
    counts = manifest["counts"]
    summary = {"output": str(args.output), **counts, "units": manifest["units"]}
    print(json.dumps(summary))
    if manifest.get("dummy_models"):
        console.print("note: this pipeline uses dummy (random-weight) models; its boxes are random by design")
    return 0


def cmd_demo_input(args: argparse.Namespace) -> int:
    from engine.demo import write_demo_input

    paths = write_demo_input(args.dest, samples=args.samples, per_tar=args.per_tar, seed=args.seed)
    print(json.dumps({"written": [str(p) for p in paths], "samples": args.samples}))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    config = load_config(args.pipeline, args.set)
    print(yaml.safe_dump(config.public_dump(), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="granucap", description="Turn raw image-text pairs into a pseudo-labelled detection corpus."
    )
    parser.add_argument("--version", action="version", version=f"granucap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a pipeline over raw pairs and write GranuCap shards (resumable)")
    p.add_argument("pipeline", help="pipeline YAML, e.g. pipelines/granucap.yaml")
    p.add_argument("--input", "-i", action="append", required=True,
                   help="directory, file or glob, local or a URI (s3://, gs://, az://, hf://); repeatable")
    p.add_argument("--output", "-o", required=True,
                   help="output folder, local or a URI (s3://bucket/prefix); rerun the same command to resume")
    p.add_argument("--set", action="append", default=[], metavar="A.B=C", help="override a config value")
    p.add_argument("--ray-address", default=None, help="Ray cluster address; default: embedded Ray")
    p.add_argument("--quiet", "-q", action="store_true", help="no live progress view")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan (stages, units, done) and exit")
    p.add_argument("--dummy-weights", action="store_true",
                   help="teacher: the real architecture of its checkpoint with random weights (throughput tests)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo-input", help="write a small synthetic raw dump (webdataset tars) to try granucap")
    p.add_argument("dest")
    p.add_argument("--samples", type=int, default=24)
    p.add_argument("--per-tar", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_input)

    p = sub.add_parser("validate", help="validate a pipeline YAML (with overrides) and print it resolved")
    p.add_argument("pipeline")
    p.add_argument("--set", action="append", default=[], metavar="A.B=C")
    p.set_defaults(func=cmd_validate)

    import importlib

    from engine.commands import COMMAND_MODULES

    for module in COMMAND_MODULES:
        importlib.import_module(f"engine.commands.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        from engine.io.storage import StorageError
        from engine.runner import RunError

        if not isinstance(exc, (RunError, StorageError)):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
