"""Overhead: end-to-end wall time of `granucap run` vs the summed compute time of its model stages.

The compute time is each model stage run in one process over the same decoded records, timed around its
calls only (models loaded before the clock starts), with as many torch threads as the stage's Ray worker
gets (Ray sets OMP_NUM_THREADS to the worker's whole CPUs, at least 1); the end-to-end run adds reading,
Arrow batches through Ray, the driver-side writer and Ray's start. Run by hand:

    python benchmarks/overhead.py --samples 2000            # GLIP path on tiny models: nltk + tiny GDINO
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _session import ROOT, run_cli


def stage_compute_seconds(inp: Path, overrides: list[str], batch: int) -> dict[str, float]:
    from engine.config import load_config
    from engine.io.readers import plan_units, read_unit
    from engine.runner import build_stage, stage_names, uses_model

    import torch

    config = load_config(ROOT / "pipelines" / "smoke.yaml", overrides)
    records = [r for u in plan_units([str(inp)], shard_size=10**9) for r in read_unit(u)]
    seconds: dict[str, float] = {}
    for name in stage_names(config):
        torch.set_num_threads(max(1, int(getattr(config.stages, name).resources.num_cpus)))
        stage = build_stage(name, config)
        stage.setup()
        stage._ready = True
        start = time.perf_counter()
        for i in range(0, len(records), batch):
            stage(records[i : i + batch])
        if uses_model(name, config):
            seconds[name] = time.perf_counter() - start
        else:
            seconds[f"{name} (cpu)"] = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=250)
    args = parser.parse_args()
    from engine.demo import write_demo_input

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_demo_input(tmp / "in", samples=args.samples, per_tar=500, seed=0)
        overrides = ["stages.recaption.backend=passthrough", "stages.extract.backend=nltk",
                     f"cache_dir={tmp / 'cache'}", f"write.shard_size={args.shard_size}",
                     "stages.ground.resources.batch_size=8", "stages.decode.resources.batch_size=64"]
        run = run_cli(["run", "pipelines/smoke.yaml", "-i", str(tmp / "in"), "-o", str(tmp / "out"), "-q",
                       *sum((["--set", o] for o in overrides), [])])
        if run["returncode"] != 0:
            raise SystemExit(run["stderr"][-3000:])
        compute = stage_compute_seconds(tmp / "in", overrides, batch=8)
        model = sum(v for k, v in compute.items() if "(cpu)" not in k)
        everything = sum(compute.values())
        counts = json.loads(run["stdout"].strip().splitlines()[-1])
    print(f"samples: {args.samples}  (ok {counts['ok']}, rejected {counts['rejected']}, failed {counts['failed']})")
    print(f"{'what':<44}{'seconds':>10}")
    for name, sec in compute.items():
        print(f"{'  ' + name + ' (in-process compute)':<44}{sec:>10.1f}")
    print(f"{'model stages, summed compute':<44}{model:>10.1f}")
    print(f"{'all stages, summed compute':<44}{everything:>10.1f}")
    print(f"{'granucap run, end to end (incl. Ray start)':<44}{run['seconds']:>10.1f}")
    print(f"overhead vs model compute: {run['seconds'] / model - 1:+.1%}   "
          f"vs all-stage compute: {run['seconds'] / everything - 1:+.1%}   (target <= +10%)")


if __name__ == "__main__":
    main()
