"""granucap uses other libraries through their public APIs only: no private modules or attributes of third-party
packages (`ray._private`, `from X._y import ...`, `X._y`), no calls into C libraries through ctypes, no private
parameters (`_system_config` of `ray.init`). Checked on the source of engine/, detector/ and benchmarks/;
granucap's own modules and the standard library may use leading underscores."""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("engine", "detector", "benchmarks")
OWN = {"engine", "detector", "benchmarks", "tests"}
# Searched in the code and its strings, comments left out: a script run in a subprocess is code too.
BANNED = {
    r"\bray\._private\b": "Ray's internals (ray._private)",
    r"\bimport\s+ctypes\b|\bfrom\s+ctypes\s+import\b|\bctypes\.\w": "a C library called through ctypes",
    r"\b_system_config\b": "a private parameter of ray.init (_system_config)",
}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _without_comments(text: str) -> list[str]:
    lines = text.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            lines[row - 1] = lines[row - 1][:col]
    return lines


def violations(path: Path) -> list[str]:
    """Each use of a private API of another library in the Python file `path`, as 'path:line: what: code'."""
    text = path.read_text(encoding="utf-8")
    source = text.splitlines()
    found: list[tuple[int, str]] = []
    for lineno, line in enumerate(_without_comments(text), 1):
        found += [(lineno, why) for pattern, why in BANNED.items() if re.search(pattern, line)]

    siblings = {p.stem for p in path.parent.glob("*.py")}  # a script's own modules next to it

    def third_party(module: str) -> bool:
        top = module.split(".")[0]
        return bool(top) and top not in OWN | siblings and top not in sys.stdlib_module_names

    tree = ast.parse(text, filename=str(path))
    modules: set[str] = set()  # names bound to (parts of) third-party packages
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if third_party(alias.name):
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append((node.lineno, f"a private module of {alias.name.split('.')[0]}"))
                    modules.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and third_party(node.module):
            top = node.module.split(".")[0]
            if any(_private(part) for part in node.module.split(".")):
                found.append((node.lineno, f"a private module of {top}"))
            for alias in node.names:
                if _private(alias.name):
                    found.append((node.lineno, f"a private name of {top} ({alias.name})"))
                modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, root = [node.attr], node.value
            while isinstance(root, ast.Attribute):
                chain.append(root.attr)
                root = root.value
            if isinstance(root, ast.Name) and root.id in modules and _private(node.attr):
                found.append((node.lineno, f"a private attribute of {root.id} ({'.'.join([root.id, *chain[::-1]])})"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[0], ast.Name) and node.args[0].id in modules
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            found.append((node.lineno, f"a private attribute of {node.args[0].id} ({node.args[1].value})"))
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return [f"{name}:{line}: {why}: {source[line - 1].strip()}" for line, why in sorted(set(found))]


def test_granucap_uses_other_libraries_through_their_public_apis_only():
    files = sorted(p for folder in CHECKED for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)
    assert len(files) > 50  # the folders were found
    found = [v for path in files for v in violations(path)]
    assert not found, "\n".join(found)


def test_the_check_finds_each_kind_of_private_use(tmp_path):
    bad = {
        "from ray._private import worker": "a private module of ray",
        "import ray._private.worker": "a private module of ray",
        "from ray.data._internal.execution import streaming_executor": "a private module of ray",
        "from torch import _C": "a private name of torch (_C)",
        "import ray\nnode = ray._private.worker._global_node": "Ray's internals (ray._private)",
        "import ray\nray.util._helper()": "a private attribute of ray (ray.util._helper)",
        "import pyarrow as pa\npa._lib": "a private attribute of pa (pa._lib)",
        "import ray\ngetattr(ray, '_private')": "a private attribute of ray (_private)",
        "import ctypes": "a C library called through ctypes",
        "def f():\n    from ctypes import CDLL": "a C library called through ctypes",
        "import ray\nray.init(_system_config={})": "a private parameter of ray.init",
        "SCRIPT = 'import ray; ray._private.worker'": "Ray's internals (ray._private)",
    }
    for n, (code, why) in enumerate(bad.items()):
        path = tmp_path / f"bad{n}.py"
        path.write_text(code + "\n")
        assert any(why in v for v in violations(path)), (code, violations(path))


def test_the_check_leaves_granucaps_own_names_the_standard_library_and_comments_alone(tmp_path):
    path = tmp_path / "fine.py"
    path.write_text(
        "import os\nimport ray\nfrom engine.runner.session import _ray_init\nfrom engine import _version\n"
        "from . import _sibling\nos._exit(0)\nprint(ray.__version__, ray.data)\n"
        "x = object()._private  # a comment may say ray._private or ctypes.CDLL or _system_config\n"
    )
    assert violations(path) == []
