"""The student's subcommands: `granucap train`, `granucap eval`, `granucap selftrain`, `granucap shapes`.

Training flags override the keys of `--config` (detector/config.py has them all); see docs/student.md.
`selftrain` and `shapes` run on the engine's side (engine/selftrain.py, engine/synthetic_runs.py): the
detector only trains and scores (detector/__init__.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _train_config(args: argparse.Namespace):
    from detector.config import load_train_config

    return load_train_config(args.config, {
        "steps": args.steps, "workers": args.workers, "seed": args.seed, "model.init": args.model,
        "model.cache_dir": args.cache_dir, "data.batch_size": args.batch_size, "optim.lr": args.lr,
        "checkpoint_every": args.checkpoint_every,
    })


def cmd_train(args: argparse.Namespace) -> int:
    from detector.train import train

    result = train(shards=args.shards, out=args.out, config=_train_config(args))
    print(json.dumps(result))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.run is not None:
        return _eval_run(args)
    if not args.model or not args.images:
        raise ValueError("eval needs --model (one or more detectors) and --images, or --run to score a run's boxes")
    from detector.evaluate import evaluate, format_table, write_json

    results = [evaluate(model=model, coco=args.coco, images=args.images, batch_size=args.batch_size,
                        max_dets=args.max_dets, cache_dir=args.cache_dir, device=args.device, limit=args.limit)
               for model in args.model]
    if args.json_out:
        write_json(results, args.json_out)
    print(json.dumps(results, indent=1) if args.json else format_table(results))
    return 0


def _eval_run(args: argparse.Namespace) -> int:
    from engine.io.atomic import atomic_write_bytes
    from engine.quality import format_report, format_sweep, score_run, sweep

    if args.model:
        raise ValueError("--run scores a run's own boxes and --model scores detectors: give one of them")
    synonyms = None
    if args.synonyms:
        import yaml

        synonyms = yaml.safe_load(Path(args.synonyms).read_text(encoding="utf-8"))  # JSON is YAML too
        if not isinstance(synonyms, dict) or not all(isinstance(v, list) for v in synonyms.values()):
            raise ValueError(f"{args.synonyms}: synonyms are a mapping of GT category name to a list of aliases")
    if args.sweep:
        result = sweep(args.run, args.coco, thresholds=args.thresholds, min_precision=args.min_precision,
                       synonyms=synonyms, allow_partial=args.allow_partial)
        text = format_sweep(result)
    else:
        result = score_run(args.run, args.coco, synonyms=synonyms, allow_partial=args.allow_partial)
        text = format_report(result)
    if args.json_out:
        atomic_write_bytes(Path(args.json_out), (json.dumps(result, indent=1) + "\n").encode())
    print(json.dumps(result, indent=1) if args.json else text)
    return 0


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or not all(0 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds are numbers in [0, 1]: {text!r}")
    return values


def cmd_selftrain(args: argparse.Namespace) -> int:
    from engine.config import load_config
    from engine.selftrain import self_train

    pipeline = load_config(args.pipeline, args.set)
    rounds = self_train(pipeline, inputs=args.input, output=args.output, rounds=args.rounds,
                        train_config=_train_config(args), ray_address=args.ray_address, students=args.students)
    print(json.dumps(rounds, indent=1))
    return 0


def cmd_shapes(args: argparse.Namespace) -> int:
    from engine.synthetic_runs import write_shapes

    print(json.dumps(write_shapes(args.dest, train=args.train, val=args.val, seed=args.seed)))
    return 0


def _training_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="train config YAML (keys: docs/student.md); flags override it")
    p.add_argument("--model", default=None, help="start from: hub id, dir (teacher or checkpoint), tiny:NAME")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="Ray Train data-parallel workers (1: one process)")
    p.add_argument("--batch-size", type=int, default=None, help="per worker")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps")
    p.add_argument("--cache-dir", default=None, help="where tiny:NAME models are built")


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train the student detector on GranuCap shards (resumes from OUT)")
    p.add_argument("--shards", required=True, help="a granucap run: a folder or a URI (s3://bucket/run, ...)")
    p.add_argument("--out", required=True, help="local checkpoint directory; rerun the same command to resume")
    _training_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="COCO box AP of detectors (--model), or of a run's own boxes (--run)")
    p.add_argument("--model", action="append", default=[],
                   help="checkpoint dir, hub id or tiny:NAME; repeat to compare (teacher vs student)")
    p.add_argument("--run", default=None,
                   help="score this run's pseudo boxes instead: AP and precision/recall/F1 (docs/quality.md)")
    p.add_argument("--coco", required=True, help="COCO-format annotations JSON (a path or a URI)")
    p.add_argument("--images", default=None,
                   help="with --model: folder (or URI) the annotations' file_name values are relative to")
    p.add_argument("--synonyms", default=None,
                   help="with --run: JSON/YAML {GT category: [alias, ...]} for labels the run names otherwise")
    p.add_argument("--allow-partial", action="store_true", help="with --run: score the complete units only")
    p.add_argument("--sweep", action="store_true",
                   help="with --run: P/R/F1 over box thresholds, replayed on the boxes the run kept over "
                        "stages.ground.keep_candidates (no model runs)")
    p.add_argument("--thresholds", type=_thresholds, default=None,
                   help="with --sweep: comma-separated thresholds (default 0.05, 0.10, ..., 0.95)")
    p.add_argument("--min-precision", type=float, default=None,
                   help="with --sweep: also name the threshold with the best F1 at this precision or more")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-dets", type=int, default=100, help="detections kept per image")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--json-out", default=None, help="also write the results as JSON to this file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("selftrain", help="GLIP self-training: teacher -> shards -> student -> next teacher")
    p.add_argument("pipeline", help="pipeline YAML whose stages.ground.model is the first teacher")
    p.add_argument("--input", "-i", action="append", required=True)
    p.add_argument("--output", "-o", required=True,
                   help="round-N/data (and, unless --students, round-N/student) go here; a folder or a URI")
    p.add_argument("--students", default=None,
                   help="local folder for round-N/student (default: --output; needed when --output is a URI)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="A.B=C", help="override a pipeline value")
    p.add_argument("--ray-address", default=None)
    _training_flags(p)
    p.set_defaults(func=cmd_selftrain)

    p = sub.add_parser("shapes", help="write the synthetic shapes set (train shards + COCO val) to check learning")
    p.add_argument("dest")
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--val", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_shapes)
