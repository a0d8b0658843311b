"""The Ray Data plan of one Dataset, and the functions and actors it runs on the workers.

    units ─► read + decode (tasks) ─► recaption ─► extract ─► ground + filter (actor pools)
          ─► write (tasks: one unit's shard, index part and marker, straight to the output) ─► driver: reports

Each read task reads one work unit and runs decode (and any CPU stage before the first model stage, e.g. a
passthrough recaption) on it `decode.resources.batch_size` rows at a time; the raw image bytes never go through
the object store, and one pool of task workers serves both. A CPU stage right after a model stage (filter after
ground) runs inside that stage's actors (`stages.operators`).

A unit travels as one block from its read task to its write task: Ray Data never splits a block it bundles for
a map, and with no block size limit (`target_max_block_size = None`) each task's output is one block, so the
write task always holds whole units (it checks, and refuses to write a partial one). It writes them on the node
that holds them, claiming their keys from the run's `KeyClaims` actor first, and hands the driver a report of a
few hundred bytes per unit: the driver never sees an image or a record.

Ray pickles the functions and classes below by reference (module and name), so they stay at the top level of
this module.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Any, Iterator

import pyarrow as pa

from engine.config import PipelineConfig, Resources
from engine.io.inputs import Unit
from engine.io.readers import read_unit
from engine.io.shard_reader import shard_files
from engine.io.shards import KeyClaims, completed_keys, write_unit
from engine.io.storage import Location
from engine.records import Record, from_table, to_table
from engine.errors import RunError, WorkerLost
from engine.runner.sizing import data_memory_budget
from engine.runner.stages import batches_in_flight, batches_to_fill, build_stage, operators

CHAOS_ENV = "GRANUCAP_CHAOS_KILL_ONCE"
CHAOS_ENGINE_ENV = "GRANUCAP_CHAOS_KILL_ENGINE_ONCE"
WORKER_LOST_EXIT = 70  # the exit status of a stage actor whose engine died
# Units one stage actor holds when its batches in flight fill its engine (`max_concurrent_batches: null`): the
# current unit, and the next ones queued behind it so that the engine stays full across units; more than two
# so that units smaller than the engine (the ends of input files) still fill it.
UNITS_PER_FILLED_ACTOR = 4

REPORT_SCHEMA = pa.schema([
    ("unit", pa.int64()),
    ("stats", pa.string()),  # the unit's marker, as written (an earlier attempt's, when it had written it)
    ("node", pa.string()),  # the Ray node that wrote it
    ("rows_bytes", pa.int64()),  # Arrow bytes of the unit's rows as the write task received them
])


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


def _chaos_due(env: str, name: str) -> bool:
    """Fault injection: with `env`=STAGE:PATH[:N], whether this batch reaching stage `name` is one of the first
    N (default 1) to do so, across processes: each claims a marker file (PATH, then PATH.2, ... PATH.N) that
    records it happened. Unset, this costs one dictionary lookup per batch."""
    spec = os.environ.get(env)
    if not spec:
        return False
    stage, _, rest = spec.partition(":")
    path, _, times = rest.partition(":")
    if stage != name or not path:
        return False
    for i in range(1, int(times or 1) + 1):
        try:
            fd = os.open(path if i == 1 else f"{path}.{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.close(fd)
        return True
    return False


def _chaos(name: str) -> None:
    """The reliability tests' actor crash (GRANUCAP_CHAOS_KILL_ONCE=STAGE:PATH[:N]): the batch kills its worker
    process, as a segfault or a lost node would."""
    if _chaos_due(CHAOS_ENV, name):
        os._exit(137)


def _chaos_engine(name: str) -> None:
    """The engine-death tests' fault (GRANUCAP_CHAOS_KILL_ENGINE_ONCE=STAGE:PATH[:N]): the batch kills the
    processes the actor started (vLLM's engine core), as a crash of the engine would."""
    if not _chaos_due(CHAOS_ENGINE_ENV, name):
        return
    import multiprocessing
    import signal

    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)
        child.join()


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
        return self.run(table)

    def run(self, table: pa.Table) -> pa.Table:
        records = from_table(table)
        try:
            for name, stage in zip(self.names, self.stages):
                _chaos(name)
                _chaos_engine(name)
                records = stage(records)
        except WorkerLost as exc:
            # Raised, it would fail the Dataset; exiting, the actor is lost to Ray, which starts a fresh one
            # (a fresh engine) and retries every batch this one held, none of which has returned rows.
            logging.getLogger(__name__).error("%s: %s; exiting so that Ray restarts this actor", self.names[0], exc)
            os._exit(WORKER_LOST_EXIT)
        return to_table(records)


class _ConcurrentStageActor(_StageActor):
    """A stage actor that runs `in_flight` batches at once, on threads sharing its engine (`batches_in_flight`).

    It takes whole blocks and cuts them into batches of `batch_size` itself. A unit travels as one block (module
    docstring), and Ray Data, left to cut it, runs a block's batches one after another (for a coroutine
    `__call__`, at most four at once: a default with no public setting), so `max_concurrent_batches` would not
    hold within a unit, and a unit at batch 16 would keep at most 64 requests in the engine. Each block the
    actor holds (`max_concurrent_calls_per_actor`) queues its batches on one pool of `in_flight` threads, first
    come first served, so the next unit's batches are waiting when the current unit's last ones drain, and a
    block's rows come back whole and in order."""

    def __init__(self, *, names: tuple[str, ...], config_json: str, in_flight: int | None, batch_size: int) -> None:
        super().__init__(names=names, config_json=config_json)
        self.batch_size = batch_size
        # None: as many as fill this actor's engine, known once it has started
        self.in_flight = in_flight or batches_to_fill(self.stages[0].backend.capacity, batch_size)
        self.pool = ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix=f"granucap-{names[0]}")

    async def __call__(self, table: pa.Table) -> pa.Table:
        size = self.batch_size
        batches = [table.slice(start, size) for start in range(0, table.num_rows, size)] or [table]
        loop = asyncio.get_running_loop()
        done = await asyncio.gather(*(loop.run_in_executor(self.pool, self.run, batch) for batch in batches))
        return pa.concat_tables(done) if len(done) > 1 else done[0]


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


def _start_key_claims(out: Location, done_units: list[int]):
    """The run's `KeyClaims` actor, on this node (it lives as long as the driver does)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_restarts=0)(_KeyClaimsActor).options(scheduling_strategy=here)
    claims = actor.remote(out.uri, out.storage_options, done_units)
    ray.get(claims.size.remote())  # seeded before any write task asks
    return claims


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


def map_stage_group(ds: Any, names: tuple[str, ...], config: PipelineConfig, config_json: str) -> Any:
    """`ds` through the actor pool of one model stage and the CPU stages joined to it (`stages.operators`),
    as `granucap run` maps it (benchmarks/language.py times this operator alone)."""
    import ray.data

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*")  # see build_dataset
        res: Resources = getattr(config.stages, names[0]).resources
        in_flight = batches_in_flight(names, config)
        if in_flight is None or in_flight > 1:  # whole blocks to the actor, which cuts its batches (see the class)
            actor, kwargs, batch_size = (_ConcurrentStageActor, {"in_flight": in_flight,
                                                                 "batch_size": res.batch_size}, None)
        else:
            actor, kwargs, batch_size = _StageActor, {}, res.batch_size
        return ds.map_batches(
            actor,
            fn_constructor_kwargs={"names": names, "config_json": config_json, **kwargs},
            batch_size=batch_size,
            batch_format="pyarrow",
            num_cpus=res.num_cpus,
            # several blocks per actor, their batches on threads that share its engine (vllm_chat.py)
            compute=ray.data.ActorPoolStrategy(size=res.concurrency,
                                               max_concurrent_calls_per_actor=in_flight or UNITS_PER_FILLED_ACTOR),
            num_gpus=res.num_gpus or None,
            resources=res.custom or None,
            # the defaults of max_restarts / max_task_retries (-1) would retry forever
            max_restarts=3,
            max_task_retries=3,
        )


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
            ds = map_stage_group(ds, names, config, config_json)
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
