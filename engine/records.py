"""The one record every stage reads and fills: one row per image-text pair, Arrow-friendly.

Every field is born here. Nested values are plain dicts/lists (lists of structs in Arrow), never pickled
objects, so a batch round-trips through `pyarrow.Table.from_pylist(..., schema=SCHEMA)` unchanged.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

Status = Literal["ok", "rejected", "failed"]
STATUSES: tuple[str, ...] = ("ok", "rejected", "failed")

# Entity: one object mention, DetCLIPv3 style.
ENTITY_TYPE = pa.struct(
    [("phrase", pa.string()), ("category", pa.string()), ("parent_category", pa.string())]
)
# Box: pixel xyxy in the decoded image, teacher score, index into `entities`, and what matched:
# 'phrase' | 'category' (text prompts, DetCLIPv3 rule) or 'exemplar' (a visual exemplar of the category).
BOX_TYPE = pa.struct(
    [
        ("xyxy", pa.list_(pa.float64(), 4)),
        ("score", pa.float64()),
        ("entity", pa.int32()),
        ("matched", pa.string()),
        ("teacher", pa.string()),
        # The describe stage: does the VLM's name for the box's crop agree with the entity (null: not asked,
        # a generic prompt's box it relabelled, or no valid answer), and that name, "phrase|category|parent".
        ("label_agreement", pa.bool_()),
        ("described", pa.string()),
    ]
)
ERROR_TYPE = pa.struct([("stage", pa.string()), ("kind", pa.string()), ("message", pa.string())])
# Provenance: one entry per stage that touched the sample.
PROVENANCE_TYPE = pa.struct(
    [
        ("stage", pa.string()),
        ("backend", pa.string()),
        ("model", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt_sha256", pa.string()),
        ("params", pa.string()),  # JSON of the thresholds/sampling settings used
    ]
)

SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # key in its source (wds __key__, parquet key, file stem) or source+position
        ("source", pa.string()),  # input file the sample came from
        ("unit", pa.int64()),  # work unit (= output shard number) the sample belongs to
        ("position", pa.int64()),  # position of the sample inside its unit, 0-based
        ("image", pa.binary()),  # encoded image bytes (dropped from the parquet index)
        ("width", pa.int32()),  # decoded width in pixels, after EXIF rotation and resizing
        ("height", pa.int32()),  # decoded height in pixels
        ("raw_caption", pa.string()),  # the caption as found in the input
        ("caption", pa.string()),  # recaptioned detailed description (or the raw one, passthrough)
        ("factual_caption", pa.string()),  # the factual, directly observable part of `caption`
        ("entities", pa.list_(ENTITY_TYPE)),  # {phrase, category, parent_category}
        ("boxes", pa.list_(BOX_TYPE)),  # teacher boxes assigned to entities
        # with stages.ground.keep_candidates: every entity box over that floor, before thresholds and filter
        ("candidates", pa.list_(BOX_TYPE)),
        ("status", pa.string()),  # ok | rejected | failed
        ("error", ERROR_TYPE),  # why the sample is not ok: {stage, kind, message}
        ("provenance", pa.list_(PROVENANCE_TYPE)),  # per stage: backend, model, prompt id + sha256, params
        ("meta", pa.string()),  # JSON object for one-off data (source extras such as url)
    ]
)
INDEX_SCHEMA = pa.schema([f for f in SCHEMA if f.name != "image"])
FIELDS: tuple[str, ...] = tuple(SCHEMA.names)


@dataclass(slots=True)
class Record:
    """One image-text pair on its way through the pipeline."""

    key: str
    source: str
    unit: int = 0
    position: int = 0
    image: bytes | None = None
    width: int | None = None
    height: int | None = None
    raw_caption: str | None = None
    caption: str | None = None
    factual_caption: str | None = None
    entities: list[dict[str, str]] = field(default_factory=list)
    boxes: list[dict[str, Any]] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ok"
    error: dict[str, str] | None = None
    provenance: list[dict[str, str | None]] = field(default_factory=list)
    meta: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def reject(self, stage: str, kind: str, message: str) -> None:
        """Mark as rejected: the input or the model output does not qualify (bad image, no entities...)."""
        self._set_error("rejected", stage, kind, message)

    def fail(self, stage: str, kind: str, message: str) -> None:
        """Mark as failed: something went wrong processing a valid sample (exception, backend error)."""
        self._set_error("failed", stage, kind, message)

    def _set_error(self, status: str, stage: str, kind: str, message: str) -> None:
        self.status = status
        self.error = {"stage": stage, "kind": kind, "message": message[:2000]}

    def stamp(
        self,
        stage: str,
        backend: str,
        model: str | None = None,
        prompt_id: str | None = None,
        prompt_sha256: str | None = None,
        params: str | None = None,
    ) -> None:
        """Record which backend/model/prompt produced this stage's fields."""
        self.provenance.append(
            {
                "stage": stage,
                "backend": backend,
                "model": model,
                "prompt_id": prompt_id,
                "prompt_sha256": prompt_sha256,
                "params": params,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in FIELDS}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Record":
        values = {f: row[f] for f in FIELDS if f in row and row[f] is not None}
        for name in ("entities", "boxes", "candidates", "provenance"):
            values[name] = [dict(x) for x in values.get(name, [])]
        for name in ("boxes", "candidates"):
            for box in values[name]:
                box["xyxy"] = [float(v) for v in box["xyxy"]]
        if "error" in values:
            values["error"] = dict(values["error"])
        return cls(**values)

    def copy(self) -> "Record":
        return dataclasses.replace(
            self,
            entities=[dict(e) for e in self.entities],
            boxes=[dict(b) for b in self.boxes],
            candidates=[dict(b) for b in self.candidates],
            provenance=[dict(p) for p in self.provenance],
            error=dict(self.error) if self.error else None,
        )


def merge_meta(meta: str | None, updates: dict[str, Any]) -> str | None:
    """Merge keys into a record's JSON meta; a non-object meta is kept under "meta_raw"."""
    if not updates:
        return meta
    base: dict[str, Any] = {}
    if meta:
        try:
            loaded = json.loads(meta)
        except ValueError:
            loaded = meta
        base = loaded if isinstance(loaded, dict) else {"meta_raw": loaded}
    base.update(updates)
    return json.dumps(base, ensure_ascii=False, sort_keys=True, default=str)


def to_table(records: list[Record], *, with_image: bool = True) -> pa.Table:
    """Records -> Arrow table with the canonical schema (`with_image=False`: the index schema)."""
    schema = SCHEMA if with_image else INDEX_SCHEMA
    rows = [r.to_dict() for r in records]
    if not with_image:
        for row in rows:
            row.pop("image")
    return pa.Table.from_pylist(rows, schema=schema)


def from_table(table: pa.Table) -> list[Record]:
    """Arrow table (any column subset of SCHEMA) -> records."""
    return [Record.from_dict(row) for row in table.to_pylist()]
