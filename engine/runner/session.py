"""The run's Ray session: started embedded on this machine unless an address names a cluster, with the
workers' environment; stopped early when a run ends before its last manifest; and what the driver asks of
the cluster before the Datasets run (can every node write the output, count the input files in tasks).

An embedded session stops when the process exits, by the exit hook Ray registers when it is imported; a
joined cluster ends the job's workers when the driver leaves and keeps its own processes.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from engine.allocator import AllocatorError, WorkerAllocator
from engine.allocator import resolve as resolve_allocator
from engine.config import PipelineConfig
from engine.io.storage import Location, redact
from engine.errors import RunError
from engine.runner.worker_logs import ray_init_kwargs

log = logging.getLogger(__name__)

ENV_PASSTHROUGH = ("GRANUCAP_", "HF_", "TRANSFORMERS_", "NLTK_DATA", "OMP_NUM_THREADS", "TOKENIZERS_", "VLLM_")
# Model loading progress bars from every worker drown the run's own progress view.
QUIET_WORKERS = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
                 "VLLM_LOGGING_LEVEL": "WARNING"}


def worker_allocator(config: PipelineConfig, address: str | None = None) -> WorkerAllocator:
    """The allocator Ray's workers will run with (`ray.worker_allocator`); RunError if it is not installed."""
    try:
        return resolve_allocator(config.ray.worker_allocator, cluster=bool(address or config.ray.address))
    except AllocatorError as exc:
        raise RunError(str(exc)) from None


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
    # the allocator goes through the runtime environment: a preload applies only to processes started with it
    env.update(allocator.env(os.environ.get("LD_PRELOAD")))
    log.info("Ray workers' memory allocator: %s", allocator.why)
    address = address or config.ray.address
    # the workers' output goes to their log files, kept in the output when the run ends (worker_logs.py)
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
            **kwargs,
        )
    return True


def stop_session() -> None:
    """End this process's Ray session now rather than at exit: an embedded session stops its processes, a
    joined cluster ends the job's workers. A run that stops early does this before its last manifest, so that
    no worker of the run writes a marker after it."""
    import ray

    ray.shutdown()


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
