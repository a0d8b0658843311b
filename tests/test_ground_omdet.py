"""OmDet-Turbo in the transformers grounding backend and the ground stage, on the tiny random-weight model (CPU)."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
from PIL import Image

from engine.backends.base import BackendSpec, make_grounding_backend
from engine.config import GroundSpec
from engine.records import Record
from engine.stages.ground import Ground, plan_prompts

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _backend(model_cache, **options):
    options = {"cache_dir": model_cache, "device": "cpu", "num_threads": 1, "box_threshold": 0.3,
               "text_threshold": 0.25, **options}
    return make_grounding_backend("transformers", BackendSpec("tiny:omdet-turbo", options))


@pytest.fixture(scope="module")
def omdet(model_cache):
    return _backend(model_cache)


def test_tiny_model_loads_with_auto_classes(omdet):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    from engine.backends.transformers_grounding import load_processor

    model = AutoModelForZeroShotObjectDetection.from_pretrained(omdet.path)
    assert type(model).__name__ == "OmDetTurboForObjectDetection" and model.config.model_type == "omdet-turbo"
    assert model.config.backbone_config.model_type == "swin"  # no timm
    if importlib.util.find_spec("torchvision") is not None:
        processor = AutoProcessor.from_pretrained(omdet.path)
    else:  # OmDetTurboProcessor is a torchvision-only placeholder at the top level of transformers
        with pytest.raises(ImportError, match="(?i)torchvision"):
            AutoProcessor.from_pretrained(omdet.path)
        processor = load_processor(omdet.path)
    assert type(processor).__name__ == "OmDetTurboProcessor"
    tok = processor.tokenizer
    assert tok.eos_token_id == len(tok) - 1 == model.config.text_config.eos_token_id  # argmax pooling finds eos
    inputs = processor(images=[_noise(64, 48, 0)], text=[["cat", "dog"]], task=["Detect cat, dog."],
                       max_length=32, return_tensors="pt")
    with torch.inference_mode():
        out = model(**inputs)
    assert out.decoder_class_logits.shape == (1, 20, 2) and out.decoder_coord_logits.shape == (1, 20, 4)


# Boxes in bounds, labels from the prompt, and batch = single run for OmDet-Turbo in the parametrized
# tests of tests/test_transformers_backends.py, beside Grounding DINO and OWLv2.


def test_best_class_varies_over_queries(omdet):
    dets = omdet.detect([_noise(200, 150, 3)], [["a cat. a dog. remote control.", "sofa."]])[0]
    assert len({d.label for d in dets}) > 2


def test_higher_threshold_never_more_boxes(model_cache):
    images = [_noise(120, 100, 7)]
    prompts = [["a cat. a dog. a tree."]]
    counts, previous = [], None
    for threshold in (0.1, 0.5, 0.7, 0.9):
        dets = _backend(model_cache, box_threshold=threshold).detect(images, prompts)[0]
        assert all(d.score > threshold for d in dets)
        if previous is not None:  # NMS is per class and greedy by score: a higher threshold keeps a subset
            assert {(d.label, d.xyxy) for d in dets} <= previous
        previous = {(d.label, d.xyxy) for d in dets}
        counts.append(len(dets))
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


def test_token_limits_pack_whole_task_sentences(omdet):
    tok = omdet.tokenizer
    limit = omdet.max_text_tokens  # what the backend truncates each task sentence to
    entities = [{"phrase": f"a small red thing number {i}", "category": f"thing{i}"} for i in range(12)]
    plan = plan_prompts(entities, count_tokens=omdet.count_tokens, max_tokens=omdet.max_text_tokens)
    assert len(plan.prompts) > 3
    assert sorted(t for texts in plan.prompt_texts for t in texts) == sorted(
        {f"a small red thing number {i}" for i in range(12)} | {f"thing{i}" for i in range(12)})
    for texts in plan.prompt_texts:
        # the task sentence OmDet-Turbo reads ("Detect a, b, c.") fits whole: no class is cut off
        assert len(tok("Detect " + ", ".join(texts) + ".")["input_ids"]) <= limit


def test_class_nms_is_per_class_and_greedy():
    from engine.backends.transformers_grounding import _class_nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=torch.float)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])
    assert _class_nms(boxes, scores, labels, 0.5) == [0, 2, 3]
    assert _class_nms(boxes, scores, labels, 1.0) == [0, 1, 2, 3]


def test_ground_stage_assigns_omdet_boxes_to_entities(model_cache):
    entities = [{"phrase": "a red cat", "category": "cat", "parent_category": "animal"},
                {"phrase": "a wooden table", "category": "table", "parent_category": "furniture"},
                {"phrase": "a green lamp", "category": "lamp", "parent_category": "furniture"}]
    buf = io.BytesIO()
    _noise(160, 120, 8).save(buf, format="JPEG")
    rec = Record(key="o", source="s", image=buf.getvalue(), width=160, height=120, caption="c", entities=entities)
    stage = Ground(GroundSpec(model="tiny:omdet-turbo", box_threshold=0.3, text_threshold=0.0),
                   cache_dir=model_cache)
    out = stage([rec])[0]
    assert out.boxes
    for b in out.boxes:
        x0, y0, x1, y1 = b["xyxy"]
        assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 120
        assert b["score"] > 0.3 and b["teacher"] == "tiny:omdet-turbo"
        assert 0 <= b["entity"] < 3 and b["matched"] in ("phrase", "category")
    assert {b["matched"] for b in out.boxes} == {"phrase", "category"}
    assert out.provenance[0]["model"] == "tiny:omdet-turbo (dummy weights)"  # tiny: models are random weights
