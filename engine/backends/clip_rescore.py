"""CLIP re-scoring of teacher boxes (YOLO-World's pseudo-label refinement).

Each box is cropped from its image; CLIP scores the crop against every text of the sample (its phrases and
categories), the softmax gives the probability of the box's own text, and the new score is
sqrt(detector score * CLIP probability). With a single text in a sample the softmax is 1 and the score
becomes sqrt(detector score): CLIP can only re-rank among the texts it is shown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from PIL import Image

from engine.models.loading import pick_device, pick_dtype, resolve_model

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Crop:
    """One box to re-score: which image, where, and which of `texts` is its own."""

    image: int  # index into the images given to `ClipRescorer.probs`
    xyxy: tuple[float, float, float, float]
    text: int  # index into that image's texts


def combine(det_score: float, clip_prob: float) -> float:
    """YOLO-World's rule: geometric mean of detector confidence and CLIP probability."""
    return (max(det_score, 0.0) * max(clip_prob, 0.0)) ** 0.5


class ClipRescorer:
    """A transformers `CLIPModel`, loaded once per worker; crops and texts are embedded in batches."""

    def __init__(self, model: str, *, cache_dir: str | None = None, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 32) -> None:
        from transformers import AutoProcessor, CLIPModel

        self.model_id = model
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.batch_size = batch_size
        path = resolve_model(model, cache_dir)
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = CLIPModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.max_text_tokens = int(self.model.config.text_config.max_position_embeddings)
        log.info("loaded re-scorer %s on %s/%s", model, self.device, self.dtype)

    def probs(self, images: list[Image.Image], texts: list[list[str]], crops: list[Crop]) -> list[float]:
        """CLIP probability of each crop's own text among its image's texts, 1:1 with `crops`."""
        import torch

        if not crops:
            return []
        vocab = sorted({t for ts in texts for t in ts})
        with torch.inference_mode():
            text_emb = self._embed_texts(vocab)
            crop_emb = self._embed_crops([_crop(images[c.image], c.xyxy) for c in crops])
            scale = self.model.logit_scale.exp().float()
            row = {t: k for k, t in enumerate(vocab)}
            out = []
            for c, emb in zip(crops, crop_emb):
                ids = torch.tensor([row[t] for t in texts[c.image]], device=text_emb.device)
                logits = scale * emb @ text_emb[ids].T
                out.append(float(logits.softmax(-1)[c.text]))
        return out

    def _embed_texts(self, texts: list[str]):
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.processor(text=texts[start:start + self.batch_size], padding=True, truncation=True,
                                    max_length=self.max_text_tokens, return_tensors="pt").to(self.device)
            chunks.append(_features(self.model.get_text_features(**inputs)))
        return _unit(chunks)

    def _embed_crops(self, crops: list[Image.Image]):
        chunks = []
        for start in range(0, len(crops), self.batch_size):
            inputs = self.processor(images=crops[start:start + self.batch_size], return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, self.dtype)
            chunks.append(_features(self.model.get_image_features(pixel_values=pixels)))
        return _unit(chunks)


def _crop(image: Image.Image, xyxy: tuple[float, float, float, float]) -> Image.Image:
    """The box's pixels, at least 1x1 (boxes are clipped to the image already)."""
    x0, y0, x1, y1 = (int(round(v)) for v in xyxy)
    x0, y0 = min(max(x0, 0), image.width - 1), min(max(y0, 0), image.height - 1)
    return image.crop((x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)))


def _features(out):
    """transformers 5 returns a model output whose pooler_output is the projected embedding; 4 a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _unit(chunks):
    import torch

    emb = torch.cat(chunks).float()
    return emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
