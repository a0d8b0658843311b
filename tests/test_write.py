"""The shard writer: shards read back with webdataset, the index with pyarrow, marker last, reruns skip."""

import io
import json

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from engine.records import INDEX_SCHEMA, Record
import numpy as np

from engine.io.shard_reader import complete_units
from engine.io.shards import KeyRegistry, ShardWriter, clean_temporaries, completed_keys, tar_key


def jpeg(color=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), color).save(buf, format="JPEG")
    return buf.getvalue()


def make(unit, position, key, status="ok"):
    r = Record(key=key, source="in.tar", unit=unit, position=position, image=jpeg(), width=32, height=24,
               raw_caption="a red square", caption="a red square", factual_caption="a red square",
               entities=[{"phrase": "a red square", "category": "square", "parent_category": "shape"}],
               boxes=[{"xyxy": [1.0, 2.0, 20.0, 22.0], "score": 0.9, "entity": 0, "matched": "phrase",
                       "teacher": "tiny:grounding-dino"}])
    r.stamp("ground", "transformers", model="tiny:grounding-dino")
    if status == "rejected":
        r.boxes = []
        r.reject("decode", "undecodable_image", "cannot identify image file")
    return r


def test_unit_written_only_when_complete_and_read_back(tmp_path):
    writer = ShardWriter(tmp_path, expected={0: 3, 1: 1})
    assert writer([make(0, 1, "b"), make(1, 0, "z")])[0].unit == 1  # unit 1 complete at once
    assert not (tmp_path / "shards" / "000000.tar").exists()
    assert writer.incomplete() == {0: 1}
    done = writer([make(0, 2, "c.with.dots", status="rejected"), make(0, 0, "a")])
    assert [s.unit for s in done] == [0] and writer.incomplete() == {}
    stats = json.loads((tmp_path / "shards" / "000000.stats.json").read_text())
    assert (stats["read"], stats["ok"], stats["rejected"], stats["failed"], stats["boxes"]) == (3, 2, 1, 0, 2)
    assert stats["reasons"] == {"decode/undecodable_image": 1}

    samples = list(wds.WebDataset(str(tmp_path / "shards" / "000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["a", "b"]  # ok samples only, in position order
    meta = json.loads(samples[0]["json"])
    assert meta["key"] == "a" and "image" not in meta
    assert meta["boxes"][0]["xyxy"] == [1.0, 2.0, 20.0, 22.0]
    assert meta["entities"][0]["category"] == "square"
    assert Image.open(io.BytesIO(samples[0]["jpg"])).size == (32, 24)

    table = pq.read_table(tmp_path / "index" / "000000.parquet")
    assert table.schema.equals(INDEX_SCHEMA)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["a", "b", "c.with.dots"]
    assert rows[2]["status"] == "rejected" and rows[2]["error"]["kind"] == "undecodable_image"
    assert set(complete_units(tmp_path)) == {0, 1}


def test_same_records_give_byte_identical_shards(tmp_path):
    for out in ("one", "two"):
        ShardWriter(tmp_path / out, expected={0: 2})([make(0, 0, "a"), make(0, 1, "b")])
    one = (tmp_path / "one" / "shards" / "000000.tar").read_bytes()
    assert one == (tmp_path / "two" / "shards" / "000000.tar").read_bytes()


def test_duplicate_positions_and_unplanned_units_are_errors(tmp_path):
    writer = ShardWriter(tmp_path, expected={0: 2})
    with pytest.raises(ValueError, match="not planned"):
        writer([make(5, 0, "x")])
    with pytest.raises(ValueError, match="positions"):
        writer([make(0, 0, "a"), make(0, 0, "a")])
    assert complete_units(tmp_path) == {}


def test_temporaries_are_cleaned_and_never_count_as_done(tmp_path):
    ShardWriter(tmp_path, expected={0: 1})([make(0, 0, "a")])
    (tmp_path / "shards" / "000001.tar.tmp-deadbeef").write_bytes(b"partial")
    (tmp_path / "shards" / "000001.stats.json.tmp-deadbeef").write_text("{}")
    assert set(complete_units(tmp_path)) == {0}
    assert clean_temporaries(tmp_path) == 2
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["000000.stats.json", "000000.tar"]


def test_tar_key_is_webdataset_safe():
    assert tar_key("../etc/pass.wd") == "___etc_pass_wd"
    assert tar_key("abc-01_x") == "abc-01_x"


def write_units(out, units: list[list[str]]) -> list[str]:
    """Write one unit per list of keys, in order; the keys the index holds afterwards."""
    writer = ShardWriter(out, expected={u: len(keys) for u, keys in enumerate(units)})
    for u, keys in enumerate(units):
        writer([make(u, p, key) for p, key in enumerate(keys)])
    return [r["key"] for r in pq.read_table(out / "index").to_pylist()]


def test_repeated_keys_are_renamed_in_plan_order_and_nothing_is_dropped(tmp_path):
    keys = write_units(tmp_path, [["a", "a", "b"], ["a", "b"]])
    assert keys == ["a", "a-dup1", "b", "a-dup2", "b-dup1"]
    rows = pq.read_table(tmp_path / "index" / "000001.parquet").to_pylist()
    assert json.loads(rows[0]["meta"])["duplicate_of_key"] == "a"
    samples = list(wds.WebDataset(str(tmp_path / "shards" / "000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["a", "a-dup1", "b"]


def test_a_resumed_writer_knows_the_keys_of_complete_units(tmp_path):
    ShardWriter(tmp_path, expected={0: 1})([make(0, 0, "a")])
    resumed = ShardWriter(tmp_path, expected={1: 1}, seen_keys=completed_keys(tmp_path, [0]))
    resumed([make(1, 0, "a")])
    assert pq.read_table(tmp_path / "index" / "000001.parquet").column("key").to_pylist() == ["a-dup1"]


def test_a_key_made_by_renaming_is_renamed_again_when_it_also_comes_literally(tmp_path):
    keys = write_units(tmp_path, [["a", "a", "a-dup1"], ["a-dup1", "a-dup2"]])
    assert keys == ["a", "a-dup1", "a-dup1-dup1", "a-dup1-dup2", "a-dup2"]
    assert len(set(keys)) == len(keys)


def test_key_registry_finds_every_key_it_was_given_across_merges():
    rng = np.random.default_rng(0)
    registry, added = KeyRegistry(), []
    for unit in range(60):
        keys = [f"u{unit}/{i}" for i in range(int(rng.integers(1, 400)))]
        assert not registry.contains(keys).any()
        registry.add(keys)
        added += keys
    # the budget docs/performance.md gives for 50M keys: 16 bytes a key, nothing per unit added
    assert len(registry) == len(added) and registry.nbytes <= 16 * len(added)
    assert registry.contains(added).all()
    probe = ["u0/0", "u59/0", "u0/399x", "nope", "u60/0"]
    assert registry.contains(probe).tolist() == [True, True, False, False, False]
    assert "u30/0" in registry and "u30" not in registry
    assert KeyRegistry(["x", "y"]).contains(["y", "z"]).tolist() == [True, False]


def test_key_registry_tells_apart_digests_that_share_their_first_word():
    registry = KeyRegistry()
    shared = np.array([[7, 1], [7, 2], [7, 3], [5, 9]], dtype=np.uint64)
    registry.add(shared[:3])
    registry.add(np.array([[7, 9]], dtype=np.uint64))  # another run, same first word
    asked = np.array([[7, 3], [7, 2], [7, 4], [5, 9], [7, 9]], dtype=np.uint64)
    assert registry.contains(asked).tolist() == [True, True, False, False, True]


def test_completed_keys_reads_the_keys_of_the_units_asked_for(tmp_path):
    ShardWriter(tmp_path, expected={0: 2, 1: 1})([make(0, 0, "a"), make(0, 1, "b"), make(1, 0, "c")])
    keys = completed_keys(tmp_path, [0])
    assert len(keys) == 2 and keys.contains(["a", "b", "c"]).tolist() == [True, True, False]
