"""Exporters, each read back by its consumer: pycocotools and roboflow supervision for COCO, supervision and
the Ultralytics layout for YOLO, HF datasets for the parquet index, webdataset for the shards, and the
published formats for ODVG (Open-GroundingDino / mmdet ODVGDataset) and Label Studio (tasks with
rectanglelabels predictions)."""

from __future__ import annotations

import contextlib
import io
import json
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml
from tests.fakerun import BOXES_OUT, CATEGORIES, OK_IMAGES, make_records, make_run
from PIL import Image

from engine.cli import main
from engine.export import EXPORTERS, export
from engine.export.common import UniqueNames
from engine.io.completeness import IncompleteRunError
from engine.io.inputs import Unit
from engine.io.plan import FileCount, Plan, save_plan
from engine.io.shards import ShardWriter
from engine.io.storage import Location
from engine.records import Record


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("fake-run"))


def clip_box(xyxy: list[float], width: int, height: int) -> tuple[float, ...] | None:
    """The box clipped to the image by hand; None when nothing of positive area is left."""
    x0, y0, x1, y1 = xyxy
    x0, x1 = max(0.0, min(x0, width)), max(0.0, min(x1, width))
    y0, y1 = max(0.0, min(y0, height)), max(0.0, min(y1, height))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def expected_boxes() -> dict[str, list[tuple[tuple[float, ...], str, str, str]]]:
    """key -> [(clipped xyxy, category, phrase, parent)] straight from the records, not from an exporter."""
    out = {}
    for r in make_records():
        if r.ok:
            rows = []
            for b in r.boxes:
                c = clip_box(b["xyxy"], r.width, r.height)
                if c is not None:
                    e = r.entities[b["entity"]]
                    rows.append((c, e["category"], e["phrase"], e["parent_category"]))
            out[r.key] = rows
    return out


def test_coco_loads_in_pycocotools_without_warnings_and_evaluates_to_ap_1(run_dir, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    summary = export("coco", run_dir, tmp_path)
    assert (summary["images"], summary["annotations"], summary["dropped_boxes"]) == (OK_IMAGES, BOXES_OUT, 1)
    out = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        coco = COCO(str(tmp_path / "annotations.json"))
    assert not caught, [str(w.message) for w in caught]
    chatter = {"loading annotations into memory...", "creating index...", "index created!"}
    assert all(line in chatter or line.startswith("Done (t=") for line in out.getvalue().splitlines()), out.getvalue()

    cats = coco.loadCats(coco.getCatIds())
    assert [c["name"] for c in cats] == CATEGORIES
    assert {c["name"]: c["supercategory"] for c in cats}["remote control"] == "device"
    expected = expected_boxes()
    assert len(coco.getImgIds()) == OK_IMAGES
    for image in coco.loadImgs(coco.getImgIds()):
        with Image.open(tmp_path / image["file_name"]) as im:  # the image is there, at the stated size
            assert im.size == (image["width"], image["height"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        want = expected[image["granucap_key"]]
        assert len(anns) == len(want)
        for ann, (xyxy, category, phrase, parent) in zip(anns, want):
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == pytest.approx(xyxy, abs=0.02)
            assert coco.loadCats(ann["category_id"])[0]["name"] == category
            assert (ann["phrase"], ann["parent_category"]) == (phrase, parent)
            assert 0 < ann["score"] <= 1 and ann["iscrowd"] == 0 and ann["area"] == pytest.approx(w * h, abs=0.1)

    # The same file as detections (it carries scores) against itself: a consumer-side check that ids,
    # boxes and categories are consistent. Perfect detections give AP 1.
    with contextlib.redirect_stdout(io.StringIO()):
        dets = coco.loadRes(coco.loadAnns(coco.getAnnIds()))
        ev = COCOeval(coco, dets, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)


def test_coco_of_a_run_without_complete_shards_is_valid_and_empty(tmp_path):
    from pycocotools.coco import COCO

    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    assert export("coco", run, tmp_path / "out")["images"] == 0
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(tmp_path / "out" / "annotations.json"))
    assert coco.getImgIds() == [] and coco.getCatIds() == []


def test_odvg_detection_matches_the_published_format(run_dir, tmp_path):
    summary = export("odvg", run_dir, tmp_path)
    assert summary["boxes"] == BOXES_OUT
    label_map = json.loads((tmp_path / "label_map.json").read_text())
    assert label_map == {str(i): c for i, c in enumerate(CATEGORIES)}  # keys "0".. as Open-GroundingDino wants
    lines = [json.loads(line) for line in (tmp_path / "odvg.jsonl").read_text().splitlines()]
    assert len(lines) == OK_IMAGES
    got = []
    for row in lines:
        assert set(row) == {"filename", "height", "width", "detection"}
        with Image.open(tmp_path / row["filename"]) as im:
            assert im.size == (row["width"], row["height"])
        for inst in row["detection"]["instances"]:
            assert set(inst) == {"bbox", "label", "category"} and isinstance(inst["label"], int)
            assert label_map[str(inst["label"])] == inst["category"]
            x0, y0, x1, y1 = inst["bbox"]
            # mmdet ODVGDataset drops boxes outside the image or under 1 px; none of ours may be dropped
            assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"] and x1 - x0 >= 1 and y1 - y0 >= 1
            got.append((tuple(inst["bbox"]), inst["category"]))
    want = [(xyxy, cat) for rows in expected_boxes().values() for xyxy, cat, _, _ in rows]
    assert [c for _, c in got] == [c for _, c in want]
    assert [b for b, _ in got] == [pytest.approx(b, abs=0.01) for b, _ in want]


def test_odvg_grounding_tokens_positive_point_at_the_phrase(run_dir, tmp_path):
    export("odvg-grounding", run_dir, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "odvg.jsonl").read_text().splitlines()]
    regions = 0
    for row in lines:
        caption = row["grounding"]["caption"]
        for region in row["grounding"]["regions"]:
            assert set(region) == {"bbox", "phrase", "tokens_positive"} and len(region["bbox"]) == 4
            for start, end in region["tokens_positive"]:
                assert caption[start:end].lower() == region["phrase"].lower()
            regions += 1
    assert regions == BOXES_OUT
    by_file = {row["filename"]: row["grounding"]["caption"] for row in lines}
    # "tv remote control" is not in "A remote lies on the sofa.": appended, the original caption kept
    assert "images/000000/img_0002.jpg" in by_file
    assert by_file["images/000000/img_0002.jpg"] == "A remote lies on the sofa. tv remote control."


def test_yolo_layout_labels_and_dataset_yaml(run_dir, tmp_path):
    summary = export("yolo", run_dir, tmp_path)
    assert (summary["images"], summary["boxes"]) == (OK_IMAGES, BOXES_OUT)
    data = yaml.safe_load((tmp_path / "dataset.yaml").read_text())
    assert data["nc"] == len(CATEGORIES) and data["names"] == dict(enumerate(CATEGORIES))
    assert "path" not in data  # Ultralytics takes the yaml's own folder: the export can be moved
    assert (tmp_path / "classes.txt").read_text().splitlines() == CATEGORIES
    images = sorted((tmp_path / data["train"]).rglob("*.jpg"))
    assert len(images) == OK_IMAGES
    expected = expected_boxes()
    for image in images:
        # Ultralytics finds a label file by replacing /images/ with /labels/ and the suffix with .txt
        label = Path(str(image).replace("/images/", "/labels/")).with_suffix(".txt")
        lines = label.read_text().splitlines()
        with Image.open(image) as im:
            w, h = im.size
        key = "img/" + image.stem.split("_")[1]
        assert len(lines) == len(expected[key])
        for line, (xyxy, category, _, _) in zip(lines, expected[key]):
            parts = line.split()
            assert len(parts) == 5 and parts[0].isdigit()
            cls, cx, cy, bw, bh = int(parts[0]), *map(float, parts[1:])
            assert all(0 <= v <= 1 for v in (cx, cy, bw, bh))
            assert CATEGORIES[cls] == category
            back = ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)
            assert back == pytest.approx(xyxy, abs=1e-3 * max(w, h))


def _supervision():
    with warnings.catch_warnings():  # without opencv it warns that it uses its NumPy fallback; that is fine
        warnings.simplefilter("ignore")
        import supervision

    return supervision


def _assert_supervision_dataset_matches_run(dataset) -> None:
    """A supervision DetectionDataset holds exactly the run's ok images, each with the run's clipped boxes."""
    assert dataset.classes == CATEGORIES
    assert len(dataset) == OK_IMAGES
    expected = expected_boxes()
    seen = set()
    for path in dataset.image_paths:
        key = "img/" + Path(path).stem.split("_")[1]
        seen.add(key)
        detections = dataset.annotations[path]
        want = expected[key]
        assert len(detections) == len(want)
        assert [dataset.classes[c] for c in detections.class_id] == [category for _, category, _, _ in want]
        for got, (xyxy, _, _, _) in zip(detections.xyxy.tolist(), want):
            assert got == pytest.approx(xyxy, abs=0.02)  # normalised floats (YOLO) or 2 decimals (COCO)
    assert seen == set(expected)


def test_yolo_and_coco_load_in_supervision(run_dir, tmp_path):
    """Read back with a real consumer: roboflow supervision's DetectionDataset.from_yolo / from_coco."""
    sv = _supervision()

    export("yolo", run_dir, tmp_path / "yolo")
    # supervision reads one flat images folder with its labels folder; the export has one folder per shard
    shards = sorted(p.name for p in (tmp_path / "yolo" / "images" / "train").iterdir())
    assert shards == ["000000", "000001"]
    parts = [
        sv.DetectionDataset.from_yolo(
            images_directory_path=str(tmp_path / "yolo" / "images" / "train" / shard),
            annotations_directory_path=str(tmp_path / "yolo" / "labels" / "train" / shard),
            data_yaml_path=str(tmp_path / "yolo" / "dataset.yaml"),
        )
        for shard in shards
    ]
    assert all(part.classes == CATEGORIES for part in parts)
    _assert_supervision_dataset_matches_run(sv.DetectionDataset.merge(parts))

    export("coco", run_dir, tmp_path / "coco")
    coco = sv.DetectionDataset.from_coco(
        images_directory_path=str(tmp_path / "coco"), annotations_path=str(tmp_path / "coco" / "annotations.json")
    )
    _assert_supervision_dataset_matches_run(coco)
    path, image, detections = coco[0]  # images load, at the size the boxes refer to
    record = next(r for r in make_records() if r.key == "img/" + Path(path).stem.split("_")[1])
    assert image.shape[:2] == (record.height, record.width)
    assert list(detections["class_name"]) == [CATEGORIES[c] for c in detections.class_id]


def test_labelstudio_tasks_with_percent_rectangles(run_dir, tmp_path):
    summary = export("labelstudio", run_dir, tmp_path)
    assert (summary["tasks"], summary["boxes"]) == (OK_IMAGES, BOXES_OUT)
    config = ET.fromstring((tmp_path / "label_config.xml").read_text())
    image_tag, rect_tag = config.find("Image"), config.find("RectangleLabels")
    assert image_tag.get("value") == "$image"
    assert [lab.get("value") for lab in rect_tag.findall("Label")] == CATEGORIES
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    assert isinstance(tasks, list) and len(tasks) == OK_IMAGES
    expected = expected_boxes()
    ids = set()
    for task in tasks:
        rel = task["data"]["image"].removeprefix("/data/local-files/?d=")
        assert (tmp_path / rel).is_file()
        (prediction,) = task["predictions"]
        assert prediction["model_version"] == "fake-teacher" and 0 <= prediction["score"] <= 1
        want = expected[task["data"]["key"]]
        assert len(prediction["result"]) == len(want)
        for result, (xyxy, category, phrase, _) in zip(prediction["result"], want):
            assert result["type"] == "rectanglelabels"
            assert result["from_name"] == rect_tag.get("name") and result["to_name"] == rect_tag.get("toName")
            assert result["to_name"] == image_tag.get("name")
            v, w, h = result["value"], result["original_width"], result["original_height"]
            assert all(0 <= v[k] <= 100 for k in ("x", "y", "width", "height"))
            assert v["x"] + v["width"] <= 100 + 1e-9 and v["y"] + v["height"] <= 100 + 1e-9
            back = (v["x"] * w / 100, v["y"] * h / 100, (v["x"] + v["width"]) * w / 100, (v["y"] + v["height"]) * h / 100)
            assert back == pytest.approx(xyxy, abs=1e-6)
            assert v["rectanglelabels"] == [category] and phrase in result["meta"]["text"][0]
            ids.add(result["id"])
    assert len(ids) == BOXES_OUT  # result ids are unique


def test_index_loads_with_hf_datasets_and_shards_with_webdataset(run_dir, tmp_path):
    import datasets
    import webdataset as wds

    ds = datasets.load_dataset(
        "parquet", data_files=str(run_dir / "index" / "*.parquet"), split="train", cache_dir=str(tmp_path / "hf")
    )
    assert ds.num_rows == 6 and "image" not in ds.column_names
    assert sorted(ds["status"]) == ["failed", "ok", "ok", "ok", "ok", "rejected"]
    rejected = ds.filter(lambda r: r["status"] == "rejected")[0]
    assert rejected["error"]["stage"] == "decode"
    ok = ds.filter(lambda r: r["key"] == "img/0001")[0]
    assert ok["entities"][1]["category"] == "dog" and len(ok["boxes"]) == 2

    urls = [str(p) for p in sorted((run_dir / "shards").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == OK_IMAGES
    for sample in samples:
        assert sample["jpg"].size == (sample["json"]["width"], sample["json"]["height"])
        assert sample["json"]["status"] == "ok" and sample["json"]["boxes"]


def test_export_command_prints_its_summary(run_dir, tmp_path, capsys):
    assert main(["export", "yolo", str(run_dir), str(tmp_path / "y")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "yolo" and summary["boxes"] == BOXES_OUT
    assert main(["export", "coco", str(tmp_path / "nope"), str(tmp_path / "c")]) == 2  # not a run dir


# --- partial runs: a plan with units still to write ---------------------------------------------------------


def _save_plan(run: Path, sizes: list[int]) -> None:
    """plan.json for units of `sizes` samples (one input file), as `granucap run` saves it."""
    units, start = [], 0
    for i, n in enumerate(sizes):
        units.append(Unit(i, "webdataset", "/in/fake.tar", start, start + n, "fake.tar"))
        start += n
    files = [FileCount("webdataset", "/in/fake.tar", "fake.tar", start, "tar_headers")]
    save_plan(Location(run), Plan(shard_size=max(sizes), inputs=["/in"], files=files, units=units))


def test_export_refuses_a_run_whose_plan_has_units_without_a_marker(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    _save_plan(run, [3, 3, 4])  # units 0 and 1 are written; unit 2 (4 samples) is not
    with pytest.raises(IncompleteRunError) as caught:
        export("coco", run, tmp_path / "refused")
    message = str(caught.value)
    assert "\n" not in message and "2 of 3 planned units (6 of 10 samples)" in message
    assert "--allow-partial" in message
    assert not (tmp_path / "refused").exists()  # refused before anything was written

    summary = export("coco", run, tmp_path / "partial", allow_partial=True)
    assert summary["images"] == OK_IMAGES  # the complete units' ok samples, all of them
    assert summary["completeness"]["complete"] is False
    assert summary["completeness"]["units"] == {"planned": 3, "complete": 2}
    assert summary["completeness"]["samples"] == {"planned": 10, "complete": 6}

    # the CLI prints the same counts in its JSON summary
    assert main(["export", "yolo", str(run), str(tmp_path / "y"), "--allow-partial"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["completeness"]["units"] == {"planned": 3, "complete": 2} and printed["images"] == OK_IMAGES


def test_export_of_a_run_whose_plan_is_all_written_says_it_is_complete(tmp_path):
    run = make_run(tmp_path / "run")
    _save_plan(run, [3, 3])
    completeness = export("odvg", run, tmp_path / "o")["completeness"]
    assert completeness["complete"] is True and completeness["samples"] == {"planned": 6, "complete": 6}
    assert completeness["manifest_status"] == "complete"  # shown as the manifest says it, not relied on


def test_export_of_a_run_without_a_plan_is_not_refused_and_says_completeness_is_unknown(run_dir, tmp_path):
    completeness = export("odvg", run_dir, tmp_path / "o")["completeness"]
    assert completeness["complete"] is None and completeness["plan"] == "none"
    assert completeness["units"] == {"planned": None, "complete": 2}
    assert completeness["samples"] == {"planned": None, "complete": 6}  # the markers' counts of samples read


# --- keys that differ only in case ----------------------------------------------------------------------------

# key -> (image size, category of its one box); sizes differ so that an exported file tells whose it is
CASE_KEYS = {"Cat_1": ((40, 30), "cat"), "cat_1": ((30, 40), "dog"), "CAT_1": ((50, 20), "table")}


def _case_run(out: Path) -> Path:
    """Cat_1 and cat_1 in unit 0, CAT_1 in unit 1: the first two share a shard's folder."""
    records = []
    for i, (key, ((w, h), category)) in enumerate(CASE_KEYS.items()):
        unit, position = (0, i) if i < 2 else (1, 0)
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (60 * i, 100, 200)).save(buf, format="JPEG")
        record = Record(key=key, source="case.tar", unit=unit, position=position, image=buf.getvalue(), width=w,
                        height=h, raw_caption=f"a {category}", caption=f"a {category}", factual_caption=f"a {category}")
        record.entities = [{"phrase": f"a {category}", "category": category, "parent_category": "thing"}]
        record.boxes = [{"xyxy": [1.0, 1.0, w - 1.0, h - 1.0], "score": 0.8, "entity": 0, "matched": "phrase",
                         "teacher": "fake-teacher"}]
        records.append(record)
    ShardWriter(out, expected={0: 2, 1: 1})(records)
    (out / "manifest.json").write_text(json.dumps({"format": "granucap/1", "pipeline": "case", "status": "complete"}))
    return out


def _key_of_size(path: Path) -> str:
    with Image.open(path) as im:
        size = im.size
    (key,) = [k for k, (s, _) in CASE_KEYS.items() if s == size]
    return key


def _distinct_case_aside(paths: list[str]) -> None:
    assert len(paths) == len(CASE_KEYS)
    assert len({p.lower() for p in paths}) == len(paths), paths


def test_unique_names_are_unique_case_aside_and_the_same_every_time():
    def names():
        unique = UniqueNames()
        return [unique(n) for n in ["Cat_1", "cat_1", "CAT_1", "cat_1-2", "dog"]]

    assert names() == ["Cat_1", "cat_1-2", "CAT_1-3", "cat_1-2-2", "dog"]
    assert names() == names()


def test_keys_that_differ_only_in_case_get_distinct_files_in_every_exporter(tmp_path):
    run = _case_run(tmp_path / "run")
    tested = set()

    dest = tmp_path / "coco"
    coco = json.loads(Path(export("coco", run, dest)["annotations_file"]).read_text())
    categories = {c["id"]: c["name"] for c in coco["categories"]}
    _distinct_case_aside([image["file_name"] for image in coco["images"]])
    for image in coco["images"]:
        key = _key_of_size(dest / image["file_name"])
        (ann,) = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert image["granucap_key"] == key and categories[ann["category_id"]] == CASE_KEYS[key][1]
    tested.add("coco")

    dest = tmp_path / "yolo"
    export("yolo", run, dest)
    names = yaml.safe_load((dest / "dataset.yaml").read_text())["names"]
    images = sorted((dest / "images" / "train").rglob("*.jpg"))
    _distinct_case_aside([str(p.relative_to(dest)) for p in images])
    _distinct_case_aside([str(p.relative_to(dest)) for p in (dest / "labels" / "train").rglob("*.txt")])
    for image in images:
        label = Path(str(image).replace("/images/", "/labels/")).with_suffix(".txt")
        (line,) = label.read_text().splitlines()
        assert names[int(line.split()[0])] == CASE_KEYS[_key_of_size(image)][1]
    tested.add("yolo")

    for fmt in ("odvg", "odvg-grounding"):
        dest = tmp_path / fmt
        rows = [json.loads(line) for line in Path(export(fmt, run, dest)["jsonl"]).read_text().splitlines()]
        _distinct_case_aside([row["filename"] for row in rows])
        for row in rows:
            _, category = CASE_KEYS[_key_of_size(dest / row["filename"])]
            if fmt == "odvg":
                assert [i["category"] for i in row["detection"]["instances"]] == [category]
            else:
                assert [r["phrase"] for r in row["grounding"]["regions"]] == [f"a {category}"]
        tested.add(fmt)

    dest = tmp_path / "labelstudio"
    tasks = json.loads(Path(export("labelstudio", run, dest)["tasks_file"]).read_text())
    rels = [task["data"]["image"].removeprefix("/data/local-files/?d=") for task in tasks]
    _distinct_case_aside(rels)
    for task, rel in zip(tasks, rels):
        key = _key_of_size(dest / rel)
        (result,) = task["predictions"][0]["result"]
        assert task["data"]["key"] == key and result["value"]["rectanglelabels"] == [CASE_KEYS[key][1]]
    tested.add("labelstudio")

    dest = tmp_path / "sft"
    items = json.loads(Path(export("sft", run, dest)["file"]).read_text())
    _distinct_case_aside([item["image"] for item in items])
    for item in items:
        key = _key_of_size(dest / item["image"])
        assert item["id"] == key
        assert json.loads(item["conversations"][1]["value"])["entities"][0]["category"] == CASE_KEYS[key][1]
    tested.add("sft")

    dest = tmp_path / "regions"
    items = json.loads(Path(export("regions", run, dest)["conversations"]).read_text())
    _distinct_case_aside([item["image"] for item in items])
    for item in items:
        key = _key_of_size(dest / item["image"])
        assert item["id"] == f"{key}#0" and item["conversations"][1]["value"].split("|")[1] == CASE_KEYS[key][1]
    tested.add("regions")
    assert tested == set(EXPORTERS)  # a new exporter must be added here

