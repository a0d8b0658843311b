"""How much the run may hold at once: Ray Data's budget for blocks waiting between operators, sized from the
input's first samples as decoded, and the Datasets the units run as.

The units run as consecutive Datasets of at most `ray.max_samples_per_dataset` samples, because Ray Data keeps
statistics of every block it produced in the driver until the Dataset ends.
"""

from __future__ import annotations

import logging

from engine.config import PipelineConfig
from engine.io.inputs import Unit
from engine.io.readers import read_unit
from engine.records import Record, to_table
from engine.runner.stages import build_stage, operators

log = logging.getLogger(__name__)

# What a decoded sample is taken to weigh when `ray.data_memory_mb` is unset and the input could not be sampled
# (measure_sample_bytes): a high-quality JPEG of about one megapixel.
DECODED_SAMPLE_KB = 256
MIN_DATA_MEMORY_MB = 64
# Decoded units of budget for each worker. Ray Data splits the budget evenly between its operators and counts
# the blocks a task is still producing and, with ordered output, finished blocks waiting behind an earlier
# one: at one unit a worker the teacher actors waited for blocks (docs/performance.md).
UNITS_PER_WORKER = 8
# How many samples the driver reads and decodes to size the default budget (measure_sample_bytes)
SIZE_SAMPLES = 32


def dataset_segments(units: list[Unit], max_samples: int | None) -> list[list[Unit]]:
    """Consecutive runs of whole units, each at most `max_samples` samples (a larger unit alone); each
    becomes one Ray Dataset, so the driver's per-block statistics are dropped after every segment."""
    if max_samples is None:
        return [units] if units else []
    segments: list[list[Unit]] = []
    size = 0
    for unit in units:
        if not segments or size + unit.size > max_samples:
            segments.append([])
            size = 0
        segments[-1].append(unit)
        size += unit.size
    return segments


def measure_sample_bytes(units: list[Unit], config: PipelineConfig, samples: int = SIZE_SAMPLES) -> float | None:
    """Mean bytes of one sample as the read tasks hand it on: the first `samples` samples of `units` read and
    run through the first operator's stages (decode's re-encoded JPEG, the caption, metadata) into an Arrow
    table, as the read tasks do; the mean is over the samples that passed (a broken file's rejected rows say
    nothing of the images after it), over all of them when none did. None when reading or decoding fails: the
    budget then falls back to DECODED_SAMPLE_KB, and the run itself reports what is wrong."""
    from contextlib import closing
    from itertools import islice

    rows: list[Record] = []
    try:
        for unit in units:
            with closing(read_unit(unit, config.storage_options)) as records:
                rows.extend(islice(records, samples - len(rows)))
            if len(rows) >= samples:
                break
        if not rows:
            return None
        for stage in [build_stage(name, config) for name in operators(config)[0]]:
            rows = stage(rows)
        passed = [r for r in rows if r.ok] or rows
        return to_table(passed).nbytes / len(passed)
    except Exception as exc:  # sizing must never cost the run: the read tasks meet the same input and say why
        log.warning("could not size the input's decoded samples (%s: %s); taking %d KB a sample",
                    type(exc).__name__, exc, DECODED_SAMPLE_KB)
        return None


def data_memory_budget(config: PipelineConfig, sample_bytes: float | None = None) -> int:
    """Bytes of Ray's object store the run's blocks may hold between operators: `ray.data_memory_mb`, or by
    default UNITS_PER_WORKER decoded units for every worker (the read tasks and every model stage's actors):
    enough that no worker waits for a block while the read tasks cannot run far ahead of the teacher; a unit
    is `write.shard_size` samples of `sample_bytes` each (measure_sample_bytes; None: DECODED_SAMPLE_KB); at
    least MIN_DATA_MEMORY_MB."""
    if config.ray.data_memory_mb is not None:
        return config.ray.data_memory_mb * 2**20
    _, *model_groups = operators(config)
    workers = config.stages.decode.resources.concurrency + sum(
        getattr(config.stages, names[0]).resources.concurrency for names in model_groups
    )
    per_sample = DECODED_SAMPLE_KB * 2**10 if sample_bytes is None else sample_bytes
    unit = config.write.shard_size * per_sample
    return max(int(workers * UNITS_PER_WORKER * unit), MIN_DATA_MEMORY_MB * 2**20)
