"""Inputs and outputs on a real S3 API server (moto's, on 127.0.0.1): listing, reading every input kind, the
plan from img2dataset's metadata, shards written and read back, and secrets kept out of every message."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from engine.io import storage
from engine.io.inputs import expand_inputs, source_names
from engine.io.plan import make_plan
from engine.io.readers import read_unit
from engine.io.shard_reader import complete_units
from engine.io.shards import KeyClaims, ShardWriter, write_unit
from engine.io.storage import Location, StorageError
from engine.records import Record
from tests.conftest import s3_fs


def jpeg(colour=(10, 200, 30), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def tar_bytes(keys: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key in keys:
            for ext, data in (("jpg", jpeg()), ("txt", f"caption of {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_dump(put, keys_per_tar: dict[str, list[str]], stats: dict[str, int] | None = None) -> None:
    """An img2dataset-style dump through `put(name, bytes)`: NAME.tar, NAME.parquet metadata (no images) and,
    where `stats` says, NAME_stats.json."""
    for name, keys in keys_per_tar.items():
        put(f"{name}.tar", tar_bytes(keys))
        sink = io.BytesIO()
        pq.write_table(pa.table({"key": keys, "status": ["success"] * len(keys)}), sink)
        put(f"{name}.parquet", sink.getvalue())
        if stats and name in stats:
            put(f"{name}_stats.json", json.dumps({"count": 99, "successes": stats[name]}).encode())


def test_a_dump_on_s3_lists_plans_and_reads_as_the_same_dump_on_disk(s3, tmp_path):
    fs = s3_fs()
    dump = {"00000": ["000000000", "000000001", "000000002"], "00001": ["000010000", "000010001"]}
    write_dump(lambda name, data: fs.pipe_file(f"{s3[5:]}/dump/{name}", data), dump)
    write_dump(lambda name, data: (tmp_path / name).write_bytes(data), dump)

    remote = expand_inputs([f"{s3}/dump"])
    # the metadata parquet beside each tar is not an input
    assert remote == [("webdataset", f"{s3}/dump/00000.tar"), ("webdataset", f"{s3}/dump/00001.tar")]
    assert expand_inputs([f"{s3}/dump/*.tar"]) == remote
    assert [p for _, p in expand_inputs([str(tmp_path)])] == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert source_names([p for _, p in remote]) == {p: p.rsplit("/", 1)[1] for _, p in remote}

    plan_s3 = make_plan([f"{s3}/dump"], shard_size=2)
    plan_local = make_plan([str(tmp_path)], shard_size=2)
    assert [(f.samples, f.how) for f in plan_s3.files] == [(3, "tar_headers"), (2, "tar_headers")]
    assert [(u.start, u.stop, u.source) for u in plan_s3.units] == \
        [(u.start, u.stop, u.source) for u in plan_local.units] == [(0, 2, "00000.tar"), (2, 3, "00000.tar"),
                                                                    (0, 2, "00001.tar")]
    rows = lambda plan: [r.to_dict() for u in plan.units for r in read_unit(u)]  # noqa: E731
    assert rows(plan_s3) == rows(plan_local)
    assert [r["key"] for r in rows(plan_s3)] == [k for keys in dump.values() for k in keys]


def test_img2dataset_stats_plan_without_reading_tars_and_the_last_unit_reads_to_the_end(s3):
    fs = s3_fs()
    # the stats undercount the second tar by one: its last unit still reads every sample
    write_dump(lambda name, data: fs.pipe_file(f"{s3[5:]}/d/{name}", data),
               {"00000": ["a0", "a1", "a2"], "00001": ["b0", "b1", "b2"]}, stats={"00000": 3, "00001": 2})
    plan = make_plan([f"{s3}/d"], shard_size=2)
    assert [(f.samples, f.how) for f in plan.files] == [(3, "img2dataset_stats"), (2, "img2dataset_stats")]
    assert [(u.start, u.stop, u.to_end) for u in plan.units] == [(0, 2, False), (2, 3, True), (0, 2, True)]
    assert [r.key for r in read_unit(plan.units[2])] == ["b0", "b1", "b2"]
    # a stats file is only trusted for the tar it belongs to: its row count is never read from the tar itself
    fs.pipe_file(f"{s3[5:]}/d/00000.tar", b"not a tar any more")
    assert make_plan([f"{s3}/d"], shard_size=2).files[0].samples == 3


def test_parquet_and_folder_inputs_on_s3_read_their_images_relative_to_their_file(s3):
    fs = s3_fs()
    root = f"{s3[5:]}/in"
    fs.pipe_file(f"{root}/imgs/a.jpg", jpeg((255, 0, 0)))
    fs.pipe_file(f"{root}/imgs/b.jpg", jpeg((0, 0, 255)))
    sink = io.BytesIO()
    pq.write_table(pa.table({"path": ["imgs/a.jpg", "../escape.jpg", "imgs/missing.jpg"],
                             "caption": ["red", "escape", "gone"]}), sink)
    fs.pipe_file(f"{root}/pq/data.parquet", sink.getvalue())
    fs.pipe_file(f"{root}/pq/imgs/a.jpg", jpeg((255, 0, 0)))
    lines = [json.dumps({"file": "imgs/a.jpg", "caption": "red"}), json.dumps({"file": "imgs/b.jpg", "caption": "blue"})]
    fs.pipe_file(f"{root}/captions.jsonl", "\n".join(lines).encode())

    assert expand_inputs([f"{s3}/in"]) == [("folder", f"{s3}/in/captions.jsonl")]  # the folder owns pq/
    [folder] = make_plan([f"{s3}/in"], shard_size=10).units
    records = list(read_unit(folder))
    assert [(r.key, r.raw_caption, r.image) for r in records] == [("imgs/a", "red", jpeg((255, 0, 0))),
                                                                 ("imgs/b", "blue", jpeg((0, 0, 255)))]
    [unit] = make_plan([f"{s3}/in/pq/data.parquet"], shard_size=10).units
    a, escape, missing = read_unit(unit)
    assert a.ok and a.image == jpeg((255, 0, 0))
    assert (escape.status, escape.error["kind"]) == ("rejected", "unsafe_path")
    assert (missing.status, missing.error["kind"]) == ("rejected", "missing_image")


def record(unit, position, key):
    return Record(key=key, source="x.tar", unit=unit, position=position, image=jpeg(), width=24, height=16,
                  raw_caption="c", caption="c", factual_caption="c", entities=[], boxes=[])


def test_shards_written_to_s3_read_back_with_webdataset_and_pyarrow_and_mark_completion_last(s3, tmp_path):
    out = Location(f"{s3}/run")
    ShardWriter(out, expected={0: 2, 1: 1})([record(0, 0, "a"), record(0, 1, "b"), record(1, 0, "a")])
    ShardWriter(tmp_path, expected={0: 2, 1: 1})([record(0, 0, "a"), record(0, 1, "b"), record(1, 0, "a")])
    assert set(complete_units(out)) == {0, 1}
    fs = s3_fs()
    assert fs.cat_file(f"{s3[5:]}/run/shards/000000.tar") == (tmp_path / "shards" / "000000.tar").read_bytes()
    with fs.open(f"{s3[5:]}/run/shards/000000.tar") as f:
        members = wds.tariterators.tar_file_expander([{"stream": f, "url": f"{s3}/run/shards/000000.tar"}])
        assert [s["__key__"] for s in wds.tariterators.group_by_keys(members)] == ["a", "b"]
    with fs.open(f"{s3[5:]}/run/index/000001.parquet") as f:
        assert pq.read_table(f).column("key").to_pylist() == ["a-dup1"]  # keys stay unique across units

    # a killed writer leaves data without a marker: the unit is not complete, and writing it again overwrites
    fs.pipe_file(f"{s3[5:]}/run/shards/000002.tar", b"half a tar")
    assert set(complete_units(out)) == {0, 1}
    write_unit(out, 2, [record(2, 0, "c")], lambda unit, keys: keys)
    assert set(complete_units(out)) == {0, 1, 2} and fs.cat_file(f"{s3[5:]}/run/shards/000002.tar") != b"half a tar"


def test_a_retried_claim_replaces_the_first_and_committed_keys_stay_taken():
    claims = KeyClaims()
    assert claims.claim(0, ["a", "b", "a"]) == ["a", "b", "a-dup1"]
    assert claims.claim(1, ["b", "c"]) == ["b-dup1", "c"]  # unit 0 holds b (not yet committed)
    assert claims.claim(0, ["a", "b", "a"]) == ["a", "b", "a-dup1"]  # a retried write gets the same keys
    claims.commit(0)
    claims.release(1)  # unit 1's write failed before its marker
    assert claims.claim(1, ["b", "c"]) == ["b-dup1", "c"]  # committed keys stay taken
    assert claims.claim(2, ["c", "d"]) == ["c-dup1", "d"]
    assert len(claims) == 3 + 2 + 2


def test_no_credentials_wrong_endpoint_and_missing_bucket_are_one_line_without_secrets(s3, s3_server, monkeypatch):
    options = {"s3": {"secret": "sup3r-s3cret-value", "key": "AKIAEXAMPLEKEY"}}
    with pytest.raises(StorageError) as err:
        Location(f"{s3}-missing/out").check_writable()
    assert "bucket does not exist" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(StorageError) as err:
        Location(f"{s3}/out", {"s3": {**options["s3"], "endpoint_url": "http://127.0.0.1:9"}}).check_writable()
    message = str(err.value)
    assert "endpoint cannot be reached" in message and s3 in message
    assert "sup3r-s3cret-value" not in message and "AKIAEXAMPLEKEY" not in message
    assert storage.redact("x sup3r-s3cret-value y") == "x *** y"
    assert storage.redacted_options(options) == {"s3": {"secret": "<set>", "key": "<set>"}}
    with pytest.raises(StorageError, match="cannot read s3://.*: the bucket does not exist"):
        expand_inputs([f"{s3}-missing/dump"])


@pytest.mark.parametrize("case", ["no credentials", "endpoint down", "missing bucket", "missing input bucket"])
def test_unreachable_storage_stops_the_run_before_any_work_with_one_line(case, s3, tmp_path, demo_input):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import free_port

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    inp, out = str(demo_input), f"{s3}/out"
    # credentials given in the pipeline, as a team might: they must show nowhere
    extra = ["--set", "storage_options.s3.key=AKIAGRANUCAPEXAMPLE", "--set", "storage_options.s3.secret=sup3r-s3cret"]
    if case == "no credentials":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(name)
        extra = []
        env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                   AWS_EC2_METADATA_DISABLED="true")
    elif case == "endpoint down":
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    elif case == "missing bucket":
        out = f"{s3}-missing/out"
    else:
        inp = f"{s3}-missing/dump"
    proc = subprocess.run([sys.executable, "-m", "engine.cli", "run", "pipelines/smoke.yaml", "-i", inp, "-o", out,
                           "-q", *extra], cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True,
                          timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: cannot "), proc.stderr
    expected = {"no credentials": "no credentials found", "endpoint down": "the endpoint cannot be reached",
                "missing bucket": "the bucket does not exist", "missing input bucket": "the bucket does not exist"}
    assert expected[case] in lines[0] and (inp if case == "missing input bucket" else out) in lines[0]
    assert "sup3r-s3cret" not in proc.stderr + proc.stdout and "AKIAGRANUCAPEXAMPLE" not in proc.stderr + proc.stdout
    assert s3_fs().ls(s3[5:]) == []  # nothing written


def test_storage_options_reach_the_filesystem_but_never_the_manifest_or_the_printed_config(s3, tmp_path, capsys):
    from engine.cli import main
    from engine.config import load_config
    from engine.io.plan import Plan
    from engine.runner import write_manifest

    # the server's own credentials, given in the pipeline: they work, and show nowhere
    secret = ["--set", "storage_options.s3.key=granucap-test-key", "--set", "storage_options.s3.secret=granucap-test-secret"]
    config = load_config("pipelines/smoke.yaml", secret[1::2])
    out = Location(f"{s3}/run", config.storage_options)
    out.check_writable()
    write_manifest(out, config, Plan(shard_size=8, inputs=[], files=[]), {})
    text = s3_fs().cat_file(f"{s3[5:]}/run/manifest.json").decode()
    assert json.loads(text)["config"]["storage_options"] == {"s3": {"key": "<set>", "secret": "<set>"}}
    assert "granucap-test-secret" not in text and "granucap-test-key" not in text
    assert main(["validate", "pipelines/smoke.yaml", *secret]) == 0
    printed = capsys.readouterr().out
    assert "storage_options" in printed and "granucap-test-secret" not in printed
