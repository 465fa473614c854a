"""What the GPU server checks in a ``torch.export`` archive (``.pt2``) that a function uploads
(``register_program``) before ``torch.export.load`` may see it.

``torch.export.load`` of torch 2.13 is not safe on untrusted bytes. Besides the JSON graph it

- unpickles every weight or constant whose payload config says ``use_pickle``
  (``torch.load(weights_only=False)``), custom objects (``torch._C._pickle_load_obj``) and
  opaque objects (``pickle.loads``);
- loads the example inputs with ``torch.load(weights_only=True)`` and, when that fails, again
  with ``weights_only=False``;
- loads AOTInductor shared libraries found in the archive, and falls back to a legacy format
  whose state dict is unpickled;
- ``exec``s the program's ``guards_code`` strings when the module is built (``ep.module()``);
- parses symbolic shape expressions with ``sympy.sympify``, which ``eval``s them;
- resolves each node's target by attribute path from ``torch``, ``operator`` or ``math`` and
  accepts any callable found there (``torch.os.system`` would do) as an operator;
- imports the modules that output tree specs name (defaultdict factories, enums).

:func:`check_program` therefore admits only archives that use none of these: the members that
``torch.export.save`` writes for one program with static shapes, every tensor stored raw,
example inputs that load with ``weights_only=True``, no guard code, no symbolic expressions,
only ATen operators (minus those that touch files or raw storage), and tree specs of tuples,
lists and dicts only. It never unpickles or executes anything itself.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from typing import Any

import torch

ROOT = "archive/"
FIXED_MEMBERS = {
    "archive_format": b"pt2",
    "archive_version": None,
    "byteorder": b"little",
    ".data/version": None,
    ".data/serialization_id": None,
}
MODEL_JSON = "models/model.json"
SAMPLE_INPUTS = "data/sample_inputs/model.pt"
PAYLOADS = {"data/weights/model_weights_config.json": ("data/weights/", re.compile(r"weight_\d+")),
            "data/constants/model_constants_config.json": ("data/constants/", re.compile(r"tensor_\d+"))}
# Strings outside the keys below are names (nodes, tensors, weights, modules, dtypes):
# identifier characters and dots only, no part starting with "__" (no __class__, __dict__...).
NAME = re.compile(r"[A-Za-z0-9_.]*")
FREE_TEXT_KEYS = {"as_string", "as_strings", "torch_version"}
TREESPEC_KEYS = {"in_spec", "out_spec"}
FORBIDDEN_KEYS = {
    "expr_str": "symbolic shape expressions (export with static shapes)",
    "as_graph": "sub-graphs (control-flow operators)",
    "as_operator": "operators passed as arguments",
    "as_custom_obj": "custom objects",
}
TARGET = re.compile(r"torch\.ops\.aten\.([A-Za-z0-9_]+)\.[A-Za-z0-9_]+")
# ATen operators that read or write files or point tensors at arbitrary storage.
DENIED_OPS = {"from_file", "save", "set_", "set_data", "_print", "warn"}
TREESPEC_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict"}


class UnsafeProgram(Exception):
    """The archive holds something the GPU server does not load; the message names it."""


def check_program(data: bytes) -> None:
    """Checks the ``torch.export.save`` archive ``data`` (bytes) as described in the module
    docstring.

    Raises:
        UnsafeProgram: naming the first member, key or operator that is not admitted.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise UnsafeProgram(f"not a torch.export archive (zip): {exc}") from None
    members = _members(infos)
    for name, expected in FIXED_MEMBERS.items():
        if expected is not None and archive.read(ROOT + name).strip() != expected:
            raise UnsafeProgram(f"{name} is not {expected.decode()!r}")
    for config, (folder, pattern) in PAYLOADS.items():
        _check_payload_config(_json(archive, config), config, folder, pattern, members)
    _check_sample_inputs(archive.read(ROOT + SAMPLE_INPUTS))
    model = _json(archive, MODEL_JSON)
    if not isinstance(model, dict) or not isinstance(model.get("graph_module"), dict):
        raise UnsafeProgram(f"{MODEL_JSON} holds no graph_module")
    if model.get("guards_code"):
        raise UnsafeProgram("the program carries guard code (Python source run at load)")
    if model.get("range_constraints"):
        raise UnsafeProgram("the program has symbolic shapes (export with static shapes)")
    if model["graph_module"].get("treespec_namedtuple_fields"):
        raise UnsafeProgram("the program's inputs or outputs use named tuples")
    _walk(model, "")


def _members(infos: list[zipfile.ZipInfo]) -> set[str]:
    names = [i.filename for i in infos]
    if len(names) != len(set(names)):
        raise UnsafeProgram("the archive repeats a member name")
    members = set()
    for info in infos:
        name = info.filename
        if not name.startswith(ROOT):
            raise UnsafeProgram(f"member {name!r} is outside {ROOT}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise UnsafeProgram(f"member {name!r} is compressed (torch.export.save stores members raw)")
        members.add(name[len(ROOT):])
    required = set(FIXED_MEMBERS) | {MODEL_JSON, SAMPLE_INPUTS} | set(PAYLOADS)
    missing = required - members
    if missing:
        raise UnsafeProgram(f"the archive lacks {', '.join(sorted(missing))}")
    for name in members - required:
        if not any(name.startswith(folder) and pattern.fullmatch(name[len(folder):])
                   for folder, pattern in PAYLOADS.values()):
            raise UnsafeProgram(f"member {name!r} is not admitted (only one program's graph, weights and constants)")
    return members


def _json(archive: zipfile.ZipFile, name: str) -> Any:
    try:
        return json.loads(archive.read(ROOT + name))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UnsafeProgram(f"{name} is not JSON: {exc}") from None


def _check_payload_config(config: Any, name: str, folder: str, pattern: re.Pattern, members: set[str]) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise UnsafeProgram(f"{name} has no config object")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or not _plain(fqn):
            raise UnsafeProgram(f"{name}: malformed entry {fqn!r}")
        if meta.get("use_pickle") is not False:
            raise UnsafeProgram(f"{name}: {fqn!r} is pickled (only raw tensors are admitted)")
        path = meta.get("path_name")
        if not isinstance(path, str) or not pattern.fullmatch(path) or folder + path not in members:
            raise UnsafeProgram(f"{name}: {fqn!r} points at {path!r}, which is not a tensor of the archive")
        if not isinstance(meta.get("tensor_meta"), dict):
            raise UnsafeProgram(f"{name}: {fqn!r} has no tensor description")


def _check_sample_inputs(data: bytes) -> None:
    # torch retries a failed weights_only load without the restriction; a file that loads
    # here loads there on the first try, so the unrestricted retry never runs.
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # any refusal of the safe unpickler means "not plain tensors"
        raise UnsafeProgram(f"{SAMPLE_INPUTS} is not plain tensors: {type(exc).__name__}: {str(exc)[:200]}") from None


def _walk(node: Any, key: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            if k in FORBIDDEN_KEYS:
                raise UnsafeProgram(f"the program uses {FORBIDDEN_KEYS[k]}, which the GPU server does not load")
            if k == "metadata":
                if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
                    raise UnsafeProgram("malformed metadata")
            elif k == "target":
                _check_target(v)
            elif k in TREESPEC_KEYS:
                _check_treespec(v)
            elif k not in FREE_TEXT_KEYS:
                _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            _walk(v, key)
    elif isinstance(node, str) and not _plain(node):
        raise UnsafeProgram(f"{key} {node[:80]!r} is not a plain name")


def _plain(name: str) -> bool:
    return NAME.fullmatch(name) is not None and not any(part.startswith("__") for part in name.split("."))


def _check_target(target: Any) -> None:
    match = TARGET.fullmatch(target) if isinstance(target, str) else None
    if match is None:
        raise UnsafeProgram(f"operator {str(target)[:80]!r} is not an ATen operator")
    op = match.group(1)
    if op in DENIED_OPS or "unsafe" in op:
        raise UnsafeProgram(f"operator aten.{op} is not admitted (it touches files or raw storage)")


def _check_treespec(text: Any) -> None:
    try:
        protocol, tree = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise UnsafeProgram("malformed input or output tree spec") from None
    if protocol != 1:
        raise UnsafeProgram(f"tree spec protocol {protocol!r} is not admitted")
    _check_tree(tree)


def _check_tree(tree: Any) -> None:
    if not isinstance(tree, dict) or set(tree) != {"type", "context", "children_spec"}:
        raise UnsafeProgram("malformed input or output tree spec")
    if tree["type"] not in TREESPEC_TYPES:
        raise UnsafeProgram(f"inputs or outputs of type {str(tree['type'])[:80]!r} are not admitted "
                            "(tensors in tuples, lists and dicts only)")
    if tree["type"] == "builtins.dict":
        try:
            keys = json.loads(tree["context"])
        except (TypeError, ValueError, RecursionError):
            keys = None
        if not isinstance(keys, list) or not all(isinstance(k, (str, int)) for k in keys):
            raise UnsafeProgram("dict keys of inputs or outputs must be strings or integers")
    elif tree["context"] not in (None, "null"):
        raise UnsafeProgram("malformed input or output tree spec")
    if not isinstance(tree["children_spec"], list):
        raise UnsafeProgram("malformed input or output tree spec")
    for child in tree["children_spec"]:
        _check_tree(child)
