"""The transformers chat and grounding backends on tiny random-weight models (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.backends.base import BackendSpec, ChatRequest, make_chat_backend, make_grounding_backend

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _user(text: str, **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], **kw)


@pytest.fixture(scope="module")
def llama(model_cache):
    spec = BackendSpec("tiny:llama-chat", {"cache_dir": model_cache, "device": "cpu"})
    return make_chat_backend("transformers", spec)


@pytest.fixture(scope="module")
def llava(model_cache):
    return make_chat_backend("transformers", BackendSpec("tiny:llava", {"cache_dir": model_cache, "device": "cpu"}))


def _grounding(model_cache, name: str, **options):
    options = {"cache_dir": model_cache, "device": "cpu", "num_threads": 1, "box_threshold": 0.3,
               "text_threshold": 0.25, **options}
    return make_grounding_backend("transformers", BackendSpec(f"tiny:{name}", options))


@pytest.fixture(scope="module")
def gdino(model_cache):
    return _grounding(model_cache, "grounding-dino")


@pytest.fixture(scope="module")
def owl(model_cache):
    return _grounding(model_cache, "owlv2")


# -- chat ---------------------------------------------------------------------------------------------


def test_chat_batch_matches_single_greedy(llama):
    assert llama.model_id == "tiny:llama-chat" and not llama.is_vlm
    requests = [
        _user("Describe a cat on a sofa.", max_tokens=6),
        ChatRequest(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                    max_tokens=9),
        _user("List the objects in a kitchen with many things in it.", max_tokens=4),
    ]
    batch = llama.generate(requests)
    assert len(batch) == 3
    for req, res in zip(requests, batch):
        assert res.error is None and res.text
        assert 0 < res.completion_tokens <= req.max_tokens
        assert res.prompt_tokens > 0
        if res.finish_reason == "length":
            assert res.completion_tokens == req.max_tokens
        else:
            assert res.finish_reason == "stop"
    singles = [llama.generate([r])[0] for r in requests]
    assert [s.text for s in singles] == [b.text for b in batch]
    assert [s.prompt_tokens for s in singles] == [b.prompt_tokens for b in batch]


def test_chat_hits_length(llama):
    res = llama.generate([_user("Tell me a long story.", max_tokens=3)])[0]
    # random weights rarely produce eos in 3 tokens; this seed's model does not
    assert res.finish_reason == "length" and res.completion_tokens == 3


def test_chat_sampling_is_seeded(llama):
    a = llama.generate([_user("Describe a dog.", max_tokens=8, temperature=1.0, seed=7)])[0]
    b = llama.generate([_user("Describe a dog.", max_tokens=8, temperature=1.0, seed=7),
                        _user("Other.", max_tokens=8, temperature=1.0, seed=8)])[0]
    assert a.text == b.text


def test_text_model_rejects_image_per_request(llama):
    results = llama.generate([_user("What is this?", image=_noise(40, 30, 0), max_tokens=3),
                              _user("Describe a bird.", max_tokens=3)])
    assert results[0].error and "image" in results[0].error
    assert results[1].error is None and results[1].completion_tokens == 3


def test_vlm_with_and_without_image(llava):
    assert llava.is_vlm
    requests = [
        _user("Describe the image.", image=_noise(64, 48, 1), max_tokens=5),
        _user("Describe a red car.", max_tokens=4),
        _user("What is in the picture?", image=_noise(30, 50, 2), max_tokens=5),
    ]
    results = llava.generate(requests)
    assert all(r.error is None for r in results), results
    assert results[0].prompt_tokens > results[1].prompt_tokens  # image tokens count as prompt
    assert all(0 < r.completion_tokens <= q.max_tokens for r, q in zip(results, requests))
    single = llava.generate([requests[2]])[0]
    assert single.text == results[2].text


# -- grounding ----------------------------------------------------------------------------------------


def _phrases(prompt: str) -> set[str]:
    return {p.strip() for p in prompt.split(".") if p.strip()}


@pytest.mark.parametrize("name", ["grounding-dino", "owlv2", "omdet-turbo"])
def test_boxes_in_bounds_and_labels_from_prompt(model_cache, name):
    backend = _grounding(model_cache, name)
    images = [_noise(200, 150, 3), _noise(90, 160, 4)]
    prompts = [["a cat. a dog. remote control.", "sofa."], ["person. red car."]]
    results = backend.detect(images, prompts)
    assert len(results) == 2 and all(results)
    for image, ps, dets in zip(images, prompts, results):
        for det in dets:
            x1, y1, x2, y2 = det.xyxy
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
            assert det.score > 0.3
            assert 0 <= det.prompt_index < len(ps)
            assert det.label in _phrases(ps[det.prompt_index])
    assert {d.prompt_index for d in results[0]} == {0, 1}


@pytest.mark.parametrize("name", ["grounding-dino", "owlv2", "omdet-turbo"])
def test_batch_equals_single(model_cache, name):
    # Different prompt lengths / class counts per image: the batch pads them, which must not change any boxes.
    backend = _grounding(model_cache, name, batch_size=4)
    images = [_noise(160, 120, 5), _noise(160, 120, 6)]
    prompts = [["a cat. a dog."], ["a bowl of fruit. table. chair. a lamp."]]
    batched = backend.detect(images, prompts)
    singles = [backend.detect([im], [ps])[0] for im, ps in zip(images, prompts)]
    for b, s in zip(batched, singles):
        assert len(b) == len(s) and len(b) > 0
        for db, ds in zip(b, s):
            assert db.label == ds.label and db.prompt_index == ds.prompt_index
            assert db.score == pytest.approx(ds.score, abs=1e-4)
            assert np.allclose(db.xyxy, ds.xyxy, atol=1e-2)


@pytest.mark.parametrize("name", ["grounding-dino", "owlv2"])
def test_higher_threshold_never_more_boxes(model_cache, name):
    images = [_noise(120, 100, 7)]
    prompts = [["a cat. a dog. a tree."]]
    counts = []
    for threshold in (0.1, 0.5, 0.7, 0.9):
        backend = _grounding(model_cache, name, box_threshold=threshold, text_threshold=0.0)
        dets = backend.detect(images, prompts)[0]
        assert all(d.score > threshold for d in dets)
        counts.append(len(dets))
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


def test_token_limits(gdino, owl):
    assert gdino.max_text_tokens == 256 and owl.max_text_tokens == 16
    assert gdino.count_tokens("a cat. a dog.") == 8  # [CLS] a cat . a dog . [SEP]
    # OWL runs each label as its own query: a prompt costs its longest label
    assert owl.count_tokens("a cat. a very small brown dog.") == owl.count_tokens("a very small brown dog")
    assert gdino.model_id == "tiny:grounding-dino"


def test_empty_prompts_and_modes(gdino):
    images = [_noise(50, 40, 8).convert("L"), _noise(60, 40, 9)]
    results = gdino.detect(images, [[], ["  .  "]])
    assert results == [[], []]
    assert gdino.detect([], []) == []
    with pytest.raises(ValueError):
        gdino.detect(images, [["a cat."]])
