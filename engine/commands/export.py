"""`granucap export FORMAT RUN DEST [options]`: write a finished run (a folder or a URI) in another tool's format
to the local folder DEST; an unfinished run only with --allow-partial (its complete units).

One subcommand per format, so that `granucap export FORMAT --help` says what that format writes and which
options it takes. The options are declared here rather than read from the exporters' signatures, so that the
CLI starts without importing every exporter; tests/test_export_docs.py checks that every keyword option of
every exporter has its flag here. An option left out is not passed, and the exporter's own default applies.
"""

from __future__ import annotations

import argparse
import json

# What each format writes, for `export --help` and `export FORMAT --help` (docs/formats.md has the whole layout).
WRITES: dict[str, str] = {
    "coco": "DEST/annotations.json (COCO detection: images, annotations with score and phrase, categories) "
            "and DEST/images/{shard}/{STEM}.jpg; reads in pycocotools, FiftyOne, supervision",
    "odvg": "DEST/odvg.jsonl (ODVG detection lines: filename, size, instances with bbox, label, category), "
            "DEST/label_map.json and DEST/images/{shard}/{STEM}.jpg; for Open-GroundingDino, MM-Grounding-DINO",
    "odvg-grounding": "DEST/odvg.jsonl (ODVG grounding lines: caption, regions with bbox, phrase, "
                      "tokens_positive) and DEST/images/{shard}/{STEM}.jpg; for MM-Grounding-DINO, Open-GroundingDino",
    "yolo": "DEST/dataset.yaml (train, val, nc, names; paths relative to its folder), DEST/classes.txt, "
            "DEST/images/train/{shard}/{STEM}.jpg and DEST/labels/train/{shard}/{STEM}.txt; reads in "
            "Ultralytics and FiftyOne",
    "labelstudio": "DEST/tasks.json (tasks with the teacher's boxes as predictions), DEST/label_config.xml and "
                   "DEST/images/{shard}/{STEM}.jpg; import into Label Studio with a Local Files storage "
                   "(docs/formats.md gives the steps)",
    "sft": "DEST/sft.json (LLaVA conversations: the annotate prompt with the raw caption -> the entities JSON), "
           "DEST/sft_manifest.json and DEST/images/{shard}/{STEM}.jpg; trains the fused annotator",
    "regions": "DEST/regions.json (LLaVA conversations, one per box: the box -> phrase|category|parent), "
               "DEST/regions.odvg.jsonl, DEST/regions_manifest.json and DEST/images/{shard}/{STEM}.jpg",
}

# Exporter keyword -> its flag and argparse settings. `default=SUPPRESS` everywhere: a flag that is not given
# leaves the keyword out, so the exporter's default is the one default.
OPTIONS: dict[str, tuple[str, dict]] = {
    "write_images": ("--no-images", dict(
        action="store_false",
        help="write the annotation files only, not DEST/images/ (their paths still name images/{shard}/{STEM}.jpg; "
             "put the images there yourself)")),
    "image_url_prefix": ("--image-url-prefix", dict(
        metavar="PREFIX",
        help="what data.image starts with, before images/{shard}/{STEM}.jpg (default: /data/local-files/?d=, "
             "Label Studio's Local Files URL with DEST as its document root; with a parent folder as the root use "
             "'/data/local-files/?d=SUBDIR/', with a web server 'https://host/path/')")),
    "prompt": ("--prompt", dict(
        metavar="ID",
        help="the prompt that makes the human turn: an id (prompts/ID.txt) or a path to a .txt file "
             "(default: annotate for sft, region for regions)")),
    "min_entities": ("--min-entities", dict(
        type=int, metavar="N",
        help="leave out samples with fewer than N entities (default: 1)")),
}

# format -> the exporter keywords it takes (the exporter's keyword-only parameters)
FORMAT_OPTIONS: dict[str, tuple[str, ...]] = {
    "coco": ("write_images",),
    "odvg": ("write_images",),
    "odvg-grounding": ("write_images",),
    "yolo": (),
    "labelstudio": ("image_url_prefix",),
    "sft": ("prompt", "min_entities"),
    "regions": ("prompt", "write_images"),
}


def exporter_options(args: argparse.Namespace) -> dict:
    """The exporter keywords given on the command line (those left out keep the exporter's default)."""
    return {name: getattr(args, name) for name in FORMAT_OPTIONS[args.format] if hasattr(args, name)}


def cmd_export(args: argparse.Namespace) -> int:
    from engine.export import export

    summary = export(args.format, args.run_dir, args.dest, allow_partial=args.allow_partial,
                     **exporter_options(args))
    print(json.dumps(summary, default=str))
    return 0


def add_parser(sub) -> None:
    from engine.export import EXPORTERS

    formats = sorted(EXPORTERS)
    p = sub.add_parser(
        "export", help="export a run to another format (" + ", ".join(formats) + ")",
        description="Export the complete shards of a run to another tool's format, in the local folder DEST. Every "
                    "path written is relative to DEST, so a copy or a move of DEST loads as well. `granucap export "
                    "FORMAT --help` lists a format's options; docs/formats.md the files, field by field.")
    formats_sub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for fmt in formats:
        f = formats_sub.add_parser(fmt, help=WRITES[fmt], description=f"granucap export {fmt} writes {WRITES[fmt]}.")
        f.add_argument("run_dir", help="a granucap run (has manifest.json): a folder or a URI (s3://bucket/run, ...)")
        f.add_argument("dest", help="the local folder to write the export to")
        f.add_argument("--allow-partial", action="store_true",
                       help="export the complete units of a run whose plan has units still to write (else refused)")
        for name in FORMAT_OPTIONS[fmt]:
            flag, settings = OPTIONS[name]
            f.add_argument(flag, dest=name, default=argparse.SUPPRESS, **settings)
        f.set_defaults(func=cmd_export)
