"""The plan: which samples of which input file each work unit (= output shard) holds, saved as OUT/plan.json.

Planning decodes nothing and reads no image data where the dump says how many samples a file holds:
  * img2dataset's `NAME_stats.json` beside `NAME.tar` (its `successes` are the samples in the tar);
  * a parquet file's footer (its row count).
Other files (tars without stats, jsonl captions) are counted by reading them (tar member headers, lines),
in parallel: through `map_fn` (the runner passes one that runs Ray tasks, so on a cluster the reading is
spread over the nodes), else in threads here. Metadata lookups are small reads and run in threads here.

Every file is cut into runs of at most `shard_size` samples; unit `index` is global (0..N-1 in file order)
and is also the output shard number. Same inputs -> same plan. A rerun reuses the saved plan after checking
that the inputs still list the same files.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

from engine.io import storage
from engine.io.inputs import Unit, expand_inputs, source_names, tar_stem
from engine.io.readers import count_parquet, count_samples, read_bytes

log = logging.getLogger(__name__)

PLAN_FORMAT = "granucap-plan/2"
# Small reads (a stats file, a parquet footer) in flight at once; object stores answer each in milliseconds
# but serially 2,000 of them add up
METADATA_THREADS = 32
# Files read at once by one counting task (threads: the reads wait on storage)
READ_THREADS = 8

Options = Mapping[str, Any] | None
Files = list[tuple[str, str]]
Counts = list[tuple[int, str]]
# map_fn(count, files, options): `count(chunk, options)` over chunks of `files`, in parallel, flattened in order
MapFn = Callable[[Callable[[Files, Options], Counts], Files, Options], Counts]


@dataclass(frozen=True, slots=True)
class FileCount:
    """One input file as planned: `how` says where its sample count came from."""

    kind: str
    path: str
    source: str
    samples: int  # -1: unreadable, planned as one placeholder sample that reads as a corrupt_input row
    how: str  # img2dataset_stats | parquet_footer | tar_headers | jsonl_lines | unreadable


@dataclass
class Plan:
    shard_size: int
    inputs: list[str]
    files: list[FileCount]
    units: list[Unit] = field(default_factory=list)
    # the config fingerprint (engine/fingerprint.py) of the run that made the plan; None in older plans
    fingerprint: str | None = None

    @property
    def samples(self) -> int:
        return sum(u.size for u in self.units)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "shard_size": self.shard_size,
            "inputs": list(self.inputs),
            "files": [asdict(f) for f in self.files],
            "units": [asdict(u) for u in self.units],
            "fingerprint": self.fingerprint,
        }

    @classmethod
    def from_json(cls, data: Any) -> "Plan":
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise ValueError(
                f"plan.json is not a {PLAN_FORMAT} plan (written by an older granucap?); use a new output"
            )
        return cls(
            shard_size=int(data["shard_size"]),
            inputs=list(data["inputs"]),
            files=[FileCount(**f) for f in data["files"]],
            units=[Unit(**u) for u in data["units"]],
            fingerprint=data.get("fingerprint"),
        )

    def file_list(self) -> list[tuple[str, str]]:
        return [(f.kind, f.path) for f in self.files]


# --- counting ---------------------------------------------------------------------------------------------


def img2dataset_stats(path: str, options: Options = None) -> int | None:
    """The sample count img2dataset recorded for a tar (`successes` in `NAME_stats.json` beside `NAME.tar`),
    None when there is no such file or it says nothing usable (0 included: then the tar is counted)."""
    stem = tar_stem(path)
    if stem is None:
        return None
    try:
        stats = json.loads(read_bytes(f"{stem}_stats.json", options))
    except (FileNotFoundError, ValueError):
        return None
    n = stats.get("successes") if isinstance(stats, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def metadata_count(kind: str, path: str, options: Options = None) -> tuple[int, str] | None:
    """(samples, how) from what the dump already carries, None when the file must be read to count it."""
    if kind == "webdataset":
        n = img2dataset_stats(path, options)
        return None if n is None else (n, "img2dataset_stats")
    if kind == "parquet":
        n = count_parquet(path, options)
        return (n, "parquet_footer") if n >= 0 else (-1, "unreadable")
    return None


def count_by_reading(files: Sequence[tuple[str, str]], options: Options = None) -> Counts:
    """(samples, how) for files that have no metadata, READ_THREADS at a time (the body of a counting task)."""

    def one(item: tuple[str, str]) -> tuple[int, str]:
        kind, path = item
        n = count_samples(kind, path, options)
        if n < 0:
            return -1, "unreadable"
        return n, "tar_headers" if kind == "webdataset" else "jsonl_lines"

    with ThreadPoolExecutor(max_workers=min(len(files), READ_THREADS) or 1) as pool:
        return list(pool.map(one, files))


def _here(count: Callable[[Files, Options], Counts], files: Files, options: Options) -> Counts:
    return count(files, options)


def count_files(
    files: list[tuple[str, str]], options: Options = None, map_fn: MapFn | None = None
) -> list[tuple[int, str]]:
    """(samples, how) for every (kind, path): metadata first (threads here), the rest read through `map_fn`
    (default: in threads here)."""
    with ThreadPoolExecutor(max_workers=METADATA_THREADS) as pool:
        found = list(pool.map(lambda f: metadata_count(f[0], f[1], options), files))
    rest = [i for i, counted in enumerate(found) if counted is None]
    if rest:
        log.info("counting %d input files by reading them", len(rest))
        counted = (map_fn or _here)(count_by_reading, [files[i] for i in rest], options)
        for i, value in zip(rest, counted):
            found[i] = value
    return found  # type: ignore[return-value]


# --- the plan ---------------------------------------------------------------------------------------------


def cut_units(files: list[FileCount], shard_size: int) -> list[Unit]:
    units: list[Unit] = []
    for f in files:
        n = 1 if f.samples < 0 else f.samples
        if n == 0:
            log.info("%s: no samples", f.path)
        for start in range(0, n, shard_size):
            stop = min(start + shard_size, n)
            # img2dataset's count is the dump's word, not ours: the file's last unit reads on to its end
            to_end = f.how == "img2dataset_stats" and stop == n
            units.append(Unit(len(units), f.kind, f.path, start, stop, f.source, to_end))
    return units


def make_plan(
    inputs: list[str],
    *,
    shard_size: int,
    storage_options: Options = None,
    map_fn: MapFn | None = None,
    files: list[tuple[str, str]] | None = None,
) -> Plan:
    """List and count the inputs and cut them into units of at most `shard_size` samples."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    files = expand_inputs(inputs, storage_options) if files is None else files
    names = source_names([p for _, p in files])
    counts = count_files(files, storage_options, map_fn)
    planned = [FileCount(k, p, names[p], n, how) for (k, p), (n, how) in zip(files, counts)]
    plan = Plan(shard_size=shard_size, inputs=[str(i) for i in inputs], files=planned)
    plan.units = cut_units(planned, shard_size)
    log.info("planned %d units from %d input files", len(plan.units), len(files))
    return plan


def plan_units(inputs: list[str], *, shard_size: int, storage_options: Options = None) -> list[Unit]:
    """The units of `make_plan` (tests, benchmarks, tools that need no saved plan)."""
    return make_plan(inputs, shard_size=shard_size, storage_options=storage_options).units


def load_plan(location: storage.Location) -> Plan | None:
    """The plan saved in a run's output, None when there is none yet."""
    try:
        data = location.read_json("plan.json")
    except FileNotFoundError:
        return None
    return Plan.from_json(data)


def save_plan(location: storage.Location, plan: Plan) -> None:
    location.write_bytes("plan.json", json.dumps(plan.to_json(), indent=1).encode())


__all__ = ["FileCount", "Plan", "count_files", "cut_units", "load_plan", "make_plan", "plan_units", "save_plan"]
