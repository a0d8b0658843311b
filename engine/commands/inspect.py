"""`granucap inspect RUN [--html DEST] [--json] [--allow-partial]`: a run's summary as tables, JSON or a static
page; RUN is a folder or a URI (s3://..., gs://...). A run whose plan has units still to write is refused
unless --allow-partial, and every form of the summary says how much of the plan it covers. Also prints the
plan of `granucap run --dry-run` (`show_plan`)."""

from __future__ import annotations

import argparse
import json

from engine.errors import EXIT_ERROR


def _table(title: str, columns: list[str], rows: list[list]):
    from rich.table import Table

    table = Table(title=title, title_justify="left", header_style="bold")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    return table


def console():
    """Rich console on stdout; wide when piped (rich's default of 80 columns folds the plan's model ids)."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)


def cmd_inspect(args: argparse.Namespace) -> int:
    from engine.io.completeness import require_complete
    from engine.io.shard_reader import open_run
    from engine.report import completeness_line, label_quality, summarize, write_html

    run = open_run(args.run_dir)  # one reachability check, shared by the summary and the page
    completeness = require_complete(run, allow_partial=args.allow_partial, action="inspect")
    summary = summarize(run, top=args.top, completeness=completeness)
    if summary["samples"] == 0 and not summary["units"] and completeness["plan"] == "none":
        raise FileNotFoundError(
            f"{args.run_dir}: no complete shards, no plan.json and no manifest.json; is it a granucap run?"
        )
    quality = label_quality(run, args.coco) if args.coco else None
    if quality is not None:
        summary["label_quality"] = {"score": {k: quality["score"][k] for k in
                                              ("AP", "AP50", "precision", "recall", "f1", "boxes", "gt_boxes")},
                                    "curve": quality["curve"] and quality["curve"]["table"]}
    if args.html:
        summary["html"] = str(write_html(run, args.html, gallery=args.gallery, summary=summary, quality=quality))
    if args.json:
        print(json.dumps(summary))
        return 0
    out = console()
    units, samples = completeness["units"], completeness["samples"]
    out.print(
        _table(
            "completeness",
            ["", "complete", "planned"],
            [["units", units["complete"], "unknown" if units["planned"] is None else units["planned"]],
             ["samples", "unknown" if samples["complete"] is None else samples["complete"],
              "unknown" if samples["planned"] is None else samples["planned"]]],
        )
    )
    out.print(completeness_line(completeness, summary["status"]), markup=False,
              style="bold red" if completeness["complete"] is False else None)
    n = max(summary["samples"], 1)
    out.print(
        _table(
            f"run {summary['run_dir']} (pipeline {summary['pipeline']}, {summary['status']})",
            ["", "samples", "share"],
            [[k, summary[k], f"{summary[k] / n:.1%}"] for k in ("ok", "rejected", "failed")]
            + [["total", summary["samples"], ""]],
        )
    )
    if summary["reasons"]:
        out.print(_table("top reasons", ["status: stage/kind", "samples"], summary["reasons"]))
    bpi = summary["boxes_per_image"]
    out.print(
        _table(
            "boxes",
            ["boxes", "per image (mean)", "min", "max", "phrase matches", "category matches"],
            [[summary["boxes"], f"{bpi['mean']:.2f}", bpi["min"], bpi["max"],
              summary["matched"].get("phrase", 0), summary["matched"].get("category", 0)]],
        )
    )
    hist = summary["score_histogram"]
    peak = max(hist.values()) or 1
    out.print(_table("score histogram", ["score", "boxes", ""], [[k, v, "█" * round(20 * v / peak)] for k, v in hist.items()]))
    out.print(_table(f"top categories ({summary['categories']} in all)", ["category", "boxes"], summary["top_categories"]))
    out.print(
        _table(f"top parent categories ({summary['parent_categories']} in all)", ["parent category", "boxes"],
               summary["top_parent_categories"])
    )
    if summary["described"]:
        out.print(_table("boxes named by the describe stage", ["verdict", "boxes"], sorted(summary["described"].items())))
    if quality is not None:
        score = quality["score"]
        out.print(_table(f"label quality against {args.coco} (IoU 0.5; docs/quality.md)",
                         ["AP", "AP50", "precision", "recall", "F1", "boxes", "GT boxes"],
                         [[f"{score[k]:.3f}" for k in ("AP", "AP50", "precision", "recall", "f1")]
                          + [score["boxes"], score["gt_boxes"]]]))
        if quality["note"]:
            out.print(f"note: {quality['note']}")
    if summary["dummy_models"]:
        out.print("note: made with dummy (random-weight) models; boxes and captions are random by design")
    if args.html:
        out.print(f"page: {summary['html']}")
    return 0


def _budget(plan: dict) -> str:
    """The waiting-blocks budget, with the decoded sample size it was sized from when measured."""
    if plan["sample_kb"] is None:
        return str(plan["data_memory_mb"])
    return f"{plan['data_memory_mb']} ({plan['sample_kb']:g} KB a sample)"


def show_plan(config, inputs: list[str], output: str, *, ray_address: str | None = None, as_json: bool = False,
              allow_config_change: bool = False) -> int:
    """Print what `granucap run` would do; used by `granucap run --dry-run`."""
    from engine.report import plan_summary

    plan = plan_summary(config, inputs, output, ray_address=ray_address, allow_config_change=allow_config_change)
    if as_json:
        print(json.dumps(plan))
        return 0
    out = console()
    out.print(
        _table(
            f"pipeline {plan['pipeline']}: stages",
            ["stage", "backend", "model", "runs as", "batch", "concurrency", "cpus", "gpus"],
            [[s["stage"], s["backend"], (s["model"] or "-") + (" (dummy)" if s["dummy"] else ""), s["runs_as"],
              s["batch_size"], s["concurrency"], s["num_cpus"], s["num_gpus"]] for s in plan["stages"]],
        )
    )
    out.print(
        _table(
            f"work into {plan['output']}",
            ["samples", "units (shards)", "shard size", "complete", "to do", "ray datasets", "waiting blocks MiB",
             "ray"],
            [[plan["samples"], plan["units"], plan["shard_size"], len(plan["complete"]), plan["todo"],
              plan["ray_datasets"], _budget(plan), plan["ray_address"] or "embedded"]],
        )
    )
    out.print(f"Ray workers' memory allocator: {plan['worker_allocator']}", markup=False,
              style="red" if plan["worker_allocator"].startswith("error") else None)
    if plan["same_plan_as_output"] is False:
        out.print("[red]the output holds a different input plan: `granucap run` would refuse it[/red]")
    out.print(f"output writable, not locked by another run; config fingerprint {plan['fingerprint']}")
    for problem in plan["would_stop"]:
        out.print(f"would stop: {problem}", markup=False, style="red")
    out.print("dry run: nothing was started")
    return EXIT_ERROR if plan["would_stop"] else 0


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="summarise a run (tables), optionally as a static HTML page with a gallery")
    p.add_argument("run_dir", help="a granucap run: a folder or a URI (s3://bucket/run, gs://...)")
    p.add_argument("--html", metavar="DEST", default=None, help="write DEST/index.html with plots and a gallery")
    p.add_argument("--gallery", type=int, default=24, help="images in the HTML gallery (default 24)")
    p.add_argument("--top", type=int, default=15, help="rows in the reason and category tables")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of tables")
    p.add_argument("--coco", metavar="GT.json", default=None,
                   help="labelled images (COCO): score the run's boxes against them (as `eval --run`), and on the "
                        "--html page draw precision/recall over box thresholds (needs a run with "
                        "stages.ground.keep_candidates)")
    p.add_argument("--allow-partial", action="store_true",
                   help="summarise the complete units of a run whose plan has units still to write (else refused)")
    p.set_defaults(func=cmd_inspect)
