"""`granucap export regions`: one labelled region per kept box, as LLaVA conversations and ODVG grounding."""

from __future__ import annotations

import io
import json

from PIL import Image

from engine.cli import main
from engine.io.shards import ShardWriter
from engine.records import Record

SOFA = {"phrase": "a red sofa", "category": "sofa", "parent_category": "furniture"}
CAT = {"phrase": "a cat | kitten", "category": "cat", "parent_category": "animal"}


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 90, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _box(xyxy, entity):
    return {"xyxy": xyxy, "score": 0.8, "entity": entity, "matched": "phrase", "teacher": "t"}


def write_run(dest):
    writer = ShardWriter(dest, expected={0: 3})
    writer([Record(key="a/1", source="s", unit=0, position=0, image=_jpeg(200, 100), width=200, height=100,
                   caption="c", entities=[SOFA, CAT],
                   boxes=[_box([20, 10, 120, 90], 0), _box([150, 20, 230, 60], 1), _box([250, 0, 260, 10], 1)]),
            Record(key="a/2", source="s", unit=0, position=1, image=_jpeg(50, 40), width=50, height=40,
                   caption="c", entities=[SOFA]),  # no boxes: no regions, no image
            Record(key="a/3", source="s", unit=0, position=2, image=_jpeg(80, 80), width=80, height=80,
                   caption="c", entities=[CAT], boxes=[_box([0, 0, 40, 80], 0)])])
    (dest / "manifest.json").write_text("{}")
    return dest


def test_regions_are_labelled_with_the_entity_hierarchy_in_both_files(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    dest = tmp_path / "regions"
    assert main(["export", "regions", str(run), str(dest)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["images"], summary["regions"], summary["dropped_boxes"]) == (2, 3, 1)  # one box is off the image

    conversations = json.loads((dest / "regions.json").read_text())
    answers = [c["conversations"][1]["value"] for c in conversations]
    assert answers == ["a red sofa|sofa|furniture", "a cat / kitten|cat|animal", "a cat / kitten|cat|animal"]
    first = conversations[0]["conversations"][0]["value"]
    assert first.startswith("<image>\n") and "[100, 100, 600, 900]" in first  # thousandths of 200 x 100
    # clipped to the image's right edge first
    assert "[750, 200, 1000, 600]" in conversations[1]["conversations"][0]["value"]
    for item in conversations:
        assert (dest / item["image"]).is_file()
        assert Image.open(dest / item["image"]).size in {(200, 100), (80, 80)}

    lines = [json.loads(line) for line in (dest / "regions.odvg.jsonl").read_text().splitlines()]
    assert [len(line["grounding"]["regions"]) for line in lines] == [2, 1]
    for line in lines:
        caption = line["grounding"]["caption"]
        for region in line["grounding"]["regions"]:
            (start, end), = region["tokens_positive"]
            assert caption[start:end] == region["phrase"]
    assert lines[0]["grounding"]["regions"][1]["bbox"] == [150.0, 20.0, 200.0, 60.0]
    manifest = json.loads((dest / "regions_manifest.json").read_text())
    assert manifest["prompt_id"] == "region" and len(manifest["prompt_sha256"]) == 64
