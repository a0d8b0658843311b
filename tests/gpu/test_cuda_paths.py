"""Paths only a CUDA device runs: models in bfloat16 on the GPU ('auto' dtype there), host copies of device
outputs, the GPU's own random state, real device out-of-memory inside a stage, and the student's bf16
autocast training. Skipped without CUDA (tests/gpu/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine.backends.base import BackendSpec, ChatRequest, make_chat_backend, make_grounding_backend

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

TEACHERS = ["grounding-dino", "owlv2", "omdet-turbo"]
IMAGES = [(200, 150, 3), (90, 160, 4), (160, 160, 5)]
PROMPTS = [["a cat. a dog. remote control.", "sofa."], ["person. red car."], ["a bowl of fruit. table. chair."]]
THRESHOLD = 0.3


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _teacher(model_cache, name: str, **options):
    options = {"cache_dir": model_cache, "box_threshold": THRESHOLD, "text_threshold": 0.25, **options}
    return make_grounding_backend("transformers", BackendSpec(f"tiny:{name}", options))


def _confident(dets, margin: float):
    """Detections clear of the threshold, keyed for matching: near-threshold boxes may fairly differ."""
    return [d for d in dets if d.score > THRESHOLD + margin]


def _iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _assert_valid(images, prompts, results):
    assert len(results) == len(images)
    for image, ps, dets in zip(images, prompts, results):
        for det in dets:
            x1, y1, x2, y2 = det.xyxy
            assert all(np.isfinite(det.xyxy)) and np.isfinite(det.score)
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height
            assert THRESHOLD < det.score <= 1
            assert det.label in {p.strip() for p in ps[det.prompt_index].split(".") if p.strip()}


@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_on_the_gpu_in_float32_finds_the_cpu_boxes(model_cache, name, exact_float32):
    images = [_noise(*args) for args in IMAGES]
    cpu = _teacher(model_cache, name, device="cpu", dtype="float32").detect(images, PROMPTS)
    gpu_backend = _teacher(model_cache, name, device="cuda", dtype="float32")
    assert next(gpu_backend.model.parameters()).is_cuda
    gpu = gpu_backend.detect(images, PROMPTS)
    _assert_valid(images, PROMPTS, gpu)
    assert sum(map(len, cpu)) > 0
    for c_dets, g_dets in zip(cpu, gpu):
        for c in _confident(c_dets, 1e-3):
            # Random weights put many boxes on the same edges with different scores: the CPU box has its
            # twin among them, not necessarily the first.
            same = [g for g in g_dets if g.label == c.label and g.prompt_index == c.prompt_index
                    and np.allclose(g.xyxy, c.xyxy, atol=0.05) and abs(g.score - c.score) <= 1e-4]
            assert same, (c, g_dets)


@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_in_auto_dtype_runs_bfloat16_on_the_gpu_and_stays_near_float32(model_cache, name, exact_float32):
    images = [_noise(*args) for args in IMAGES]
    bf16 = _teacher(model_cache, name, device="cuda")
    assert bf16.dtype == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.bfloat16
    low = bf16.detect(images, PROMPTS)
    _assert_valid(images, PROMPTS, low)
    full = _teacher(model_cache, name, device="cuda", dtype="float32").detect(images, PROMPTS)
    confident = [(i, d) for i, dets in enumerate(full) for d in _confident(dets, 0.1)]
    assert confident
    # Random weights make labels near ties, and Grounding DINO picks its queries as a top-k over near-tied
    # encoder scores, so bfloat16's rounding swaps some boxes or labels; a wrong dtype or scale in the path
    # moves every box. So: most boxes keep their place (whatever their label), many keep their label too.
    def gap(g, d):
        return float(np.abs(np.subtract(g.xyxy, d.xyxy)).max())
    placed = labelled = 0
    for i, d in confident:
        tolerance = 0.02 * max(images[i].size)
        placed += any(gap(g, d) <= tolerance for g in low[i])
        labelled += any(gap(g, d) <= tolerance and g.label == d.label for g in low[i])
    assert placed >= 0.8 * len(confident) and labelled >= 0.6 * len(confident), (placed, labelled, len(confident))


def _chat(model_cache, model: str, **options):
    return make_chat_backend("transformers", BackendSpec(model, {"cache_dir": model_cache, **options}))


def _user(text: str, **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], **kw)


def test_chat_on_the_gpu_greedy_matches_cpu_and_seeded_sampling_leaves_the_gpu_generator_alone(
        model_cache, exact_float32):
    texts = ["Describe a cat.", "Two dogs on a red sofa, one asleep.", "x"]
    greedy = [_user(t, max_tokens=12) for t in texts]
    cpu = _chat(model_cache, "tiny:llama-chat", device="cpu", dtype="float32").generate(greedy)
    gpu_backend = _chat(model_cache, "tiny:llama-chat", device="cuda", dtype="float32")
    gpu = gpu_backend.generate(greedy)
    assert [r.text for r in gpu] == [r.text for r in cpu]
    assert [r.completion_tokens for r in gpu] == [r.completion_tokens for r in cpu]

    sampled = [_user("Describe a cat.", max_tokens=12, temperature=1.0, seed=7)]
    state = torch.cuda.get_rng_state()
    first = gpu_backend.generate(sampled)[0].text
    assert torch.equal(torch.cuda.get_rng_state(), state)  # a seeded request forks the GPU generator
    torch.cuda.manual_seed(1234)  # whatever the process did to the GPU generator in between
    assert gpu_backend.generate(sampled)[0].text == first


def test_vision_chat_in_bfloat16_on_the_gpu_takes_an_image(model_cache):
    llava = _chat(model_cache, "tiny:llava", device="cuda")
    assert llava.dtype == torch.bfloat16
    requests = [_user("What is in the image?", image=_noise(64, 48, 1), max_tokens=8),
                _user("And here?", image=_noise(30, 70, 2), max_tokens=8)]
    results = llava.generate(requests)
    assert [r.error for r in results] == [None, None]
    assert all(r.completion_tokens > 0 and r.prompt_tokens > 0 for r in results)
    assert llava.generate(requests[1:])[0].text == results[1].text


def test_clip_rescorer_on_the_gpu_matches_cpu(model_cache, exact_float32):
    from engine.backends.clip_rescore import ClipRescorer, Crop

    images = [_noise(120, 90, 8), _noise(64, 64, 9)]
    texts = [["cat", "dog", "red sofa"], ["person", "car"]]
    crops = [Crop(0, (10, 10, 60, 50), 0), Crop(0, (0, 0, 120, 90), 2), Crop(1, (5, 5, 40, 60), 1)]
    cpu = ClipRescorer("tiny:clip", cache_dir=model_cache, device="cpu", dtype="float32").probs(images, texts, crops)
    gpu = ClipRescorer("tiny:clip", cache_dir=model_cache, device="cuda", dtype="float32").probs(images, texts, crops)
    assert gpu == pytest.approx(cpu, abs=1e-4)
    bf16 = ClipRescorer("tiny:clip", cache_dir=model_cache, device="cuda").probs(images, texts, crops)
    assert all(0 <= p <= 1 for p in bf16) and bf16 == pytest.approx(cpu, abs=0.05)


def test_exemplar_detector_on_the_gpu_matches_cpu(model_cache, tmp_path, exact_float32):
    from engine.backends.owlv2_exemplars import ExemplarDetector

    rng = np.random.default_rng(0)
    for category, n in (("cat", 2), ("red sofa", 1)):
        (tmp_path / category).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40 + 10 * i, 30, 3), dtype=np.uint8)).save(
                tmp_path / category / f"{i}.jpg")
    images = [_noise(120, 90, 10), _noise(80, 100, 11)]
    wanted = [["cat", "red sofa"], ["cat"]]
    kw = dict(model="tiny:owlv2", threshold=0.0, cache_dir=model_cache, dtype="float32")
    cpu = ExemplarDetector(str(tmp_path), device="cpu", **kw).detect(images, wanted)
    gpu = ExemplarDetector(str(tmp_path), device="cuda", **kw).detect(images, wanted)
    assert sum(map(len, cpu)) > 0
    for c_boxes, g_boxes in zip(cpu, gpu):
        assert [b.category for b in g_boxes] == [b.category for b in c_boxes]
        assert np.allclose([b.xyxy for b in g_boxes], [b.xyxy for b in c_boxes], atol=0.05)
        assert np.allclose([b.score for b in g_boxes], [b.score for b in c_boxes], atol=1e-4)


def test_a_stage_that_runs_out_of_gpu_memory_halves_its_batch_and_fails_only_what_cannot_fit():
    """Real CUDA allocations: each sample asks for a share of the card; a batch that does not fit halves
    until it does, and a sample bigger than the card fails alone as out_of_memory."""
    from engine.records import Record
    from engine.stages.base import Stage

    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    share = free // 3  # three samples fit at once, four do not
    held = torch.cuda.memory_allocated()
    calls: list[list[str]] = []

    class Greedy(Stage):
        name = "greedy"

        def process(self, records):
            calls.append([r.key for r in records])
            block = torch.empty(sum(int(r.caption) for r in records) * share, dtype=torch.uint8, device="cuda")
            for r in records:
                r.factual_caption = f"ran in a batch of {len(records)} holding {block.numel() // share} shares"

    records = [Record(key=f"k{i}", source="s", caption="1") for i in range(8)]
    records[5].caption = "9"  # more than the whole card
    Greedy(None)(records)
    assert [r.status for r in records] == ["ok"] * 5 + ["failed"] + ["ok"] * 2
    assert records[5].error["kind"] == "out_of_memory" and records[5].factual_caption is None
    assert [len(c) for c in calls] == [8, 4, 2, 2, 4, 2, 1, 1, 2]  # halving, down to k5 alone
    assert calls[-3:] == [["k4"], ["k5"], ["k6", "k7"]]
    assert all(r.factual_caption == "ran in a batch of 2 holding 2 shares" for r in records if r.key not in ("k4", "k5"))
    assert torch.cuda.memory_allocated() == held  # the failed attempts hold nothing


def test_student_trains_with_bf16_autocast_on_the_gpu_and_learns(tmp_path, model_cache):
    """The learning check of tests/test_student.py, on the GPU: bf16 autocast, CUDA tensors end to end."""
    import json

    import yaml

    from engine.cli import main
    from engine.models.loading import resolve_model
    from engine.synthetic_runs import write_shapes
    from tests.test_student import AP_FLOOR, LEARN

    tiny_gdino = resolve_model("tiny:grounding-dino", model_cache)
    data = write_shapes(tmp_path / "shapes", train=64, val=32, seed=0)
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({**LEARN, "use_gpu": True, "amp": True}))
    out = tmp_path / "student"
    assert main(["train", "--shards", data["shards"], "--out", str(out), "--config", str(config),
                 "--model", tiny_gdino]) == 0
    table = tmp_path / "ap.json"
    assert main(["eval", "--model", tiny_gdino, "--model", str(out), "--coco", data["coco"], "--images",
                 data["images"], "--json-out", str(table)]) == 0
    before, after = json.loads(table.read_text())
    assert after["AP"] > AP_FLOOR and after["AP"] > 10 * before["AP"], (before, after)
