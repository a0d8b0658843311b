"""Allocator: the ground stage's own memory and time in one process under glibc's malloc, tcmalloc and jemalloc.

The teacher's batches differ in shape (image sizes, prompt lengths), and what an allocator keeps of their freed
memory is what a ground actor's heap grows by. Each allocator runs the same records through the ground stage
(tiny Grounding DINO, one torch thread, like an actor given one CPU) in a fresh process started with it
preloaded; the process's anonymous memory (RssAnon) is sampled every `--every` batches. The records are
decoded and their entities extracted before the clock starts. Allocators not installed are left out.
Run by hand:

    python benchmarks/allocator.py --samples 3072
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _session import ROOT

MEASURE = "--measure"


def anon_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def measure(inp: Path, cache: Path, samples: int, batch: int, every: int) -> dict:
    """In the child process: ground `samples` records `batch` at a time; anonymous MiB over time, seconds."""
    import torch

    from engine.config import load_config
    from engine.io.plan import plan_units
    from engine.io.readers import read_unit
    from engine.runner import build_stage

    torch.set_num_threads(1)
    config = load_config(ROOT / "pipelines" / "smoke.yaml", ["stages.recaption.backend=passthrough",
                                                             "stages.extract.backend=nltk", f"cache_dir={cache}"])
    records = [r for u in plan_units([str(inp)], shard_size=10**9) for r in read_unit(u)][:samples]
    for name in ("decode", "recaption", "extract"):
        stage = build_stage(name, config)
        stage.setup()
        records = stage(records)
    ground = build_stage("ground", config)
    ground.setup()
    timeline = [anon_mib()]
    start = time.perf_counter()
    for n, i in enumerate(range(0, len(records), batch)):
        ground(records[i:i + batch])
        if n % every == every - 1:
            timeline.append(anon_mib())
    seconds = time.perf_counter() - start
    timeline.append(anon_mib())
    return {"seconds": seconds, "timeline": timeline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3072)
    parser.add_argument("--batch", type=int, default=16, help="records per call of the stage")
    parser.add_argument("--every", type=int, default=24, help="sample the memory every this many calls")
    parser.add_argument(MEASURE, nargs=2, metavar=("INPUT", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        result = measure(Path(args.measure[0]), Path(args.measure[1]), args.samples, args.batch, args.every)
        sys.stdout.write(json.dumps(result) + "\n")
        return

    from engine.allocator import ALLOCATORS, find_library
    from engine.demo import write_demo_input

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        inp, cache = Path(tmp) / "in", Path(tmp) / "cache"
        write_demo_input(inp, samples=args.samples, per_tar=500, seed=0)
        for name in ("glibc", *ALLOCATORS):
            library = None if name == "glibc" else find_library(name)
            if name != "glibc" and library is None:
                rows.append((name, None, None))
                continue
            env = dict(os.environ, HF_HUB_OFFLINE="1")
            env.pop("LD_PRELOAD", None)
            if library:
                env["LD_PRELOAD"] = str(library)
            child = subprocess.run(
                [sys.executable, __file__, "--samples", str(args.samples), "--batch", str(args.batch),
                 "--every", str(args.every), MEASURE, str(inp), str(cache)],
                env=env, capture_output=True, text=True, check=False, cwd=ROOT)
            if child.returncode != 0:
                raise SystemExit(f"{name}: {child.stderr[-3000:]}")
            rows.append((name, library, json.loads(child.stdout.strip().splitlines()[-1])))

    base = rows[0][2]
    print(f"ground stage, {args.samples} samples, {args.batch} per call, one torch thread; anonymous memory "
          f"(MiB) before the first batch, then every {args.every} calls")
    print(f"{'allocator':<10}{'seconds':>9}{'x glibc':>9}{'start':>7}{'first':>7}{'end':>7}{'growth':>8}"
          f"{'after first':>13}{'x glibc':>9}")
    for name, library, result in rows:
        if result is None:
            print(f"{name:<10}  not installed ({ALLOCATORS[name][1]})")
            continue
        t = result["timeline"]
        print(f"{name:<10}{result['seconds']:>9.1f}{result['seconds'] / base['seconds']:>9.2f}{t[0]:>7}{t[1]:>7}"
              f"{t[-1]:>7}{t[-1] - t[0]:>+8}{t[-1] - t[1]:>+13}"
              f"{(t[-1] - t[1]) / max(base['timeline'][-1] - base['timeline'][1], 1):>9.2f}")
        print(f"{'':<10}  timeline: {' '.join(map(str, t))}")
    print(f"growth: end - start; first: after the first {args.every} calls; after first: end - first (what the heap "
          "still adds once warm)")


if __name__ == "__main__":
    main()
