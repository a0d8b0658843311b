"""CLIP re-scoring (YOLO-World style) on tiny Grounding DINO + tiny CLIP, checked against CLIP run by hand."""

from __future__ import annotations

import io
import math

import pytest
from PIL import Image

from engine.config import GroundSpec, RescoreSpec
from engine.models.loading import resolve_model
from engine.stages.ground import Ground, normalize_text, plan_prompts
from tests.test_ground_teacher import many_entities, record

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


def test_rescored_score_is_sqrt_of_detector_times_clip_prob(model_cache):
    from transformers import AutoProcessor, CLIPModel

    entities = many_entities(4)
    base = dict(model="tiny:grounding-dino", box_threshold=0.3, text_threshold=0.25)
    plain = Ground(GroundSpec(**base), cache_dir=model_cache)([record("r", 7, entities)])[0]
    spec = GroundSpec(**base, rescore=RescoreSpec(enabled=True, model="tiny:clip", batch_size=3))
    stage = Ground(spec, cache_dir=model_cache)
    rescored = stage([record("r", 7, entities)])[0]
    assert len(plain.boxes) >= 3
    assert [(b["entity"], b["matched"], b["xyxy"]) for b in rescored.boxes] == \
        [(b["entity"], b["matched"], b["xyxy"]) for b in plain.boxes]
    assert '"rescore": "tiny:clip"' in rescored.provenance[0]["params"]

    # CLIP by hand: crop, score against all the sample's texts, softmax, prob of the box's own text
    path = resolve_model("tiny:clip", model_cache)
    clip, processor = CLIPModel.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    texts = plan_prompts(entities, count_tokens=stage.backend.count_tokens, max_tokens=256).texts
    image = Image.open(io.BytesIO(plain.image)).convert("RGB")
    changed = 0
    for before, after in zip(plain.boxes, rescored.boxes):
        own = normalize_text(entities[before["entity"]][before["matched"]])
        x0, y0, x1, y1 = (int(round(v)) for v in before["xyxy"])
        inputs = processor(text=texts, images=image.crop((x0, y0, x1, y1)), padding=True, return_tensors="pt")
        with torch.inference_mode():
            prob = clip(**inputs).logits_per_image.softmax(-1)[0, texts.index(own)].item()
        assert after["score"] == pytest.approx(math.sqrt(before["score"] * prob), abs=1e-4)
        changed += abs(after["score"] - before["score"]) > 1e-3
    assert changed == len(plain.boxes)
