"""Scale: what the driver receives per sample, planning thousands of input files, 1 node vs 2 nodes, and write
throughput to an S3 API server, each against a baseline measured in the same run.

Every component is real and started here, then stopped at the end: moto's S3 server on 127.0.0.1 (every
s3:// below; it keeps objects in its own memory), embedded Ray sessions, and local multi-node Ray clusters
(`ray.cluster_utils.Cluster`: a raylet per node, all on this machine). Sections (`--only`, comma-separated):

  driver  one in-process `engine.runner.run` (smoke pipeline on tiny models, GLIP path: passthrough recaption,
          nltk extract, tiny teacher; S3 in and out) with `on_progress`: the Arrow bytes per sample the
          driver received (the unit reports) vs the bytes per sample the write tasks received (the unit rows,
          what the driver received when it iterated the records and wrote the shards itself).
  plan    planning N img2dataset tars (`NNNNN.tar` with `NNNNN_stats.json` and `NNNNN.parquet` beside it),
          on disk and on S3: the old planner (every tar's member headers read, one file after another, in
          this process) vs `make_plan` with the runner's Ray-task map_fn, from the stats files and from a
          copy without them (the tars then counted by reading them in parallel Ray tasks). Each side gets a
          fresh embedded Ray session, started before the clock as a run starts Ray anyway; its first count by
          Ray tasks also starts the worker processes (as in a run), a second one finds them warm.
  nodes   the job of `driver` on a cluster of a CPU-less head + one worker with C logical CPUs vs a CPU-less
          head + two workers with C/2 each (the object store split alike): wall time of `run` (the clusters
          are started before the clock) and the units each node wrote. On one physical machine both
          clusters share the same cores, so the ratio measures funnelling and coordination overhead
          (whether everything passes through one node or process), not a speed-up.
  write   Ray tasks that each write K units with `write_unit` (shard tar, index part, marker) of random-noise
          JPEGs (they do not compress), 1, 2 and 4 tasks at once, to the S3 server and to a local folder (the
          baseline): MB/s in total and per task, seconds per unit. The tasks start together on warm workers
          and are timed from the first start to the last end.

Run by hand (about 8 minutes on a 2-core machine with the defaults):

    python benchmarks/scale.py
    python benchmarks/scale.py --only plan --files 2000
    python benchmarks/scale.py --driver-samples 96 --files 200 --nodes-samples 96 --write-units 1   # quick check
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from _session import ROOT

SECTIONS = ("driver", "plan", "nodes", "write")
# The tests' credentials (tests/conftest.py): moto accepts any
S3_ENV = {"AWS_ACCESS_KEY_ID": "granucap-bench-key", "AWS_SECRET_ACCESS_KEY": "granucap-bench-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}
GLIP = ["stages.recaption.backend=passthrough", "stages.extract.backend=nltk"]


# --- components ---------------------------------------------------------------------------------------------


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1, with this process's environment pointing boto at it (Ray
    nodes and workers started from here inherit it, as the nodes of a real cluster carry their own); yields
    the endpoint URL. The environment is restored and the server stopped on exit."""
    server = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(server).exists():
        raise SystemExit("moto_server is not installed (pip install 'moto[server]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", **S3_ENV}
    before = {k: os.environ.get(k) for k in env}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("moto_server did not start")
                time.sleep(0.1)
        os.environ.update(env)
        yield env["AWS_ENDPOINT_URL"]
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        proc.terminate()
        proc.wait(timeout=30)


def s3_fs():
    """A fresh s3fs filesystem (no listing cache kept between calls) for setting up and checking buckets."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)


def new_bucket(prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    s3_fs().mkdir(name)
    return name


@contextmanager
def local_cluster(workers: list[int], object_store_mb: int) -> Iterator[tuple[object, dict[str, str]]]:
    """A Ray cluster on this machine: a head with no CPUs (so no task or actor of the run lands there, as on a
    cluster whose head only coordinates) and `workers` nodes with those logical CPUs, sharing
    `object_store_mb` of object store equally. Yields the cluster and node id -> label."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        labels = {cluster.head_node.node_id: "head"}
        for i, cpus in enumerate(workers, 1):
            node = cluster.add_node(num_cpus=cpus, object_store_memory=object_store_mb * 2**20 // len(workers))
            labels[node.node_id] = f"worker{i} ({cpus} CPUs)"
        cluster.wait_for_nodes()
        yield cluster, labels
    finally:
        cluster.shutdown()


# --- inputs -------------------------------------------------------------------------------------------------


def glip_config(args, *extra: str):
    from engine.config import load_config

    return load_config(ROOT / "pipelines" / "smoke.yaml", [
        *GLIP, f"cache_dir={args.cache_dir}", f"write.shard_size={args.shard_size}", *extra])


def demo_dump(dest: Path, samples: int, per_tar: int) -> Path:
    """The demo input (drawn scenes, one broken image) in img2dataset layout: each tar with its stats file."""
    from engine.io.readers import count_tar
    from engine.demo import write_demo_input

    for path in write_demo_input(dest, samples=samples, per_tar=per_tar, seed=0):
        n = count_tar(str(path))
        (dest / f"{path.stem}_stats.json").write_text(json.dumps({"count": n, "successes": n}))
    return dest


def upload(local: Path, bucket: str, prefix: str) -> str:
    s3_fs().put(f"{local}/", f"{bucket}/{prefix}/", recursive=True)
    return f"s3://{bucket}/{prefix}"


def noise_jpeg(rng, side: int) -> bytes:
    """A side x side JPEG of random noise: neither JPEG nor the shard's zstd index can shrink it."""
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def noise_jpegs(count: int, kb: float, seed: int) -> list[bytes]:
    """`count` distinct noise JPEGs of about `kb` KB each (the side is scaled from a probe: bytes grow with
    the pixels)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    probe = len(noise_jpeg(rng, 128))
    side = max(8, round(128 * (kb * 1024 / probe) ** 0.5))
    return [noise_jpeg(rng, side) for _ in range(count)]


def img2dataset_dump(dest: Path, files: int, seed: int = 0) -> int:
    """`files` tars of 16-32 samples (a few-KB JPEG, caption .txt, .json each) with img2dataset's side files:
    `NNNNN_stats.json` (its counts) and `NNNNN.parquet` (its per-sample metadata); returns the samples."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    images = noise_jpegs(32, 3, seed)  # a pool: the planner reads no image data, their bytes only set file sizes
    dest.mkdir(parents=True, exist_ok=True)
    total = 0
    for shard in range(files):
        n = rng.randint(16, 32)
        rows = []
        with tarfile.open(dest / f"{shard:05d}.tar", "w") as tar:
            for i in range(n):
                key = f"{shard:05d}{i:04d}"
                caption = f"photo {key} of a thing"
                meta = {"key": key, "caption": caption, "url": f"https://example.com/{key}.jpg", "status": "success"}
                for name, payload in ((f"{key}.jpg", images[rng.randrange(len(images))]),
                                      (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                rows.append(meta)
        (dest / f"{shard:05d}_stats.json").write_text(json.dumps({"count": n, "successes": n, "failed_to_download": 0}))
        pq.write_table(pa.Table.from_pylist(rows), dest / f"{shard:05d}.parquet")
        total += n
    return total


def without_stats(src: Path, dest: Path) -> None:
    """The same dump without its stats files (tars and parquet hard-linked: the very same bytes)."""
    dest.mkdir(parents=True)
    for path in src.iterdir():
        if not path.name.endswith("_stats.json"):
            os.link(path, dest / path.name)


# --- the run ------------------------------------------------------------------------------------------------


def run_job(config, inputs: list[str], output: str, address: str | None = None) -> tuple[float, object, dict]:
    """`engine.runner.run` in this process: (wall seconds, the last Progress, the manifest). The Ray session it
    started or joined is shut down after it, so the next run starts afresh."""
    import ray

    from engine.runner import run

    seen = []
    start = time.perf_counter()
    try:
        manifest = run(config, inputs=inputs, output=output, ray_address=address, on_progress=seen.append)
    finally:
        seconds = time.perf_counter() - start
        ray.shutdown()
    progress = seen[-1]
    counts = manifest["counts"]
    if manifest["units"]["complete"] != manifest["units"]["planned"] or counts["read"] != progress.done:
        raise SystemExit(f"the run into {output} is incomplete: {manifest['units']}, {counts}")
    return seconds, progress, manifest


def node_line(nodes: Counter, labels: dict[str, str] | None = None) -> str:
    labels = labels or {}
    return ", ".join(f"{labels.get(node, node[:8])}: {n}" for node, n in sorted(nodes.items(), key=lambda kv: -kv[1]))


def driver_section(args, tmp: Path) -> None:
    bucket = new_bucket("scale-driver")
    inputs = upload(demo_dump(tmp / "driver-in", args.driver_samples, args.per_tar), bucket, "in")
    seconds, p, manifest = run_job(glip_config(args), [inputs], f"s3://{bucket}/out")
    before, after = p.rows_bytes / p.done, p.received_bytes / p.done
    print(f"\n[driver] {p.done} samples in {p.units} units of <= {args.shard_size}, S3 in and out, embedded Ray "
          f"({seconds:.1f} s; ok/rejected/failed {p.ok}/{p.rejected}/{p.failed})")
    print(f"{'bytes the driver receives per sample':<48}{'B/sample':>10}")
    print(f"{'  before: the unit rows (driver-side writer)':<48}{before:>10.0f}")
    print(f"{'  after: the unit reports (writes on the workers)':<48}{after:>10.1f}")
    print(f"after / before {after / before:.5f} ({before / after:.0f}x less); after < 1 KB/sample: "
          f"{'yes' if after < 1024 else 'NO'}; per unit {p.received_bytes / p.units:.0f} B")
    print(f"units written per node: {node_line(p.nodes)} (one embedded node)")


# --- planning -----------------------------------------------------------------------------------------------


def fresh_listing(uri: str) -> None:
    """Drop the process's cached listings of `uri`'s filesystem, so each timing lists and opens afresh."""
    from engine.io.storage import filesystem

    fs, _ = filesystem(uri)
    fs.invalidate_cache()


def plan_serial(uri: str) -> tuple[float, int]:
    """The old planner: list, then count every tar by its member headers, one file after another."""
    from engine.io.inputs import expand_inputs
    from engine.io.readers import count_samples

    fresh_listing(uri)
    start = time.perf_counter()
    samples = sum(count_samples(kind, path) for kind, path in expand_inputs([uri]))
    return time.perf_counter() - start, samples


def plan_new(uri: str, shard_size: int, map_fn) -> tuple[float, int]:
    """`make_plan` as the run calls it (metadata in threads here, the rest in Ray tasks through `map_fn`)."""
    from engine.io.plan import make_plan

    fresh_listing(uri)
    start = time.perf_counter()
    plan = make_plan([uri], shard_size=shard_size, map_fn=map_fn)
    return time.perf_counter() - start, plan.samples


PLAN_ROWS = ("serial: tar headers, one file after another", "new, img2dataset stats",
             "new, no stats: Ray tasks, first (workers start)", "new, no stats: Ray tasks, again (warm)")


def plan_section(args, tmp: Path) -> None:
    import ray

    from engine.runner.session import _ray_init, _ray_map, worker_allocator

    start = time.perf_counter()
    samples = img2dataset_dump(tmp / "plan" / "stats", args.files)
    without_stats(tmp / "plan" / "stats", tmp / "plan" / "nostats")
    made = time.perf_counter() - start
    bucket = new_bucket("scale-plan")
    start = time.perf_counter()
    where = {"local": {k: str(tmp / "plan" / k) for k in ("stats", "nostats")},
             "S3": {k: upload(tmp / "plan" / k, bucket, k) for k in ("stats", "nostats")}}
    uploaded = time.perf_counter() - start
    # What one request to the S3 server costs, for reading the S3 column: the old planner sends two requests a
    # file (HEAD + GET of the tar in one block), the stats lookup one (GET of the stats file)
    fs, probes = s3_fs(), [f"{bucket}/stats/{i:05d}_stats.json" for i in range(min(args.files, 200))]
    fs.cat_file(probes[0])  # the client's set-up (credentials, connection) is not a request's cost
    start = time.perf_counter()
    for path in probes:
        fs.cat_file(path)
    request_ms = (time.perf_counter() - start) / len(probes) * 1e3

    config = glip_config(args)
    map_fn = _ray_map(config, lambda: None)
    seconds: dict[str, dict[str, float]] = {row: {} for row in PLAN_ROWS}
    for side, uris in where.items():
        # a fresh Ray session per side, started before the clock as a run starts it before it plans: the first
        # count by Ray tasks starts the worker processes (and their imports of the filesystem's library), as in
        # a run; the second finds them warm
        _ray_init(config, None, worker_allocator(config))
        try:
            cpus = ray.cluster_resources().get("CPU", 0)
            for row, (took, got) in zip(PLAN_ROWS, (
                plan_serial(uris["stats"]),
                plan_new(uris["stats"], args.shard_size, map_fn),
                plan_new(uris["nostats"], args.shard_size, map_fn),
                plan_new(uris["nostats"], args.shard_size, map_fn),
            )):
                if got != samples:
                    raise SystemExit(f"{row} on {side} planned {got} samples of {samples}")
                seconds[row][side] = took
        finally:
            ray.shutdown()
    print(f"\n[plan] {args.files} tars, {samples} samples (+ a _stats.json and a .parquet each; made in {made:.1f} s, "
          f"both copies uploaded in {uploaded:.1f} s); embedded Ray with {cpus:g} logical CPUs started before the "
          f"clock, counting tasks of 1 CPU, {2 * cpus:g} of them; local files in the page cache")
    print(f"the S3 server (moto, one Python process) answers a small GET in {request_ms:.1f} ms, one after another; "
          "the old planner sends 2 requests a file (HEAD + GET), the stats lookup 1 (GET)")
    sides = ("local", "S3")
    print(f"{'seconds':<50}" + "".join(f"{s:>9}" for s in sides))
    for row in PLAN_ROWS:
        print(f"{row:<50}" + "".join(f"{seconds[row][s]:>9.2f}" for s in sides))
    serial = seconds[PLAN_ROWS[0]]
    for row, short in zip(PLAN_ROWS[1:], ("stats", "no stats, first", "no stats, again")):
        print(f"{'serial / new, ' + short:<50}" + "".join(f"{serial[s] / seconds[row][s]:>8.1f}x" for s in sides))


# --- 1 node vs 2 nodes --------------------------------------------------------------------------------------


def nodes_section(args, tmp: Path) -> None:
    bucket = new_bucket("scale-nodes")
    inputs = upload(demo_dump(tmp / "nodes-in", args.nodes_samples, args.per_tar), bucket, "in")
    actors = args.actors
    config = glip_config(args, f"stages.decode.resources.concurrency={actors}",
                         f"stages.extract.resources.concurrency={actors}",
                         f"stages.ground.resources.concurrency={actors}")
    results = []
    for name, workers in (("1 node", [args.cpus]), ("2 nodes", [args.cpus // 2, args.cpus - args.cpus // 2])):
        with local_cluster(workers, args.object_store_mb) as (cluster, labels):
            seconds, p, _ = run_job(config, [inputs], f"s3://{bucket}/out-{len(workers)}", cluster.address)
        results.append((name, workers, seconds, p, labels))
    print(f"\n[nodes] {args.nodes_samples} samples in units of <= {args.shard_size}, S3 in and out; head with 0 CPUs "
          f"+ workers sharing {args.cpus} logical CPUs and {args.object_store_mb} MiB of object store; {actors} read "
          f"tasks, {actors} extract and {actors} ground actors; clusters started before the clock")
    print(f"{'cluster':<10}{'workers':>9}{'seconds':>9}{'samples/s':>11}{'driver B/sample':>17}   "
          "units written per node")
    for name, workers, seconds, p, labels in results:
        print(f"{name:<10}{'+'.join(map(str, workers)):>9}{seconds:>9.1f}{p.done / seconds:>11.1f}"
              f"{p.received_bytes / p.done:>17.1f}   {node_line(p.nodes, labels)}")
    (_, _, one, _, _), (_, _, two, p2, _) = results
    busiest = max(p2.nodes.values()) / p2.units
    print(f"2 nodes / 1 node: wall time {two / one:.2f}x (same cores: overhead, not speed-up); on 2 nodes the busiest "
          f"node wrote {busiest:.0%} of the units")


# --- write throughput ---------------------------------------------------------------------------------------


def _write_task(uri: str, units: list[int], images: list[bytes], start_at: float) -> dict:
    """Ray task: write `units` (each one record per image) to `uri`, starting at wall-clock `start_at` so that
    the tasks of one round start together; records are built before the clock starts."""
    from engine.io.shards import write_unit
    from engine.io.storage import Location
    from engine.records import Record

    location = Location(uri)
    batches = [[Record(key=f"{u:06d}{i:05d}", source="scale", unit=u, position=i, image=image, width=0, height=0,
                       raw_caption="noise", caption="noise", entities=[], boxes=[], status="ok")
                for i, image in enumerate(images)] for u in units]
    while time.time() < start_at:
        time.sleep(0.001)
    started = time.time()
    durations = []
    for unit, records in zip(units, batches):
        t = time.perf_counter()
        write_unit(location, unit, records, lambda unit, keys: keys)
        durations.append(time.perf_counter() - t)
    return {"start": started, "end": time.time(), "durations": durations}


def write_round(task, uri: str, tasks: int, units: int, images_ref) -> dict:
    """`tasks` tasks at once, `units` units each, into `uri`: wall seconds (first start to last end), bytes
    written (what the storage holds afterwards), the seconds of every unit."""
    import ray

    from engine.io.storage import Location

    start_at = time.time() + 0.5  # every task is past its imports by then (the workers are warm)
    results = ray.get([task.remote(uri, list(range(t * units, (t + 1) * units)), images_ref, start_at)
                       for t in range(tasks)])
    location = Location(uri)
    return {"seconds": max(r["end"] for r in results) - min(r["start"] for r in results),
            "bytes": location.fs.du(location.root),
            "durations": [d for r in results for d in r["durations"]]}


def write_section(args, tmp: Path) -> None:
    import ray

    from engine.io.storage import Location

    images = noise_jpegs(args.unit_samples, args.image_kb, 1)
    bucket = new_bucket("scale-write")
    levels = args.write_tasks
    ray.init(address="local", num_cpus=max(levels), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        images_ref = ray.put(images)
        task = ray.remote(num_cpus=1, max_retries=0)(_write_task)
        # warm every worker (imports, s3fs session) with a small unit to each storage before timing
        for uri in (f"s3://{bucket}/warm", str(tmp / "write" / "warm")):
            write_round(task, uri, max(levels), 1, ray.put(images[:2]))
        for storage_name in ("local", "S3"):
            for n in levels:
                uri = str(tmp / "write" / f"{n}") if storage_name == "local" else f"s3://{bucket}/{n}"
                result = write_round(task, uri, n, args.write_units, images_ref)
                rows.append((storage_name, n, result))
                location = Location(uri)
                location.fs.rm(location.root, recursive=True)  # moto holds objects in memory; disk stays tidy
    finally:
        ray.shutdown()
    unit_mb = rows[0][2]["bytes"] / (levels[0] * args.write_units) / 1e6
    print(f"\n[write] units of {args.unit_samples} noise JPEGs of {sum(map(len, images)) / len(images) / 1024:.0f} KB "
          f"({unit_mb:.1f} MB a unit with its index and marker), {args.write_units} units per task, Ray tasks at 1 CPU")
    print(f"{'storage':<8}{'tasks':>6}{'MB':>8}{'seconds':>9}{'MB/s':>8}{'MB/s/task':>11}{'s/unit':>8}")
    base = {n: r for s, n, r in rows if s == "local"}
    for storage_name, n, r in rows:
        mbs = r["bytes"] / 1e6 / r["seconds"]
        print(f"{storage_name:<8}{n:>6}{r['bytes'] / 1e6:>8.0f}{r['seconds']:>9.2f}{mbs:>8.1f}{mbs / n:>11.1f}"
              f"{sum(r['durations']) / len(r['durations']):>8.2f}")
    print("S3 / local, MB/s: " + ", ".join(
        f"{n} task{'s' * (n > 1)} {(r['bytes'] / r['seconds']) / (base[n]['bytes'] / base[n]['seconds']):.2f}x"
        for s, n, r in rows if s == "S3"))


# --- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--cache-dir", help="tiny models' cache (default: a temporary folder; built once)")
    parser.add_argument("--shard-size", type=int, default=50, help="write.shard_size: samples per unit")
    parser.add_argument("--per-tar", type=int, default=100, help="demo samples per input tar (driver, nodes)")
    parser.add_argument("--driver-samples", type=int, default=300)
    parser.add_argument("--files", type=int, default=2000, help="input tars to plan")
    parser.add_argument("--nodes-samples", type=int, default=400)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the cluster's workers, in all")
    parser.add_argument("--actors", type=int, default=2, help="read tasks, extract and ground actors (nodes)")
    parser.add_argument("--object-store-mb", type=int, default=600, help="object store of the workers, in all")
    parser.add_argument("--write-tasks", type=int, nargs="+", default=[1, 2, 4], help="tasks writing at once")
    parser.add_argument("--write-units", type=int, default=3, help="units each write task writes")
    parser.add_argument("--unit-samples", type=int, default=100, help="samples per unit (write)")
    parser.add_argument("--image-kb", type=int, default=100, help="size of each noise JPEG (write)")
    args = parser.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.cpus < 2:
        parser.error("--cpus must be at least 2: the 2-node cluster gets half of them on each worker")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models are built locally; nothing is downloaded
    started = time.perf_counter()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="granucap-scale-")))
        args.cache_dir = args.cache_dir or str(tmp / "cache")
        stack.enter_context(s3_server())
        if {"driver", "nodes"} & set(only):
            # the teacher is built into the cache before anything is timed (as a user's models are downloaded
            # once, not per run)
            from engine.models.loading import resolve_model

            resolve_model("tiny:grounding-dino", cache_dir=args.cache_dir)
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
        print(f"machine: {os.cpu_count()} cores, {memory:.0f} GiB; python {sys.version.split()[0]}; "
              f"sections {', '.join(only)}")
        sections = {"driver": driver_section, "plan": plan_section, "nodes": nodes_section, "write": write_section}
        for name in SECTIONS:
            if name in only:
                sections[name](args, tmp)
    print(f"\nbenchmark wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
