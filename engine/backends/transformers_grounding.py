"""Grounding backend on HF transformers: any zero-shot detector of the Grounding DINO or OWL families.

Work is flattened to (image, prompt) pairs, sorted by aspect ratio (less padding) and run `batch_size`
pairs per forward pass. Labels are snapped to the prompt's own phrases: a box takes the phrase whose tokens
score highest (GLIP style), rather than the decoded above-threshold tokens, which can be word pieces or
several phrases run together. Boxes come back in pixel xyxy of the given image, clipped to it.

Grounding DINO pads a batch to its largest image and Swin sees the padding, so scores can shift slightly
with the batch's other images when sizes differ; same-size images give the same boxes batched or alone.
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
        else:
            raise ValueError(f"{self.model_id}: model type {config.model_type!r} is not supported "
                             f"(supported: {', '.join(sorted(GDINO_TYPES | OWL_TYPES))})")
        self.processor = AutoProcessor.from_pretrained(self.path)
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
        """Tokens `text` takes in the text encoder, specials included; for OWL the longest of its labels."""
        if self.family == "owl":
            return max((len(self.tokenizer(label)["input_ids"]) for label in split_labels(text)), default=0)
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
                run = self._run_gdino if self.family == "gdino" else self._run_owl
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
