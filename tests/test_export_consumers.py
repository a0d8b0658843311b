"""The exports in their real consumers: Ultralytics and FiftyOne read a copy of the export, the original deleted.

tests/test_export_relocation.py follows these libraries' rules for finding a dataset's files, in the main
environment, where they are not installed. This module runs the libraries themselves; they are installed by
`GRANUCAP_CONSUMERS=1 bash install.sh` (CI builds .venv-consumers with it and runs `pytest -m consumers` there),
and without them the module skips. FiftyOne runs without its database (fiftyone-db cannot be installed here):
`fo.Dataset.from_dir` builds its dataset importer with `fiftyone.utils.data.build_dataset_importer` and reads
the samples with `with importer: for image_path, metadata, label in importer` before it writes them to
MongoDB; the tests build and read the importer the same way and stop there.

The libraries get a scratch HOME and config folders, and no network: every host name they look up is recorded,
the lookup fails, and a test that saw one fails.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest

from tests.fakerun import BOXES_OUT, CATEGORIES, OK_IMAGES, make_records
from tests.test_export_relocation import image_size, relocated, run_dir  # noqa: F401 (run_dir: a fixture)

pytestmark = pytest.mark.consumers


@pytest.fixture(scope="module")
def lookups(tmp_path_factory):
    """Imports Ultralytics and FiftyOne (or skips) with their settings and caches under a scratch HOME and no
    network: the host names they try to look up, which all fail, collect in the list this returns."""
    home = tmp_path_factory.mktemp("consumers-home")
    looked_up: list[str] = []

    def refuse(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, f"no network for the consumers' tests: {host}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", refuse)
        mp.setenv("HOME", str(home))  # FiftyOne's ~/.fiftyone, matplotlib's caches
        mp.setenv("YOLO_CONFIG_DIR", str(home / "yolo"))  # Ultralytics writes its settings.json at import
        mp.setenv("YOLO_OFFLINE", "1")  # else Ultralytics resolves two DNS hosts at import to see if it is online
        mp.setenv("FIFTYONE_DO_NOT_TRACK", "true")
        missing = "Ultralytics and FiftyOne not installed (GRANUCAP_CONSUMERS=1 bash install.sh)"
        utils = pytest.importorskip("ultralytics.utils", reason=missing)
        pytest.importorskip("fiftyone.utils.yolo", reason=missing)
        assert Path(utils.SETTINGS_FILE).is_relative_to(home), "Ultralytics was imported before this module"
        assert looked_up == [], "importing them tried the network"
        # check_det_dataset looks for the font it draws labels with in its config folder and downloads it when
        # it is missing: a font in its place (matplotlib's DejaVu Sans) keeps it offline
        import matplotlib

        shutil.copy(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf",
                    Path(utils.USER_CONFIG_DIR) / "Arial.ttf")
        yield looked_up


@pytest.fixture(autouse=True)
def offline(lookups):
    """A test in which Ultralytics or FiftyOne tried to reach the network fails (at its teardown)."""
    before = len(lookups)
    yield
    assert lookups[before:] == [], "tried the network"


def expected_boxes() -> dict[tuple[int, int], list[tuple]]:
    """(width, height) -> the image's boxes as sorted (category, x, y, w, h), relative to the image, as every
    export must carry them: clipped to the image, one wholly outside it dropped. Each image of the fake run
    has a size of its own, so the size names the image."""
    expected = {}
    for record in make_records():
        if not record.ok:
            continue
        w, h = record.width, record.height
        boxes = []
        for box in record.boxes:
            x1, y1, x2, y2 = box["xyxy"]
            x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
            if x2 > x1 and y2 > y1:
                boxes.append((record.entities[box["entity"]]["category"], x1 / w, y1 / h, (x2 - x1) / w, (y2 - y1) / h))
        expected[(w, h)] = sorted(boxes)
    assert len(expected) == OK_IMAGES and sum(map(len, expected.values())) == BOXES_OUT
    return expected


def assert_boxes(found: dict[tuple[int, int], list[tuple]]) -> None:
    """`found` (as expected_boxes) holds every image with its boxes' categories and places."""
    expected = expected_boxes()
    assert found.keys() == expected.keys()
    for size, boxes in found.items():
        boxes = sorted(boxes)
        assert [b[0] for b in boxes] == [b[0] for b in expected[size]], size
        assert [v for b in boxes for v in b[1:]] == pytest.approx([v for b in expected[size] for v in b[1:]], abs=1e-4)


def fiftyone_samples(dataset_type, importer_cls, **kwargs) -> tuple[list[tuple], list[str]]:
    """The samples a FiftyOne dataset importer reads, built as `fo.Dataset.from_dir(dataset_type=..., **kwargs)`
    builds it, and the classes it reports."""
    from fiftyone.utils.data import build_dataset_importer

    importer, unused = build_dataset_importer(dataset_type, **kwargs)
    assert isinstance(importer, importer_cls)
    assert not unused, f"FiftyOne's {type(importer).__name__} ignores {unused}"
    with importer:
        samples = list(importer)
        classes = importer.get_dataset_info()["classes"]
    return samples, classes


def fiftyone_boxes(samples, dest: Path) -> dict[tuple[int, int], list[tuple]]:
    """Image size -> (label, x, y, w, h) of each detection; every image lies in `dest` and is read from there."""
    found = {}
    for image_path, _, detections in samples:
        assert Path(image_path).is_relative_to(dest), f"FiftyOne reads {image_path}, outside {dest}"
        found[image_size(Path(image_path))] = [(d.label, *d.bounding_box) for d in detections.detections]
    assert len(found) == len(samples), "an image twice"
    return found


def test_ultralytics_reads_a_copied_yolo_export_from_the_copy(run_dir, tmp_path):
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    moved, _ = relocated("yolo", run_dir, tmp_path)
    root = moved.resolve()  # Ultralytics resolves the paths it returns
    for data_arg in (moved / "dataset.yaml", moved):  # `data=DEST/dataset.yaml` and `data=DEST`
        data = check_det_dataset(str(data_arg), autodownload=False)
        assert Path(data["yaml_file"]).resolve() == root / "dataset.yaml"
        assert Path(data["train"]) == Path(data["val"]) == root / "images" / "train"
        assert data["names"] == dict(enumerate(CATEGORIES)) and data["nc"] == len(CATEGORIES)

    # the loader `yolo detect train data=DEST` trains from: it pairs each image with its label file, checks
    # both, and reads the image
    dataset = YOLODataset(img_path=data["train"], data=data, augment=False)
    assert len(dataset) == OK_IMAGES
    found = {}
    for i, label in enumerate(dataset.labels):
        assert Path(label["im_file"]).is_relative_to(root)
        assert dataset[i]["ori_shape"] == label["shape"]
        (h, w), xywhn = label["shape"], label["bboxes"].tolist()
        found[(w, h)] = [(data["names"][int(c)], cx - bw / 2, cy - bh / 2, bw, bh)
                         for c, (cx, cy, bw, bh) in zip(label["cls"].ravel(), xywhn)]
    assert_boxes(found)


def test_fiftyone_reads_a_copied_yolo_export_from_the_copy(run_dir, tmp_path):
    import fiftyone as fo
    from fiftyone.utils.yolo import YOLOv5DatasetImporter

    moved, _ = relocated("yolo", run_dir, tmp_path)
    for split in ("train", "val"):  # FiftyOne's default split is val, which the yaml points at the same images
        samples, classes = fiftyone_samples(fo.types.YOLOv5Dataset, YOLOv5DatasetImporter, dataset_dir=str(moved),
                                            split=split)
        assert classes == CATEGORIES
        assert_boxes(fiftyone_boxes(samples, moved))


def test_fiftyone_reads_a_copied_coco_export_from_the_copy(run_dir, tmp_path):
    import fiftyone as fo
    from fiftyone.utils.coco import COCODetectionDatasetImporter

    moved, _ = relocated("coco", run_dir, tmp_path)
    # the arguments docs/formats.md gives for the coco export
    samples, classes = fiftyone_samples(fo.types.COCODetectionDataset, COCODetectionDatasetImporter,
                                        dataset_dir=str(moved), data_path=".", labels_path="annotations.json")
    assert classes == CATEGORIES
    for image_path, metadata, _ in samples:  # the size the annotations give is the image's own
        assert (metadata.width, metadata.height) == image_size(Path(image_path))
    assert_boxes(fiftyone_boxes([(path, None, label["detections"]) for path, _, label in samples], moved))
