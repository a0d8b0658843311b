"""`granucap refilter RUN OUT --set ...`: a new run made from a run's kept candidates at other thresholds,
without any model.

What may change: the ground stage's thresholds (`box_threshold`, `phrase_threshold`, `category_threshold`,
none under the run's `keep_candidates` floor) and any filter setting but its resources; anything else
shapes records in ways the candidates cannot replay and needs a new run.

Each complete unit of RUN is read (the index part for every sample, the shard for the images) and written to
OUT as a run writes one (shard, index part, marker last), units in a pool of threads. A sample the run kept
gets the boxes and the verdict the new settings give its candidates (`engine.quality.replay`: ground's field
thresholds, then the filter) and a `refilter` provenance entry; every other sample is copied as it is. A
sample RUN rejected keeps its verdict even where the new settings would take it: shards hold the images of
kept samples only, so there is none to write (the summary counts them as `would_take`); a lower threshold
than RUN's therefore adds boxes to kept images but cannot bring back rejected ones: rerun the pipeline for
that.

Exactly once and resumable like a run: OUT is locked while it is written, units whose marker is in OUT are
skipped, and the same command finishes an interrupted refilter. OUT gets RUN's plan, its own config record
under configs/, and a manifest whose `parent` names RUN and the fingerprint of RUN's config.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine.boxes import Boxes
from engine.config import ConfigError, config_from_dict, parse_override
from engine.fingerprint import fingerprint_of, shaping
from engine.io.completeness import require_complete
from engine.io.lock import OutputLock, new_run_id
from engine.io.plan import load_plan, save_plan
from engine.io.shard_reader import complete_units, open_run, read_index, read_shard
from engine.io.shards import tar_stems, write_unit
from engine.io.storage import Location
from engine.quality import QualityError, replay, replayable, run_config
from engine.records import Record
from engine.runner.manifest import config_record, write_manifest
from engine.stages.ground import field_thresholds

log = logging.getLogger(__name__)

GROUND_KEYS = {"box_threshold", "phrase_threshold", "category_threshold"}


def check_overrides(overrides: list[str]) -> None:
    """Only what the candidates can replay: ground's thresholds and the filter's settings."""
    for text in overrides:
        keys, _ = parse_override(text)
        ground = keys[:2] == ["stages", "ground"] and len(keys) == 3 and keys[2] in GROUND_KEYS
        filtering = keys[:2] == ["stages", "filter"] and len(keys) >= 3 and keys[2] != "resources"
        if not (ground or filtering):
            raise ConfigError(f"refilter replays stages.ground.{{{','.join(sorted(GROUND_KEYS))}}} and "
                              f"stages.filter.* only; {'.'.join(keys)} needs a new run")


def refilter(run: str | Path, output: str | Path, overrides: list[str], *, allow_partial: bool = False,
             threads: int | None = None) -> dict[str, Any]:
    """Write OUT from RUN at the settings `overrides` give (module docstring); returns OUT's manifest with
    a `refilter` summary."""
    check_overrides(overrides)
    parent = open_run(run)
    require_complete(parent, allow_partial=allow_partial, action="refilter")
    source = complete_units(parent)  # every marker, read once: its fingerprints and the units to write
    parent_fp, parent_config = run_config(parent, source)
    config = config_from_dict(parent_config, overrides, origin=f"{parent.uri} with --set")
    floor = config.stages.ground.keep_candidates
    if floor is None:
        raise QualityError(f"{parent.uri} kept no candidates (stages.ground.keep_candidates): nothing to replay")
    out = Location(output, config.storage_options)
    if out.uri.rstrip("/") == parent.uri.rstrip("/"):
        raise ConfigError("refilter writes a new run: OUT must not be RUN")
    out.check_writable()
    shape = shaping(config)
    fp = fingerprint_of(shape)
    plan = load_plan(parent)
    if plan is None:
        raise QualityError(f"{parent.uri} has no plan.json")
    with OutputLock(out, new_run_id()):
        done = complete_units(out)
        foreign = {s.get("fingerprint") for s in done.values()} - {fp}
        if foreign:
            raise ConfigError(f"{out.uri} holds units made with other settings ({', '.join(map(str, foreign))}); "
                              "use a new output")
        if not out.exists(config_record(fp)):
            out.write_bytes(config_record(fp), json.dumps(
                {"fingerprint": fp, "shaping": shape, "config": config.public_dump()}, indent=1).encode())
        plan.fingerprint = fp
        save_plan(out, plan)
        out.clean_temporaries()
        todo = sorted(set(source) - set(done))
        params = json.dumps({"parent": parent.uri, "parent_fingerprint": parent_fp,
                             "ground": {k: getattr(config.stages.ground, k) for k in sorted(GROUND_KEYS)},
                             "filter": config.stages.filter.model_dump(exclude={"resources"})}, sort_keys=True)
        thresholds = field_thresholds(config.stages.ground)
        workers = threads or min(8, os.cpu_count() or 1)

        def one(unit: int) -> dict[str, int]:
            return _refilter_unit(parent, out, unit, thresholds, config.stages.filter, params, fp)

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="granucap-refilter") as pool:
            counts = list(pool.map(one, todo))
        done = complete_units(out)
        summary = {k: sum(c[k] for c in counts) for k in ("samples", "replayed", "rejected_now", "would_take")}
        return write_manifest(out, config, plan, done, "complete",
                              parent={"run": parent.uri, "fingerprint": parent_fp},
                              refilter={"units_written": len(todo), **summary})


def _refilter_unit(parent: Location, out: Location, unit: int, thresholds: dict[str, float], spec: Any,
                   params: str, fp: str) -> dict[str, int]:
    images = {s["__key__"]: s.get("jpg") for s in read_shard(parent, unit)}
    counts = {"samples": 0, "replayed": 0, "rejected_now": 0, "would_take": 0}
    records = sorted((Record.from_dict(row) for row in read_index(parent, unit).to_pylist()),
                     key=lambda r: r.position)
    for record, stem in zip(records, tar_stems(records)):
        counts["samples"] += 1
        if not replayable(record.status, record.error):
            continue
        kept, rejected = replay(Boxes.from_rows(record.candidates), thresholds, spec, entities=len(record.entities),
                                width=record.width or 0, height=record.height or 0)
        if not record.ok:  # the parent rejected it: its image is not in the shard to write again
            counts["would_take"] += rejected is None
            continue
        record.image = images.get(stem)
        if record.image is None:
            raise QualityError(f"{parent.uri}: shard {unit} lacks the image of its sample {record.key}")
        counts["replayed"] += 1
        record.stamp("refilter", "rules", params=params)
        record.boxes = kept.to_rows()  # as the filter stage leaves them, on a sample it rejects too
        if rejected is not None:
            record.reject("filter", *rejected)
            counts["rejected_now"] += 1
    write_unit(out, unit, records, lambda _unit, keys: keys, fingerprint=fp)
    return counts

