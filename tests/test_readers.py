"""Readers: input expansion, unit planning, streamed reading of tars, parquet files and folders."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.io.inputs import Unit, expand_inputs
from engine.io.plan import plan_units
from engine.io.readers import read_unit, sanitize_key


def _jpeg(i: int, size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, ((i * 37) % 256, (i * 91) % 256, 128)).save(buf, format="JPEG")
    return buf.getvalue()


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (i % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _write_tar(path: Path, n: int, *, prefix: str = "s", mode: str = "w") -> dict[str, tuple[bytes, str]]:
    """img2dataset layout: KEY.jpg + KEY.txt + KEY.json; returns key -> (image, caption)."""
    expected = {}
    with tarfile.open(path, mode) as tf:
        for i in range(n):
            key = f"{prefix}{i:05d}"
            img, cap = _jpeg(i), f"caption {i}"
            _add(tf, f"{key}.jpg", img)
            _add(tf, f"{key}.txt", cap.encode())
            _add(tf, f"{key}.json", json.dumps({"url": f"http://x/{i}", "caption": cap}).encode())
            expected[key] = (img, cap)
    return expected


def _read_all(units: list[Unit]) -> list:
    out = []
    for unit in units:
        records = list(read_unit(unit))
        assert len(records) == unit.stop - unit.start
        assert [r.position for r in records] == list(range(unit.stop - unit.start))
        assert all(r.unit == unit.index for r in records)
        out.extend(records)
    return out


def test_plan_splits_and_is_deterministic(tmp_path: Path) -> None:
    expected = _write_tar(tmp_path / "a.tar", 7)
    _write_tar(tmp_path / "b.tar", 3, prefix="t")
    plan = plan_units([str(tmp_path)], shard_size=3)
    assert [(u.index, os.path.basename(u.path), u.start, u.stop) for u in plan] == [
        (0, "a.tar", 0, 3),
        (1, "a.tar", 3, 6),
        (2, "a.tar", 6, 7),
        (3, "b.tar", 0, 3),
    ]
    assert plan_units([str(tmp_path)], shard_size=3) == plan
    assert pickle.loads(pickle.dumps(plan[1])) == plan[1]
    records = _read_all(plan)
    assert len(records) == 10 and all(r.ok for r in records)
    by_key = {r.key: r for r in records}
    for key, (img, cap) in expected.items():
        assert by_key[key].image == img
        assert by_key[key].raw_caption == cap
        assert json.loads(by_key[key].meta)["url"].startswith("http://x/")
        assert "caption" not in json.loads(by_key[key].meta)
    assert records[3].key == "s00003" and records[3].position == 0 and records[3].unit == 1


def test_kind_detection_glob_and_directory(tmp_path: Path) -> None:
    _write_tar(tmp_path / "x.tar", 2)
    _write_tar(tmp_path / "y.tar.gz", 2, mode="w:gz")
    pq.write_table(pa.table({"image": [_jpeg(1)], "caption": ["c"]}), tmp_path / "z.parquet")
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(_jpeg(0))
    (folder / "captions.jsonl").write_text(json.dumps({"file": "a.jpg", "caption": "hi"}) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    pairs = expand_inputs([str(tmp_path)])
    assert [(k, os.path.basename(p)) for k, p in pairs] == [
        ("folder", "captions.jsonl"),
        ("webdataset", "x.tar"),
        ("webdataset", "y.tar.gz"),
        ("parquet", "z.parquet"),
    ]
    assert expand_inputs([str(tmp_path / "*.tar*")]) == [p for p in pairs if p[0] == "webdataset"]
    assert expand_inputs([str(folder)]) == [("folder", str(folder / "captions.jsonl"))]
    # duplicates collapse; order independent of argument order
    assert expand_inputs([str(tmp_path / "x.tar"), str(tmp_path)]) == pairs
    records = _read_all(plan_units([str(tmp_path)], shard_size=10))
    assert len(records) == 6 and all(r.ok for r in records)


def test_no_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no input found"):
        expand_inputs([str(tmp_path)])
    with pytest.raises(ValueError, match="matches nothing"):
        expand_inputs([str(tmp_path / "*.tar")])
    with pytest.raises(ValueError, match="does not exist"):
        expand_inputs([str(tmp_path / "missing.tar")])
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="unknown kind"):
        expand_inputs([str(tmp_path / "a.csv")])


def test_webdataset_tarwriter_and_json_caption(tmp_path: Path) -> None:
    import webdataset as wds

    path = tmp_path / "wds.tar"
    with wds.TarWriter(str(path)) as sink:
        sink.write({"__key__": "k0", "jpg": _jpeg(0), "txt": "from txt", "json": {"caption": "from json"}})
        sink.write({"__key__": "k1", "png": _png(1), "json": {"caption": "only json", "w": 3}})
        sink.write({"__key__": "k2", "txt": "no image"})
        sink.write({"__key__": "k3", "webp": _jpeg(3), "txt": b"caf\xe9 bad utf8"})
    records = _read_all(plan_units([str(path)], shard_size=100))
    assert [r.key for r in records] == ["k0", "k1", "k2", "k3"]
    assert records[0].raw_caption == "from txt"  # txt wins
    assert json.loads(records[0].meta)["json_caption"] == "from json"
    assert records[1].raw_caption == "only json" and json.loads(records[1].meta)["w"] == 3
    assert records[1].image == _png(1)
    assert records[2].status == "rejected" and records[2].error["kind"] == "missing_image"
    assert records[2].error["stage"] == "read" and records[2].image is None
    assert records[3].raw_caption == "caf\ufffd bad utf8"
    assert json.loads(records[3].meta)["caption_invalid_utf8"] is True


def test_unsafe_members_never_touch_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        _add(tf, "../evil.jpg", _jpeg(0))
        _add(tf, "../evil.txt", b"evil caption")
        _add(tf, "/abs/dir/x.jpg", _jpeg(1))
        _add(tf, "/abs/dir/x.txt", b"abs caption")
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
        _add(tf, "link.txt", b"link caption")
        hard = tarfile.TarInfo("hard.jpg")
        hard.type = tarfile.LNKTYPE
        hard.linkname = "../evil.jpg"
        tf.addfile(hard)
        dev = tarfile.TarInfo("dev.jpg")
        dev.type = tarfile.CHRTYPE
        tf.addfile(dev)
        _add(tf, "ok.jpg", _jpeg(2))
        _add(tf, "ok.txt", b"fine")
    before = sorted(p for p in tmp_path.rglob("*"))
    records = _read_all(plan_units([str(path)], shard_size=100))
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert not (tmp_path / "evil.jpg").exists()
    assert [r.key for r in records] == ["evil", "abs/dir/x", "link", "hard", "dev", "ok"]
    assert records[0].ok and records[0].image == _jpeg(0) and records[0].raw_caption == "evil caption"
    assert json.loads(records[0].meta)["original_key"] == "../evil"
    assert records[1].ok and records[1].raw_caption == "abs caption"
    for r in records[2:5]:
        assert r.status == "rejected" and r.error == {
            "stage": "read",
            "kind": "unsafe_member",
            "message": r.error["message"],
        }
        assert r.image is None
    assert "symlink" in records[2].error["message"]
    assert records[5].ok


def test_sanitize_key() -> None:
    assert sanitize_key("../../a/./b") == "a/b"
    assert sanitize_key("/abs/x") == "abs/x"
    assert sanitize_key("..\\..\\w") == "w"
    assert sanitize_key("..") == ""


def test_corrupt_tar_keeps_counts(tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    _write_tar(good, 6)
    data = good.read_bytes()
    # cut inside the data of sample 3's image: its header was read, so it is planned, and reads as the
    # sample in progress when the stream breaks -> corrupt_input; the complete samples before it are ok.
    with tarfile.open(good) as tf:
        member = next(m for m in tf.getmembers() if m.name == "s00003.jpg")
    broken = tmp_path / "broken.tar"
    broken.write_bytes(data[: member.offset_data + 10])
    plan = plan_units([str(broken)], shard_size=2)
    assert sum(u.stop - u.start for u in plan) == 4
    records = _read_all(plan)
    assert [r.ok for r in records] == [True, True, True, False]
    assert records[3].error["kind"] == "corrupt_input" and records[3].key == "s00003"
    assert records[3].error["stage"] == "read" and "unexpected end of data" in records[3].error["message"]
    # gzip-compressed and truncated: same rule, no exception escapes
    gz = tmp_path / "gz.tar.gz"
    _write_tar(gz, 6, mode="w:gz")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    plan = plan_units([str(cut)], shard_size=4)
    records = _read_all(plan)
    assert records and records[-1].error["kind"] == "corrupt_input"
    # A file that is not a tar at all: one visible corrupt_input row.
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar file" * 100)
    plan = plan_units([str(junk)], shard_size=2)
    records = _read_all(plan)
    assert len(records) == 1 and records[0].error["kind"] == "corrupt_input"
    assert records[0].key == "junk-00000000"
    # A tar that lost samples after planning: the missing positions are corrupt_input rows.
    unit = Unit(0, "webdataset", str(good), 4, 9)
    records = list(read_unit(unit))
    assert len(records) == 5 and [r.ok for r in records] == [True, True, False, False, False]
    assert records[2].key == "good-00000006"


def test_parquet_bytes_struct_and_paths(tmp_path: Path) -> None:
    images = [_jpeg(i) for i in range(5)]
    pq.write_table(
        pa.table(
            {
                "key": ["a", "b", None, "d", "e"],
                "image": images,
                "caption": ["c0", "c1", "c2", None, "c4"],
                "url": [f"u{i}" for i in range(5)],
            }
        ),
        tmp_path / "bytes.parquet",
        row_group_size=2,
    )
    plan = plan_units([str(tmp_path / "bytes.parquet")], shard_size=2)
    assert [(u.start, u.stop) for u in plan] == [(0, 2), (2, 4), (4, 5)]
    records = _read_all(plan)
    assert [r.key for r in records] == ["a", "b", "bytes-00000002", "d", "e"]
    assert [r.image for r in records] == images
    assert [r.raw_caption for r in records] == ["c0", "c1", "c2", None, "c4"]
    assert json.loads(records[4].meta) == {"url": "u4"}

    # HF datasets style struct column + `text`
    struct = pa.array(
        [{"bytes": images[0], "path": "0.jpg"}, {"bytes": None, "path": "img/1.jpg"}],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "1.jpg").write_bytes(images[1])
    pq.write_table(pa.table({"image": struct, "text": ["t0", "t1"]}), tmp_path / "hf.parquet")
    records = _read_all(plan_units([str(tmp_path / "hf.parquet")], shard_size=8))
    assert [r.image for r in records] == images[:2] and [r.raw_caption for r in records] == ["t0", "t1"]

    # `path` column relative to the parquet's directory; missing and escaping paths are rejected rows
    outside = tmp_path.parent / "outside.jpg"
    outside.write_bytes(images[2])
    pq.write_table(
        pa.table(
            {"path": ["img/1.jpg", "img/nope.jpg", "../outside.jpg", str(outside)], "caption": list("wxyz")}
        ),
        tmp_path / "paths.parquet",
    )
    records = _read_all(plan_units([str(tmp_path / "paths.parquet")], shard_size=8))
    assert records[0].ok and records[0].image == images[1]
    assert [r.error["kind"] for r in records[1:]] == ["missing_image", "unsafe_path", "unsafe_path"]
    assert all(r.image is None for r in records[1:])


def test_parquet_image_column_of_path_strings(tmp_path: Path) -> None:
    """A string `image` column names files relative to the parquet's folder, under the `path` column's rule."""
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    images = [_jpeg(i, (16 + i, 12)) for i in range(3)]
    (data / "img" / "0.jpg").write_bytes(images[0])
    (data / "1.jpg").write_bytes(images[1])
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(images[2])
    (data / "img" / "link.jpg").symlink_to(outside)
    table = pa.table(
        {
            "image": ["img/0.jpg", "1.jpg", "img/nope.jpg", "../outside.jpg", str(outside), "img/link.jpg", None, ""],
            "caption": [f"c{i}" for i in range(8)],
        }
    )
    assert table.schema.field("image").type == pa.string()
    pq.write_table(table, data / "strings.parquet")
    records = _read_all(plan_units([str(data / "strings.parquet")], shard_size=8))
    assert [r.image for r in records[:2]] == images[:2]
    assert records[0].ok and records[1].ok and records[0].raw_caption == "c0"
    assert json.loads(records[0].meta) == {"path": "img/0.jpg"}
    kinds = [r.error["kind"] for r in records[2:]]
    assert kinds == ["missing_image", "unsafe_path", "unsafe_path", "unsafe_path", "missing_image", "missing_image"]
    assert all(r.image is None for r in records[2:])
    assert "leaves" in records[3].error["message"]

    # large_string works alike, and a `path` value wins over the image's; the image's is kept in meta
    pq.write_table(
        pa.table({"image": pa.array(["1.jpg"], pa.large_string()), "path": ["img/0.jpg"], "text": ["t"]}),
        data / "both.parquet",
    )
    (record,) = _read_all(plan_units([str(data / "both.parquet")], shard_size=8))
    assert record.image == images[0]
    assert json.loads(record.meta) == {"path": "img/0.jpg", "image_path": "1.jpg"}


def test_folder_jsonl(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jpg").write_bytes(_jpeg(0))
    (tmp_path / "sub" / "b.png").write_bytes(_png(1))
    lines = [
        json.dumps({"file": "a.jpg", "caption": "first", "url": "http://a"}),
        "",
        json.dumps({"file": "sub/b.png", "caption": "second"}),
        "{not json",
        json.dumps({"file": "gone.jpg", "caption": "third"}),
        json.dumps({"file": "../../etc/passwd", "caption": "evil"}),
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    plan = plan_units([str(tmp_path)], shard_size=3)
    assert [(u.kind, u.start, u.stop) for u in plan] == [("folder", 0, 3), ("folder", 3, 5)]
    records = _read_all(plan)
    assert [r.key for r in records] == ["a", "sub/b", f"{tmp_path.name}-00000002", "gone", "etc/passwd"]
    assert records[0].ok and records[0].image == _jpeg(0) and json.loads(records[0].meta)["url"] == "http://a"
    assert records[1].ok and records[1].image == _png(1) and records[1].raw_caption == "second"
    assert [r.error["kind"] for r in records[2:]] == ["bad_input", "missing_image", "unsafe_path"]
