"""Visual exemplars (T-Rex2 idea) through tiny OWLv2 image-guided detection."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.backends.owlv2_exemplars import ExemplarDetector, list_exemplars
from engine.config import ExemplarSpec, GroundSpec
from engine.models.loading import resolve_model
from engine.stages.ground import Ground
from tests.test_ground_teacher import noise_jpeg, record

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exemplar_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("exemplars")
    rng = np.random.default_rng(0)
    for category, n in (("cat", 2), ("Red Sofa", 1), ("empty", 0)):
        (root / category).mkdir()
        for i in range(n):
            array = rng.integers(0, 255, (40 + 10 * i, 30, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / category / f"{i}.jpg")
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_listing(exemplar_dir):
    found = list_exemplars(exemplar_dir)
    assert list(found) == ["Red Sofa", "cat"] and [p.name for p in found["cat"]] == ["0.jpg", "1.jpg"]
    with pytest.raises(FileNotFoundError):
        list_exemplars(exemplar_dir / "missing")


def test_cached_query_embeddings_equal_image_guided_detection(model_cache, exemplar_dir):
    from transformers import AutoProcessor, Owlv2ForObjectDetection

    detector = ExemplarDetector(str(exemplar_dir), model="tiny:owlv2", threshold=0.0, cache_dir=model_cache,
                                device="cpu")
    path = resolve_model("tiny:owlv2", model_cache)
    model, processor = Owlv2ForObjectDetection.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
    target = Image.open(__import__("io").BytesIO(noise_jpeg(3))).convert("RGB")
    query = Image.open(exemplar_dir / "Red Sofa" / "0.jpg").convert("RGB")
    inputs = processor(images=target, query_images=query, return_tensors="pt")
    with torch.inference_mode():
        reference = model.image_guided_detection(**inputs)
    probs = reference.logits[0, :, 0].sigmoid().numpy()
    boxes = detector.detect([target], [["Red Sofa"]])[0]
    assert boxes and all(b.category == "Red Sofa" for b in boxes)
    side = max(target.size)
    ref_xyxy = reference.target_pred_boxes[0].numpy() * side
    ref_xyxy = np.concatenate([ref_xyxy[:, :2] - ref_xyxy[:, 2:] / 2, ref_xyxy[:, :2] + ref_xyxy[:, 2:] / 2], 1)
    for b in boxes:  # each kept box is one of the reference's patch boxes, with the reference's score
        j = int(np.argmin(np.abs(probs - b.score)))
        assert probs[j] == pytest.approx(b.score, abs=1e-5)
        clipped = np.clip(ref_xyxy[j], 0, [target.width, target.height] * 2)
        assert np.allclose(b.xyxy, clipped, atol=1e-3)
    assert max(b.score for b in boxes) == pytest.approx(float(probs.max()), abs=1e-5)


def test_ground_adds_exemplar_boxes_for_the_samples_categories(model_cache, exemplar_dir):
    spec = GroundSpec(model="tiny:grounding-dino", box_threshold=0.99, text_threshold=0.99,
                      exemplars=ExemplarSpec(dir=str(exemplar_dir), model="tiny:owlv2", threshold=0.0))
    entities = [{"phrase": "a tabby", "category": "Cats", "parent_category": "animal"},  # not "cat": no exemplars
                {"phrase": "a kitten", "category": "cat", "parent_category": "animal"},
                {"phrase": "a black cat", "category": "cat", "parent_category": "animal"},
                {"phrase": "couch", "category": "red sofa", "parent_category": "furniture"}]
    out = Ground(spec, cache_dir=model_cache)([record("e", 4, entities),
                                               record("none", 5, [{"phrase": "a dog", "category": "dog",
                                                                   "parent_category": "animal"}])])
    ex = [b for b in out[0].boxes if b["matched"] == "exemplar"]
    assert ex and {b["entity"] for b in ex} == {1, 3}  # first entity of each exemplar category
    assert all(b["teacher"] == "tiny:owlv2" for b in ex)
    for b in ex:
        x0, y0, x1, y1 = b["xyxy"]
        assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 120
    assert out[1].boxes == [] and out[1].ok
    assert '"exemplars"' in out[0].provenance[0]["params"]
