"""recaption / extract / ground stages on tiny real models, with failing samples and shuffled batches."""

import io
import random

import pytest
from PIL import Image

from engine.config import ExtractSpec, GroundSpec, RecaptionSpec
from engine.records import Record
from engine.stages.extract import Extract
from engine.stages.ground import Ground
from engine.stages.recaption import Recaption

pytestmark = pytest.mark.slow


def jpeg(color, size=(96, 80)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def records():
    out = []
    for i, (color, caption) in enumerate([((200, 30, 30), "a red square"), ((30, 30, 200), "a blue circle"),
                                          ((30, 200, 30), "two green triangles on a table")]):
        out.append(Record(key=f"k{i}", source="s", position=i, image=jpeg(color), width=96, height=80,
                          raw_caption=caption, caption=caption))
    broken = Record(key="broken", source="s", position=3, image=b"not an image", raw_caption="x", caption="x")
    skipped = Record(key="skipped", source="s", position=4, raw_caption="y", caption="y")
    skipped.reject("decode", "undecodable_image", "bad")
    return out + [broken, skipped]


def test_recaption_fills_captions_and_isolates_a_broken_image(model_cache):
    stage = Recaption(RecaptionSpec(model="tiny:llava", max_tokens=6, image_max_side=32), cache_dir=model_cache)
    batch = records()
    out = stage(batch)
    assert [r.key for r in out] == ["k0", "k1", "k2", "broken", "skipped"]
    for r in out[:3]:
        assert r.ok and r.caption and r.caption != r.raw_caption
        (prov,) = r.provenance
        assert prov["stage"] == "recaption" and prov["prompt_id"] == "recaption"
        assert len(prov["prompt_sha256"]) == 64 and "dummy" in prov["model"]
    assert out[3].status == "failed" and out[3].error["stage"] == "recaption"
    assert out[4].error["stage"] == "decode" and out[4].provenance == []


def test_recaption_passthrough_keeps_raw_caption():
    out = Recaption(RecaptionSpec(backend="passthrough"))(records()[:2])
    assert [r.caption for r in out] == ["a red square", "a blue circle"]
    assert out[0].provenance[0]["backend"] == "passthrough"


def test_extract_llm_output_must_pass_the_schema(model_cache):
    # random weights never write valid entities JSON: without a fallback that is a rejection with the reason
    stage = Extract(ExtractSpec(model="tiny:llama-chat", max_tokens=8), cache_dir=model_cache)
    out = stage(records()[:3])
    for r in out:
        assert r.status == "rejected", r.entities
        assert r.error["stage"] == "extract" and r.error["kind"] == "invalid_entities_json"
        assert r.provenance[0]["prompt_id"] == "factual+entities"


def test_extract_falls_back_to_nltk_and_says_so(model_cache):
    stage = Extract(ExtractSpec(model="tiny:llama-chat", max_tokens=8, factual_prompt=None, fallback="nltk"),
                    cache_dir=model_cache)
    out = stage(records()[:3])
    assert [sorted(e["category"] for e in r.entities) for r in out] == [["square"], ["circle"], ["table", "triangle"]]
    assert all("nltk fallback" in r.provenance[0]["backend"] for r in out)
    assert all(len(r.provenance) == 1 for r in out)


def test_extract_nltk_backend():
    out = Extract(ExtractSpec(backend="nltk"))(records()[:3])
    assert out[2].entities[0] == {"phrase": "two green triangles", "category": "triangle", "parent_category": "shape"}
    assert out[2].factual_caption == out[2].caption


def test_ground_assigns_whole_entities_and_is_order_independent(model_cache):
    spec = GroundSpec(model="tiny:grounding-dino", box_threshold=0.05, text_threshold=0.05)
    stage = Ground(spec, cache_dir=model_cache)
    batch = Extract(ExtractSpec(backend="nltk"))(records())
    batch[3].entities = [{"phrase": "a box", "category": "box", "parent_category": "container"}]  # broken image
    batch.append(Record(key="no-entities", source="s", image=jpeg((0, 0, 0)), caption="", entities=[]))
    out = stage([r.copy() for r in batch])
    by_key = {r.key: r for r in out}
    assert any(by_key[k].boxes for k in ("k0", "k1", "k2"))
    for key in ("k0", "k1", "k2"):
        r = by_key[key]
        for box in r.boxes:
            assert 0 <= box["entity"] < len(r.entities)
            assert box["matched"] in ("phrase", "category")
            assert box["teacher"] == "tiny:grounding-dino"
            x0, y0, x1, y1 = box["xyxy"]
            assert 0 <= x0 <= x1 <= 96 and 0 <= y0 <= y1 <= 80
    assert by_key["no-entities"].boxes == [] and by_key["no-entities"].ok
    assert by_key["broken"].status == "failed"
    shuffled = [r.copy() for r in batch]
    random.Random(0).shuffle(shuffled)
    again = {r.key: r for r in Ground(spec, cache_dir=model_cache)(shuffled)}
    for key in ("k0", "k1", "k2"):
        got = [(b["entity"], b["matched"]) for b in again[key].boxes]
        assert got == [(b["entity"], b["matched"]) for b in by_key[key].boxes]
        for a, b in zip(again[key].boxes, by_key[key].boxes):
            assert a["xyxy"] == pytest.approx(b["xyxy"], abs=1e-3)
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
