"""What the box exporters share: streaming a run's samples, image file names, the category vocabulary,
and a sample's boxes clipped to its image (`engine.boxes.Boxes`).

File names come from sample keys, and keys that differ only in case (`Cat_1`, `cat_1`) would name one file
on a case-insensitive file system (macOS, Windows), one image silently replacing the other. `UniqueNames`
gives every name that is taken, case aside, a `-N` suffix; each sample's `name` is made unique that way
within its shard's folder, so an image and its label file always share it.

Everything streams: samples come shard by shard through webdataset, the vocabulary is counted from the
parquet index (no image bytes), and a large output file (COCO json, Label Studio tasks) is assembled from
temporary parts, so memory does not grow with the corpus. The run may be local or on any fsspec filesystem;
only its complete units are read (`engine.io.shard_reader.complete_unit_ids`: their marker exists).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from engine.boxes import Boxes
from engine.io.shard_reader import complete_unit_ids, iter_index, open_run, read_shard, shard_name
from engine.io.storage import Location


class UniqueNames:
    """Names that stay distinct where case does not count: a name equal, case aside, to one given before
    comes back as `NAME-2`, `NAME-3`, ... (the first not taken either). The same names asked in the same
    order get the same answers, so an export of the same run names its files the same way every time."""

    def __init__(self) -> None:
        self._taken: set[str] = set()  # case-folded names given so far

    def __call__(self, name: str) -> str:
        unique, n = name, 1
        while unique.casefold() in self._taken:
            n += 1
            unique = f"{name}-{n}"
        self._taken.add(unique.casefold())
        return unique


@dataclass(frozen=True, slots=True)
class Sample:
    """One ok sample of a run as it lies in its shard."""

    shard: str  # shard stem, "000003"
    stem: str  # webdataset key inside the shard (unique within it, case counting)
    record: dict[str, Any]  # KEY.json: the record without image bytes
    jpg: bytes
    name: str = ""  # file stem for exports: `stem`, unique within the shard case aside (iter_samples sets it)

    def image_name(self, ext: str = "jpg") -> str:
        """Relative file name, one folder per shard (keeps folders small and names unique in the run)."""
        return f"{self.shard}/{self.name or self.stem}.{ext}"


def iter_samples(run: str | Path | Location) -> Iterator[Sample]:
    """Every ok sample of the complete units, in unit order, read with webdataset's tar reader."""
    location = open_run(run)
    for unit in complete_unit_ids(location):
        names = UniqueNames()  # one folder per shard: names need only be unique within it
        for item in read_shard(location, unit):
            stem = item["__key__"]
            yield Sample(shard_name(unit), stem, json.loads(item["json"]), item["jpg"], names(stem))


def iter_index_rows(run: str | Path | Location, columns: list[str]) -> Iterator[dict[str, Any]]:
    """The rows of the complete units' index parts, `columns` only, read a batch at a time."""
    location = open_run(run)
    for unit in complete_unit_ids(location):
        for batch in iter_index(location, unit, columns):
            yield from batch.to_pylist()


@dataclass(slots=True)
class Vocabulary:
    """Entity categories that carry at least one box in an ok sample, with ids in name order."""

    names: list[str]  # sorted category names; class index = position
    parents: dict[str, str]  # category -> its most frequent parent_category
    boxes: Counter  # category -> number of boxes

    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def category_vocabulary(run: str | Path | Location) -> Vocabulary:
    """Count categories from the parquet index, batch by batch (no images are read)."""
    boxes: Counter = Counter()
    parent_votes: dict[str, Counter] = {}
    for row in iter_index_rows(run, ["status", "entities", "boxes"]):
        if row["status"] != "ok":
            continue
        entities = row["entities"] or []
        for index in Boxes.from_rows(row["boxes"] or []).entity.tolist():
            entity = entities[index]
            name = entity["category"]
            boxes[name] += 1
            parent_votes.setdefault(name, Counter())[entity.get("parent_category") or ""] += 1
    names = sorted(boxes)
    parents = {n: min(parent_votes[n].items(), key=lambda kv: (-kv[1], kv[0]))[0] for n in names}
    return Vocabulary(names=names, parents=parents, boxes=boxes)


def image_boxes(record: dict[str, Any]) -> tuple[Boxes, np.ndarray]:
    """The record's boxes clipped to its image, less those with nothing of positive area left, and the
    position of each in `record["boxes"]`."""
    boxes = Boxes.from_rows(record["boxes"]).clip(record["width"], record["height"])
    kept = np.flatnonzero(boxes.has_area())
    return boxes.select(kept), kept


def write_image(root: Path, name: str, data: bytes) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


class PartFile:
    """A temporary file next to its target that receives JSON items one by one (comma separated)."""

    def __init__(self, target: Path, part: str) -> None:
        self.path = target.with_name(f".{target.name}.{part}.tmp-{uuid.uuid4().hex[:8]}")
        self.fh: IO[str] = open(self.path, "w", encoding="utf-8")
        self.count = 0

    def add(self, item: Any) -> None:
        self.fh.write(("," if self.count else "") + "\n" + json.dumps(item, ensure_ascii=False))
        self.count += 1

    def close(self) -> None:
        self.fh.close()


def assemble_json(target: Path, head: dict[str, Any], parts: dict[str, PartFile], *, array: str | None = None) -> None:
    """Write `target` as `head` plus one array per part (or, with `array`, the bare array of that part),
    copying the parts' text without loading them; temp name + rename, parts deleted."""
    tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            if array is not None:
                _copy_array(out, parts[array])
            else:
                body = json.dumps(head, ensure_ascii=False, indent=1)[:-1].rstrip()  # drop the closing brace
                out.write(body + ("," if head else ""))
                for i, (name, part) in enumerate(parts.items()):
                    out.write(f'\n "{name}": ')
                    _copy_array(out, part)
                    out.write("," if i < len(parts) - 1 else "\n")
                out.write("}\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    finally:
        for part in parts.values():
            part.path.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)


def _copy_array(out: IO[str], part: PartFile) -> None:
    part.close()
    out.write("[")
    with open(part.path, encoding="utf-8") as fh:
        shutil.copyfileobj(fh, out)
    out.write("\n]")
