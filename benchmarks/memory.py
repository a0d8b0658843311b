"""Memory: peak resident memory of a whole `granucap run` (driver, Ray daemons, workers) at 1x and 10x the
input size. Streaming means the 10x run should need about the same memory. Besides summed RSS (the issue's
measure) and PSS, it splits PSS into anonymous memory (each process's own heap: what would grow if anything
held samples) and shared memory (pages of Ray's object store that are in use or were touched once: they
stay resident while the store reuses them; how much the run's blocks may use at once is `ray.data_memory_mb`,
shown by `granucap run --dry-run`). Run by hand:

    python benchmarks/memory.py --samples 1000
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _session import allocator_line, run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000,
                        help="samples at 1x (enough for the ground actors to reach their steady heap)")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--breakdown", action="store_true", help="print each process's RSS at the peak")
    parser.add_argument("--set", action="append", default=[], metavar="A.B=C", help="extra config override")
    args = parser.parse_args()
    from engine.demo import write_demo_input

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "cache"
        for factor in (1, args.factor):
            n = args.samples * factor
            write_demo_input(tmp / f"in{factor}", samples=n, per_tar=500, seed=0)
            run = run_cli(["run", "pipelines/smoke.yaml", "-i", str(tmp / f"in{factor}"), "-o", str(tmp / f"out{factor}"),
                           "-q", "--set", f"cache_dir={cache}", "--set", "stages.recaption.backend=passthrough",
                           "--set", "stages.extract.backend=nltk", "--set", "write.shard_size=100",
                           *sum((["--set", o] for o in args.set), [])])
            if run["returncode"] != 0:
                raise SystemExit(run["stderr"][-3000:])
            input_mb = sum(p.stat().st_size for p in (tmp / f"in{factor}").iterdir()) / 2**20
            rows.append((factor, n, input_mb, *(run[f"peak_{k}"] / 2**20 for k in ("rss", "pss", "anon", "shmem")),
                         run["seconds"]))
            if args.breakdown:
                print(f"processes at the peak of the {factor}x run (MiB):")
                for title, rss in sorted(run["at_peak"].items(), key=lambda kv: -kv[1]):
                    print(f"  {rss / 2**20:8.0f}  {title}")
    print(f"{'size':>6}{'samples':>9}{'input MiB':>11}{'peak MiB:':>11}{'RSS':>7}{'PSS':>7}{'anon':>7}{'shmem':>7}"
          f"{'seconds':>9}")
    for factor, n, mb, rss, pss, anon, shmem, sec in rows:
        print(f"{str(factor) + 'x':>6}{n:>9}{mb:>11.1f}{'':>11}{rss:>7.0f}{pss:>7.0f}{anon:>7.0f}{shmem:>7.0f}{sec:>9.1f}")
    print(allocator_line(args.set))
    a, b = rows
    print(f"{args.factor}x / 1x: peak RSS {b[3] / a[3]:.2f}, PSS {b[4] / a[4]:.2f}, anonymous {b[5] / a[5]:.2f}, "
          f"object store pages {b[6] / max(a[6], 1e-9):.2f}  (target <= 1.10; RSS counts shared pages once per "
          "process that maps them, PSS once in all)")


if __name__ == "__main__":
    main()
