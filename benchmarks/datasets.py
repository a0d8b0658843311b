"""Datasets: the driver's memory over many work units, in one Ray Dataset vs consecutive Datasets (what
`ray.max_samples_per_dataset` does). Ray Data keeps statistics of every block it produced in the driver until
the Dataset ends (ray-project/ray#66016); granucap's operators produce about one block per unit each. The
pipeline here has the runner's shape without its work (unit rows → a generator task per unit → an actor
pool → the driver iterating pyarrow batches), so thousands of units take minutes, not hours. Each side runs in
a fresh process. Run by hand:

    python benchmarks/datasets.py --units 10000 --datasets 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(units: int, datasets: int) -> None:
    import gc

    import pyarrow as pa
    import ray
    import ray.data

    def read_unit(batch: pa.Table):
        for _ in range(batch.num_rows):
            yield pa.table({"key": ["000000000"] * 8, "boxes": [3] * 8})

    class Stage:
        def __call__(self, batch: pa.Table) -> pa.Table:
            return batch

    def one_dataset(n: int) -> int:
        ds = ray.data.from_items([{"unit": i} for i in range(n)], override_num_blocks=n)
        ds = ds.map_batches(read_unit, batch_size=1, batch_format="pyarrow", compute=ray.data.TaskPoolStrategy(size=1))
        ds = ds.map_batches(Stage, batch_size=None, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1))
        return sum(t.num_rows for t in ds.iter_batches(batch_size=None, batch_format="pyarrow"))

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = True
    one_dataset(2)  # Ray Data's own start-up allocations, outside the measurement
    gc.collect()
    base = rss_mib()
    start = time.perf_counter()
    rows, after = 0, []
    for i in range(datasets):
        rows += one_dataset(units // datasets + (i < units % datasets))
        gc.collect()
        after.append(rss_mib() - base)
    seconds = time.perf_counter() - start
    ray.shutdown()
    print(json.dumps({"rows": rows, "growth_mib": after, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=10000)
    parser.add_argument("--datasets", type=int, default=10,
                        help="the consecutive Datasets of the second side")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    sides = {"one Dataset": 1, f"{args.datasets} Datasets": args.datasets}  # label -> Datasets
    results = {}
    for label, datasets in sides.items():
        proc = subprocess.run([sys.executable, __file__, "--child", str(args.units), str(datasets)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        if results[label]["rows"] != 8 * args.units:
            raise SystemExit(f"{label}: {results[label]['rows']} rows, expected {8 * args.units}")
    print(f"{args.units:,} units (one block per unit per operator); driver RSS growth after the run")
    print(f"{'':<28}{'MiB':>8}{'KB/unit':>9}{'seconds':>9}{'ratio':>7}  after each Dataset (MiB)")
    first = results["one Dataset"]
    for label, r in results.items():
        grown = r["growth_mib"][-1]
        steps = " ".join(f"{g:.0f}" for g in r["growth_mib"]) if len(r["growth_mib"]) > 1 else ""
        print(f"{label:<28}{grown:>8.0f}{grown * 1024 / args.units:>9.1f}{r['seconds']:>9.0f}"
              f"{grown / max(first['growth_mib'][-1], 1e-9):>6.2f}x  {steps}")
    print("ratio: driver growth against one Dataset (the runner's default is the last row: "
          "ray.max_samples_per_dataset)")


if __name__ == "__main__":
    main()
