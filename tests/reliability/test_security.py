"""Guards over the source: no pickle for data we read, torch.load only with weights_only=True."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for d in ("engine", "detector") for p in (ROOT / d).rglob("*.py"))
# The install step converts the POS-tagger model shipped as a pickle in textblob-aptagger, once, with an
# unpickler that only admits set/frozenset (engine/language/nltk_data.py); nothing at run time reads pickle.
PICKLE_ALLOWED = {"engine/language/nltk_data.py"}


def calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield owner, name, node


def test_no_pickle_outside_the_install_converter():
    found = []
    for path in SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib") for n in names):
                found.append(rel)
    # the converter's own import is seen (the scan reads the sources), and it is the only one
    assert set(found) == PICKLE_ALLOWED


def test_torch_load_only_with_weights_only():
    offenders, torch_calls = [], 0
    for path in SOURCES:
        for owner, name, node in calls(ast.parse(path.read_text())):
            torch_calls += owner == "torch"
            if owner == "torch" and name == "load":
                ok = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                         for k in node.keywords)
                if not ok:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert torch_calls and offenders == []  # the scan sees the model code's torch calls


def test_no_print_outside_cli_commands():
    allowed = {"engine/cli.py"} | {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "engine" / "commands").glob("*.py")}
    printing = set()
    for path in SOURCES:
        rel = path.relative_to(ROOT).as_posix()
        for owner, name, node in calls(ast.parse(path.read_text())):
            if not owner and name == "print":
                printing.add(rel if rel in allowed else f"{rel}:{node.lineno}")
    # the command line's own prints are seen, and nothing else prints
    assert "engine/cli.py" in printing and sorted(printing - allowed) == []
