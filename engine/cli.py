"""`granucap` command line: run a pipeline, make demo input, check a config; more subcommands in engine/commands/."""

from __future__ import annotations

import argparse
import contextlib
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

    from engine.runner import run

    config = load_config(args.pipeline, args.set + (["stages.ground.dummy_weights=true"] if args.dummy_weights else []))
    if args.dry_run:
        from engine.commands.inspect import show_plan

        return show_plan(config, args.input, args.output, ray_address=args.ray_address,
                         allow_config_change=args.allow_config_change)
    from engine.runner.driver_log import DriverLog

    driver_log = DriverLog()
    try:
        # Ray's and the model libraries' own output goes to the run's log file (-v: to the terminal as well)
        with driver_log if not args.verbose else contextlib.nullcontext(driver_log):
            console = Console(file=driver_log.terminal)
            kwargs = dict(inputs=args.input, output=args.output, ray_address=args.ray_address,
                          allow_config_change=args.allow_config_change, driver_log=driver_log.path)
            if args.quiet:
                manifest = run(config, **kwargs)
            else:
                with Live(console=console, refresh_per_second=4, transient=False) as live:
                    manifest = run(config, on_progress=lambda progress: live.update(_progress_view(progress)),
                                   **kwargs)
                console.line()
            if manifest.get("dummy_models"):
                console.print("note: this pipeline uses dummy (random-weight) models; its boxes are random by design")
    finally:
        driver_log.remove()
    counts = manifest["counts"]
    summary = {"output": str(args.output), **counts, "units": manifest["units"], "logs": manifest.get("logs")}
    print(json.dumps(summary))
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
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of a failure")
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
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved plan (stages, units, done), check the output (writable, not locked, same "
                        "config) and exit")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume an output whose complete units were made with another config, mixing the two "
                        "(the manifest lists each config with its units)")
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


def _failure(exc: BaseException, output: str | None = None) -> tuple[int, str] | None:
    """(exit code, one line) for a failure an operator can act on (engine/errors.py lists the codes); None
    for a bug of granucap's, which keeps its traceback."""
    from engine import errors
    from engine.io.lock import OutputLocked
    from engine.io.storage import StorageError
    from engine.runner import RunError

    if isinstance(exc, errors.Interrupted):
        return exc.exit_code, "stopped; rerun the same command to resume"
    if isinstance(exc, KeyboardInterrupt):
        return errors.EXIT_SIGINT, "stopped; rerun the same command to resume"
    if isinstance(exc, OutputLocked):
        return errors.EXIT_LOCKED, str(exc)
    if isinstance(exc, (ConfigError, errors.ConfigChanged)):
        return errors.EXIT_USAGE, str(exc)
    os_error = errors.os_error_in(exc)
    if os_error is not None:
        return errors.EXIT_ERROR, errors.describe_os_error(os_error, output)
    from engine.io.completeness import IncompleteRunError

    if isinstance(exc, (RunError, StorageError, IncompleteRunError)):
        return errors.EXIT_ERROR, str(exc)
    if isinstance(exc, (FileNotFoundError, ValueError)):
        return errors.EXIT_USAGE, str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    from engine.errors import raise_on_sigterm

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    raise_on_sigterm()
    try:
        return args.func(args)
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        failure = _failure(exc, getattr(args, "output", None))
        if failure is None or args.debug:
            if args.debug or not isinstance(exc, Exception):
                raise
            failure = (1, f"internal error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]} (rerun "
                          "with --debug for the traceback, and please report it)")
        code, line = failure
        print(f"error: {' '.join(line.split())}" if code not in (130, 143) else line, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
