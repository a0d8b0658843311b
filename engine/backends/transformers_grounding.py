"""Grounding backend on HF transformers: zero-shot detectors of the Grounding DINO, OWL and OmDet-Turbo families.

Work is flattened to (image, prompt) pairs, sorted by aspect ratio (less padding) and run `batch_size`
pairs per forward pass. Labels are snapped to the prompt's own phrases: a box takes the phrase whose tokens
score highest (GLIP style), rather than the decoded above-threshold tokens, which can be word pieces or
several phrases run together. Boxes come back in pixel xyxy of the given image, clipped to it.

Grounding DINO pads a batch to its largest image and Swin sees the padding, so scores can shift slightly
with the batch's other images when sizes differ; same-size images give the same boxes batched or alone.

OmDet-Turbo takes a prompt's phrases as its class list (each class encoded on its own, plus the task
"Detect a, b, c." that names them all) and keeps its own post-processing: top (query, class) pairs, threshold,
per-class NMS (`nms_threshold`, default 0.5). That is re-implemented here in plain torch because transformers'
version needs torchvision, which has no CPU build here; for the same reason its processor is loaded by class
when `AutoProcessor` refuses it.
"""

from __future__ import annotations

import logging
from typing import Any

from PIL import Image

from engine.backends.base import BackendSpec, Detection
from engine.models.loading import pick_device, pick_dtype, resolve_model

log = logging.getLogger(__name__)

GDINO_TYPES = {"grounding-dino", "mm-grounding-dino"}
OWL_TYPES = {"owlv2", "owlvit"}
OMDET_TYPES = {"omdet-turbo"}


def split_labels(prompt: str) -> list[str]:
    """GLIP-style prompt "a. b. c." -> ["a", "b", "c"]."""
    return [part.strip() for part in prompt.split(".") if part.strip()]


class TransformersGrounding:
    """`GroundingBackend` over `AutoModelForZeroShotObjectDetection` + `AutoProcessor`."""

    def __init__(self, spec: BackendSpec) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

        if not spec.model:
            raise ValueError("transformers grounding backend needs a model")
        opts = dict(spec.options)
        self.model_id = spec.model
        self.box_threshold = float(opts.get("box_threshold", 0.35))
        self.text_threshold = float(opts.get("text_threshold", 0.25))
        self.batch_size = int(opts.get("batch_size", 8))
        self.nms_threshold = float(opts.get("nms_threshold", 0.5))  # OmDet-Turbo only
        self.device = pick_device(opts.get("device", "auto"))
        if opts.get("num_threads"):  # CPU: match the CPUs Ray gave this actor; oversubscription is ~100x slower
            torch.set_num_threads(int(opts["num_threads"]))
        self.dtype = pick_dtype(opts.get("dtype", "auto"), self.device)
        self.dummy_weights = bool(opts.get("dummy_weights", False))
        if self.dummy_weights:
            from engine.models.dummy import dummy_source

            self.path = dummy_source(spec.model, opts.get("cache_dir"))
        else:
            self.path = resolve_model(spec.model, opts.get("cache_dir"))
        config = AutoConfig.from_pretrained(self.path)
        if config.model_type in GDINO_TYPES:
            self.family = "gdino"
            self.max_text_tokens = int(config.max_text_len)
        elif config.model_type in OWL_TYPES:
            self.family = "owl"
            self.max_text_tokens = int(config.text_config.max_position_embeddings)
        elif config.model_type in OMDET_TYPES:
            self.family = "omdet"
            self.max_text_tokens = int(config.text_config.max_position_embeddings)
        else:
            raise ValueError(f"{self.model_id}: model type {config.model_type!r} is not supported "
                             f"(supported: {', '.join(sorted(GDINO_TYPES | OWL_TYPES | OMDET_TYPES))})")
        self.processor = load_processor(self.path) if self.family == "omdet" else AutoProcessor.from_pretrained(
            self.path)
        self.tokenizer = self.processor.tokenizer
        if self.dummy_weights:
            from engine.models.dummy import build_dummy_model

            self.model = build_dummy_model(AutoModelForZeroShotObjectDetection, self.path, self.dtype)
        else:
            self.model = AutoModelForZeroShotObjectDetection.from_pretrained(self.path, dtype=self.dtype)
        self.model.to(self.device).eval()
        log.info("loaded %s (%s%s) on %s/%s", self.model_id, config.model_type,
                 ", dummy weights" if self.dummy_weights else "", self.device, self.dtype)

    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes in the text encoder, specials included.

        OWL: the longest of its labels (each label is its own query). OmDet-Turbo: its task sentence
        "Detect a, b, c.", which holds every label (each label is also encoded on its own, never longer).
        """
        labels = split_labels(text)
        if self.family == "owl":
            return max((len(self.tokenizer(label)["input_ids"]) for label in labels), default=0)
        if self.family == "omdet":
            if not labels:
                return 0
            return max(len(self.tokenizer(t)["input_ids"]) for t in [omdet_task(labels), *labels])
        return len(self.tokenizer(text)["input_ids"])

    def detect(self, images: list[Image.Image], prompts: list[list[str]]) -> list[list[Detection]]:
        """Boxes per image over all its prompts; each box records which prompt found it."""
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompt lists")
        rgb = [im.convert("RGB") if im.mode != "RGB" else im for im in images]
        pairs = [(i, j) for i, ps in enumerate(prompts) for j, p in enumerate(ps) if split_labels(p)]
        pairs.sort(key=lambda ij: (rgb[ij[0]].width / rgb[ij[0]].height, ij))
        found: dict[tuple[int, int], list[Detection]] = {}
        with torch.inference_mode():
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start:start + self.batch_size]
                chunk_images = [rgb[i] for i, _ in chunk]
                chunk_prompts = [prompts[i][j] for i, j in chunk]
                run = {"gdino": self._run_gdino, "owl": self._run_owl, "omdet": self._run_omdet}[self.family]
                for (i, j), dets in zip(chunk, run(chunk_images, chunk_prompts)):
                    found[(i, j)] = [Detection(d.xyxy, d.score, d.label, j) for d in dets]
        out: list[list[Detection]] = []
        for i, ps in enumerate(prompts):
            dets = [d for j in range(len(ps)) for d in found.get((i, j), [])]
            out.append(dets)
        return out

    # -- Grounding DINO ---------------------------------------------------------------------------------

    def _run_gdino(self, images: list[Image.Image], prompts: list[str]) -> list[list[Detection]]:
        import torch

        phrases = [split_labels(p) for p in prompts]
        texts = [". ".join(ps) + "." for ps in phrases]
        inputs = self.processor(images=images, text=texts, padding=True, truncation=True,
                                max_length=self.max_text_tokens, return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs)
        probs = outputs.logits.float().sigmoid()  # (B, queries, max_text_len)
        boxes = outputs.pred_boxes.float()  # (B, queries, 4) cxcywh, relative to the unpadded image
        dot = self.tokenizer.convert_tokens_to_ids(".")
        special = set(self.tokenizer.all_special_ids)
        results = []
        for b, image in enumerate(images):
            ids = inputs["input_ids"][b].tolist()
            spans = _phrase_spans(ids, dot, special)
            names = phrases[b] if len(spans) == len(phrases[b]) else [
                self.tokenizer.decode([ids[k] for k in span]) for span in spans]
            if not spans:
                results.append([])
                continue
            # Phrase score: the best token of the phrase (the model's own box score is the best token overall).
            span_scores = torch.stack([probs[b, :, span].max(dim=-1).values for span in spans], dim=-1)
            phrase_score, phrase_idx = span_scores.max(dim=-1)
            keep = (phrase_score > self.box_threshold) & (phrase_score > self.text_threshold)
            results.append(_to_detections(boxes[b][keep], phrase_score[keep], phrase_idx[keep],
                                          names, image.width, image.height, image.width, image.height))
        return results

    # -- OWL-ViT / OWLv2 --------------------------------------------------------------------------------

    def _run_owl(self, images: list[Image.Image], prompts: list[str]) -> list[list[Detection]]:
        import torch

        labels = [split_labels(p) for p in prompts]
        inputs = self.processor(images=images, text=labels, truncation=True, max_length=self.max_text_tokens,
                                return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs)
        logits = outputs.logits.float().clone()  # (B, patches, max queries)
        for b, names in enumerate(labels):
            logits[b, :, len(names):] = float("-inf")  # queries the processor padded with " "
        score, idx = logits.max(dim=-1)
        score = score.sigmoid()
        boxes = outputs.pred_boxes.float()
        results = []
        for b, image in enumerate(images):
            keep = score[b] > self.box_threshold
            # OWLv2 pads images to a square (bottom/right) before resizing: boxes are relative to that square.
            side = max(image.width, image.height) if self.model.config.model_type == "owlv2" else None
            sx, sy = (side, side) if side else (image.width, image.height)
            results.append(_to_detections(boxes[b][keep], score[b][keep], idx[b][keep], labels[b],
                                          sx, sy, image.width, image.height))
        return results

    # -- OmDet-Turbo --------------------------------------------------------------------------------------

    def _run_omdet(self, images: list[Image.Image], prompts: list[str]) -> list[list[Detection]]:
        import torch

        labels = [split_labels(p) for p in prompts]
        # Pad every class list to the batch's longest with copies of its own first class, not the model's
        # zero embeddings: query selection takes each query's best class, which a copy leaves unchanged, so
        # a prompt gives the same boxes batched or alone. The copies' columns are dropped below.
        width = max(len(names) for names in labels)
        classes = [names + [names[0]] * (width - len(names)) for names in labels]
        inputs = self.processor(images=images, text=classes, task=[omdet_task(n) for n in labels],
                                padding="max_length", truncation=True, max_length=self.max_text_tokens,
                                return_tensors="pt")
        pixel_mask = inputs.pop("pixel_mask", None)
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs)
        logits = outputs.decoder_class_logits.float()  # (B, queries, classes)
        boxes = outputs.decoder_coord_logits.float()  # (B, queries, 4) cxcywh, relative to the model input
        _, _, in_h, in_w = inputs["pixel_values"].shape
        results = []
        for b, image in enumerate(images):
            sx, sy = float(image.width), float(image.height)
            if pixel_mask is not None:  # padded (bottom/right) input: boxes are relative to the padded canvas
                sx *= in_w / max(int(pixel_mask[b].any(dim=0).sum()), 1)
                sy *= in_h / max(int(pixel_mask[b].any(dim=1).sum()), 1)
            results.append(omdet_postprocess(boxes[b], logits[b, :, :len(labels[b])], labels[b], sx, sy,
                                             image.width, image.height, self.box_threshold, self.nms_threshold))
        return results


def omdet_task(labels: list[str]) -> str:
    """OmDet-Turbo's task sentence for a class list (the processor's default, and its model card's)."""
    return f"Detect {', '.join(labels)}."


def load_processor(path: str) -> Any:
    """`AutoProcessor`, else (OmDet-Turbo without torchvision) the processor class imported directly."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError as err:
        if "torchvision" not in str(err).lower():
            raise
        from transformers.models.omdet_turbo.processing_omdet_turbo import OmDetTurboProcessor

        log.info("OmDetTurboProcessor via its module: AutoProcessor needs torchvision")
        return OmDetTurboProcessor.from_pretrained(path)


def omdet_postprocess(boxes: Any, logits: Any, names: list[str], scale_x: float, scale_y: float, width: int,
                      height: int, threshold: float, nms_threshold: float) -> list[Detection]:
    """transformers' `OmDetTurboProcessor.post_process_grounded_object_detection` for one image, torchvision-free.

    boxes (queries, 4) relative cxcywh; logits (queries, classes) for this image's classes only. The best
    `queries` (query, class) pairs above `threshold`, per-class greedy NMS, then pixel xyxy clipped to the image.
    """
    import torch

    queries, num_classes = logits.shape
    scores, flat = logits.sigmoid().flatten().topk(min(queries, queries * num_classes))
    query, label = flat // num_classes, flat % num_classes
    keep = scores > threshold
    scores, query, label = scores[keep], query[keep], label[keep]
    cx, cy, w, h = boxes[query].unbind(-1)
    xyxy = torch.stack([(cx - w / 2) * scale_x, (cy - h / 2) * scale_y, (cx + w / 2) * scale_x,
                        (cy + h / 2) * scale_y], dim=-1)
    kept = _class_nms(xyxy, scores, label, nms_threshold)
    dets = []
    for (x1, y1, x2, y2), s, li in zip(xyxy[kept].tolist(), scores[kept].tolist(), label[kept].tolist()):
        x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
        if x2 <= x1 or y2 <= y1:
            continue
        dets.append(Detection(xyxy=(x1, y1, x2, y2), score=float(s), label=names[li]))
    dets.sort(key=lambda d: -d.score)
    return dets


def _class_nms(xyxy: Any, scores: Any, labels: Any, iou_threshold: float) -> list[int]:
    """Greedy NMS within each class (torchvision's `batched_nms`): indices kept, best score first."""
    import torch

    if len(scores) == 0:
        return []
    order = scores.argsort(descending=True, stable=True)
    area = (xyxy[:, 2] - xyxy[:, 0]).clamp(min=0) * (xyxy[:, 3] - xyxy[:, 1]).clamp(min=0)
    lt = torch.maximum(xyxy[:, None, :2], xyxy[None, :, :2])
    rb = torch.minimum(xyxy[:, None, 2:], xyxy[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1e-12)
    clash = ((iou > iou_threshold) & (labels[:, None] == labels[None, :])).tolist()
    suppressed = [False] * len(scores)
    kept = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        kept.append(i)
        for j, hit in enumerate(clash[i]):
            if hit:
                suppressed[j] = True
    return kept


def _phrase_spans(ids: list[int], dot: int, special: set[int]) -> list[list[int]]:
    """Token positions of each "."-separated phrase, specials and padding excluded."""
    spans, current = [], []
    for k, t in enumerate(ids):
        if t == dot or t in special:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(k)
    if current:
        spans.append(current)
    return spans


def _to_detections(boxes: Any, scores: Any, label_idx: Any, names: list[str], scale_x: float, scale_y: float,
                   width: int, height: int) -> list[Detection]:
    """cxcywh relative boxes -> pixel xyxy clipped to the image; zero-area boxes are dropped."""
    dets = []
    for (cx, cy, w, h), s, li in zip(boxes.tolist(), scores.tolist(), label_idx.tolist()):
        x1 = min(max((cx - w / 2) * scale_x, 0.0), width)
        y1 = min(max((cy - h / 2) * scale_y, 0.0), height)
        x2 = min(max((cx + w / 2) * scale_x, 0.0), width)
        y2 = min(max((cy + h / 2) * scale_y, 0.0), height)
        if x2 <= x1 or y2 <= y1:
            continue
        dets.append(Detection(xyxy=(x1, y1, x2, y2), score=float(s), label=names[li]))
    dets.sort(key=lambda d: -d.score)
    return dets
