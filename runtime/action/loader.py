"""Loading an action's Python code: plain source or a base64 zip holding ``__main__.py``
(with an optional ``virtualenv/`` folder), imported as the module ``main__``."""
from __future__ import annotations

import base64
import binascii
import importlib.util
import io
import os
import sys
import traceback
import zipfile
from pathlib import Path
from typing import Any, Callable

from runtime.action.errors import ActionError

ENTRY_FILE = "__main__.py"
# The name OpenWhisk's Python runtime imports the action under (so `__name__ == "main__"`).
MODULE_NAME = "main__"


def _fail(status: int, message: str) -> ActionError:
    print(message, file=sys.stderr, flush=True)
    return ActionError(status, message)


def write_source(code: str, folder: Path) -> None:
    """Writes plain source code as ``folder/__main__.py``.

    Raises:
        ActionError: 400 when the code cannot be encoded as UTF-8 (lone surrogates).
    """
    try:
        (folder / ENTRY_FILE).write_text(code, encoding="utf-8")
    except UnicodeEncodeError as exc:
        raise ActionError(400, f"the action code is not valid Unicode: {exc.reason} at offset {exc.start}") from None


def unpack_zip(code: str, folder: Path) -> None:
    """Decodes ``code`` (base64 of a zip archive) and extracts it into ``folder``.

    Raises:
        ActionError: 400 when the code is not base64 or not a readable zip archive;
            502 when the archive holds no ``__main__.py``.
    """
    try:
        data = base64.b64decode("".join(code.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _fail(400, f"the action code is not valid base64: {exc}") from None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            # extractall drops absolute paths and '..' parts, so members stay inside folder
            archive.extractall(folder)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError, EOFError) as exc:
        raise _fail(400, f"the action code is not a readable zip archive: {exc}") from None
    if not (folder / ENTRY_FILE).is_file():
        raise _fail(502, f"Zip file does not include {ENTRY_FILE}.")


def _activate_virtualenv(folder: Path) -> None:
    venv = folder / "virtualenv"
    if not venv.is_dir():
        return
    script = venv / "bin" / "activate_this.py"
    if not script.is_file():
        raise _fail(502, "Invalid virtualenv: zip file does not include virtualenv/bin/activate_this.py.")
    try:
        exec(compile(script.read_bytes(), str(script), "exec"), {"__file__": str(script), "__name__": "activate_this"})
    except (Exception, SystemExit) as exc:
        traceback.print_exc()
        raise _fail(502, f"Initialization has failed due to: the virtualenv did not activate: "
                         f"{type(exc).__name__}: {exc}") from None


def load_main(folder: Path, main: str) -> Callable[[Any], Any]:
    """Imports ``folder/__main__.py`` and returns its entry point.

    The working directory becomes ``folder`` and ``folder`` goes first on ``sys.path``, so
    the action opens its own files by relative path and imports its sibling modules; a
    ``virtualenv/`` folder is activated first through ``virtualenv/bin/activate_this.py``.

    Args:
        folder: the action's folder holding ``__main__.py``.
        main: name of the entry point; dots reach into attributes (``Handler.main``).

    Raises:
        ActionError: 502 when the virtualenv is invalid, the module fails to compile or to
            import (traceback on stderr), or ``main`` names no callable.
    """
    os.chdir(folder)
    sys.path.insert(0, str(folder))
    _activate_virtualenv(folder)
    spec = importlib.util.spec_from_file_location(MODULE_NAME, folder / ENTRY_FILE)
    module = importlib.util.module_from_spec(spec)
    # registered before running so that dataclasses and pickling find the module by name
    sys.modules[MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[MODULE_NAME]
        traceback.print_exc()
        raise _fail(502, f"Initialization has failed due to: {type(exc).__name__}: {exc}") from None
    target: Any = module
    for part in main.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise _fail(502, f"The action has no function named {main!r}.")
    return target
