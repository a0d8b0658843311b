"""The fused annotator path: `export sft` from a run, the `annotate` stage, and the one-input commands."""

import io
import json

import pytest
from PIL import Image

from engine.cli import main
from engine.config import AnnotateSpec, load_config
from engine.export import export
from engine.prompts import load_prompt
from engine.records import Record
from engine.runner import stage_names
from engine.stages.annotate import Annotate
from engine.io.shards import ShardWriter

pytestmark = pytest.mark.slow


def jpeg(color=(200, 30, 30)):
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, format="JPEG")
    return buf.getvalue()


def finished_run(tmp_path):
    """A run directory with one shard: two ok samples (one without entities) and a rejected one."""
    records = []
    for i, (caption, entities) in enumerate([
        ("a red square, best price", [{"phrase": "red square", "category": "square", "parent_category": "shape"}]),
        ("nothing to see", []),
        ("broken", []),
    ]):
        r = Record(key=f"k.{i}", source="in.tar", position=i, image=jpeg(), width=64, height=48,
                   raw_caption=caption, caption=caption, entities=entities)
        records.append(r)
    records[2].reject("decode", "undecodable_image", "bad")
    ShardWriter(tmp_path, expected={0: 3})(records)
    (tmp_path / "manifest.json").write_text("{}")
    return tmp_path


def test_export_sft_writes_llava_conversations_with_the_annotate_prompt(tmp_path):
    run = finished_run(tmp_path / "run")
    summary = export("sft", run, tmp_path / "sft")
    assert summary["conversations"] == 1 and summary["skipped_few_entities"] == 1
    data = json.loads((tmp_path / "sft" / "sft.json").read_text())
    (item,) = data
    assert item["id"] == "k.0"
    assert Image.open(tmp_path / "sft" / item["image"]).size == (64, 48)
    human, gpt = item["conversations"]
    assert human["from"] == "human" and gpt["from"] == "gpt"
    assert human["value"] == "<image>\n" + load_prompt("annotate").render(caption="a red square, best price")
    assert json.loads(gpt["value"]) == {"entities": [
        {"phrase": "red square", "category": "square", "parent_category": "shape"}]}
    assert summary["prompt_sha256"] == load_prompt("annotate").sha256


def test_export_of_a_non_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a granucap run"):
        export("sft", tmp_path, tmp_path / "x")
    run = finished_run(tmp_path / "run")
    with pytest.raises(ValueError, match="unknown export format"):
        export("nope", run, tmp_path / "x")


def test_fused_pipeline_replaces_recaption_and_extract():
    config = load_config("pipelines/granucap-fused.yaml")
    assert stage_names(config) == ("decode", "annotate", "ground", "filter")


def test_annotate_stage_rejects_invalid_output_or_falls_back(model_cache):
    records = [Record(key="a", source="s", image=jpeg(), width=64, height=48, raw_caption="a red square"),
               Record(key="b", source="s", image=b"garbage", raw_caption="a blue circle")]
    strict = Annotate(AnnotateSpec(model="tiny:llava", max_tokens=8, image_max_side=32), cache_dir=model_cache)
    out = strict([r.copy() for r in records])
    assert out[0].status == "rejected" and out[0].error["kind"] == "invalid_entities_json"
    assert out[1].status == "failed" and out[1].error["stage"] == "annotate"
    loose = Annotate(AnnotateSpec(model="tiny:llava", max_tokens=8, image_max_side=32, fallback="nltk"),
                     cache_dir=model_cache)
    out = loose([r.copy() for r in records])
    assert out[0].ok and out[0].entities == [{"phrase": "red square", "category": "square", "parent_category": "shape"}]
    assert "nltk fallback" in out[0].provenance[0]["backend"]
    assert out[0].provenance[0]["prompt_id"] == "annotate"
    usage = json.loads(out[0].provenance[0]["params"])["usage"]
    assert usage["requests"] == 1 and 0 < usage["completion_tokens"] <= 8


def test_extract_command_prints_entities(capsys):
    assert main(["extract", "--caption", "Two fluffy cats on a red sofa. Buy now!"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [e["category"] for e in result["entities"]] == ["cat", "sofa"]
    assert result["status"] == "ok"


def test_recaption_command_on_an_image(tmp_path, capsys, model_cache):
    path = tmp_path / "red.jpg"
    path.write_bytes(jpeg())
    code = main(["recaption", "--model", "tiny:llava", "--image", str(path), "--caption", "a red thing",
                 "--max-tokens", "6", "--cache-dir", model_cache])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["status"] == "ok"
    assert result["caption"] and result["caption"] != "a red thing"
    assert [p["stage"] for p in result["provenance"]] == ["decode", "recaption"]
