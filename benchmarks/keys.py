"""Keys: the writer's registry of a run's keys (every sample key must be unique within a run, across dumps)
vs the Python set of key strings it replaced. The registry lives in the driver for the whole run, so its
bytes per key decide whether a 50M-sample run fits one machine. Both sides do what the writer does for each
unit: ask which of the unit's keys were used before, then add them. Run by hand:

    python benchmarks/keys.py --keys 2000000
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc

from engine.io.shards import KeyRegistry


def unit_keys(unit: int, size: int) -> list[str]:
    """img2dataset-style keys, as several dumps numbered from zero would give them."""
    return [f"dump{unit % 7:02d}/{unit:06d}{i:04d}" for i in range(size)]


def with_set(units: int, size: int) -> tuple[set[str], int]:
    seen: set[str] = set()
    hits = 0
    for unit in range(units):
        for key in unit_keys(unit, size):
            hits += key in seen
            seen.add(key)
    return seen, hits


def with_registry(units: int, size: int) -> tuple[KeyRegistry, int]:
    registry = KeyRegistry()
    hits = 0
    for unit in range(units):
        digests = registry.digests(unit_keys(unit, size))
        hits += int(registry.contains(digests).sum())
        registry.add(digests)
    return registry, hits


def measure(fn, units: int, size: int) -> tuple[float, int, int, int]:
    """Seconds (a plain run), bytes held at the end (a second run under tracemalloc), hits, keys kept."""
    gc.collect()
    start = time.perf_counter()
    kept, hits = fn(units, size)
    seconds = time.perf_counter() - start
    del kept
    gc.collect()
    tracemalloc.start()
    kept, hits = fn(units, size)
    held, _ = tracemalloc.get_traced_memory()  # while the structure is still alive
    tracemalloc.stop()
    return seconds, held, hits, len(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=2_000_000)
    parser.add_argument("--unit", type=int, default=1000, help="keys per unit (write.shard_size)")
    args = parser.parse_args()
    units = max(1, args.keys // args.unit)
    n = units * args.unit
    # key generation costs the same on both sides; measured alone so it can be taken out
    start = time.perf_counter()
    for unit in range(units):
        unit_keys(unit, args.unit)
    making = time.perf_counter() - start
    rows = []
    for name, fn in (("Python set of str", with_set), ("KeyRegistry", with_registry)):
        seconds, held, hits, kept = measure(fn, units, args.unit)
        if hits or kept != n:
            raise SystemExit(f"{name}: {hits} false hits, {kept} keys kept of {n}")
        rows.append((name, held / n, (seconds - making) / n * 1e6, held / n * 50e6 / 2**30))
    print(f"{n:,} keys in units of {args.unit} (key generation, {making / n * 1e6:.2f} us/key, taken out)")
    print(f"{'':<20}{'bytes/key':>10}{'us/key':>8}{'GiB at 50M':>12}")
    for name, per_key, us, at50m in rows:
        print(f"{name:<20}{per_key:>10.1f}{us:>8.2f}{at50m:>12.2f}")
    (_, set_bytes, set_us, _), (_, reg_bytes, reg_us, _) = rows
    print(f"registry / set: memory {reg_bytes / set_bytes:.3f}x, time {reg_us / set_us:.2f}x")


if __name__ == "__main__":
    main()
