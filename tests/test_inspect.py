"""`granucap inspect` (summary, tables, HTML page checked in headless Chromium) and `granucap run --dry-run`."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from tests.fakerun import BOXES_IN, OK_IMAGES, make_run
from PIL import Image

from engine.cli import main
from engine.report import BOX_COLOUR, plan_summary, summarize, write_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("fake-run"))


def test_summary_counts_every_sample_from_the_index(run_dir):
    s = summarize(run_dir)
    assert (s["samples"], s["ok"], s["rejected"], s["failed"]) == (6, OK_IMAGES, 1, 1)
    assert dict(s["reasons"]) == {"rejected: decode/undecodable_image": 1, "failed: ground/exception": 1}
    assert s["boxes"] == BOXES_IN == sum(s["score_histogram"].values())
    assert s["boxes_per_image"]["histogram"] == {2: 3, 3: 1} and s["boxes_per_image"]["mean"] == 9 / 4
    assert s["score_histogram"]["0.9-1.0"] == 2 and s["score_histogram"]["0.1-0.2"] == 1
    # the box wholly outside its image still counts here (the exporters drop it)
    assert dict(s["top_categories"]) == {"cat": 3, "dog": 3, "remote control": 2, "table": 1}
    assert dict(s["top_parent_categories"])["animal"] == 6 and s["matched"] == {"phrase": 7, "category": 2}


def test_inspect_prints_tables_and_json(run_dir, capsys):
    assert main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for text in ("top reasons", "decode/undecodable_image", "score histogram", "top categories", "remote control",
                 "top parent categories", "furniture"):
        assert text in out
    assert main(["inspect", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] == OK_IMAGES


def test_inspect_refuses_a_folder_that_is_not_a_run(tmp_path):
    assert main(["inspect", str(tmp_path)]) == 2


def _planned_run(out: Path, sizes: tuple[int, ...] = (3, 3, 4)) -> Path:
    """The fake run (units 0 and 1 written, 3 samples each) with a plan of units of `sizes`; by default a
    third unit (4 samples) is planned and never written."""
    from engine.io.inputs import Unit
    from engine.io.plan import FileCount, Plan, save_plan
    from engine.io.storage import Location

    run = make_run(out)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    units = [Unit(i, "webdataset", "/in/f.tar", a, a + n, "f.tar") for i, (a, n) in enumerate(zip(starts, sizes))]
    files = [FileCount("webdataset", "/in/f.tar", "f.tar", sum(sizes), "tar_headers")]
    save_plan(Location(run), Plan(shard_size=max(sizes), inputs=["/in"], files=files, units=units))
    return run


def page_completeness(page: Path) -> tuple[str, str | None]:
    """The text and style of the page's completeness paragraph, parsed with the standard HTML parser."""
    from html.parser import HTMLParser

    class Finder(HTMLParser):
        def __init__(self):
            super().__init__()
            self.inside, self.text, self.style = False, "", None

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if attrs.get("id") == "completeness":
                self.inside, self.style = True, attrs.get("style")

        def handle_endtag(self, tag):
            self.inside = False

        def handle_data(self, data):
            if self.inside:
                self.text += data

    finder = Finder()
    finder.feed(page.read_text(encoding="utf-8"))
    return finder.text, finder.style


def test_inspect_refuses_a_partial_run_unless_allowed_and_then_says_what_it_covers(tmp_path, capsys):
    run = _planned_run(tmp_path / "run")
    assert main(["inspect", str(run)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {run} is an incomplete run: ")
    assert "2 of 3 planned units (6 of 10 samples)" in err and "--allow-partial" in err

    assert main(["inspect", str(run), "--allow-partial"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich folds long lines; compare the words
    assert "Partial run" in out and "2 of 3 planned units (6 of 10 samples) complete" in out
    assert "manifest.json says 'complete'" in out  # what the manifest claims, shown next to what is true

    assert main(["inspect", str(run), "--allow-partial", "--json", "--html", str(tmp_path / "site")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 6  # the complete units' rows, as before
    assert summary["completeness"]["complete"] is False
    assert summary["completeness"]["units"] == {"planned": 3, "complete": 2}
    assert summary["completeness"]["samples"] == {"planned": 10, "complete": 6}
    text, style = page_completeness(Path(summary["html"]))
    assert text.startswith("Partial run") and "2 of 3 planned units (6 of 10 samples) complete" in text
    assert style and "color" in style


def test_inspect_of_a_complete_or_planless_run_says_so(run_dir, tmp_path, capsys):
    assert main(["inspect", str(run_dir), "--json"]) == 0  # no plan.json: not refused
    completeness = json.loads(capsys.readouterr().out)["completeness"]
    assert completeness["complete"] is None and completeness["units"] == {"planned": None, "complete": 2}
    text, style = page_completeness(write_html(run_dir, tmp_path / "unknown"))
    assert text.startswith("Completeness unknown") and style is None

    run = _planned_run(tmp_path / "run", (3, 3))
    assert main(["inspect", str(run)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Complete run: 2 of 2 planned units (6 of 6 samples) complete" in out


def _screenshot(page: Path, fragment: str, out: Path, tmp: Path) -> np.ndarray:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'chromium-profile'}", f"--screenshot={out}", "--window-size=1200,2600",
           f"{page.as_uri()}{fragment}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


def _box_pixels(shot: np.ndarray) -> int:
    r, g, b = shot[..., 0], shot[..., 1], shot[..., 2]
    want = BOX_COLOUR
    return int(((abs(r - want[0]) < 30) & (abs(g - want[1]) < 30) & (abs(b - want[2]) < 30)).sum())


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (install.sh installs it)")
def test_html_page_shows_plots_and_a_filterable_gallery_in_chromium(run_dir, tmp_path):
    page = write_html(run_dir, tmp_path / "site")
    assert sorted(p.name for p in (tmp_path / "site" / "plots").iterdir()) == [
        "boxes_per_image.png", "categories.png", "parents.png", "scores.png", "status.png"]
    assert len(list((tmp_path / "site" / "gallery").iterdir())) == OK_IMAGES

    everything = _screenshot(page, "", tmp_path / "all.png", tmp_path)
    only_table = _screenshot(page, "#category=table", tmp_path / "table.png", tmp_path)
    nothing = _screenshot(page, "#category=no-such-thing", tmp_path / "none.png", tmp_path)
    # The drawn boxes and their label tags are the only magenta on the page: many pixels with the whole
    # gallery, fewer with one category's image, none once the filter hides every image.
    assert _box_pixels(everything) > 2000
    assert 200 < _box_pixels(only_table) < _box_pixels(everything)
    assert _box_pixels(nothing) == 0
    # The page without the gallery is not blank: the plots (matplotlib's blue bars) are there.
    blue = (abs(nothing[..., 0] - 0x4C) < 20) & (abs(nothing[..., 1] - 0x72) < 20) & (abs(nothing[..., 2] - 0xB0) < 20)
    assert blue.sum() > 5000


def test_dry_run_prints_the_plan_and_starts_nothing(demo_input, tmp_path, monkeypatch, capsys):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("--dry-run must not start Ray")

    monkeypatch.setattr(ray, "init", no_ray)  # however a Ray session would start, it goes through ray.init
    out_dir = tmp_path / "out"
    argv = ["run", "pipelines/smoke.yaml", "-i", str(demo_input), "-o", str(out_dir), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in ("decode", "recaption", "tiny:llava", "actor pool", "ground", "filter", "dry run: nothing was started",
                 "waiting blocks MiB", "KB a sample", "Ray workers' memory allocator: "):
        assert text in out
    assert not out_dir.exists()  # nothing written either
    # an allocator that is not installed: the plan says `run` would refuse it, and still starts nothing
    monkeypatch.setattr("engine.allocator.library_dirs", lambda: [tmp_path / "no-libraries"])
    assert main(argv + ["--set", "ray.worker_allocator=jemalloc"]) == 0
    assert "allocator: error: ray.worker_allocator is jemalloc" in capsys.readouterr().out.replace("\n", " ")
    assert not out_dir.exists()


def test_plan_summary_sees_units_an_earlier_run_completed(demo_input, tmp_path):
    from engine.config import load_config
    from engine.errors import ConfigChanged
    from engine.fingerprint import fingerprint
    from engine.io.plan import make_plan, save_plan
    from engine.io.storage import Location
    from engine.runner import measure_sample_bytes

    config = load_config("pipelines/smoke.yaml", ["write.shard_size=4"])
    saved = make_plan([str(demo_input)], shard_size=4)
    units = saved.units
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    save_plan(Location(out), saved)
    (out / "shards" / "000001.stats.json").write_text(
        json.dumps({"unit": 1, "read": 4, "fingerprint": fingerprint(config)}))
    plan = plan_summary(config, [str(demo_input)], out)
    # the unit was made with this config; with another one `run` would stop, and so does the dry run
    other = load_config("pipelines/smoke.yaml", ["write.shard_size=4", "stages.ground.box_threshold=0.5"])
    with pytest.raises(ConfigChanged, match=f"made with config {fingerprint(config)}, and this run.s config is {fingerprint(other)}"):
        plan_summary(other, [str(demo_input)], out)
    assert plan_summary(other, [str(demo_input)], out, allow_config_change=True)["fingerprint"] == fingerprint(other)
    assert (plan["samples"], plan["units"], plan["complete"], plan["todo"]) == (12, 4, [1], 3)
    assert plan["same_plan_as_output"] is True and plan["ray_datasets"] == 1
    split = config.model_copy(update={"ray": config.ray.model_copy(update={"max_samples_per_dataset": 4})})
    assert plan_summary(split, [str(demo_input)], out)["ray_datasets"] == 3  # units 0, 2, 3 (sizes 4, 4, 2)
    assert plan["data_memory_mb"] == 64  # 3 workers x 8 units of 4 samples: the floor
    # sized from the first samples still to do (units 0, 2, 3), as `run` sizes it
    todo = [u for u in units if u.index != 1]
    assert plan["sample_kb"] == round(measure_sample_bytes(todo, config) / 2**10, 1) > 1
    fixed = config.model_copy(update={"ray": config.ray.model_copy(update={"data_memory_mb": 100})})
    fixed_plan = plan_summary(fixed, [str(demo_input)], out)
    assert (fixed_plan["sample_kb"], fixed_plan["data_memory_mb"]) == (None, 100)
    cluster = plan_summary(config, [str(demo_input)], out, ray_address="10.0.0.1:6379")
    assert cluster["ray_address"] == "10.0.0.1:6379" and cluster["worker_allocator"].startswith("system allocator")
    assert [s["stage"] for s in plan["stages"]] == ["decode", "recaption", "extract", "ground", "filter"]
    runs_as = {s["stage"]: s["runs_as"] for s in plan["stages"]}
    assert (runs_as["decode"], runs_as["ground"], runs_as["filter"]) == (
        "tasks that read the input", "actor pool", "in ground's actors")
    other = plan_summary(config.model_copy(update={"write": config.write.model_copy(update={"shard_size": 5})}),
                         [str(demo_input)], out)
    assert other["same_plan_as_output"] is False and other["complete"] == []


def test_cpu_stages_run_in_the_read_tasks_or_the_actors_of_the_model_stage_before_them(demo_input, tmp_path):
    from engine.config import load_config
    from engine.report import plan_summary
    from engine.runner import operators

    glip = load_config("pipelines/smoke.yaml", ["stages.recaption.backend=passthrough", "stages.extract.backend=nltk"])
    assert operators(glip) == [("decode", "recaption"), ("extract",), ("ground", "filter")]
    runs_as = {s["stage"]: s["runs_as"] for s in plan_summary(glip, [str(demo_input)], tmp_path / "out")["stages"]}
    assert runs_as["recaption"] == "in decode's tasks"
    assert operators(load_config("pipelines/smoke.yaml", [])) == [
        ("decode",), ("recaption",), ("extract",), ("ground", "filter")]
    fused = load_config("pipelines/granucap-fused.yaml", [])
    assert operators(fused) == [("decode",), ("annotate",), ("ground", "filter")]


def test_dummy_weights_flag_marks_the_teacher_in_the_plan(tmp_path, capsys, demo_input):
    from engine.cli import main

    fits_here = ["--set", "ray.num_cpus=8", "--set", "stages.ground.resources.num_gpus=0"]  # glip.yaml asks a GPU
    assert main(["run", "pipelines/glip.yaml", "-i", str(demo_input), "-o", str(tmp_path / "o"),
                 "--dry-run", "--dummy-weights", *fits_here]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "ground" in l)
    assert "IDEA-Research/grounding-dino-tiny (dummy)" in line
    assert main(["run", "pipelines/glip.yaml", "-i", str(demo_input), "-o", str(tmp_path / "o"), "--dry-run",
                 *fits_here]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "ground" in l)
    assert "(dummy)" not in line
