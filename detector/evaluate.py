"""COCO-style box AP of a grounding detector on a COCO-format labelled set, prompted with its category names.

Any Grounding DINO loads (a student checkpoint dir, the teacher's hub id, tiny:NAME), so teacher and
student are scored by the same code. Per image and category the score is the best token probability
inside that category's phrase of the prompt; the top `max_dets` (query, category) pairs are kept
(GLIP / DETR-style evaluation, no score threshold). Categories are split over several prompts when they
do not fit the text encoder's limit. AP comes from faster-coco-eval, else pycocotools. The annotations and
the images may be local or at URIs of any fsspec filesystem (engine/io/storage.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from detector.data import build_prompt, normalize_concept
from engine.io.storage import Location, StorageError, basename, describe, is_remote, parent

logger = logging.getLogger(__name__)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _coco_api() -> tuple[Any, Any]:
    try:
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    except ImportError:  # pragma: no cover - both are dependencies; pycocotools is the fallback
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval


def _read(location: Location, rel: str) -> bytes:
    """The file's bytes; storage that does not answer is a one-line StorageError (a missing file stays a
    FileNotFoundError)."""
    try:
        return location.read_bytes(rel)
    except FileNotFoundError:
        raise
    except Exception as exc:  # botocore, gcsfs, adlfs each have their own exception trees
        raise StorageError(describe(exc, location.uri_of(rel), "read")) from None


def load_coco(coco: str | Path) -> Any:
    """The COCO ground truth at a path or a URI."""
    COCO, _ = _coco_api()
    text = os.fspath(coco)
    with contextlib.redirect_stdout(io.StringIO()):  # the COCO API prints its progress
        if not is_remote(text):
            return COCO(text)
        gt = COCO()
        gt.dataset = json.loads(_read(Location(parent(text)), basename(text)))
        gt.createIndex()
    return gt


def category_prompts(names: list[str], tokenizer: Any, max_text_len: int) -> list[list[int]]:
    """Split category indices into groups whose "a. b. c." prompt fits `max_text_len` tokens."""
    groups: list[list[int]] = [[]]
    budget = max_text_len - 2
    for i, name in enumerate(names):
        cost = len(tokenizer.tokenize(name)) + 1
        if cost > max_text_len - 2:
            raise ValueError(f"category {name!r} alone does not fit the {max_text_len}-token prompt")
        if cost > budget:
            groups.append([])
            budget = max_text_len - 2
        groups[-1].append(i)
        budget -= cost
    return groups


def _token_groups(input_ids: torch.Tensor) -> torch.Tensor:
    """Per token, the 1-based index of the "."-separated phrase it belongs to (0 for delimiters/specials)."""
    special = torch.tensor([101, 102, 1012, 1029, 0])  # GDINO's hard-coded delimiters, plus [PAD]
    delimiter = torch.isin(input_ids, special)
    return torch.cumsum(delimiter, dim=-1) * (~delimiter)


@torch.no_grad()
def predict(model: Any, processor: Any, images: list[Image.Image], names: list[str], *, max_dets: int,
            max_text_len: int, device: torch.device) -> list[list[tuple[int, float, list[float]]]]:
    """Per image, up to `max_dets` detections (category index, score, xyxy pixels) for prompts of `names`."""
    results: list[list[tuple[int, float, list[float]]]] = [[] for _ in images]
    for indices in category_prompts(names, processor.tokenizer, max_text_len):
        prompt, spans = build_prompt([names[i] for i in indices])
        if len(spans) != len(indices):
            raise ValueError(f"category names must be distinct after normalising: {[names[i] for i in indices]}")
        inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding="longest",
                           truncation=True, max_length=max_text_len)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        outputs = model(**inputs)
        probs = outputs.logits.float().sigmoid().cpu()  # (n, queries, text positions)
        groups = _token_groups(inputs["input_ids"].cpu())
        # the logits' text axis is padded to max_text_len; padded positions belong to no phrase
        groups = torch.nn.functional.pad(groups, (0, probs.shape[-1] - groups.shape[-1]))
        for n, image in enumerate(images):
            width, height = image.size
            per_category = torch.stack(
                [probs[n][:, groups[n] == g + 1].max(dim=-1).values for g in range(len(indices))], dim=-1)
            cx, cy, w, h = outputs.pred_boxes[n].float().cpu().unbind(-1)
            boxes = torch.stack([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                                 (cy + h / 2) * height], dim=-1)
            for query, column in zip(*torch.nonzero(per_category >= 0, as_tuple=True)):
                results[n].append((indices[int(column)], float(per_category[query, column]),
                                   boxes[query].tolist()))
    return [sorted(found, key=lambda d: -d[1])[:max_dets] for found in results]


def evaluate(*, model: str, coco: str | Path, images: str | Path, batch_size: int = 4, max_dets: int = 100,
             cache_dir: str | None = None, device: str = "auto", limit: int | None = None) -> dict[str, Any]:
    """Box AP of `model` on the COCO annotations `coco` with images under `images` (paths or URIs)."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    from detector.model import resolve
    from engine.models.loading import pick_device

    started = time.perf_counter()
    gt = load_coco(coco)
    image_root = Location(images)
    categories = sorted(gt.loadCats(gt.getCatIds()), key=lambda c: c["id"])
    names = [normalize_concept(c["name"]) for c in categories]
    image_ids = sorted(gt.getImgIds())[:limit]
    source = resolve(model, cache_dir)
    dev = torch.device(pick_device(device))
    processor = AutoProcessor.from_pretrained(source)
    net = AutoModelForZeroShotObjectDetection.from_pretrained(source).to(dev).eval()
    max_text_len = int(getattr(net.config, "max_text_len", 256))
    detections: list[dict[str, Any]] = []
    for start in range(0, len(image_ids), batch_size):
        ids = image_ids[start:start + batch_size]
        infos = gt.loadImgs(ids)
        batch = [Image.open(io.BytesIO(_read(image_root, info["file_name"]))).convert("RGB") for info in infos]
        found = predict(net, processor, batch, names, max_dets=max_dets, max_text_len=max_text_len, device=dev)
        for image_id, dets in zip(ids, found):
            for category, score, (x0, y0, x1, y1) in dets:
                detections.append({"image_id": image_id, "category_id": categories[category]["id"],
                                   "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    metrics = coco_ap(gt, detections, image_ids=image_ids)
    result = {"model": model, **metrics, "images": len(image_ids), "detections": len(detections),
              "categories": len(names), "seconds": round(time.perf_counter() - started, 3)}
    logger.info("%s: AP %.4f AP50 %.4f on %d images", model, result["AP"], result["AP50"], len(image_ids))
    return result


def coco_ap(gt: Any, detections: list[dict[str, Any]], *, image_ids: list[int] | None = None) -> dict[str, float]:
    """COCO box AP / AP50 / AP75 / APs / APm / APl of `detections` (COCO result dicts) against `gt` (a COCO
    object or a path); 0 for no detections."""
    COCO, COCOeval = _coco_api()
    if not isinstance(gt, COCO):
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(gt))
    if not detections:
        return dict.fromkeys(METRICS, 0.0)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):  # the COCO API prints its summary
        dt = gt.loadRes(detections)
        scorer = COCOeval(gt, dt, "bbox")
        if image_ids is not None:
            scorer.params.imgIds = image_ids
        scorer.evaluate()
        scorer.accumulate()
        scorer.summarize()
    logger.debug("COCO summary:\n%s", captured.getvalue())
    # COCO writes -1 where a size range has no ground truth
    return {name: max(0.0, float(value)) for name, value in zip(METRICS, scorer.stats[:6])}


def format_table(results: list[dict[str, Any]]) -> str:
    """A plain-text table, one row per model, AP columns in percent."""
    header = ["model", *METRICS, "images"]
    rows = [[str(r["model"]), *(f"{100 * r[m]:.1f}" for m in METRICS), str(r["images"])] for r in results]
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def write_json(results: list[dict[str, Any]], path: str | Path) -> None:
    Path(path).write_text(json.dumps(results, indent=1))
