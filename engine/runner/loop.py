"""The run: take the output's lock, plan (or reuse the saved plan), check that the output was made with this
config, then run the units still to do as consecutive Ray Datasets, collecting each unit's report into the
manifest; however the run ends, its last manifest and its logs are written.

A Dataset that fails for a reason outside granucap (a node lost) runs again on the units without a marker.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from engine.allocator import WorkerAllocator
from engine.config import PipelineConfig
from engine.errors import ConfigChanged, Interrupted, RunError, causes, raise_on_sigterm
from engine.fingerprint import differences, fingerprint_of, shaping
from engine.io.inputs import Unit, expand_inputs
from engine.io.lock import OutputLock, new_run_id
from engine.io.plan import Plan, load_plan, make_plan, save_plan
from engine.io.shard_reader import complete_unit_ids, complete_units, shard_files
from engine.io.storage import Location, redact
from engine.runner.capacity import check_ray_cluster
from engine.runner.dataset import _start_key_claims, build_dataset
from engine.runner.manifest import Manifest, RunLogs, config_record
from engine.runner.session import _check_nodes_reach, _ray_init, _ray_map, stop_session, worker_allocator
from engine.runner.sizing import (
    DECODED_SAMPLE_KB,
    SIZE_SAMPLES,
    data_memory_budget,
    dataset_segments,
    measure_sample_bytes,
)
from engine.runner.stages import check_stage_inputs

log = logging.getLogger(__name__)


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
    The workers' logs, and the file `driver_log` (the driver's library output, driver_log.py), are kept in
    OUT/logs/RUN_ID/ however the run ends; the manifest names the folder."""
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
            ours = _ray_init(config, ray_address, allocator)
            raise_on_sigterm()  # Ray's driver replaced the handler with one that exits without a word
            ray_started.append(ours)
            logs.ray_started()

    def stop_ray() -> None:
        """Before the last manifest of a run that stops early: no worker of this run may write a marker after
        it."""
        if any(ray_started):
            try:
                stop_session()
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


def _system_failure(exc: BaseException) -> bool:
    """Whether a failed Dataset met a failure of the cluster (a node, worker, actor or object lost) rather
    than an error of granucap's or the input's, which running again would only repeat."""
    import ray.exceptions as rex

    system = (rex.ActorDiedError, rex.ActorUnavailableError, rex.NodeDiedError, rex.ObjectLostError,
              rex.OwnerDiedError, rex.WorkerCrashedError, rex.ObjectFetchTimedOutError, rex.RaySystemError)
    return any(isinstance(cause, system) for cause in causes(exc))


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
