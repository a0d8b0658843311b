"""The runner: plan work units, map the stages onto Ray Data, write shards on the workers, keep the manifest.

    units ─► read + decode (tasks) ─► recaption ─► extract ─► ground + filter (actor pools)
          ─► write (tasks: one unit's shard, index part and marker, straight to the output) ─► driver: reports

One job a module:

    stages.py       which stages run, how each is built, how they group into Ray Data operators
    session.py      the Ray session: started embedded or joined with the workers' environment, stopped; the
                    checks and counting tasks the driver runs on the cluster before the Datasets
    sizing.py       Ray Data's budget for waiting blocks, sized from the input; the Datasets the units run as
    dataset.py      one Dataset's plan, and the read tasks, stage actors and write tasks it runs
    manifest.py     manifest.json, the config records and the run's log folder
    loop.py         `run`: lock, plan, config check, the Datasets one after another, the last manifest
    capacity.py     whether the actor pools fit the cluster, before anything starts
    worker_logs.py  the workers' output, kept in the output
    driver_log.py   the driver's library output, kept in a log file instead of the terminal

Ray starts embedded on this machine unless an address is given. The driver receives a few hundred bytes per
unit: it never sees an image or a record.
"""

from engine.records import SCHEMA
from engine.runner.dataset import CHAOS_ENV, REPORT_SCHEMA, build_dataset
from engine.errors import RunError
from engine.runner.loop import Progress, check_config_identity, prepare_plan, run
from engine.runner.manifest import Manifest, config_record, describe_models, unit_ranges, versions, write_manifest
from engine.runner.session import ENV_PASSTHROUGH, QUIET_WORKERS, worker_allocator
from engine.runner.sizing import (
    DECODED_SAMPLE_KB,
    MIN_DATA_MEMORY_MB,
    SIZE_SAMPLES,
    UNITS_PER_WORKER,
    data_memory_budget,
    dataset_segments,
    measure_sample_bytes,
)
from engine.runner.stages import (
    FUSED_ORDER,
    MODEL_STAGES,
    STAGE_ORDER,
    build_stage,
    check_stage_inputs,
    operators,
    run_stage_locally,
    stage_names,
    uses_model,
)

__all__ = [
    "CHAOS_ENV", "DECODED_SAMPLE_KB", "ENV_PASSTHROUGH", "FUSED_ORDER", "MIN_DATA_MEMORY_MB", "MODEL_STAGES",
    "Manifest", "Progress", "QUIET_WORKERS", "REPORT_SCHEMA", "RunError", "SCHEMA", "SIZE_SAMPLES", "STAGE_ORDER",
    "UNITS_PER_WORKER", "build_dataset", "build_stage", "check_config_identity", "check_stage_inputs",
    "config_record", "data_memory_budget", "dataset_segments", "describe_models", "measure_sample_bytes",
    "operators", "prepare_plan", "run", "run_stage_locally", "stage_names", "unit_ranges", "uses_model",
    "versions", "worker_allocator", "write_manifest",
]
