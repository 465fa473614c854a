"""Reading a request body within a byte limit and parsing it as JSON, with errors that say
what is wrong (empty, truncated, NUL byte, not UTF-8, too large)."""
from __future__ import annotations

import json
import math
from typing import Any, BinaryIO

from runtime.action.errors import ActionError

_CHUNK_BYTES = 64 * 1024
# Past this much of an unwanted body we stop reading and let the connection close.
_DRAIN_CAP_BYTES = 256 * 1024 * 1024


def discard(stream: BinaryIO) -> None:
    """Reads and throws away the rest of a request body (at most 256 MiB), so that the
    client, still sending, reads the answer instead of a reset connection."""
    drained = 0
    while drained < _DRAIN_CAP_BYTES:
        chunk = stream.read(_CHUNK_BYTES)
        if not chunk:
            return
        drained += len(chunk)


def read_body(stream: BinaryIO, declared_length: int | None, limit: int) -> bytes:
    """Reads a whole request body of at most ``limit`` bytes.

    Args:
        stream: the WSGI input (already bounded by ``Content-Length`` or chunked framing).
        declared_length: the ``Content-Length`` header in bytes, None when chunked.
        limit: largest body accepted, in bytes.

    Raises:
        ActionError: 413 when the body is larger than ``limit``.
    """
    if declared_length is not None and declared_length > limit:
        discard(stream)
        raise ActionError(413, f"request body of {declared_length} bytes is over the limit {limit} bytes")
    chunks: list[bytes] = []
    received = 0
    while True:
        chunk = stream.read(min(_CHUNK_BYTES, limit + 1 - received))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        received += len(chunk)
        if received > limit:
            discard(stream)
            raise ActionError(413, f"request body is over the limit {limit} bytes")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # json.loads turns 1e400 into inf without calling parse_constant, and inf cannot travel
    # on as JSON (requests refuses it; Flask would write the invalid token Infinity)
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is out of the range of a double")
    return value


def parse_json(body: bytes) -> Any:
    """Parses a request body as strict JSON (UTF-8; no NaN or Infinity).

    Raises:
        ActionError: 400 naming the problem (empty, whitespace only, NUL byte, not UTF-8,
            truncated, syntax error, nesting too deep).
    """
    if not body:
        raise ActionError(400, "request body is empty: expected a JSON object")
    if not body.strip():
        raise ActionError(400, "request body is only whitespace: expected a JSON object")
    nul = body.find(b"\x00")
    if nul >= 0:
        raise ActionError(400, f"request body contains a NUL byte at offset {nul}: not JSON")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ActionError(400, f"request body is not UTF-8: invalid byte at offset {exc.start}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip()):
            raise ActionError(400, f"request body is truncated JSON: {exc.msg} at offset {exc.pos}") from None
        raise ActionError(400, f"request body is not valid JSON: {exc.msg} at line {exc.lineno} "
                               f"column {exc.colno} (offset {exc.pos})") from None
    except ValueError as exc:
        raise ActionError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ActionError(400, "request body nests JSON too deeply") from None
