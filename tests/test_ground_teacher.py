"""The ground stage on tiny Grounding DINO / OWLv2: prompt splitting, per-field thresholds, batching, dummy weights."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.backends.base import BackendSpec, make_grounding_backend
from engine.config import GroundSpec
from engine.records import Record
from engine.stages.ground import Ground, match_label, normalize_text, plan_prompts

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "pink", "orange", "purple", "gray"]
THINGS = ["cat", "dog", "sofa", "table", "lamp", "chair", "car", "tree", "cup", "bottle", "book", "phone"]


def noise_jpeg(seed: int, size=(160, 120)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def record(key: str, seed: int, entities: list[dict], size=(160, 120)) -> Record:
    return Record(key=key, source="s", image=noise_jpeg(seed, size), width=size[0], height=size[1],
                  caption="c", entities=entities)


def many_entities(n: int) -> list[dict]:
    return [{"phrase": f"a {COLORS[i % len(COLORS)]} {THINGS[i % len(THINGS)]} number {i}",
             "category": f"{THINGS[i % len(THINGS)]}{i}", "parent_category": "thing"} for i in range(n)]


def spec(name: str = "grounding-dino", **kw) -> GroundSpec:
    return GroundSpec(**{"model": f"tiny:{name}", "box_threshold": 0.3, "text_threshold": 0.25, **kw})


def boxes_of(rec: Record) -> list[tuple]:
    return sorted((b["entity"], b["matched"], round(b["score"], 4), *np.round(b["xyxy"], 2)) for b in rec.boxes)


def assert_same_boxes(got: list[dict], want: list[dict]) -> None:
    key = lambda b: (b["entity"], b["matched"], -b["score"])  # noqa: E731
    got, want = sorted(got, key=key), sorted(want, key=key)
    assert [(b["entity"], b["matched"]) for b in got] == [(b["entity"], b["matched"]) for b in want]
    for a, b in zip(got, want):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert np.allclose(a["xyxy"], b["xyxy"], atol=1e-2)


def test_split_600_token_vocabulary_equals_its_chunks_run_by_hand(model_cache):
    stage = Ground(spec(), cache_dir=model_cache)
    entities = many_entities(70)
    out = stage([record("big", 1, entities)])[0]
    backend = stage.backend
    plan = plan_prompts(entities, count_tokens=backend.count_tokens, max_tokens=backend.max_text_tokens)
    total = backend.count_tokens(". ".join(plan.texts) + ".")
    assert total > 600 and len(plan.prompts) >= 3
    assert all(backend.count_tokens(p) <= backend.max_text_tokens for p in plan.prompts)
    # every entity's phrase and category is prompted, once
    wanted = {normalize_text(e[f]) for e in entities for f in ("phrase", "category")}
    packed = [t for texts in plan.prompt_texts for t in texts]
    assert sorted(packed) == sorted(wanted)
    image = Image.open(io.BytesIO(out.image)).convert("RGB")
    by_hand = []
    for prompt, texts in zip(plan.prompts, plan.prompt_texts):
        for det in backend.detect([image], [[prompt]])[0]:  # one chunk, one forward pass, no batching
            entity, field = plan.owners[match_label(det.label, texts)]
            by_hand.append({"xyxy": det.xyxy, "score": det.score, "entity": entity, "matched": field})
    assert len(by_hand) > 5
    assert {b["matched"] for b in by_hand} == {"phrase", "category"}
    assert len({b["entity"] for b in out.boxes}) > 3  # boxes come from several chunks' entities
    assert_same_boxes(out.boxes, by_hand)


@pytest.mark.parametrize(("name", "high", "low"), [("grounding-dino", 0.85, 0.75), ("owlv2", 0.55, 0.45)])
def test_per_field_thresholds_only_move_that_fields_boxes(model_cache, name, high, low):
    entities = [{"phrase": f"{COLORS[i]} {THINGS[i]}", "category": THINGS[(i + 5) % 12], "parent_category": "x"}
                for i in range(8)]

    def run(**kw):
        return Ground(spec(name, text_threshold=0.0, **kw), cache_dir=model_cache)([record("a", 2, entities)])[0]

    every = run(box_threshold=0.0).boxes
    above = lambda field, t: [b for b in every if b["matched"] == field and b["score"] > t]  # noqa: E731
    assert above("phrase", high) and above("category", high)
    assert len(above("category", low)) > len(above("category", high))  # the override has boxes to let in
    assert_same_boxes(run(box_threshold=high).boxes, above("phrase", high) + above("category", high))
    assert_same_boxes(run(box_threshold=high, phrase_threshold=1.0).boxes, above("category", high))
    lowered = run(box_threshold=high, category_threshold=low)
    assert_same_boxes(lowered.boxes, above("phrase", high) + above("category", low))
    assert f'"category_threshold": {low}' in lowered.provenance[0]["params"]


@pytest.mark.parametrize("name", ["grounding-dino", "owlv2"])
def test_batch_of_n_images_equals_n_single_calls(model_cache, name):
    # Same-size images: the backend pads a batch to its largest image, which shifts scores when sizes differ.
    stage = Ground(spec(name, forward_batch_size=8), cache_dir=model_cache)
    batch = [record(f"k{i}", 10 + i, many_entities(3 + 2 * i)) for i in range(4)]
    together = stage([r.copy() for r in batch])
    assert sum(len(r.boxes) for r in together) > 4
    for r, got in zip(batch, together):
        alone = stage([r.copy()])[0]
        assert_same_boxes(got.boxes, alone.boxes)


def test_owl_labels_map_back_to_entity_and_field(model_cache):
    entities = many_entities(6)
    out = Ground(spec("owlv2"), cache_dir=model_cache)([record("o", 3, entities, size=(90, 160))])[0]
    assert out.boxes
    for b in out.boxes:
        x0, y0, x1, y1 = b["xyxy"]
        assert 0 <= x0 < x1 <= 90 and 0 <= y0 < y1 <= 160
        assert b["teacher"] == "tiny:owlv2" and 0 <= b["entity"] < 6


def test_shipped_default_teacher_config_is_grounding_dino_tiny(model_cache):
    from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor, GroundingDinoConfig

    from engine.models.dummy import dummy_source

    source = dummy_source("IDEA-Research/grounding-dino-tiny", model_cache)
    config = AutoConfig.from_pretrained(source)
    assert config.to_diff_dict() == GroundingDinoConfig().to_diff_dict() | {"architectures": config.architectures}
    with torch.device("meta"):  # the real 172M-parameter module tree, no memory spent
        model = AutoModelForZeroShotObjectDetection.from_config(config)
    assert type(model).__name__ == "GroundingDinoForObjectDetection"
    assert 170e6 < sum(p.numel() for p in model.parameters()) < 175e6
    processor = AutoProcessor.from_pretrained(source)
    assert processor.tokenizer("a cat.")["input_ids"] == [101, 1037, 4937, 1012, 102]
    assert processor.image_processor.size == {"shortest_edge": 800, "longest_edge": 1333}


def test_dummy_weights_build_the_architecture_with_fixed_random_weights(model_cache):
    options = {"cache_dir": model_cache, "device": "cpu", "box_threshold": 0.0, "text_threshold": 0.0}
    loaded = make_grounding_backend("transformers", BackendSpec("tiny:grounding-dino", options))
    dummy = [make_grounding_backend("transformers", BackendSpec("tiny:grounding-dino", {**options, "dummy_weights": True}))
             for _ in range(2)]
    image = Image.open(io.BytesIO(noise_jpeg(4))).convert("RGB")
    a, b = (d.detect([image], [["a cat. a dog."]])[0] for d in dummy)
    assert [d.score for d in a] == [d.score for d in b] and a  # same seed, same weights
    assert [d.score for d in a] != [d.score for d in loaded.detect([image], [["a cat. a dog."]])[0]]
    out = Ground(spec(dummy_weights=True), cache_dir=model_cache)([record("d", 5, many_entities(2))])[0]
    assert out.provenance[0]["model"] == "tiny:grounding-dino (dummy weights)"
