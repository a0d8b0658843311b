"""The student's subcommands: `granucap train`, `granucap eval`, `granucap selftrain`, `granucap shapes`.

Training flags override the keys of `--config` (detector/config.py has them all); see docs/student.md.
`selftrain` and `shapes` run on the engine's side (engine/selftrain.py, engine/synthetic_runs.py): the
detector only trains and scores (detector/__init__.py).
"""

from __future__ import annotations

import argparse
import json


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
    from detector.evaluate import evaluate, format_table, write_json

    results = [evaluate(model=model, coco=args.coco, images=args.images, batch_size=args.batch_size,
                        max_dets=args.max_dets, cache_dir=args.cache_dir, device=args.device, limit=args.limit)
               for model in args.model]
    if args.json_out:
        write_json(results, args.json_out)
    print(json.dumps(results, indent=1) if args.json else format_table(results))
    return 0


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

    p = sub.add_parser("eval", help="COCO box AP of one or more detectors, prompted with the category names")
    p.add_argument("--model", action="append", required=True,
                   help="checkpoint dir, hub id or tiny:NAME; repeat to compare (teacher vs student)")
    p.add_argument("--coco", required=True, help="COCO-format annotations JSON (a path or a URI)")
    p.add_argument("--images", required=True,
                   help="folder (or URI) the annotations' file_name values are relative to")
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
