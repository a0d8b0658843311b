"""Label quality of a run: its pseudo boxes scored against human boxes (COCO format) for the same images.

`granucap eval --run RUN --coco GT.json` (engine/commands/student.py). The rules, in the order they apply:

Images. A GT image matches the run's sample whose key, `meta.original_key` (webdataset), `meta.file`
(folder input) or the file name in `meta.url`, without its suffix, equals the GT `file_name` without its
suffix, either as a whole path or as its last part (`a/b/0001.jpg` matches key `a/b/0001` or `0001`).
Every GT image that matches is scored, whatever the run did with it: a sample the run rejected or that
failed counts as an image where it found nothing (its GT boxes are misses). GT images the run never read
are counted as `not_in_run` and left out of the scores. Nothing matching is an error, naming examples of
both sides.

Labels. A box is labelled with its entity. It counts for the GT category whose name, normalised (lower
case, spaces collapsed, a leading article dropped, the last word singular), equals, first rule first:
(1) the entity's category; (2) its phrase; (3) with `synonyms` ({GT name: [alias, ...]}), an alias of a GT
category equal to the category or phrase; (4) the nearest WordNet hypernym of the category that is a GT
name ("puppy" counts as "dog" when the GT has dog and no puppy; skipped when WordNet is not installed);
(5) the entity's parent category. A box none of these places is `outside_gt`: counted, not scored (the GT
cannot say whether it is right).

Coordinates. Boxes are in the decoded image's pixels (decode may resize); they are scaled to the GT
image's width and height.

Scores. COCO box AP and AP50 over the matched images (pycocotools / faster-coco-eval, the run's box score
as the detection score), and precision, recall and F1 of the boxes the run kept (its thresholds), at IoU
0.5: boxes in score order take the best unmatched GT box of their category; a box over a crowd region is
neither right nor wrong; GT boxes left are misses. Per category and over all (summed counts).
"""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.boxes import Boxes, iou_matrix
from engine.io.completeness import require_complete
from engine.io.formats.common import sanitize_key
from engine.io.shard_reader import complete_unit_ids, iter_index
from engine.io.storage import Location, basename, parent

IOU = 0.5
COLUMNS = ["key", "width", "height", "status", "entities", "boxes", "meta"]
_ARTICLE = re.compile(r"^(a|an|the)\s+")


class QualityError(ValueError):
    """The run and the GT cannot be scored together (nothing matches, a malformed GT file)."""


def normalize_label(text: str) -> str:
    """Lower case, spaces collapsed, a leading article dropped, the last word singular."""
    from engine.language.entities import singular_noun

    words = _ARTICLE.sub("", " ".join(str(text).lower().split())).split()
    if not words:
        return ""
    return " ".join([*words[:-1], singular_noun(words[-1])])


def _stem(name: str) -> str:
    return posixpath.splitext(sanitize_key(name))[0]


def _names(stem: str) -> tuple[str, ...]:
    """The whole path and its last part: the two forms a file name can match."""
    return tuple(dict.fromkeys((stem, posixpath.basename(stem))))


class LabelMap:
    """Entity -> GT category id, by the rules of the module docstring; remembers which rule placed it."""

    def __init__(self, categories: list[dict[str, Any]], synonyms: dict[str, list[str]] | None = None,
                 wordnet: Any = None) -> None:
        self.names: dict[str, int] = {}
        for cat in categories:
            self.names.setdefault(normalize_label(cat["name"]), int(cat["id"]))
        self.aliases: dict[str, int] = {}
        for gt_name, aliases in (synonyms or {}).items():
            cat_id = self.names.get(normalize_label(gt_name))
            if cat_id is None:
                raise QualityError(f"synonyms name {gt_name!r}, which is no category of the GT")
            for alias in aliases:
                self.aliases.setdefault(normalize_label(alias), cat_id)
        self.wordnet = wordnet
        self._cache: dict[tuple[str, str, str], tuple[int | None, str]] = {}

    def __call__(self, entity: dict[str, Any]) -> tuple[int | None, str]:
        """(GT category id or None, the rule: category | phrase | synonym | wordnet | parent | outside_gt)."""
        key = (entity.get("category") or "", entity.get("phrase") or "", entity.get("parent_category") or "")
        if key not in self._cache:
            self._cache[key] = self._place(*(normalize_label(k) for k in key))
        return self._cache[key]

    def _place(self, category: str, phrase: str, parent_category: str) -> tuple[int | None, str]:
        for text, rule in ((category, "category"), (phrase, "phrase")):
            if text in self.names:
                return self.names[text], rule
        for text in (category, phrase):
            if text in self.aliases:
                return self.aliases[text], "synonym"
        hypernym = self._nearest_hypernym(category)
        if hypernym is not None:
            return hypernym, "wordnet"
        if parent_category in self.names:
            return self.names[parent_category], "parent"
        return None, "outside_gt"

    def _nearest_hypernym(self, category: str) -> int | None:
        if self.wordnet is None or not category:
            return None
        frontier = self.wordnet.synsets(category.replace(" ", "_"), pos="n")[:3]
        seen = set(frontier)
        while frontier:  # breadth first: the nearest GT name wins
            found = [self.names[n] for s in frontier for n in (normalize_label(l.replace("_", " "))
                                                                 for l in s.lemma_names()) if n in self.names]
            if found:
                return found[0]
            frontier = [h for s in frontier for h in s.hypernyms() + s.instance_hypernyms() if h not in seen]
            seen.update(frontier)
        return None


def installed_wordnet() -> Any:
    """NLTK's WordNet from granucap's data folder, or None when it is not installed."""
    from engine.language import nltk_data

    try:
        return nltk_data.wordnet_reader(nltk_data.data_dir())
    except nltk_data.NltkDataMissing:
        return None


def read_gt(coco: str | Path) -> dict[str, Any]:
    """The COCO annotations at a path or a URI, checked for what scoring needs."""
    text = str(coco)
    try:
        data = json.loads(Location(parent(text)).read_bytes(basename(text)))
    except json.JSONDecodeError as exc:
        raise QualityError(f"{text} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise QualityError(f"{text} is not a COCO annotations file (it needs 'images' and 'categories' lists)")
    data.setdefault("annotations", [])
    for image in data["images"]:
        if not {"id", "file_name", "width", "height"} <= image.keys():
            raise QualityError(f"{text}: image {image.get('id')!r} lacks id, file_name, width or height")
    return data


@dataclass
class _Image:
    gt: dict[str, Any]
    status: str = "ok"
    xyxy: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _sample_names(row: dict[str, Any]) -> list[str]:
    meta = json.loads(row["meta"]) if row.get("meta") else {}
    names = [row["key"], meta.get("original_key"), meta.get("file")]
    if meta.get("url"):
        names.append(str(meta["url"]).split("?")[0].rsplit("/", 1)[-1])
    return [n for raw in names if raw for n in _names(_stem(str(raw)))]


def _matched_rows(run: str | Path, gt: dict[str, Any], columns: list[str]) -> tuple[dict[int, dict], list[str]]:
    """GT image id -> the run's row for it (first match by the image rules), and a few run keys for errors."""
    by_name: dict[str, dict[str, Any]] = {}
    for image in gt["images"]:
        for name in _names(_stem(image["file_name"])):
            by_name.setdefault(name, image)
    rows: dict[int, dict[str, Any]] = {}
    keys_seen: list[str] = []
    for unit in complete_unit_ids(run):
        for batch in iter_index(run, unit, columns=columns):
            for row in batch.to_pylist():
                if len(keys_seen) < 3:
                    keys_seen.append(row["key"])
                image = next((by_name[n] for n in _sample_names(row) if n in by_name), None)
                if image is not None and image["id"] not in rows:
                    rows[image["id"]] = row
    return rows, keys_seen


def _open(run: str | Path, coco: str | Path, synonyms, allow_partial: bool, wordnet: Any,
          columns: list[str]) -> tuple[dict[str, Any], LabelMap, dict[int, dict[str, Any]]]:
    require_complete(run, allow_partial=allow_partial, action="score")
    gt = read_gt(coco)
    labels = LabelMap(gt["categories"], synonyms, installed_wordnet() if wordnet == "installed" else wordnet)
    rows, keys_seen = _matched_rows(run, gt, columns)
    if not rows:
        raise QualityError(
            f"no image of {coco} matches a sample of {run} (GT file names like "
            f"{[i['file_name'] for i in gt['images'][:3]]}, run keys like {keys_seen}); images match by "
            "file name without its suffix (docs/quality.md)")
    return gt, labels, rows


def _image_counts(gt: dict[str, Any], statuses: Counter) -> dict[str, int]:
    scored = sum(statuses.values())
    return {"gt": len(gt["images"]), "scored": scored, "ok": statuses["ok"], "rejected": statuses["rejected"],
            "failed": statuses["failed"], "not_in_run": len(gt["images"]) - scored}


def score_run(run: str | Path, coco: str | Path, *, synonyms: dict[str, list[str]] | None = None,
              allow_partial: bool = False, wordnet: Any = "installed") -> dict[str, Any]:
    """The scores of the module docstring for a run against COCO ground truth, as one JSON-able dict."""
    gt, labels, rows = _open(run, coco, synonyms, allow_partial, wordnet, COLUMNS)
    images = {i["id"]: i for i in gt["images"]}
    rules: Counter[str] = Counter()
    outside: Counter[str] = Counter()
    matched = {image_id: _sample(images[image_id], row, labels, rules, outside) for image_id, row in rows.items()}
    result = {
        "run": str(run), "gt": str(coco),
        "images": _image_counts(gt, Counter(m.status for m in matched.values())),
        "run_boxes": {"total": sum(rules.values()),
                      "scored": sum(n for r, n in rules.items() if r != "outside_gt"),
                      "outside_gt": rules["outside_gt"], "by_rule": dict(sorted(rules.items()))},
        "outside_gt_labels": dict(outside.most_common(20)),
    }
    result.update(coco_ap(gt, matched))
    result.update(precision_recall(gt, matched, result.pop("per_category_ap50")))
    return result


def _boxes_of(row: dict[str, Any], field: str) -> Boxes:
    try:
        return Boxes.from_rows(row[field] or [])
    except ValueError as exc:
        raise QualityError(f"sample {row['key']} of the run has malformed {field}: {exc}") from None


def _entity_ids(row: dict[str, Any], labels: LabelMap) -> tuple[np.ndarray, list[str]]:
    """Per entity of the row: its GT category id (-1: outside the GT) and the rule that placed it."""
    placed = [labels(e) for e in row["entities"] or []]
    return (np.asarray([-1 if c is None else c for c, _ in placed], dtype=np.int64), [r for _, r in placed])


def _predictions(image: dict[str, Any], row: dict[str, Any], boxes: Boxes, ids: np.ndarray) -> _Image:
    """The boxes whose entity has a GT category, in the GT image's pixels."""
    found = _Image(gt=image, status=row["status"])
    box_ids = np.full(len(boxes), -1, dtype=np.int64)
    valid = (boxes.entity >= 0) & (boxes.entity < len(ids))
    box_ids[valid] = ids[boxes.entity[valid]]
    keep = box_ids >= 0
    sx, sy = image["width"] / row["width"], image["height"] / row["height"]
    found.xyxy = boxes.xyxy[keep] * [sx, sy, sx, sy]
    found.scores = boxes.scores[keep]
    found.labels = box_ids[keep]
    return found


def _sample(image: dict[str, Any], row: dict[str, Any], labels: LabelMap, rules: Counter, outside: Counter) -> _Image:
    if row["status"] != "ok" or not row["boxes"]:
        return _Image(gt=image, status=row["status"])
    boxes = _boxes_of(row, "boxes")
    ids, placed_by = _entity_ids(row, labels)
    entities = row["entities"] or []
    for e in boxes.entity:
        rule = placed_by[e] if 0 <= e < len(placed_by) else "outside_gt"
        rules[rule] += 1
        if rule == "outside_gt":
            outside[(entities[e].get("category") if 0 <= e < len(entities) else None) or "?"] += 1
    return _predictions(image, row, boxes, ids)


def coco_api() -> tuple[Any, Any]:
    """(COCO, COCOeval) from faster-coco-eval, else pycocotools (the student's evaluation picks the same)."""
    try:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    except ImportError:  # pragma: no cover - both are dependencies
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval


def coco_ap(gt: dict[str, Any], matched: dict[int, _Image]) -> dict[str, Any]:
    """COCO AP and AP50 over the matched images, and AP50 per category id."""
    COCO, COCOeval = coco_api()
    detections = [{"image_id": image_id, "category_id": int(c), "score": float(s),
                   "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}
                  for image_id, m in matched.items() for (x0, y0, x1, y1), s, c in zip(m.xyxy, m.scores, m.labels)]
    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "per_category_ap50": {}}
    with contextlib.redirect_stdout(io.StringIO()):  # the COCO API prints its progress
        truth = COCO()
        truth.dataset = {k: gt[k] for k in ("images", "annotations", "categories")}
        for ann in truth.dataset["annotations"]:
            ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
            ann.setdefault("iscrowd", 0)
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluation.params.imgIds = sorted(matched)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    precision = evaluation.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all recalls, categories, all areas
    per_category = {}
    for k, cat_id in enumerate(evaluation.params.catIds):
        values = precision[:, k]
        values = values[values > -1]
        if len(values):
            per_category[int(cat_id)] = float(values.mean())
    return {"AP": float(max(evaluation.stats[0], 0.0)), "AP50": float(max(evaluation.stats[1], 0.0)),
            "per_category_ap50": per_category}


def match_counts(gt_xyxy: np.ndarray, crowd_xyxy: np.ndarray, pred_xyxy: np.ndarray,
                 pred_scores: np.ndarray) -> tuple[int, int, int]:
    """(true positives, false positives, misses) of one image and category at IoU 0.5, by the rule of the
    module docstring."""
    taken = np.zeros(len(gt_xyxy), dtype=bool)
    tp = fp = 0
    ious = iou_matrix(pred_xyxy, gt_xyxy) if len(gt_xyxy) else np.zeros((len(pred_xyxy), 0))
    crowd = iou_matrix(pred_xyxy, crowd_xyxy) if len(crowd_xyxy) else np.zeros((len(pred_xyxy), 0))
    for p in np.argsort(-pred_scores, kind="stable"):
        free = np.where(taken, -1.0, ious[p]) if len(gt_xyxy) else ious[p]
        if len(free) and free.max() >= IOU:
            taken[int(free.argmax())] = True
            tp += 1
        elif not (crowd.shape[1] and crowd[p].max() >= IOU):
            fp += 1
    return tp, fp, int((~taken).sum())


def precision_recall(gt: dict[str, Any], matched: dict[int, _Image], ap50: dict[int, float]) -> dict[str, Any]:
    """Precision, recall and F1 of the kept boxes, per category and over all."""
    truth: dict[tuple[int, int, bool], list[list[float]]] = {}
    for ann in gt["annotations"]:
        if ann["image_id"] in matched:
            x, y, w, h = ann["bbox"]
            truth.setdefault((ann["image_id"], ann["category_id"], bool(ann.get("iscrowd"))), []).append(
                [x, y, x + w, y + h])
    counts = {int(c["id"]): [0, 0, 0] for c in gt["categories"]}
    for image_id, m in matched.items():
        for cat_id in counts:
            mine = m.labels == cat_id
            boxes = np.asarray(truth.get((image_id, cat_id, False), []), dtype=np.float64).reshape(-1, 4)
            crowd = np.asarray(truth.get((image_id, cat_id, True), []), dtype=np.float64).reshape(-1, 4)
            if not mine.any() and not len(boxes):
                continue
            for slot, n in enumerate(match_counts(boxes, crowd, m.xyxy[mine], m.scores[mine])):
                counts[cat_id][slot] += n
    names = {int(c["id"]): c["name"] for c in gt["categories"]}
    rows = [{"id": cat_id, "name": names[cat_id], **_prf(*c), "AP50": ap50.get(cat_id)}
            for cat_id, c in counts.items() if any(c)]
    total = [sum(c[i] for c in counts.values()) for i in range(3)]
    return {**_prf(*total), "categories": rows}


def _prf(tp: int, fp: int, fn: int) -> dict[str, Any]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "gt_boxes": tp + fn, "boxes": tp + fp,
            "precision": precision, "recall": recall, "f1": f1}


def run_config(run: str | Path, units: dict[int, dict[str, Any]] | None = None) -> tuple[str, dict[str, Any]]:
    """The fingerprint and the recorded (public) config the run's complete units were made with; one only.
    `units`: the run's markers (`complete_units`) when the caller has read them already."""
    from engine.io.shard_reader import complete_units, open_run

    location = open_run(run)
    units = complete_units(location) if units is None else units
    prints = {stats.get("fingerprint") for stats in units.values()}
    if len(prints) != 1 or None in prints:
        raise QualityError(f"{run}: its units were made with {len(prints)} configs (or record none); a replay "
                           "needs one")
    fp = prints.pop()
    try:
        return fp, location.read_json(f"configs/{fp}.json")["config"]
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise QualityError(f"{run}: the config of its units is not recorded under configs/ ({exc})") from None


def run_stage_specs(run: str | Path) -> tuple[Any, Any]:
    """The ground and filter settings the run's complete units were made with."""
    from engine.config import FilterSpec, GroundSpec

    config = run_config(run)[1]
    return GroundSpec.model_validate(config["stages"]["ground"]), FilterSpec.model_validate(config["stages"]["filter"])


def replay(candidates: Boxes, thresholds: dict[str, float], spec: Any, *, entities: int, width: float,
           height: float) -> tuple[Boxes, tuple[str, str] | None]:
    """The boxes a run would have kept from these candidates at `thresholds` (ground's field thresholds, then
    the filter's cleaning), and the filter's verdict on the sample: None, or the (kind, message) it would
    reject it with."""
    from engine.stages.filter import clean_boxes, sample_rules
    from engine.stages.ground import over_thresholds

    kept = clean_boxes(over_thresholds(candidates, thresholds), spec, width=width, height=height)
    return kept, sample_rules(entities, len(kept), spec)


def replayable(status: str, error: dict[str, Any] | None) -> bool:
    """A sample whose fate the ground thresholds and the filter decided (not decode, extract or a failure)."""
    return status == "ok" or (status == "rejected" and (error or {}).get("stage") == "filter")


def sweep(run: str | Path, coco: str | Path, *, thresholds: list[float] | None = None,
          min_precision: float | None = None, synonyms: dict[str, list[str]] | None = None,
          allow_partial: bool = False, wordnet: Any = "installed") -> dict[str, Any]:
    """Precision, recall and F1 of the run's candidates replayed at each box threshold (both fields), then of
    each field's threshold with the other at the best; the best F1, and the best F1 at `min_precision`."""
    ground, spec = run_stage_specs(run)
    if ground.keep_candidates is None:
        raise QualityError(f"{run} kept no candidates: run it with --set stages.ground.keep_candidates=0.05 (a "
                           "floor under the thresholds to sweep) to tune thresholds without the teacher")
    floor = ground.keep_candidates
    grid = sorted(set(thresholds)) if thresholds else [round(t, 2) for t in np.arange(0.05, 0.951, 0.05)]
    low = [t for t in grid if t < floor]
    if low:
        raise QualityError(f"thresholds {low} are under the run's candidate floor {floor}: its boxes below it were "
                           "not kept")
    gt, labels, rows = _open(run, coco, synonyms, allow_partial, wordnet, [*COLUMNS, "candidates", "error"])
    images = {i["id"]: i for i in gt["images"]}
    prepared = {image_id: (row, _boxes_of(row, "candidates") if replayable(row["status"], row["error"]) else None,
                           _entity_ids(row, labels)[0]) for image_id, row in rows.items()}

    def at(field_thresholds: dict[str, float]) -> dict[str, Any]:
        matched, statuses = {}, Counter()
        for image_id, (row, candidates, ids) in prepared.items():
            if candidates is None:
                kept, status = None, row["status"]
            else:
                kept, rejected = replay(candidates, field_thresholds, spec, entities=len(ids), width=row["width"],
                                        height=row["height"])
                kept, status = (None, "rejected") if rejected else (kept, "ok")
            statuses[status] += 1
            matched[image_id] = (_Image(gt=images[image_id], status=status) if kept is None
                                 else _predictions(images[image_id], row, kept, ids))
        scores = precision_recall(gt, matched, {})
        return {**{k: scores[k] for k in ("tp", "fp", "fn", "boxes", "precision", "recall", "f1")},
                "ok": statuses["ok"]}

    def best(table: list[dict[str, Any]], key: str) -> dict[str, Any] | None:
        eligible = [r for r in table if min_precision is None or r["precision"] >= min_precision]
        return max(eligible, key=lambda r: (r["f1"], r["recall"], -r[key]), default=None)

    table = [{"threshold": t, **at({"phrase": t, "category": t})} for t in grid]
    top = max(table, key=lambda r: (r["f1"], -r["threshold"]))
    chosen = best(table, "threshold")
    fields = {}
    if chosen is not None:
        for field, other in (("phrase", "category"), ("category", "phrase")):
            rows_f = [{"threshold": t, **at({field: t, other: chosen["threshold"]})} for t in grid]
            fields[field] = {"with_other_at": chosen["threshold"], "best": best(rows_f, "threshold"), "table": rows_f}
    return {"run": str(run), "gt": str(coco), "floor": floor, "min_precision": min_precision,
            "run_thresholds": {"box": ground.box_threshold, "phrase": ground.phrase_threshold,
                               "category": ground.category_threshold},
            "table": table, "best_f1": top, "best_at_min_precision": chosen, "fields": fields}


def format_sweep(result: dict[str, Any]) -> str:
    """The sweep as the plain-text table `granucap eval --run --sweep` prints."""
    lines = [f"run {result['run']} against {result['gt']}: candidates over {result['floor']} replayed "
             "(ground thresholds, then the run's filter)", "",
             f"{'box_threshold':>14}{'P':>7}{'R':>7}{'F1':>7}{'boxes':>7}{'ok images':>11}"]
    for row in result["table"]:
        lines.append(f"{row['threshold']:>14.2f}{row['precision']:>7.3f}{row['recall']:>7.3f}{row['f1']:>7.3f}"
                     f"{row['boxes']:>7}{row['ok']:>11}")
    top = result["best_f1"]
    lines += ["", f"best F1: {top['f1']:.3f} at box_threshold {top['threshold']:.2f} "
                  f"(P {top['precision']:.3f}, R {top['recall']:.3f})"]
    if result["min_precision"] is not None:
        chosen = result["best_at_min_precision"]
        lines.append(f"best F1 at precision >= {result['min_precision']:.2f}: " + (
            f"{chosen['f1']:.3f} at box_threshold {chosen['threshold']:.2f} (P {chosen['precision']:.3f}, "
            f"R {chosen['recall']:.3f})" if chosen else "no threshold reaches it"))
    for field, found in result["fields"].items():
        if found["best"] is not None:
            lines.append(f"{field}_threshold with the other at {found['with_other_at']:.2f}: best F1 "
                         f"{found['best']['f1']:.3f} at {found['best']['threshold']:.2f}")
    return "\n".join(lines)


def format_report(result: dict[str, Any]) -> str:
    """The scores as the plain-text tables `granucap eval --run` prints."""
    im, bx = result["images"], result["run_boxes"]
    lines = [
        f"run {result['run']} against {result['gt']}",
        f"images: {im['scored']} of {im['gt']} in GT scored (ok {im['ok']}, rejected {im['rejected']}, "
        f"failed {im['failed']}); {im['not_in_run']} not in the run",
        f"boxes: {bx['scored']} of {bx['total']} scored; {bx['outside_gt']} outside the GT's categories"
        + (f" (e.g. {', '.join(list(result['outside_gt_labels'])[:5])})" if result["outside_gt_labels"] else ""),
        "",
        f"{'':<24}{'AP':>7}{'AP50':>7}{'P':>7}{'R':>7}{'F1':>7}{'boxes':>7}{'GT':>7}",
        f"{'all':<24}{result['AP']:>7.3f}{result['AP50']:>7.3f}{result['precision']:>7.3f}"
        f"{result['recall']:>7.3f}{result['f1']:>7.3f}{result['boxes']:>7}{result['gt_boxes']:>7}",
    ]
    for row in sorted(result["categories"], key=lambda r: (-r["gt_boxes"], r["name"])):
        ap50 = f"{row['AP50']:>7.3f}" if row["AP50"] is not None else f"{'-':>7}"
        lines.append(f"{row['name'][:23]:<24}{'':>7}{ap50}{row['precision']:>7.3f}{row['recall']:>7.3f}"
                     f"{row['f1']:>7.3f}{row['boxes']:>7}{row['gt_boxes']:>7}")
    return "\n".join(lines)
