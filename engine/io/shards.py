"""Writing GranuCap shards: one work unit becomes one shard, written once all its samples are there.

The layout (tar, index part, marker per unit) and the rule that a unit is complete exactly when its marker
exists belong to the reading side, engine/io/shard_reader.py, which this module follows. Every file is written
so that no reader sees part of it: locally to a temporary name, fsynced and renamed; on an object store as one
PUT. The marker goes last, so a crash at any point loses only unfinished units, which a rerun redoes,
overwriting whatever a killed writer left of them.

Keys are unique within a run: a unit claims its keys (`KeyClaims`) before it writes them, and a key that
another unit of the run already claimed, or that repeats inside the unit, is written as `KEY-dupN`.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow.parquet as pq

from engine.io.shard_reader import read_index, shard_files, shard_name
from engine.io.storage import Location
from engine.records import Record, merge_meta, to_table

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


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
    fingerprint: str | None = None  # of the config the unit was made with (engine/fingerprint.py)

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
            **({"fingerprint": self.fingerprint} if self.fingerprint else {}),
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

    A Python set of key strings costs ≈ 100 bytes a key (4.6 GiB for a 50M-sample run, all in one process);
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


def _dup_name(key: str, n: int) -> str:
    return f"{key}-dup{n}"


class KeyClaims:
    """The keys of a run: those of complete units (`committed`) and those that units being written have
    claimed. `claim` gives a unit its final keys, `commit` makes them permanent once its marker is written.

    A key that another unit holds, or that repeats inside the unit, becomes `KEY-dupN` with N the first free
    number; which of two units keeps a shared key plain is the one that claimed it first. A unit that claims
    again (its write was retried) gets its earlier claim replaced, not counted against it.
    """

    def __init__(self, committed: KeyRegistry | None = None) -> None:
        self.committed = KeyRegistry() if committed is None else committed
        self._pending: dict[int, list[bytes]] = {}  # unit -> digests it claimed
        self._holder: dict[bytes, int] = {}  # claimed digest -> unit

    def _taken(self, digest: np.ndarray, unit: int) -> bool:
        holder = self._holder.get(digest.tobytes())
        return (holder is not None and holder != unit) or bool(self.committed.contains(digest[None, :])[0])

    def claim(self, unit: int, keys: list[str]) -> list[str]:
        """The keys `unit` writes, one per key asked, in order."""
        self.release(unit)
        digests = KeyRegistry.digests(keys)
        taken = self.committed.contains(digests)
        final: list[str] = []
        used: set[str] = set()
        for key, digest, in_committed in zip(keys, digests, taken):
            holder = self._holder.get(digest.tobytes())
            if in_committed or (holder is not None and holder != unit) or key in used:
                n = 1
                while _dup_name(key, n) in used or self._taken(KeyRegistry.digests([_dup_name(key, n)])[0], unit):
                    n += 1
                key = _dup_name(key, n)
            used.add(key)
            final.append(key)
        claimed = [d.tobytes() for d in KeyRegistry.digests(final)]
        self._pending[unit] = claimed
        for d in claimed:
            self._holder[d] = unit
        return final

    def release(self, unit: int) -> None:
        """Forget what `unit` claimed and did not commit."""
        for d in self._pending.pop(unit, []):
            if self._holder.get(d) == unit:
                del self._holder[d]

    def commit(self, unit: int) -> None:
        """`unit`'s marker is written: its keys are the run's for good."""
        claimed = self._pending.pop(unit, [])
        for d in claimed:
            self._holder.pop(d, None)
        if claimed:
            self.committed.add(np.frombuffer(b"".join(claimed), dtype=np.uint64).reshape(-1, 2))

    def __len__(self) -> int:
        return len(self.committed) + len(self._holder)


Claim = Callable[[int, list[str]], list[str]]


def tar_stems(records: list[Record]) -> list[str | None]:
    """The member stem each record of a unit (in position order) has in its shard; None for samples that are
    not ok, which the shard does not hold."""
    stems: list[str | None] = []
    seen: set[str] = set()
    for record in records:
        if not record.ok:
            stems.append(None)
            continue
        stem = tar_key(record.key)
        if stem in seen:  # two keys that sanitise alike: keep both, the position tells them apart
            stem = f"{stem}_{record.position}"
        seen.add(stem)
        stems.append(stem)
    return stems


def encode_unit(unit: int, records: list[Record], claim: Claim) -> tuple[bytes, bytes, UnitStats]:
    """The shard tar and index part of a complete unit (positions 0..n-1 once each), keys as `claim` gives
    them (renamed ones keep the original in `meta.duplicate_of_key`)."""
    records = sorted(records, key=lambda r: r.position)
    positions = [r.position for r in records]
    if positions != list(range(len(records))):
        raise ValueError(f"unit {unit}: positions are not 0..{len(records) - 1} once each: {positions[:10]}...")
    for record, key in zip(records, claim(unit, [r.key for r in records])):
        if key != record.key:
            record.meta = merge_meta(record.meta, {"duplicate_of_key": record.key})
            record.key = key
    stats = UnitStats(unit=unit)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for record, stem in zip(records, tar_stems(records)):
            stats.add(record)
            if stem is None:
                continue
            for ext, data in (
                ("jpg", record.image or b""),
                ("json", json.dumps(sample_json(record), ensure_ascii=False).encode("utf-8")),
            ):
                info = tarfile.TarInfo(f"{stem}.{ext}")
                info.size = len(data)
                info.mtime = 0  # reproducible bytes: same records, same tar
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    sink = io.BytesIO()
    pq.write_table(to_table(records, with_image=False), sink, compression="zstd")
    return buffer.getvalue(), sink.getvalue(), stats


def write_unit(
    location: Location, unit: int, records: list[Record], claim: Claim, written_by: str | None = None,
    fingerprint: str | None = None,
) -> UnitStats:
    """Write a complete unit's shard, then its index part, then its marker (which names `written_by`, the
    Ray node that wrote it, and `fingerprint`, the config fingerprint it was made with, when given)."""
    tar_bytes, index_bytes, stats = encode_unit(unit, records, claim)
    stats.fingerprint = fingerprint
    tar_path, index_path, marker = shard_files(unit)
    location.write_bytes(tar_path, tar_bytes)
    location.write_bytes(index_path, index_bytes)
    payload = stats.to_json() | {"written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if written_by:
        payload["written_by"] = written_by
    location.write_bytes(marker, json.dumps(payload, indent=1).encode())
    log.info("wrote shard %s: %d ok, %d rejected, %d failed", shard_name(unit), stats.ok, stats.rejected,
             stats.failed)
    return stats


class ShardWriter:
    """Writes a run's shards from records that arrive in any grouping, in one process: collects them per
    unit and writes a unit as soon as all of its samples are there (tools and tests; a run writes on its
    Ray workers, a unit at a time)."""

    name = "write"

    def __init__(
        self,
        output: str | Path | Location,
        *,
        expected: dict[int, int],
        seen_keys: KeyRegistry | None = None,
        fingerprint: str | None = None,
    ) -> None:
        self.location = output if isinstance(output, Location) else Location(output)
        self.claims = KeyClaims(seen_keys)
        self.expected = dict(expected)  # unit -> number of samples it must receive
        self.pending: dict[int, list[Record]] = {}
        self.fingerprint = fingerprint  # of the config the records were made with, for the markers

    def __call__(self, records: list[Record]) -> list[UnitStats]:
        """Add records; returns the stats of the units this call completed (and wrote)."""
        done = []
        for record in records:
            if record.unit not in self.expected:
                raise ValueError(f"record {record.key!r} belongs to unit {record.unit}, which is not planned")
            bucket = self.pending.setdefault(record.unit, [])
            bucket.append(record)
            if len(bucket) == self.expected[record.unit]:
                done.append(write_unit(self.location, record.unit, self.pending.pop(record.unit), self._claim,
                                       fingerprint=self.fingerprint))
        return done

    def _claim(self, unit: int, keys: list[str]) -> list[str]:
        final = self.claims.claim(unit, keys)
        self.claims.commit(unit)
        return final

    def incomplete(self) -> dict[int, int]:
        """Units that received some but not all of their samples: unit -> samples received."""
        return {unit: len(rows) for unit, rows in self.pending.items()}


def completed_keys(run: str | Path | Location, units: list[int], threads: int = 16) -> KeyRegistry:
    """Keys written by complete units (read from their index parts, key column only)."""
    location = run if isinstance(run, Location) else Location(run)

    def keys_of(unit: int) -> list[str]:
        return read_index(location, unit, columns=["key"]).column("key").to_pylist()

    registry = KeyRegistry()
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(units)))) as pool:
        for keys in pool.map(keys_of, units):
            registry.add(keys)
    return registry


def clean_temporaries(run: str | Path | Location) -> int:
    """Delete partial files a killed local write left behind (object stores leave none); returns how many."""
    return (run if isinstance(run, Location) else Location(run)).clean_temporaries()
