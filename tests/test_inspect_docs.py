"""The docs say what the code does: every config key in pipelines.md, every record field in formats.md,
every `granucap` command in the docs parses, and the quickstart's commands and snippets run as written
(on a fake run standing in for the smoke run, which takes too long for a unit test)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from engine.cli import build_parser, main
from engine.config import PipelineConfig
from engine.records import BOX_TYPE, ENTITY_TYPE, ERROR_TYPE, PROVENANCE_TYPE, SCHEMA
from tests.fakerun import make_run

DOCS = Path(__file__).resolve().parent.parent / "docs"
MY_DOCS = ("quickstart.md", "operations.md", "pipelines.md", "formats.md")


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        subs = [a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)]
        keys += _leaf_keys(subs[0], f"{prefix}{name}.") if subs else [f"{prefix}{name}"]
    return keys


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _commands(text: str) -> list[str]:
    lines = []
    for block in _blocks(text, "bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                if part.strip().startswith("granucap "):
                    lines.append(part.strip())
    return lines


def test_pipelines_doc_names_every_config_key():
    text = (DOCS / "pipelines.md").read_text()
    missing = [k for k in _leaf_keys(PipelineConfig) if not re.search(rf"`([\w.]+\.)?{k.split('.')[-1]}`", text)]
    assert not missing, f"docs/pipelines.md does not describe: {missing}"
    for section in ("decode", "recaption", "extract", "annotate", "ground", "filter"):
        assert f"## `stages.{section}`" in text


def test_formats_doc_names_every_record_field():
    text = (DOCS / "formats.md").read_text()
    fields = list(SCHEMA.names) + [t.field(i).name for t in (BOX_TYPE, ENTITY_TYPE, ERROR_TYPE, PROVENANCE_TYPE)
                                   for i in range(t.num_fields)]
    # a field is named in a code span of its own or in a struct's `{a, b, c}`
    assert not [f for f in fields if not re.search(rf"`[^`\n]*\b{f}\b[^`\n]*`", text)]


@pytest.mark.parametrize("doc", MY_DOCS)
def test_every_granucap_command_in_the_docs_parses(doc):
    parser = build_parser()
    commands = _commands((DOCS / doc).read_text())
    assert commands or doc == "pipelines.md" or doc == "formats.md"
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        pipeline = getattr(args, "pipeline", None)
        if isinstance(pipeline, str):
            assert (DOCS.parent / pipeline).is_file(), command


def test_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipelines").symlink_to(DOCS.parent / "pipelines")
    make_run(tmp_path / "demo" / "out")  # stands in for `granucap run pipelines/smoke.yaml ... -o demo/out`
    text = (DOCS / "quickstart.md").read_text()
    ran = []
    for command in _commands(text):
        argv = shlex.split(command)[1:]
        if argv[0] == "doctor" or (argv[0] == "run" and "--dry-run" not in argv):
            continue  # doctor has its own test; a real run is test_e2e's business
        assert main(argv) == 0, command
        ran.append(argv[0])
    assert ran.count("export") == 4 and {"demo-input", "run", "inspect"} <= set(ran)
    assert (tmp_path / "demo" / "report" / "index.html").is_file()
    capsys.readouterr()
    printed = []
    for snippet in _blocks(text, "python"):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            exec(compile(snippet, "quickstart.md", "exec"), {})
        printed.append(out.getvalue())
    assert "4 images, 8 boxes" in printed[0]  # the COCO export of the fake run, read by pycocotools
    assert "img/0001 (64, 48) 2" in printed[1]  # the index by HF datasets, a shard by webdataset
