"""Wire format of the GPU server's Unix-socket protocol (docs/gpu-server-protocol.md).

A message is a 4-byte big-endian length, a UTF-8 JSON header of that length, and — when the
header has ``"payload": N`` — N raw bytes. Tensors travel through a POSIX shared-memory
segment that the client creates; a header describes each one as
``{"dtype": "float32", "shape": [1, 3, 224, 224], "offset": 0, "nbytes": 602112}``.
This module needs neither torch nor CUDA: the action runtime imports it.
"""
from __future__ import annotations

import json
import math
import socket
import struct
from multiprocessing import resource_tracker, shared_memory

import numpy as np

MAX_HEADER_BYTES = 1 << 20
TENSOR_ALIGNMENT = 64  # bytes between tensors in shared memory
_LEN = struct.Struct(">I")
# one encoder for every message: json.dumps with separators builds a new encoder per call
_encode = json.JSONEncoder(separators=(",", ":")).encode
# np.dtype(name) and dtype.name run Python code (microseconds each, several per call): both
# are looked up once per canonical numeric dtype, a bounded set
_DTYPES: dict[str, np.dtype] = {}
_NAMES: dict[np.dtype, str] = {}


class ProtocolError(Exception):
    """The peer sent something that is not a valid message."""


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("peer closed the connection")
        got += k
    return buf


def send(sock: socket.socket, header: dict, payload: bytes | memoryview = b"") -> None:
    """Sends one message (header plus optional raw payload)."""
    if payload:
        header = {**header, "payload": len(payload)}
    data = _encode(header).encode()
    sock.sendall(_LEN.pack(len(data)) + data)
    if payload:
        sock.sendall(payload)


def recv(sock: socket.socket, max_payload: int) -> tuple[dict, bytes]:
    """Receives one message.

    Raises:
        ConnectionError: the peer closed the connection.
        ProtocolError: oversized or malformed header, or a payload over ``max_payload`` bytes.
    """
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {n} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(_recv_exact(sock, n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    size = header.get("payload", 0)
    if not isinstance(size, int) or size < 0 or size > max_payload:
        raise ProtocolError(f"payload of {size} bytes exceeds the limit of {max_payload} bytes")
    return header, bytes(_recv_exact(sock, size)) if size else b""


def attach(name: str) -> shared_memory.SharedMemory:
    """Opens a peer's segment without letting this process's resource tracker unlink it at
    exit (before Python 3.13 every attach registers the segment with the tracker)."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # Python >= 3.13
    except TypeError:
        shm = shared_memory.SharedMemory(name=name)
        resource_tracker.unregister(shm._name, "shared_memory")
        return shm


def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name`` (``float32``...), cached."""
    name = _NAMES.get(dtype)
    if name is None:
        name = dtype.name
        if dtype.kind in "biufc":  # a bounded set of keys
            _NAMES[dtype] = name
    return name


def _dtype(name) -> np.dtype:
    """The numeric dtype called ``name``, in native byte order.

    Raises:
        TypeError, ValueError: not the name of a numeric NumPy dtype in native byte order
            (objects, strings and records cannot be read from raw bytes).
    """
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is not None:
        return dtype
    dtype = np.dtype(name)
    if dtype.kind not in "biufc" or not dtype.isnative:
        raise ValueError(f"{dtype} is not a numeric dtype in native byte order")
    if dtype.name == name:
        _DTYPES[name] = dtype
    return dtype


def describe(arrays: list[np.ndarray], start: int = 0) -> tuple[list[dict], int]:
    """Header entries that lay ``arrays`` out from byte ``start``; returns (entries, end)."""
    entries, offset = [], start
    for a in arrays:
        offset = (offset + TENSOR_ALIGNMENT - 1) // TENSOR_ALIGNMENT * TENSOR_ALIGNMENT
        entries.append({"dtype": dtype_name(a.dtype), "shape": list(a.shape), "offset": offset, "nbytes": a.nbytes})
        offset += a.nbytes
    return entries, offset


def write(buf: memoryview, entries: list[dict], arrays: list[np.ndarray]) -> None:
    """Copies ``arrays`` into ``buf`` where ``entries`` say."""
    for e, a in zip(entries, arrays):
        np.frombuffer(buf, dtype=np.uint8, count=e["nbytes"], offset=e["offset"])[:] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def read(buf: memoryview | bytes, entries: list[dict], copy: bool) -> list[np.ndarray]:
    """Arrays described by ``entries`` in ``buf`` (views unless ``copy``).

    Raises:
        ProtocolError: an entry is malformed or points outside ``buf``.
    """
    out = []
    for e in entries:
        try:
            dtype = _dtype(e["dtype"])
            shape = tuple(int(d) for d in e["shape"])
            offset, nbytes = int(e["offset"]), int(e["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"bad tensor description {e!r}: {exc}") from None
        if any(d < 0 for d in shape) or nbytes != math.prod(shape) * dtype.itemsize:
            raise ProtocolError(f"tensor description {e!r}: nbytes does not match shape and dtype")
        if offset < 0 or offset + nbytes > len(buf):
            raise ProtocolError(f"tensor description {e!r} points outside the shared memory ({len(buf)} bytes)")
        a = np.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape)
        out.append(a.copy() if copy else a)
    return out
