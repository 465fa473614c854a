"""Programs that functions register themselves (``register_program``, from
``runtime.remote.remote``): a ``torch.export`` archive becomes a repository model of format
``export``, once per node, whichever container of the action uploads it first.

A program's model name ends with ``-`` and the first 16 hex digits of the archive's SHA-256,
and a name is never given to other bytes: registration is idempotent, and no upload can
replace a model that exists (``resnet50`` or another action's program).
"""
from __future__ import annotations

import hashlib
import re
import tempfile
import threading
from pathlib import Path

from runtime.gpu_server.program_check import UnsafeProgram, check_program
from runtime.gpu_server.protocol import is_int
from runtime.gpu_server.repository import ModelLoadError, ModelSpec, Repository, TensorSpec, check_inputs

PROGRAM_FILE = "model.pt2"
DIGEST = re.compile(r"[0-9a-f]{64}")
PROGRAM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
# dtypes that travel over the protocol (NumPy has no bfloat16)
INPUT_DTYPES = ("float32", "float16", "int64", "int32", "uint8", "bool")


class ProgramError(Exception):
    """A refused registration; ``status`` and ``code`` as in the protocol's error replies."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


def parse_inputs(raw) -> list[TensorSpec]:
    """``[{"name", "dtype", "shape"}]`` with static shapes (positive ints) → TensorSpecs.

    Raises:
        ProgramError: 400 naming the malformed entry.
    """
    if not isinstance(raw, list) or not raw:
        raise ProgramError(400, "bad_request", "field 'inputs' must be a non-empty list of {name, dtype, shape}")
    specs = []
    for entry in raw:
        ok = (isinstance(entry, dict) and set(entry) == {"name", "dtype", "shape"}
              and isinstance(entry["name"], str) and entry["dtype"] in INPUT_DTYPES
              and isinstance(entry["shape"], list)
              and all(is_int(d) and d > 0 for d in entry["shape"]))
        if not ok:
            raise ProgramError(400, "bad_request", f"input {str(entry)[:200]} must be {{name, dtype, shape}} with dtype "
                               f"one of {', '.join(INPUT_DTYPES)} and a static shape of positive integers")
        specs.append(TensorSpec(entry["name"], entry["dtype"], list(entry["shape"])))
    try:
        check_inputs(specs)
    except ValueError as exc:
        raise ProgramError(400, "bad_request", str(exc)) from None
    return specs


class ProgramRegistry:
    """Registers uploaded programs into a repository, one at a time.

    Args:
        repository: the GPU server's model repository.
        max_bytes: largest archive accepted (bytes).
    """

    def __init__(self, repository: Repository, max_bytes: int):
        self.repository = repository
        self.max_bytes = max_bytes
        # Containers of one action start together and upload the same program; the
        # repository stages one registration per name at a time.
        self._lock = threading.Lock()

    def register(self, name: str, digest, inputs, program: bytes) -> bool:
        """Makes ``name`` the program ``program`` (a ``torch.export.save`` archive whose
        SHA-256 is ``digest``) taking ``inputs``, unless it already is.

        An empty ``program`` only asks whether ``name`` is registered with ``digest``.

        Returns:
            True when this call wrote the model, False when it was already registered.

        Raises:
            ProgramError: 400 malformed name, digest or inputs, a digest that does not match
                the bytes, an archive the server does not load (program_check); 404 not
                registered and no bytes sent; 409 ``name`` holds other bytes; 413 the archive
                is over ``max_bytes``; 502 it does not load or run on ``inputs``.
        """
        if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
            raise ProgramError(400, "bad_request", "field 'digest' must be the archive's SHA-256 (64 lower-case hex digits)")
        if not PROGRAM_NAME.fullmatch(name) or not name.endswith("-" + digest[:16]):
            raise ProgramError(400, "bad_request", f"program name {name[:200]!r} must be at most 200 of [A-Za-z0-9_.-] "
                               f"ending with '-{digest[:16]}' (the first 16 hex digits of its digest)")
        with self._lock:
            existing = self._digest_of(name)
            if existing == digest:
                return False
            if existing is not None:
                raise ProgramError(409, "conflict", f"model {name!r} exists with other content")
            if not program:
                raise ProgramError(404, "unknown_model", f"no program {name!r} is registered: send it as the payload")
            if len(program) > self.max_bytes:
                raise ProgramError(413, "too_large", f"program of {len(program)} bytes exceeds the limit of {self.max_bytes} bytes")
            if hashlib.sha256(program).hexdigest() != digest:
                raise ProgramError(400, "bad_request", "the payload's SHA-256 does not match field 'digest'")
            specs = parse_inputs(inputs)
            try:
                check_program(program)
            except UnsafeProgram as exc:
                raise ProgramError(400, "unsafe_program", f"program {name!r} is refused: {exc}") from None
            with tempfile.TemporaryDirectory(dir=self.repository.root, prefix=".upload-") as tmp:
                path = Path(tmp) / PROGRAM_FILE
                path.write_bytes(program)
                try:
                    self.repository.register(ModelSpec(name=name, inputs=specs, format="export", weights=PROGRAM_FILE), path)
                except ModelLoadError as exc:
                    raise ProgramError(502, "model_load_failed", str(exc)) from None
            return True

    def _digest_of(self, name: str) -> str | None:
        try:
            spec = self.repository.spec(name)
        except KeyError:
            return None
        except ModelLoadError:
            return ""  # a broken folder of that name: never overwritten from here
        return spec.digest if spec.format == "export" else ""
