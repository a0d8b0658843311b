"""Visual exemplars (T-Rex2's visual prompts) through OWLv2 image-guided detection.

`DIR/CATEGORY/*.jpg` holds crops of one category. Each crop is embedded once, when the worker starts, the
way `Owlv2ForObjectDetection.image_guided_detection` embeds its query image (the most object-like box of
the crop). A target image is then embedded once and compared with the exemplars of every category its
sample mentions, in one pass; a patch box scores the best sigmoid logit over a category's exemplars.
We do not call `post_process_image_guided_detection`: it rescales scores so that each image's best box
gets 1.0 (thresholds would mean nothing), and it skips images without boxes, which misaligns a batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine import boxes as B
from engine.models.loading import pick_device, pick_dtype, resolve_model

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


@dataclass(slots=True)
class ExemplarBox:
    xyxy: tuple[float, float, float, float]  # pixels, clipped to the image
    score: float
    category: str  # the exemplar folder's name


def list_exemplars(directory: str | Path) -> dict[str, list[Path]]:
    """CATEGORY -> its image files, sorted; folders without images are left out."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"exemplars dir {root} does not exist")
    found = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in sub.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            found[sub.name] = files
    return found


class ExemplarDetector:
    """OWLv2 with its exemplar query embeddings computed once; `detect` adds boxes per wanted category."""

    def __init__(self, directory: str, *, model: str, threshold: float = 0.5, nms_iou: float = 0.3,
                 cache_dir: str | None = None, device: str = "auto", dtype: str = "auto", batch_size: int = 8) -> None:
        import torch
        from transformers import AutoConfig, AutoProcessor, Owlv2ForObjectDetection

        self.model_id = model
        self.threshold = threshold
        self.nms_iou = nms_iou
        self.batch_size = batch_size
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        path = resolve_model(model, cache_dir)
        model_type = AutoConfig.from_pretrained(path).model_type
        if model_type != "owlv2":
            raise ValueError(f"exemplars need an OWLv2 checkpoint; {model} is {model_type!r}")
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = Owlv2ForObjectDetection.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        files = list_exemplars(directory)
        self.categories: list[str] = list(files)
        columns: list[int] = []  # which category each query embedding belongs to
        chunks = []
        with torch.inference_mode():
            for c, name in enumerate(self.categories):
                crops = [Image.open(f).convert("RGB") for f in files[name]]
                chunks.append(self.query_embeddings(crops))
                columns += [c] * len(crops)
        self.queries = torch.cat(chunks) if chunks else None  # (exemplars, dim)
        self.columns = torch.tensor(columns, dtype=torch.long, device=self.device)
        log.info("loaded %d exemplars of %d categories from %s", len(columns), len(self.categories), directory)

    def query_embeddings(self, crops: list[Image.Image]):
        """One embedding per crop, as `image_guided_detection` computes it for its query image."""
        feature_map = self._feature_map(crops)
        b, h, w, d = feature_map.shape
        query_embeds, _, _ = self.model.embed_image_query(feature_map.reshape(b, h * w, d), feature_map)
        return query_embeds[:, 0, :]

    def _feature_map(self, images: list[Image.Image]):
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return self.model.image_embedder(pixel_values=pixels.to(self.device, self.dtype))[0]

    def detect(self, images: list[Image.Image], wanted: list[list[str]]) -> list[list[ExemplarBox]]:
        """Boxes per image for the categories in `wanted[i]` that have exemplars (others are ignored)."""
        import torch

        out: list[list[ExemplarBox]] = [[] for _ in images]
        index = {name: c for c, name in enumerate(self.categories)}
        todo = [(i, sorted({index[w] for w in ws if w in index})) for i, ws in enumerate(wanted)]
        todo = [(i, cats) for i, cats in todo if cats]
        if self.queries is None:
            return out
        with torch.inference_mode():
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                feature_map = self._feature_map([images[i].convert("RGB") for i, _ in chunk])
                b, h, w, d = feature_map.shape
                feats = feature_map.reshape(b, h * w, d)
                queries = self.queries.unsqueeze(0).expand(b, -1, -1)
                mask = torch.stack([torch.isin(self.columns, torch.tensor(cats, device=self.device))
                                    for _, cats in chunk])
                logits, _ = self.model.class_predictor(feats, queries, mask)
                # numpy takes host tensors only: bring each batch's outputs over once
                pred_boxes = self.model.box_predictor(feats, feature_map).float().cpu()
                probs = logits.float().sigmoid().cpu()
                for k, (i, cats) in enumerate(chunk):
                    out[i] = self._boxes(images[i], probs[k], pred_boxes[k], cats)
        return out

    def _boxes(self, image: Image.Image, probs, pred_boxes, cats: list[int]) -> list[ExemplarBox]:
        # OWLv2 pads to a square (bottom/right) before resizing: boxes are relative to that square.
        side = max(image.width, image.height)
        columns = self.columns.cpu()
        cxcywh = pred_boxes.numpy().astype(np.float64) * side
        xyxy = B.clip(np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], 1),
                      image.width, image.height)
        found = []
        for c in cats:
            score = probs[:, columns == c].max(dim=-1).values.numpy().astype(np.float64)
            keep = np.flatnonzero((score > self.threshold) & (B.area(xyxy) > 0))
            keep = keep[B.nms(xyxy[keep], score[keep], self.nms_iou)]
            found += [ExemplarBox(tuple(float(v) for v in xyxy[j]), float(score[j]), self.categories[c])
                      for j in keep]
        found.sort(key=lambda e: -e.score)
        return found
