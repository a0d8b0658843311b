"""Which package may import which (docs/architecture.md): backends import no stage, a stage imports no other
stage, the language package imports neither and has no import cycle. Read from the source, lazy imports
inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every engine module `path` imports, at the top or in a function (`from engine.x import y` counts as
    engine.x.y where that is a module, else engine.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("engine")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("engine"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (ROOT / Path(*sub.split("."))).is_dir()
                found.add(sub if is_module else node.module)
    return found


def _graph(folder: Path) -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in sorted(folder.rglob("*.py"))}


def test_the_graph_sees_lazy_imports():
    # the ground stage loads its re-scorer inside setup(): a check that missed it would prove nothing
    assert "engine.backends.clip_rescore" in _graph(ENGINE / "stages")["engine.stages.ground"]


def test_backends_import_no_stage():
    offenders = {m: sorted(i for i in imps if i.startswith("engine.stages"))
                 for m, imps in _graph(ENGINE / "backends").items()}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_stages_import_no_other_stage():
    offenders = {}
    for module, imps in _graph(ENGINE / "stages").items():
        others = sorted(i for i in imps if i.startswith("engine.stages") and i not in ("engine.stages.base", module))
        if others:
            offenders[module] = others
    assert offenders == {}


def test_language_imports_no_stage_or_backend_and_has_no_cycle():
    graph = _graph(ENGINE / "language")
    outside = {m: sorted(i for i in imps if i.startswith(("engine.stages", "engine.backends")))
               for m, imps in graph.items()}
    assert {m: i for m, i in outside.items() if i} == {}
    inside = {m: {i for i in imps if i in graph and i != "engine.language"} for m, imps in graph.items()}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in sorted(inside[module]):
            visit(dep, (*path, module))
        done.add(module)

    for module in sorted(inside):
        visit(module, ())
    assert inside["engine.language.noun_phrases"] >= {"engine.language.entities", "engine.language.lexicon"}
