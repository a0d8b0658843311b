from pathlib import Path

import pytest

from engine.config import ConfigError, apply_overrides, config_from_dict, load_config, parse_override

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {"name": "t", "stages": {"ground": {"model": "tiny:grounding-dino"}}}


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_pipeline_validates(path):
    from engine.fingerprint import describe_prompts

    config = load_config(path)
    assert config.name == path.stem and config.stages.ground.model
    # every prompt file the pipeline names exists (loading a missing one raises)
    assert "system" in describe_prompts(config)


def test_a_pipeline_naming_only_its_teacher_runs_the_offline_glip_path(tmp_path):
    import yaml

    from engine.doctor import pipeline_models
    from engine.records import Record
    from engine.runner.stages import build_stage

    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert pipeline_models([path]) == {"tiny:grounding-dino": ["t/ground"]}  # no other model to fetch
    config = load_config(path)
    record = Record(key="k", source="s", raw_caption="A brown dog chasing a ball in the park")
    [record] = build_stage("extract", config)(build_stage("recaption", config)([record]))
    # GLIP's path: the raw caption kept, its noun phrases as the entities
    assert record.ok and record.caption == record.raw_caption
    assert {e["category"] for e in record.entities} >= {"dog", "ball"}
    assert [p["backend"] for p in record.provenance] == ["passthrough", "nltk"]


def test_override_parses_yaml_values_and_creates_sections():
    config = config_from_dict(
        {"name": "t", "stages": {"ground": {"model": "m"}}},
        ["stages.ground.box_threshold=0.5", "write.shard_size=7", "stages.filter.nms_iou=null", "ray.num_cpus=3"],
    )
    assert config.stages.ground.box_threshold == 0.5
    assert config.write.shard_size == 7
    assert config.stages.filter.nms_iou is None
    assert config.ray.num_cpus == 3


def test_error_names_field_and_value():
    with pytest.raises(ConfigError) as err:
        config_from_dict(dict(MINIMAL), ["stages.ground.box_threshold=1.5"])
    assert "stages.ground.box_threshold" in str(err.value)
    assert "1.5" in str(err.value)


def test_unknown_key_is_an_error():
    with pytest.raises(ConfigError) as err:
        config_from_dict(dict(MINIMAL), ["stages.ground.box_treshold=0.3"])
    assert "box_treshold" in str(err.value)


def test_the_removed_read_section_says_where_its_settings_went():
    with pytest.raises(ConfigError) as err:
        config_from_dict(dict(MINIMAL), ["read.concurrency=2"])
    assert "stages.decode.resources" in str(err.value)


def test_model_backend_without_model_is_an_error():
    with pytest.raises(ConfigError) as err:
        config_from_dict(dict(MINIMAL), ["stages.extract.backend=transformers"])
    assert "needs a model" in str(err.value)


def test_unknown_backend_is_an_error():
    with pytest.raises(ConfigError) as err:
        config_from_dict(dict(MINIMAL), ["stages.recaption.backend=gpt5"])
    assert "stages.recaption.backend" in str(err.value)


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1", "a.b=[unclosed"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        parse_override(bad)


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
