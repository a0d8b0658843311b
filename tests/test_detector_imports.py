"""The house rule of detector/__init__.py: `detector/` imports from `engine` only the records and their boxes,
the shard reader (engine.io.shard_reader, never the writer in engine.io.shards) and model loading. Checked on
the source (every import statement, at top level or inside a function) and on what importing the detector
really loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# engine module -> the names detector/ may take from it (None: any); keep in step with detector/__init__.py
ALLOWED: dict[str, frozenset[str] | None] = {
    "engine.records": None,
    # the records' boxes as columns (`Boxes`) and their maths: numpy only, so the student reads boxes the way
    # the engine wrote them without pulling in any of the pipeline
    "engine.boxes": None,
    "engine.io.storage": None,
    "engine.io.shard_reader": None,
    "engine.models.loading": None,
}


def _is_engine(module: str) -> bool:
    return module == "engine" or module.startswith("engine.")


def _check_module(module: str, names: list[str] | None) -> list[str]:
    """Why importing `names` from `module` (None: the module itself) breaks the rule; empty when it does not."""
    if module not in ALLOWED:
        return [f"{module} is not the records, their boxes, the shard reader or model loading"]
    allowed = ALLOWED[module]
    if allowed is None:
        return []
    if names is None:
        return [f"import {module} as a whole: take its reading functions by name ({', '.join(sorted(allowed))})"]
    return [f"{module}.{name} is not part of the shard reader" for name in names if name not in allowed]


def engine_import_violations(source: str, filename: str = "<source>") -> list[str]:
    """`file:line: why` for every import of an engine module that detector/ may not use."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source, filename)):
        problems: list[str] = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_engine(alias.name):
                    problems += _check_module(alias.name, None)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_engine(node.module):
            names = [alias.name for alias in node.names]
            if node.module in ALLOWED:
                problems += _check_module(node.module, names)
            else:
                # `from engine.io import shards` names a module, `from engine.config import X` a member
                for name in names:
                    problems += _check_module(f"{node.module}.{name}", None)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and _is_engine(node.args[0].value)
              and (getattr(node.func, "attr", None) == "import_module"
                   or getattr(node.func, "id", None) in ("import_module", "__import__"))):
            problems += _check_module(node.args[0].value, None)
        found += [f"{filename}:{node.lineno}: {problem}" for problem in problems]
    return found


def test_detector_imports_only_the_records_the_shard_reader_and_model_loading():
    files = sorted((ROOT / "detector").rglob("*.py"))
    assert files, "no detector sources found"
    violations = [v for path in files
                  for v in engine_import_violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert not violations, "detector/ breaks the rule of detector/__init__.py:\n" + "\n".join(violations)


@pytest.mark.parametrize("source", [
    "from engine.runner import run",
    "import engine.runner",
    "def f():\n    from engine.config import ConfigError",
    "from engine.io.shards import ShardWriter",
    "from engine.io.shards import shard_files",
    "from engine.io.shard_reader import read_shard\nfrom engine.io.shards import completed_keys",
    "import engine.io.shards",
    "from engine.io import shards",
    "from engine.io import shard_reader, shards",
    "from engine import config",
    "import importlib\nimportlib.import_module('engine.runner')",
    "__import__('engine.stages.decode')",
])
def test_checker_flags_what_the_rule_forbids(source):
    assert engine_import_violations(source)


@pytest.mark.parametrize("source", [
    "from engine.io.shard_reader import complete_unit_ids, open_run, read_index, read_shard, shard_files",
    "from engine.io import shard_reader",
    "import engine.io.shard_reader",
    "from engine.io.storage import Location, StorageError",
    "from engine.io import storage",
    "import engine.records",
    "from engine.boxes import Boxes",
    "def f():\n    from engine.models.loading import resolve_model, pick_device",
    "from detector.data import build_prompt\nimport torch",
])
def test_checker_accepts_what_the_rule_allows(source):
    assert engine_import_violations(source) == []


def test_importing_the_detector_loads_no_other_part_of_the_engine():
    """Also transitively: what detector/ imports must not drag in the pipeline config, the stages, the runner
    or the commands."""
    modules = sorted(f"detector.{p.stem}" for p in (ROOT / "detector").glob("*.py") if p.stem != "__init__")
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "print('\\n'.join(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = set(done.stdout.split())
    assert "detector.train" in loaded
    forbidden = ("engine.config", "engine.stages", "engine.backends", "engine.runner", "engine.selftrain",
                 "engine.synthetic_runs", "engine.cli", "engine.commands", "engine.io.shards")
    assert not [m for m in loaded if m.startswith(forbidden)]
