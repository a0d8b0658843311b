"""A config's fingerprint (engine/fingerprint.py) moves with what shapes the records and only with that."""

from __future__ import annotations

import pytest

from engine.config import load_config
from engine.fingerprint import differences, fingerprint, shaping
from engine.prompts import load_prompt

BASE = "pipelines/granucap.yaml"


def fp(*overrides: str) -> str:
    return fingerprint(load_config(BASE, list(overrides)))


@pytest.mark.parametrize("override", [
    "stages.ground.resources.concurrency=4",
    "stages.recaption.resources.num_gpus=1",
    "stages.decode.resources.batch_size=7",
    "stages.extract.device=cpu",
    "ray.num_cpus=3",
    "ray.max_attempts=5",
    "write.num_cpus=1",
    "name=renamed",
    "cache_dir=/elsewhere",
    "storage_options.s3.endpoint_url=http://minio:9000",
    "stages.extract.openai.timeout_s=5",
    "stages.recaption.vllm.gpu_memory_utilization=0.5",
])
def test_where_and_how_fast_a_run_goes_leaves_the_fingerprint(override):
    assert fp(override) == fp()


@pytest.mark.parametrize("override", [
    "stages.ground.box_threshold=0.9",
    "stages.ground.model=IDEA-Research/grounding-dino-base",
    "stages.extract.entities_prompt=entities_v2",
    "stages.recaption.max_tokens=64",
    "stages.filter.nms_iou=0.7",
    "stages.decode.max_side=800",
    "stages.extract.dtype=float32",
    "write.shard_size=500",
    "seed=1",
])
def test_what_shapes_the_records_moves_the_fingerprint(override, tmp_path, monkeypatch):
    if "entities_v2" in override:  # a prompt file of another name and text
        import shutil

        prompts = tmp_path / "prompts"
        shutil.copytree("prompts", prompts)
        (prompts / "entities_v2.txt").write_text((prompts / "entities.txt").read_text() + "\nBe brief.\n")
        monkeypatch.setattr("engine.prompts.PROMPTS_DIR", prompts)
    assert fp(override) != fp()


def test_a_prompt_files_text_is_part_of_the_fingerprint(tmp_path, monkeypatch):
    import shutil

    before = fp()
    prompts = tmp_path / "prompts"
    shutil.copytree("prompts", prompts)
    monkeypatch.setattr("engine.prompts.PROMPTS_DIR", prompts)
    load_prompt.cache_clear()  # a process reads a prompt once; this test moves and edits them
    assert fp() == before  # the same texts elsewhere
    (prompts / "recaption.txt").write_text((prompts / "recaption.txt").read_text() + "\nMention colours.\n")
    load_prompt.cache_clear()
    assert fp() != before
    load_prompt.cache_clear()


def test_differences_name_each_changed_key_with_both_values():
    old = shaping(load_config(BASE))
    new = shaping(load_config(BASE, ["stages.ground.box_threshold=0.9", "stages.filter.max_boxes=5"]))
    assert differences(old, new) == ["stages.filter.max_boxes: 100 -> 5", "stages.ground.box_threshold: 0.35 -> 0.9"]
    assert differences(old, old) == []
