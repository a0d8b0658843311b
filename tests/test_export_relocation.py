"""Every export travels: made with the CLI, copied elsewhere, the original deleted, the copy loads in its consumer.

Consumers read the copy with their own code where it is in the main environment: pycocotools, supervision
and label-studio-sdk (its LabelInterface checks the labelling config, the tasks and the predictions).
Ultralytics (it needs torchvision, which imports beside the CPU torch only when patched) and FiftyOne (dozens
of packages, and a database that cannot be installed here) are not in it: their rules for finding a dataset's
files are followed here as their source states them (Ultralytics 8.4 `check_det_dataset`, `find_dataset_yaml`,
`img2label_paths`; FiftyOne 1.22 `YOLOv5DatasetImporter.setup`, `COCODetectionDatasetImporter.setup`; Label
Studio's `localfiles_data` view for `/data/local-files/?d=`), so the main suite checks the layouts without them.
tests/test_export_consumers.py runs Ultralytics and FiftyOne themselves on copied yolo and coco exports, in the
consumers environment that CI builds (`GRANUCAP_CONSUMERS=1 bash install.sh`, .venv-consumers).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import shutil
import warnings
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from PIL import Image

from engine.cli import main
from engine.export import EXPORTERS
from tests.fakerun import BOXES_OUT, CATEGORIES, OK_IMAGES, make_records, make_run

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("relocation") / "run")


def relocated(fmt: str, run: Path, tmp_path: Path, *options: str) -> tuple[Path, Path]:
    """Export `fmt` with the CLI, copy DEST to another folder, delete the original: (the copy, the original)."""
    made = tmp_path / "made" / fmt
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", fmt, str(run), str(made), *options]) == 0
    moved = tmp_path / "elsewhere" / "deeper" / fmt
    shutil.copytree(made, moved)
    shutil.rmtree(made)
    assert not made.exists()
    return moved, made


def sizes_by_key() -> dict[str, tuple[int, int]]:
    return {r.key: (r.width, r.height) for r in make_records() if r.ok}


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_no_exported_file_names_the_folder_it_was_written_to(fmt, run_dir, tmp_path):
    moved, original = relocated(fmt, run_dir, tmp_path)
    files = [p for p in moved.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        assert str(original).encode() not in data, f"{path.relative_to(moved)} names {original}"
        assert str(original.parent).encode() not in data, f"{path.relative_to(moved)} names {original.parent}"
    assert not [p for p in moved.rglob("*") if p.is_symlink()]


def test_a_copied_coco_export_loads_in_pycocotools_supervision_and_fiftyone_layout(run_dir, tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    moved, _ = relocated("coco", run_dir, tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(moved / "annotations.json"))
    sizes = sizes_by_key()
    images = coco.loadImgs(coco.getImgIds())
    assert len(images) == OK_IMAGES and len(coco.getAnnIds()) == BOXES_OUT
    for image in images:
        size = (image["width"], image["height"])
        assert image_size(moved / image["file_name"]) == size == sizes[image["granucap_key"]]

    # as detection results: the annotations list, as docs/formats.md says, scored against the copy itself
    annotations = json.loads((moved / "annotations.json").read_text())["annotations"]
    with contextlib.redirect_stdout(io.StringIO()):
        dets = coco.loadRes(annotations)
        evaluation = COCOeval(coco, dets, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)

    with warnings.catch_warnings():  # without opencv supervision warns that it uses its NumPy fallback
        warnings.simplefilter("ignore")
        import supervision as sv
    dataset = sv.DetectionDataset.from_coco(images_directory_path=str(moved),
                                            annotations_path=str(moved / "annotations.json"))
    assert len(dataset) == OK_IMAGES and dataset.classes == CATEGORIES
    assert all(Path(path).is_relative_to(moved) and Path(path).is_file() for path in dataset.image_paths)
    assert sum(len(dataset.annotations[path]) for path in dataset.image_paths) == BOXES_OUT

    # FiftyOne's COCODetectionDatasetImporter with data_path="." maps every file under DEST by its normalised
    # path relative to DEST, and finds an image by its normalised file_name in that map
    data_map = {os.path.normpath(str(p.relative_to(moved))): p for p in moved.rglob("*") if p.is_file()}
    assert all(os.path.normpath(image["file_name"]) in data_map for image in images)


def ultralytics_dataset(dataset: Path) -> dict:
    """What Ultralytics' check_det_dataset resolves for `data=dataset` (a yaml, or a folder with one yaml)."""
    if dataset.is_dir():  # find_dataset_yaml: the folder's *.yaml, exactly one (else one named like the folder)
        found = list(dataset.glob("*.yaml")) or list(dataset.rglob("*.yaml"))
        if len(found) > 1:
            found = [f for f in found if f.stem == dataset.stem]
        assert len(found) == 1, f"Ultralytics wants one yaml in {dataset}, finds {found}"
        dataset = found[0]
    data = yaml.safe_load(dataset.read_text())
    assert "train" in data and "val" in data, "'train' and 'val' are required in all data YAMLs"
    assert data.get("names") is not None and len(data["names"]) == data["nc"]
    root = Path(data.get("path") or dataset.parent)  # no `path`: the yaml's own folder
    resolved = {k: (root / data[k]).resolve() for k in ("train", "val")}
    assert all(p.exists() for p in resolved.values()), f"Dataset images not found: {resolved}"
    return {**data, **resolved}


def ultralytics_label(image: Path) -> Path:
    """img2label_paths: the last /images/ becomes /labels/, the suffix .txt."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return Path(sb.join(str(image).rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt")


def fiftyone_yolov5(dataset_dir: Path, split: str) -> tuple[list[str], dict[Path, Path]]:
    """FiftyOne's YOLOv5DatasetImporter: DEST/dataset.yaml by default, the split's folder relative to the
    yaml (after `path`, if any), every file under it; an image counts when its label file exists."""
    yaml_path = dataset_dir / "dataset.yaml"
    d = yaml.safe_load(yaml_path.read_text())
    assert split in d, f"Dataset YAML '{yaml_path}' does not contain split '{split}'"
    data_dir = Path(os.path.normpath(os.path.join(d.get("path", ""), d[split])))
    if not data_dir.is_absolute():
        data_dir = yaml_path.parent / data_dir
    labels = {}
    for image in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        label = ultralytics_label(image)  # FiftyOne's _get_yolo_v5_labels_path: the same rule
        if label.is_file():
            labels[image] = label
    names = d["names"]
    classes = [names[i] for i in sorted(names)] if isinstance(names, dict) else list(names)
    return classes, labels


def test_a_copied_yolo_export_resolves_in_ultralytics_and_fiftyone_to_its_own_files(run_dir, tmp_path):
    moved, _ = relocated("yolo", run_dir, tmp_path)
    for data_arg in (moved / "dataset.yaml", moved):  # `data=DEST/dataset.yaml` and `data=DEST`
        data = ultralytics_dataset(data_arg)
        train = Path(data["train"])
        assert train.is_relative_to(moved.resolve())
        images = sorted(p for p in train.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        assert len(images) == OK_IMAGES
        assert all(ultralytics_label(p).is_file() for p in images)
        assert [data["names"][i] for i in range(data["nc"])] == CATEGORIES

    for split in ("train", "val"):  # FiftyOne's default split is val, which the yaml points at the same images
        classes, labels = fiftyone_yolov5(moved, split)
        assert classes == CATEGORIES and len(labels) == OK_IMAGES
        assert all(image.is_relative_to(moved) and label.is_relative_to(moved) for image, label in labels.items())
        boxes = sum(len(label.read_text().splitlines()) for label in labels.values())
        assert boxes == BOXES_OUT

    # and a real reader of the layout, on the copy: supervision, one shard folder at a time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import supervision as sv
    parts = [sv.DetectionDataset.from_yolo(images_directory_path=str(shard),
                                           annotations_directory_path=str(ultralytics_label(shard / "x.jpg").parent),
                                           data_yaml_path=str(moved / "dataset.yaml"))
             for shard in sorted((moved / "images" / "train").iterdir())]
    assert sum(len(part) for part in parts) == OK_IMAGES
    assert sum(len(d) for part in parts for _, _, d in part) == BOXES_OUT


def label_studio_serves(url: str, document_root: Path, storages: list[Path]) -> Path:
    """The file Label Studio's /data/local-files/ view serves for `url`: `d` relative to the document root,
    and only when a Local Files storage of the project holds it (else 403)."""
    assert url.startswith("/data/local-files/?d="), url
    (d,) = parse_qs(urlparse(url).query)["d"][-1:]
    path = (document_root / posixpath.normpath(d).lstrip("/")).resolve()
    assert path.is_relative_to(document_root.resolve()), f"{url} leaves the document root"
    assert any(path.parent.is_relative_to(s.resolve()) for s in storages), f"403: no storage holds {path}"
    assert all(s.resolve() != document_root.resolve() for s in storages), "a storage may not be the root itself"
    return path


def check_label_studio_tasks(dest: Path, urls_to_files) -> None:
    """label-studio-sdk's LabelInterface accepts the config, every task's data and every prediction; every
    image URL leads to that task's image, at the size its boxes were made for."""
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface((dest / "label_config.xml").read_text())
    interface.validate()  # raises on a config Label Studio would refuse
    assert [control.name for control in interface.controls] == ["label"]
    tasks = json.loads((dest / "tasks.json").read_text())
    assert len(tasks) == OK_IMAGES
    sizes = sizes_by_key()
    boxes = 0
    for task in tasks:
        assert interface.validate_task({"data": task["data"]}), task["data"]
        (prediction,) = task["predictions"]
        assert interface.validate_prediction(prediction, return_errors=True) == []
        path = urls_to_files(task["data"]["image"])
        assert image_size(path) == sizes[task["data"]["key"]]
        for result in prediction["result"]:
            assert (result["original_width"], result["original_height"]) == sizes[task["data"]["key"]]
        boxes += len(prediction["result"])
    assert boxes == BOXES_OUT
    # the validator does look: a label outside the config, or a box past the edge, is refused
    wrong = json.loads(json.dumps(tasks[0]["predictions"][0]))
    wrong["result"][0]["value"]["rectanglelabels"] = ["zebra"]
    assert interface.validate_prediction(wrong, return_errors=True)
    wrong["result"][0]["value"].update(rectanglelabels=[CATEGORIES[0]], x=120.0)
    assert interface.validate_prediction(wrong, return_errors=True)


def test_a_copied_labelstudio_export_is_served_from_its_new_place(run_dir, tmp_path):
    moved, _ = relocated("labelstudio", run_dir, tmp_path)
    # LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=DEST and a Local Files storage DEST/images, as docs/formats.md says
    check_label_studio_tasks(moved, lambda url: label_studio_serves(url, moved, [moved / "images"]))


def test_image_url_prefix_from_the_cli_serves_an_export_below_a_shared_document_root(run_dir, tmp_path):
    root = tmp_path / "data"
    dest = root / "exports" / "ls"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "labelstudio", str(run_dir), str(dest),
                     "--image-url-prefix", "/data/local-files/?d=exports/ls/"]) == 0
    check_label_studio_tasks(dest, lambda url: label_studio_serves(url, root, [dest / "images"]))
    # the default prefix would point outside this export, at DOCUMENT_ROOT/images
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "labelstudio", str(run_dir), str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "tasks.json").read_text())
    with pytest.raises(AssertionError, match="403"):
        label_studio_serves(plain[0]["data"]["image"], root, [dest / "images"])

    # a web server's URL as the prefix: the task names the image by that URL, the path below it relative to DEST
    web = tmp_path / "web"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", "labelstudio", str(run_dir), str(web), "--image-url-prefix", "https://host/ls/"]) == 0
    tasks = json.loads((web / "tasks.json").read_text())
    for task in tasks:
        url = task["data"]["image"]
        assert url.startswith("https://host/ls/images/")
        assert image_size(web / url.removeprefix("https://host/ls/")) == sizes_by_key()[task["data"]["key"]]


@pytest.mark.parametrize("fmt", ["odvg", "odvg-grounding"])
def test_a_copied_odvg_export_names_its_images_relative_to_its_data_root(fmt, run_dir, tmp_path):
    moved, _ = relocated(fmt, run_dir, tmp_path)
    rows = [json.loads(line) for line in (moved / "odvg.jsonl").read_text().splitlines()]
    assert len(rows) == OK_IMAGES
    for row in rows:  # mmdet's ODVGDataset: data_root (DEST) + data_prefix img ("") + filename
        assert not os.path.isabs(row["filename"])
        assert image_size(moved / row["filename"]) == (row["width"], row["height"])
    if fmt == "odvg":
        assert json.loads((moved / "label_map.json").read_text()) == {str(i): c for i, c in enumerate(CATEGORIES)}


def test_a_copied_sft_export_names_its_images_and_files_relative_to_itself(run_dir, tmp_path):
    moved, _ = relocated("sft", run_dir, tmp_path)
    manifest = json.loads((moved / "sft_manifest.json").read_text())
    items = json.loads((moved / manifest["file"]).read_text())  # the manifest names sft.json, not a path
    assert manifest["file"] == "sft.json" and manifest["conversations"] == len(items) == OK_IMAGES
    sizes = sizes_by_key()
    for item in items:  # LLaVA's loader joins --image_folder (DEST) and `image`
        assert item["image"].startswith("images/") and image_size(moved / item["image"]) == sizes[item["id"]]


def test_a_copied_regions_export_names_its_images_and_files_relative_to_itself(run_dir, tmp_path):
    moved, _ = relocated("regions", run_dir, tmp_path)
    manifest = json.loads((moved / "regions_manifest.json").read_text())
    assert (manifest["conversations"], manifest["jsonl"]) == ("regions.json", "regions.odvg.jsonl")
    conversations = json.loads((moved / manifest["conversations"]).read_text())
    assert len(conversations) == manifest["regions"] == BOXES_OUT
    sizes = sizes_by_key()
    for item in conversations:
        assert image_size(moved / item["image"]) == sizes[item["id"].rsplit("#", 1)[0]]
    for line in (moved / manifest["jsonl"]).read_text().splitlines():
        row = json.loads(line)
        assert image_size(moved / row["filename"]) == (row["width"], row["height"])
