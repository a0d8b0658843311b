"""docs/formats.md and `granucap export --help` are true to what the exporters write and take: each format's
layout block lists exactly the files a real export writes, every keyword option of every exporter has its
flag on the command line and does what it says, and the help names each format's files and options."""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import re
from pathlib import Path

import pytest

from engine.cli import build_parser, main
from engine.commands.export import FORMAT_OPTIONS, OPTIONS, exporter_options
from engine.export import EXPORTERS, get_exporter
from tests.fakerun import OK_IMAGES, make_records, make_run

FORMATS_MD = Path(__file__).resolve().parents[1] / "docs" / "formats.md"
# what the placeholders of a layout line stand for in a file's path relative to DEST
PLACEHOLDERS = {"{shard}": r"\d{6}", "{STEM}": r"[A-Za-z0-9_-]+"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("export-docs") / "run")


def documented_layouts() -> dict[str, list[str]]:
    """format -> the paths of its layout block: the first fenced block after its `### `FORMAT`` heading under
    `## Exports`, one file a line, its path the first word (DEST/...)."""
    text = FORMATS_MD.read_text(encoding="utf-8")
    exports = text.split("\n## Exports\n", 1)[1].split("\n## ", 1)[0]
    layouts = {}
    for fmt, body in re.findall(r"^### `([^`]+)`\n(.*?)(?=^### |\Z)", exports, flags=re.S | re.M):
        block = re.search(r"^```[^\n]*\n(.*?)^```", body, flags=re.S | re.M)
        assert block, f"docs/formats.md: no layout block under ### `{fmt}`"
        paths = [line.split()[0] for line in block.group(1).splitlines() if line.strip()]
        assert all(p.startswith("DEST/") for p in paths), paths
        layouts[fmt] = [p.removeprefix("DEST/") for p in paths]
    return layouts


def pattern(path: str) -> re.Pattern:
    regex = re.escape(path)
    for placeholder, part in PLACEHOLDERS.items():
        regex = regex.replace(re.escape(placeholder), part)
    return re.compile(regex)


def written(dest: Path) -> list[str]:
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())


def cli_export(*argv: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export", *argv]) == 0
    return json.loads(out.getvalue())


def test_every_export_format_has_a_layout_block_in_formats_md():
    assert set(documented_layouts()) == set(EXPORTERS)


@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_the_documented_layout_is_the_files_an_export_writes(fmt, run_dir, tmp_path):
    layout = documented_layouts()[fmt]
    cli_export(fmt, str(run_dir), str(tmp_path))
    files = written(tmp_path)
    unexplained = [f for f in files if sum(bool(pattern(p).fullmatch(f)) for p in layout) != 1]
    assert not unexplained, f"written by `export {fmt}`, not (or twice) in its layout block: {unexplained}"
    unwritten = [p for p in layout if not any(pattern(p).fullmatch(f) for f in files)]
    assert not unwritten, f"in the layout block of `{fmt}`, not written: {unwritten}"
    # every image of the run's ok samples, once (sft and regions: those with entities / boxes, here all)
    assert len([f for f in files if f.endswith(".jpg")]) == OK_IMAGES


def test_every_keyword_option_of_every_exporter_has_a_cli_flag_that_reaches_it(run_dir, tmp_path):
    parser = build_parser()
    for fmt in sorted(EXPORTERS):
        signature = inspect.signature(get_exporter(fmt))
        keywords = {n: p.default for n, p in signature.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert set(FORMAT_OPTIONS[fmt]) == set(keywords), f"{fmt}: CLI {FORMAT_OPTIONS[fmt]} != exporter {keywords}"
        base = ["export", fmt, str(run_dir), str(tmp_path)]
        assert exporter_options(parser.parse_args(base)) == {}  # nothing given: the exporter's defaults apply
        for name, default in keywords.items():
            flag, settings = OPTIONS[name]
            if isinstance(default, bool):
                argv, want = [flag], not default
                assert settings["action"] == ("store_false" if default else "store_true")
            elif isinstance(default, int):
                argv, want = [flag, str(default + 2)], default + 2
            else:
                argv, want = [flag, f"not-{default}"], f"not-{default}"
            assert exporter_options(parser.parse_args(base + argv)) == {name: want}, (fmt, flag)
        for name in set(OPTIONS) - set(keywords):  # a flag of another format is refused, not ignored
            flag, settings = OPTIONS[name]
            with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
                parser.parse_args(base + ([flag] if "action" in settings else [flag, "1"]))


def help_text(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return " ".join(out.getvalue().split())  # argparse wraps lines; compare words


def test_export_help_names_every_format_its_files_and_its_options():
    overview = help_text("export")
    for fmt in EXPORTERS:
        assert re.search(rf"\b{re.escape(fmt)}\b", overview)
    for fmt, layout in documented_layouts().items():
        text = help_text("export", fmt)
        for path in layout:  # each file of the documented layout, by its path under DEST
            assert f"DEST/{path}" in text, (fmt, path)
        for name in FORMAT_OPTIONS[fmt]:
            assert OPTIONS[name][0] in text, (fmt, name)
        for name, param in inspect.signature(get_exporter(fmt)).parameters.items():
            if param.kind is inspect.Parameter.KEYWORD_ONLY and isinstance(param.default, (str, int)) \
                    and not isinstance(param.default, bool):
                given = re.sub(r"(?<=\w)- (?=\w)", "-", text)  # argparse wraps after a hyphen
                default = re.escape(str(param.default))
                assert re.search(rf"default: [^)]*(?<![\w/]){default}(?!\w)", given), \
                    f"{fmt} --help does not give {name}'s default {param.default!r}"


def test_no_images_writes_the_annotations_only(run_dir, tmp_path):
    for fmt in [f for f, names in FORMAT_OPTIONS.items() if "write_images" in names]:
        cli_export(fmt, str(run_dir), str(tmp_path / fmt), "--no-images")
        files = written(tmp_path / fmt)
        assert files and not [f for f in files if f.startswith("images/") or f.endswith(".jpg")], (fmt, files)
        layout = [p for p in documented_layouts()[fmt] if not p.startswith("images/")]
        assert sorted(layout) == files  # the documented files less the images


def test_sft_min_entities_and_prompt_from_the_cli(run_dir, tmp_path):
    summary = cli_export("sft", str(run_dir), str(tmp_path / "two"), "--min-entities", "2")
    items = json.loads((tmp_path / "two" / "sft.json").read_text())
    want = sorted(r.key for r in make_records() if r.ok and len(r.entities) >= 2)
    assert sorted(item["id"] for item in items) == want and len(want) == 2
    assert summary["skipped_few_entities"] == OK_IMAGES - 2
    assert len(list((tmp_path / "two" / "images").rglob("*.jpg"))) == 2  # only the images it names

    prompt = tmp_path / "short.txt"
    prompt.write_text("List the objects of: {caption}\n")
    summary = cli_export("sft", str(run_dir), str(tmp_path / "mine"), "--prompt", str(prompt))
    items = json.loads((tmp_path / "mine" / "sft.json").read_text())
    captions = {r.key: r.raw_caption for r in make_records()}
    assert [i["conversations"][0]["value"] for i in items] == [
        f"<image>\nList the objects of: {captions[i['id']]}" for i in items]
    manifest = json.loads((tmp_path / "mine" / "sft_manifest.json").read_text())
    assert manifest["prompt_id"] == summary["prompt_id"] == "short"


def test_regions_prompt_from_the_cli(run_dir, tmp_path):
    prompt = tmp_path / "where.txt"
    prompt.write_text("What is at {box}?")
    cli_export("regions", str(run_dir), str(tmp_path / "r"), "--prompt", str(prompt))
    items = json.loads((tmp_path / "r" / "regions.json").read_text())
    assert items and all(re.fullmatch(r"<image>\nWhat is at \[\d+, \d+, \d+, \d+\]\?", i["conversations"][0]["value"])
                         for i in items)
    assert json.loads((tmp_path / "r" / "regions_manifest.json").read_text())["prompt_id"] == "where"
