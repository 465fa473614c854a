"""Case 11 of issue 6 in the code itself: nothing unpickles untrusted bytes. Every Python file
of the product (not the tests, some of which unpickle on purpose to show a threat) is parsed,
not grepped (docstrings that name the dangerous calls are fine), and every call that could
unpickle is checked."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for folder in ("runtime", "controller_plugin", "loadgen", "bench")
                 for p in (ROOT / folder).rglob("*.py"))
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal",
              "multiprocessing.connection"}
# torch.export.load unpickles parts of an archive. It may run only on archives the node's
# operator registered (torpor model register) or that runtime/gpu_server/program_check.py
# admitted (register_program): the model repository's loader is the one caller.
EXPORT_LOADERS = {"runtime/gpu_server/repository.py"}


def dotted(node: ast.AST) -> str:
    """``torch.export.load`` for the expression of a call's function, "" when not a name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def keyword(call: ast.Call, name: str):
    """The constant value of keyword ``name`` of ``call``; ``...`` when absent or not a constant."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else ...
    return ...


def problems(path: Path) -> list[str]:
    found = []
    tree = ast.parse(path.read_text(), str(path))
    where = path.relative_to(ROOT).as_posix()
    for node in ast.walk(tree):
        line = f"{where}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{line} imports {a.name}" for a in node.names if a.name in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and node.module in UNPICKLERS:
            found.append(f"{line} imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = dotted(node.func)
            if name == "torch.load" and keyword(node, "weights_only") is not True:
                found.append(f"{line} calls torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and keyword(node, "allow_pickle") is True:
                found.append(f"{line} calls {name} with allow_pickle=True")
            elif name in ("torch.export.load", "torch.jit.load") and where not in EXPORT_LOADERS:
                found.append(f"{line} calls {name}")
            elif name == "yaml.load" and keyword(node, "Loader") is ...:
                found.append(f"{line} calls yaml.load without a safe Loader")
            elif name.endswith("yaml.unsafe_load") or name.endswith("yaml.full_load"):
                found.append(f"{line} calls {name}")
    return found


def test_the_sources_were_found():
    names = {p.relative_to(ROOT).as_posix() for p in SOURCES}
    assert {"runtime/gpu_server/repository.py", "runtime/client.py", "controller_plugin/api.py"} <= names


def test_nothing_unpickles_untrusted_bytes():
    assert [p for path in SOURCES for p in problems(path)] == []


@pytest.mark.parametrize("code, words", [
    ("import pickle", "imports pickle"),
    ("from cloudpickle import loads", "imports from cloudpickle"),
    ("import torch\ntorch.load('x')", "without weights_only=True"),
    ("import torch\ntorch.load('x', weights_only=False)", "without weights_only=True"),
    ("import numpy as np\nnp.load('x', allow_pickle=True)", "allow_pickle=True"),
    ("import torch\ntorch.export.load('x')", "calls torch.export.load"),
    ("import yaml\nyaml.load(open('x'))", "safe Loader"),
], ids=["pickle", "cloudpickle", "torch-load", "weights-only-false", "np-load", "export-load", "yaml"])
def test_the_check_finds_each_kind(tmp_path, monkeypatch, code, words):
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    path = tmp_path / "bad.py"
    path.write_text(code + "\n")
    assert any(words in p for p in problems(path))
    path.write_text("import torch\ntorch.load('x', map_location='cpu', weights_only=True)\n")
    assert problems(path) == []
