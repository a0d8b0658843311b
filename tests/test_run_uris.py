"""A finished run on S3 reads as the same run on disk, through every consumer: the exporters, `inspect`, the
student's data stream and concept dictionary, training, evaluation and self-training (on a real S3 API
server, tests/conftest.py's `s3`)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
wds = pytest.importorskip("webdataset")

from engine.cli import main  # noqa: E402
from engine.export import EXPORTERS, export  # noqa: E402
from engine.report import summarize, write_html  # noqa: E402
from tests.conftest import s3_fs  # noqa: E402
from tests.fakerun import make_run  # noqa: E402


def upload(local: Path, uri: str) -> str:
    """Copy the run folder `local` to `uri` (s3://BUCKET/PREFIX); returns the URI."""
    s3_fs().put(f"{local}/", f"{uri.removeprefix('s3://')}/", recursive=True)
    return uri


@pytest.fixture
def runs(s3, tmp_path) -> tuple[Path, str]:
    """The fake run on disk and the same files on S3, both under a folder named `run`."""
    local = make_run(tmp_path / "run")
    return local, upload(local, f"{s3}/run")


def tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` by its relative path, with `root`'s own path blanked out of the contents."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes().replace(str(root.resolve()).encode(), b"DEST").replace(str(root).encode(), b"DEST")
        files[path.relative_to(root).as_posix()] = data
    return files


# ---------------------------------------------------------------- export


@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_export_of_a_run_on_s3_equals_the_export_of_the_run_on_disk(runs, tmp_path, fmt):
    local, remote = runs
    from_disk, from_s3 = tmp_path / "disk" / fmt, tmp_path / "s3" / fmt
    summary_disk = export(fmt, local, from_disk)
    summary_s3 = export(fmt, remote, from_s3)
    files_disk, files_s3 = tree(from_disk), tree(from_s3)
    if fmt in ("sft", "regions"):  # the exports whose manifest names their run
        name = f"{fmt}_manifest.json"
        files_disk[name] = files_disk[name].replace(str(local).encode(), b"RUN")
        files_s3[name] = files_s3[name].replace(remote.encode(), b"RUN")
    assert files_s3 == files_disk
    assert any(name.endswith(".jpg") for name in files_s3)  # the images came through too
    strip = {str(from_disk): "DEST", str(from_s3): "DEST", str(local): "RUN", remote: "RUN"}

    def blank(summary):
        text = json.dumps(summary)
        for path, name in strip.items():
            text = text.replace(path, name)
        return json.loads(text)

    assert blank(summary_s3) == blank(summary_disk)


def test_export_and_inspect_commands_take_a_uri_and_fail_in_one_line_on_a_missing_bucket(runs, s3, tmp_path,
                                                                                       capsys):
    _, remote = runs
    assert main(["export", "coco", remote, str(tmp_path / "coco")]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 4
    assert main(["inspect", remote, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(summarize(remote)))
    for command in (["export", "coco", f"{s3}-missing/run", str(tmp_path / "x")], ["inspect", f"{s3}-missing/run"]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot read {s3}-missing/run: the bucket does not exist"), err
        assert err.count("\n") == 1
    assert main(["export", "coco", f"{s3}/not-a-run", str(tmp_path / "y")]) == 1
    assert "not found" in capsys.readouterr().err


# ---------------------------------------------------------------- inspect


def test_inspect_of_a_run_on_s3_equals_inspect_of_the_run_on_disk(runs, tmp_path):
    local, remote = runs
    on_disk, on_s3 = summarize(local), summarize(remote)
    assert (on_disk.pop("run_dir"), on_s3.pop("run_dir")) == (str(local), remote)
    assert on_s3 == on_disk
    assert on_s3["samples"] == 6 and on_s3["ok"] == 4
    page_disk = write_html(local, tmp_path / "page-disk")
    page_s3 = write_html(remote, tmp_path / "page-s3")
    assert page_s3.read_text() == page_disk.read_text()
    gallery_disk, gallery_s3 = tree(tmp_path / "page-disk" / "gallery"), tree(tmp_path / "page-s3" / "gallery")
    assert len(gallery_s3) == 4 and gallery_s3 == gallery_disk


def test_an_incomplete_unit_on_s3_is_left_out_as_on_disk(runs, tmp_path):
    """One rule for both: a unit counts when its marker exists, whatever else of it is there."""
    local, remote = runs
    (local / "shards" / "000001.stats.json").unlink()
    s3_fs().rm_file(f"{remote.removeprefix('s3://')}/shards/000001.stats.json")
    assert summarize(remote)["samples"] == summarize(local)["samples"] == 3
    assert export("coco", remote, tmp_path / "s3")["images"] == export("coco", local, tmp_path / "disk")["images"] == 2


# ---------------------------------------------------------------- the student


# The student's data settings for tests: 64 px images, few negatives.
SMALL_DATA = {"scales": [64], "max_size": 86, "batch_size": 2, "negatives": 2}


@pytest.fixture
def train_runs(s3, tmp_path) -> tuple[Path, str]:
    """The synthetic shapes run (24 samples in 3 shards) on disk and on S3."""
    from engine.synthetic_runs import write_train_run

    local = write_train_run(tmp_path / "train", samples=24, shard_size=8, seed=3)
    return local, upload(local, f"{s3}/train")


def test_the_student_stream_reads_the_same_samples_from_s3_as_from_disk(train_runs):
    from detector.data import ConceptDictionary, iter_shard_samples

    local, remote = train_runs
    on_disk, on_s3 = list(iter_shard_samples(local)), list(iter_shard_samples(remote))
    assert len(on_s3) == 24
    assert [s.key for s in on_s3] == [s.key for s in on_disk]
    for a, b in zip(on_s3, on_disk):
        assert a.concepts == b.concepts and a.boxes.equal(b.boxes) and a.image.tobytes() == b.image.tobytes()
    for rank in range(3):
        shuffled = {"shuffle_buffer": 8, "seed": 2, "rank": rank, "world_size": 3}
        assert [s.key for s in iter_shard_samples(remote, **shuffled)] == \
            [s.key for s in iter_shard_samples(local, **shuffled)]
    assert ConceptDictionary.from_run(remote).counts == ConceptDictionary.from_run(local).counts


def test_the_student_stream_on_disk_keeps_webdatasets_order(train_runs):
    """Same seed, same order as before runs could be remote: webdataset's shard list shuffled with the seed,
    then its shuffle buffer with the seed."""
    from detector.data import iter_shard_samples

    local, _ = train_runs
    for seed in (0, 5):
        urls = [str(p) for p in sorted((local / "shards").glob("*.tar"))]
        random.Random(seed).shuffle(urls)
        stream = wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(8, rng=random.Random(seed))
        expected = [json.loads(item["json"])["key"] for item in stream]
        assert [s.key for s in iter_shard_samples(local, shuffle_buffer=8, seed=seed)] == expected
    plain = [json.loads(item["json"])["key"] for item in wds.WebDataset(
        [str(p) for p in sorted((local / "shards").glob("*.tar"))], shardshuffle=False, empty_check=False)]
    assert [s.key for s in iter_shard_samples(local)] == plain


def test_train_on_shards_on_s3_sees_what_training_on_disk_sees(train_runs, tmp_path, tiny_gdino):
    from detector.config import TrainConfig
    from detector.train import train

    local, remote = train_runs
    config = TrainConfig.model_validate({"steps": 2, "checkpoint_every": 2, "model": {"init": tiny_gdino},
                                         "data": SMALL_DATA})
    from_disk = train(shards=local, out=tmp_path / "disk", config=config)
    from_s3 = train(shards=remote, out=tmp_path / "s3", config=config)
    assert from_s3["steps_run"] == from_disk["steps_run"] == 2
    assert from_s3["first_loss"] == pytest.approx(from_disk["first_loss"], rel=1e-5)
    workers = [json.loads((tmp_path / out / "workers" / "rank-0.json").read_text()) for out in ("disk", "s3")]
    assert workers[0]["keys"] == workers[1]["keys"] and len(workers[0]["keys"]) == 4


def test_eval_reads_a_coco_set_on_s3_as_on_disk(s3, tmp_path, tiny_gdino):
    from detector.evaluate import evaluate
    from engine.synthetic_runs import write_coco_set

    coco, images = write_coco_set(tmp_path / "val", samples=4, seed=1)
    remote = upload(tmp_path / "val", f"{s3}/val")
    kwargs = {"model": tiny_gdino, "batch_size": 2, "device": "cpu"}
    on_disk = evaluate(coco=coco, images=images, **kwargs)
    on_s3 = evaluate(coco=f"{remote}/{Path(coco).name}", images=f"{remote}/{Path(images).name}", **kwargs)
    on_disk.pop("seconds"), on_s3.pop("seconds")
    assert on_s3 == on_disk and on_s3["images"] == 4 and on_s3["detections"] > 0


@pytest.mark.slow
def test_selftrain_into_a_uri_writes_the_data_there_and_the_students_locally(s3, s3_server, tmp_path, model_cache,
                                                                            tiny_gdino):
    """`granucap selftrain` with its output on S3: the round's shards go there, its student to the local
    --students folder. The store is reached through the pipeline's storage options alone (no AWS variable, no
    credentials file), by the run's workers and by the trainer."""
    import os
    import subprocess
    import sys

    import yaml

    from engine.demo import write_demo_input
    from tests.conftest import S3_ENV
    from tests.test_student import SELFTRAIN_OFFLINE

    write_demo_input(tmp_path / "in", samples=8, per_tar=8, seed=0)
    train = tmp_path / "train.yaml"
    train.write_text(yaml.safe_dump({"data": SMALL_DATA, "torch_threads": 1}))
    store = [f"storage_options.s3.endpoint_url={s3_server}", f"storage_options.s3.key={S3_ENV['AWS_ACCESS_KEY_ID']}",
             f"storage_options.s3.secret={S3_ENV['AWS_SECRET_ACCESS_KEY']}"]
    sets = [arg for s in [*SELFTRAIN_OFFLINE, f"cache_dir={model_cache}", *store] for arg in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "selftrain", str(root / "pipelines" / "selftrain.yaml"),
         "-i", str(tmp_path / "in"), "-o", f"{s3}/st", "--students", str(tmp_path / "students"), "--rounds", "1",
         "--config", str(train), "--model", tiny_gdino, "--steps", "2", "--checkpoint-every", "2", *sets],
        env=env, cwd=root, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-4000:]
    [round0] = json.loads(done.stdout)
    student = tmp_path / "students" / "round-0" / "student"
    assert round0["student"] == str(student) and round0["counts"]["read"] == 8
    assert json.loads((student / "train_summary.json").read_text())["steps_run"] == 2
    fs = s3_fs()
    data = f"{s3.removeprefix('s3://')}/st/round-0/data"
    manifest = json.loads(fs.cat_file(f"{data}/manifest.json"))
    assert manifest["status"] == "complete" and manifest["counts"] == round0["counts"]
    assert fs.find(f"{data}/shards") and not fs.exists(f"{s3.removeprefix('s3://')}/st/round-0/student")
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in done.stdout + done.stderr


def test_selftrain_into_a_uri_needs_a_local_folder_for_the_students(s3):
    from detector.config import TrainConfig
    from engine.config import load_config
    from engine.selftrain import self_train

    pipeline = load_config(Path(__file__).resolve().parent.parent / "pipelines" / "selftrain.yaml")
    with pytest.raises(ValueError, match="--students"):
        self_train(pipeline, inputs=["in"], output=f"{s3}/st", rounds=1, train_config=TrainConfig(steps=1))
    assert s3_fs().find(s3.removeprefix("s3://")) == []  # refused before anything was written
