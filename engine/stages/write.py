"""Write: GranuCap shards. One work unit becomes one shard, written only once all its samples arrived.

    OUT/shards/{n:06d}.tar          webdataset: KEY.jpg + KEY.json (the record without image bytes), ok only
    OUT/index/{n:06d}.parquet       every sample of the unit, rejected and failed ones too
    OUT/shards/{n:06d}.stats.json   counts of the unit; written last, so it marks the shard complete

Every file goes to a temporary name, is fsynced and renamed. A rerun deletes leftover temporaries and skips
units whose stats file exists, so a crash at any point loses only unfinished units, which are redone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow.parquet as pq

from engine.atomic import TMP_MARK, atomic_write_bytes
from engine.records import Record, to_table
from engine.stages.decode import merge_meta

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def shard_name(unit: int) -> str:
    return f"{unit:06d}"


def tar_key(key: str) -> str:
    """A webdataset-safe member stem: webdataset splits names at the first dot, so dots and slashes go."""
    return _UNSAFE.sub("_", key) or "_"


def sample_json(record: Record) -> dict[str, Any]:
    """What goes into KEY.json: the whole record but the image bytes."""
    row = record.to_dict()
    row.pop("image")
    return row


@dataclass(slots=True)
class UnitStats:
    unit: int
    read: int = 0
    ok: int = 0
    rejected: int = 0
    failed: int = 0
    boxes: int = 0
    entities: int = 0
    reasons: Counter = field(default_factory=Counter)  # "stage/kind" -> count, for rejected and failed
    usage: dict[str, Counter] = field(default_factory=dict)  # stage -> requests/tokens, every status

    def add(self, record: Record) -> None:
        self.read += 1
        for entry in record.provenance:
            spent = _usage(entry.get("params"))
            if spent:
                self.usage.setdefault(str(entry.get("stage")), Counter()).update(spent)
        setattr(self, record.status, getattr(self, record.status) + 1)
        if record.ok:
            self.boxes += len(record.boxes)
            self.entities += len(record.entities)
        elif record.error:
            self.reasons[f"{record.error['stage']}/{record.error['kind']}"] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "read": self.read,
            "ok": self.ok,
            "rejected": self.rejected,
            "failed": self.failed,
            "boxes": self.boxes,
            "entities": self.entities,
            "reasons": dict(sorted(self.reasons.items())),
            "usage": {stage: dict(sorted(c.items())) for stage, c in sorted(self.usage.items())},
        }


def _usage(params: str | None) -> dict[str, int]:
    """The `usage` a chat stage stamped into its provenance params (requests, tokens), or {}."""
    if not params or '"usage"' not in params:
        return {}
    try:
        usage = json.loads(params).get("usage")
    except (ValueError, AttributeError):
        return {}
    if not isinstance(usage, dict):
        return {}
    return {k: v for k, v in usage.items() if isinstance(v, int) and not isinstance(v, bool)}


class KeyRegistry:
    """The keys a run has used, kept as 128-bit BLAKE2b digests in sorted numpy arrays.

    A Python set of key strings costs ≈ 100 bytes a key (4.6 GiB for a 50M-sample run, all in the driver);
    this costs 16, looked up a unit at a time with `np.searchsorted`. A digest is two uint64 words: runs are
    sorted by the first and searched on it, the second confirms a hit (a first word shared by two digests
    is checked exhaustively). The runs form a log-structured merge: each `add` appends a sorted run, and a
    run is merged into the one before it while that one is at most twice its size, so each key is copied
    O(log n) times and a lookup searches O(log n) runs. Two different keys share a digest with probability
    ≈ n² / 2^129 (≈ 10^-23 at 50M keys); such a pair would only get a `-dupN` name, never lose a sample.
    """

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (first words sorted, second words)
        self.add(keys)

    @staticmethod
    def digests(keys: Iterable[str]) -> np.ndarray:
        """An (n, 2) uint64 array: each key's 16-byte BLAKE2b digest."""
        joined = b"".join(hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=16).digest() for k in keys)
        return np.frombuffer(joined, dtype=np.uint64).reshape(-1, 2)

    def __len__(self) -> int:
        return sum(len(first) for first, _ in self._runs)

    @property
    def nbytes(self) -> int:
        return sum(first.nbytes + second.nbytes for first, second in self._runs)

    def contains(self, keys: list[str] | np.ndarray) -> np.ndarray:
        """One bool per key (strings, or their `digests`): was it added before?"""
        wanted = keys if isinstance(keys, np.ndarray) else self.digests(keys)
        found = np.zeros(len(wanted), dtype=bool)
        for first, second in self._runs:
            lo = np.searchsorted(first, wanted[:, 0])
            at = np.minimum(lo, len(first) - 1)
            same_first = first[at] == wanted[:, 0]
            found |= same_first & (second[at] == wanted[:, 1])
            # A first word that several digests share: the hit may sit further along its run of equals.
            for i in np.flatnonzero(same_first & ~found):
                hi = np.searchsorted(first, wanted[i, 0], side="right")
                found[i] = bool((second[lo[i] : hi] == wanted[i, 1]).any())
        return found

    def __contains__(self, key: str) -> bool:
        return bool(self.contains([key])[0])

    def add(self, keys: Iterable[str] | np.ndarray) -> None:
        """Add keys (strings, or their `digests`); adding one twice is harmless, lookups only ask whether
        a digest is there."""
        digests = keys if isinstance(keys, np.ndarray) else self.digests(keys)
        if not len(digests):
            return
        order = np.argsort(digests[:, 0], kind="stable")
        self._runs.append((digests[order, 0].copy(), digests[order, 1].copy()))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            first, second = self._runs.pop()
            into_first, into_second = self._runs[-1]
            at = np.searchsorted(into_first, first)
            self._runs[-1] = (np.insert(into_first, at, first), np.insert(into_second, at, second))


class ShardWriter:
    """Collects records per unit and writes a unit's shard, index part and stats once it is complete."""

    name = "write"

    def __init__(
        self, output: str | Path, *, expected: dict[int, int], seen_keys: KeyRegistry | None = None
    ) -> None:
        self.output = Path(output)
        # Keys already used in this run (completed units included): keys must be unique within a run.
        self.seen_keys = KeyRegistry() if seen_keys is None else seen_keys
        self.shards = self.output / "shards"
        self.index = self.output / "index"
        self.expected = dict(expected)  # unit -> number of samples it must receive
        self.pending: dict[int, list[Record]] = {}
        self.written: list[UnitStats] = []
        self.shards.mkdir(parents=True, exist_ok=True)
        self.index.mkdir(parents=True, exist_ok=True)

    def __call__(self, records: list[Record]) -> list[UnitStats]:
        """Add records; returns the stats of the units this call completed (and wrote)."""
        done = []
        for record in records:
            if record.unit not in self.expected:
                raise ValueError(f"record {record.key!r} belongs to unit {record.unit}, which is not planned")
            bucket = self.pending.setdefault(record.unit, [])
            bucket.append(record)
            if len(bucket) == self.expected[record.unit]:
                done.append(self.write_unit(record.unit, self.pending.pop(record.unit)))
        return done

    def _unique_keys(self, records: list[Record]) -> None:
        """A key seen before in this run (e.g. two dumps that both number from 000000000) is renamed
        `KEY-dupN`, N the first free number, so no sample is dropped; meta keeps the original key. Units
        arrive in plan order, so the renaming is the same on every run. The registry is asked once per unit;
        only keys it already holds, or that repeat inside the unit, take the slow path."""
        digests = self.seen_keys.digests([r.key for r in records])
        before = self.seen_keys.contains(digests)
        used: set[str] = set()  # keys given out in this unit, renamed ones included
        renamed = False
        for record, seen in zip(records, before):
            if seen or record.key in used:
                n = 1
                while f"{record.key}-dup{n}" in used or f"{record.key}-dup{n}" in self.seen_keys:
                    n += 1
                record.meta = merge_meta(record.meta, {"duplicate_of_key": record.key})
                record.key = f"{record.key}-dup{n}"
                renamed = True
            used.add(record.key)
        self.seen_keys.add(self.seen_keys.digests(used) if renamed else digests)

    def incomplete(self) -> dict[int, int]:
        """Units that received some but not all of their samples: unit -> samples received."""
        return {unit: len(rows) for unit, rows in self.pending.items()}

    def write_unit(self, unit: int, records: list[Record]) -> UnitStats:
        records = sorted(records, key=lambda r: r.position)
        positions = [r.position for r in records]
        if positions != list(range(len(records))):
            raise ValueError(f"unit {unit}: positions are not 0..{len(records) - 1} once each: {positions[:10]}...")
        self._unique_keys(records)
        name = shard_name(unit)
        stats = UnitStats(unit=unit)
        buffer = io.BytesIO()
        seen: set[str] = set()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for record in records:
                stats.add(record)
                if not record.ok:
                    continue
                stem = tar_key(record.key)
                if stem in seen:  # two keys that sanitise alike: keep both, the position tells them apart
                    stem = f"{stem}_{record.position}"
                seen.add(stem)
                for ext, data in (
                    ("jpg", record.image or b""),
                    ("json", json.dumps(sample_json(record), ensure_ascii=False).encode("utf-8")),
                ):
                    info = tarfile.TarInfo(f"{stem}.{ext}")
                    info.size = len(data)
                    info.mtime = 0  # reproducible bytes: same records, same tar
                    info.mode = 0o644
                    tar.addfile(info, io.BytesIO(data))
        atomic_write_bytes(self.shards / f"{name}.tar", buffer.getvalue())
        sink = io.BytesIO()
        pq.write_table(to_table(records, with_image=False), sink, compression="zstd")
        atomic_write_bytes(self.index / f"{name}.parquet", sink.getvalue())
        payload = stats.to_json() | {"written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_bytes(self.shards / f"{name}.stats.json", json.dumps(payload, indent=1).encode())
        log.info("wrote shard %s: %d ok, %d rejected, %d failed", name, stats.ok, stats.rejected, stats.failed)
        self.written.append(stats)
        return stats


def clean_temporaries(output: str | Path) -> int:
    """Delete partial files a killed run left behind; returns how many."""
    removed = 0
    for folder in (Path(output) / "shards", Path(output) / "index", Path(output)):
        if folder.is_dir():
            for path in folder.iterdir():
                if TMP_MARK in path.name and path.is_file():
                    path.unlink()
                    removed += 1
    return removed


def completed_keys(output: str | Path, units: list[int]) -> KeyRegistry:
    """Keys written by completed units (read from their index parts, key column only)."""
    keys = KeyRegistry()
    for unit in units:
        path = Path(output) / "index" / f"{shard_name(unit)}.parquet"
        keys.add(pq.read_table(path, columns=["key"]).column("key").to_pylist())
    return keys


def completed_units(output: str | Path) -> dict[int, dict[str, Any]]:
    """Units whose stats marker exists (their shard and index part are complete): unit -> stats."""
    done = {}
    shards = Path(output) / "shards"
    if shards.is_dir():
        for path in sorted(shards.glob("*.stats.json")):
            stats = json.loads(path.read_text())
            done[int(stats["unit"])] = stats
    return done
