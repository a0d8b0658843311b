"""The describe stage (vocabulary-free labels): crops, naming through a real chat backend, relabelling of
generic boxes, label agreement, dropping, failures; the agreement rule; the shipped vocabulary-free pipeline
end to end."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from engine.config import DescribeSpec, load_config
from engine.export.common import iter_index_rows, iter_samples
from engine.language.agreement import agrees, words_agree
from engine.language.entities import generic_entity, parse_entity_json, EntityFormatError
from engine.quality import installed_wordnet
from engine.records import Record
from engine.stages.describe import Describe, crop_box
from tests.test_openai_backend import ChatServer, Reply, completion

ROOT = Path(__file__).resolve().parent.parent
KEY_ENV = "GRANUCAP_TEST_DESCRIBE_KEY"


def entity(phrase, category, parent="thing"):
    return {"phrase": phrase, "category": category, "parent_category": parent}


# ------------------------------------------------------------------------------------------- the rules


@pytest.mark.parametrize("a, b, same", [
    (entity("a red car", "car"), entity("a car", "car"), True),
    (entity("a sports car", "sports car"), entity("a car", "car"), True),  # same head noun
    (entity("my pet", "pet"), entity("pet", "dog"), True),  # the name is the entity's phrase
    (entity("a cat", "cat", "animal"), entity("a dog", "dog", "animal"), False),  # a shared parent is not enough
    (entity("a puppy", "puppy"), entity("a dog", "dog"), False),  # words alone cannot tell
])
def test_words_rule(a, b, same):
    assert words_agree(a, b) is same and words_agree(b, a) is same


@pytest.mark.parametrize("a, b, same", [
    ("puppy", "dog", True),  # a puppy is a kind of dog
    ("dog", "animal", True),  # and a dog a kind of animal: either direction
    ("couch", "sofa", True),  # one sense, two words
    ("cat", "dog", False),
    ("car", "tree", False),
    ("cat", "qwzxv", False),  # no sense at all
])
def test_wordnet_rule(a, b, same):
    wordnet = installed_wordnet()
    assert wordnet is not None, "the NLTK data is installed in the test environment (granucap nltk-data install)"
    assert agrees(entity(a, a), entity(b, b), wordnet) is same
    assert agrees(entity(b, b), entity(a, a), wordnet) is same


def test_one_entity_answers_are_validated():
    assert parse_entity_json('```json\n{"phrase": "a cat", "category": "cat", "parent_category": "animal"}\n```') == \
        entity("a cat", "cat", "animal")
    for bad in ('{"phrase": "a cat", "category": "cat"}', '{"entities": []}', "a cat|cat|animal",
                '{"phrase": "", "category": "cat", "parent_category": "animal"}'):
        with pytest.raises(EntityFormatError):
            parse_entity_json(bad)


@pytest.mark.parametrize("xyxy, context, size, expected", [
    ((10, 10, 30, 20), 0.5, (100, 50), (0, 5, 40, 25)),  # grown by half the box each way
    ((90, 40, 100, 50), 0.5, (100, 50), (85, 35, 100, 50)),  # clipped at the image's edge
    ((10.5, 10.5, 10.5, 10.5), 0.1, (100, 50), (10, 10, 11, 11)),  # a box without area: one pixel
    ((0, 0, 100, 50), 0.0, (100, 50), (0, 0, 100, 50)),
])
def test_crop_geometry(xyxy, context, size, expected):
    image = Image.new("RGB", size)
    left, top, right, bottom = expected
    assert crop_box(image, xyxy, context).size == (right - left, bottom - top)
    marked = image.copy()
    marked.putpixel((left, top), (255, 0, 0))  # the crop starts where expected
    assert crop_box(marked, xyxy, context).getpixel((0, 0)) == (255, 0, 0)


# ------------------------------------------------------------------------------------------- the stage

RED, BLUE, GREEN, YELLOW = (220, 20, 20), (20, 20, 220), (20, 200, 20), (230, 230, 20)
ANSWERS = {  # what the scripted VLM answers for a crop of each colour
    "red": '{"phrase": "a red cat", "category": "cats", "parent_category": "animal"}',
    "blue": '{"phrase": "a blue dog", "category": "dog", "parent_category": "animal"}',
    "green": "I cannot tell what this is.",
}


def colour_of(image: Image.Image) -> str:
    r, g, b = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)
    if r > 150 and g > 150:
        return "yellow"
    return {0: "red", 1: "green", 2: "blue"}[int(np.argmax([r, g, b]))]


def request_image(body: dict) -> Image.Image:
    content = [m for m in body["messages"] if m["role"] == "user"][-1]["content"]
    url = next(p["image_url"]["url"] for p in content if p.get("type") == "image_url")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def vlm(server: ChatServer) -> None:
    """The scripted VLM: names a crop by its colour; a yellow crop is a request the server refuses."""
    def respond(body, n):
        colour = colour_of(request_image(body))
        if colour == "yellow":
            return Reply(status=400, body={"error": {"message": "image rejected", "type": "invalid_request_error"}})
        return Reply(body=completion(ANSWERS[colour], prompt_tokens=30, completion_tokens=12))
    server.respond = respond


def quadrants() -> bytes:
    """160x80: red, blue, green, yellow quarters of 40 pixels side by side."""
    image = Image.new("RGB", (160, 80))
    draw = ImageDraw.Draw(image)
    for i, colour in enumerate((RED, BLUE, GREEN, YELLOW)):
        draw.rectangle((40 * i, 0, 40 * i + 39, 79), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def box(x0, entity_index, score=0.9):
    """A box well inside the quarter starting at x0 (its crop, grown by 10%, stays in that colour)."""
    return {"xyxy": [x0 + 8.0, 10.0, x0 + 32.0, 70.0], "score": score, "entity": entity_index, "matched": "phrase",
            "teacher": "t"}


def record(key, boxes, entities=None):
    entities = entities if entities is not None else [entity("a cat", "cat", "animal"), generic_entity("object")]
    return Record(key=key, source="s", image=quadrants(), width=160, height=80, entities=list(entities), boxes=boxes)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    s = ChatServer()
    vlm(s)
    yield s
    s.close()


def describe(server, **over) -> Describe:
    spec = DescribeSpec(backend="openai", model="m", openai={
        "base_url": server.url, "api_key_env": KEY_ENV, "max_retries": 0, "timeout_s": 5.0}, **over)
    return Describe(spec, generic_prompts=["object"], min_boxes=1)


def test_boxes_are_named_relabelled_and_marked(server):
    # cat on red (agrees), cat on blue (a dog: disagrees), object on blue (becomes the dog), object on green
    # (no valid name: dropped), cat on green (no valid name: kept, unmarked)
    rec = record("a", [box(0, 0), box(40, 0), box(40, 1, 0.8), box(80, 1), box(80, 0, 0.7)])
    [out] = describe(server)([rec])
    assert out.status == "ok", out.error
    assert out.entities == [entity("a cat", "cat", "animal"), generic_entity("object"),
                            entity("a blue dog", "dog", "animal")]
    got = [(b["xyxy"][0], b["entity"], b["label_agreement"], b["described"]) for b in out.boxes]
    assert got == [
        (8.0, 0, True, "a red cat|cat|animal"),
        (48.0, 0, False, "a blue dog|dog|animal"),
        (48.0, 2, None, "a blue dog|dog|animal"),
        (88.0, 0, None, None),
    ]
    assert [b["score"] for b in out.boxes] == [0.9, 0.9, 0.8, 0.7]  # the teacher's scores stay
    assert len(server.requests) == 5  # one request per box
    stamp = out.provenance[-1]
    assert stamp["stage"] == "describe" and stamp["prompt_id"] == "describe"
    params = json.loads(stamp["params"])
    assert params["boxes"] == {"agreed": 1, "disagreed": 1, "relabelled": 1, "unnamed": 2}
    assert params["usage"] == {"requests": 5, "prompt_tokens": 150, "completion_tokens": 60}


def test_each_request_carries_the_boxes_crop_with_its_context(server):
    rec = record("a", [{**box(0, 0), "xyxy": [10.0, 20.0, 30.0, 60.0]}])
    describe(server, context=0.25, image_max_side=400)([rec])
    [request] = server.requests
    assert request_image(request["body"]).size == (30, 60)  # 20x40 grown by 5 and 10 on each side
    assert request["body"]["response_format"]["type"] == "json_schema"  # the one-entity schema is asked for
    describe(server, context=0.25, image_max_side=16)([record("b", [box(0, 0)])])
    assert max(request_image(server.requests[-1]["body"]).size) == 16  # shrunk to fit


def test_disagreeing_boxes_can_be_dropped_and_a_sample_left_without_boxes_is_rejected(server):
    kept = record("kept", [box(0, 0), box(40, 0)])
    emptied = record("emptied", [box(40, 0), box(80, 1)])  # a dog named cat, and an unnamed object
    out = describe(server, drop_disagreeing=True)([kept, emptied])
    assert out[0].status == "ok" and [b["xyxy"][0] for b in out[0].boxes] == [8.0]
    assert out[1].status == "rejected" and out[1].boxes == []
    assert out[1].error["stage"] == "describe" and out[1].error["kind"] == "too_few_boxes"


def test_unnamed_generic_boxes_stay_when_asked(server):
    [out] = describe(server, keep_unnamed=True)([record("a", [box(80, 1)])])
    assert out.status == "ok" and [(b["entity"], b["described"]) for b in out.boxes] == [(1, None)]


def test_a_refused_request_fails_its_sample_only(server):
    good, bad = record("good", [box(0, 0)]), record("bad", [box(0, 0), box(120, 1)])  # yellow is refused
    out = describe(server)([good, bad])
    assert out[0].status == "ok" and out[0].boxes[0]["label_agreement"] is True
    assert out[1].status == "failed" and out[1].error["kind"] == "backend_error"
    assert "image rejected" in out[1].error["message"]


def test_samples_without_boxes_ask_nothing(server):
    [out] = describe(server)([record("none", [])])
    assert server.requests == [] and out.boxes == []
    assert out.status == "rejected" and out.error["kind"] == "too_few_boxes"


def test_describe_cannot_be_replayed_from_candidates():
    config = load_config(ROOT / "pipelines" / "granucap-vocabfree.yaml")
    data = config.model_dump()
    data["stages"]["ground"]["keep_candidates"] = 0.01
    with pytest.raises(ValueError, match="describe cannot be combined with ground.keep_candidates"):
        type(config).model_validate(data)


# ------------------------------------------------------------------------------------------- end to end


def granucap(*args, env=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=540)


@pytest.mark.slow
def test_vocabulary_free_pipeline_as_shipped_runs_offline(tmp_path, demo_input, model_cache):
    """Tiny random weights never write a valid name: every generic box goes, the caption's stay unmarked."""
    out = tmp_path / "out"
    proc = granucap("run", "pipelines/granucap-vocabfree.yaml", "--input", str(demo_input), "--output", str(out),
                    "--quiet", "--set", f"cache_dir={model_cache}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["read"] == 12
    assert "describe" in manifest["prompts"]
    samples = list(iter_samples(out))
    assert samples
    for sample in samples:
        rec = sample.record
        assert rec["provenance"][-1]["stage"] == "describe"
        assert generic_entity("object") in rec["entities"]
        for b in rec["boxes"]:
            assert rec["entities"][b["entity"]] != generic_entity("object")
            assert b["label_agreement"] is None and b["described"] is None
    statuses = {row["status"] for row in iter_index_rows(out, ["status"])}
    assert statuses <= {"ok", "rejected"}


def crop_name(width: int, height: int) -> dict[str, str]:
    return entity(f"a thing of {width} by {height}", f"shape{width}x{height}", "shape")


@pytest.mark.slow
def test_vocabulary_free_pipeline_names_every_box_from_its_crop(tmp_path, demo_input, model_cache, server):
    """Through Ray, against a VLM that names a crop by its size: every generic box ends with the name of its
    own crop, every caption box is marked, and the shards read back."""
    def respond(body, n):
        image = request_image(body)
        return Reply(body=completion(json.dumps(crop_name(*image.size))))
    server.respond = respond
    out = tmp_path / "out"
    proc = granucap("run", "pipelines/granucap-vocabfree.yaml", "--input", str(demo_input), "--output", str(out),
                    "--quiet", "--set", f"cache_dir={model_cache}", "--set", "stages.describe.backend=openai",
                    "--set", "stages.describe.model=m", "--set", f"stages.describe.openai.base_url={server.url}",
                    "--set", f"stages.describe.openai.api_key_env={KEY_ENV}", "--set", "stages.describe.image_max_side=4096",
                    env={KEY_ENV: "sk-test"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    relabelled = marked = 0
    for sample in iter_samples(out):
        rec = sample.record
        canvas = Image.new("RGB", (rec["width"], rec["height"]))
        for b in rec["boxes"]:
            named = crop_name(*crop_box(canvas, b["xyxy"], 0.1).size)
            assert b["described"] == "|".join(named.values())
            if b["label_agreement"] is None:  # a generic box: its entity is its crop's name
                assert rec["entities"][b["entity"]] == named
                relabelled += 1
            else:  # a caption entity's box: a shape is none of the caption's things
                assert b["label_agreement"] is False and rec["entities"][b["entity"]]["category"] != named["category"]
                marked += 1
    assert relabelled > 0 and marked > 0
    assert len(server.requests) == relabelled + marked  # every box asked once, none twice
    proc = granucap("inspect", str(out), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["described"] == {"relabelled": relabelled, "disagreed": marked}
