"""Wire format of the GPU server's Unix-socket protocol (docs/gpu-server-protocol.md).

A message is a 4-byte big-endian length, a UTF-8 JSON header of that length, and — when the
header has ``"payload": N`` — N raw bytes. Tensors travel through a shared-memory segment
that the client creates (:class:`Segment`: a memfd sealed against shrinking) and passes to
the server as a file descriptor (``SCM_RIGHTS``) with the first request that uses it on a
connection; a header describes each tensor as
``{"dtype": "float32", "shape": [1, 3, 224, 224], "offset": 0, "nbytes": 602112}``.
The seal is what makes the server's mapping safe: a client that could shrink a segment the
server has mapped would make the server's next access to it fault (SIGBUS) and kill the
process; the kernel refuses to shrink a sealed memfd. Passing descriptors also means the
action's and the server's containers need not share an IPC namespace or ``/dev/shm``.
This module needs neither torch nor CUDA: the action runtime imports it.
"""
from __future__ import annotations

import array
import fcntl
import json
import math
import mmap
import os
import select
import socket
import struct
import time
import uuid

import numpy as np

MAX_HEADER_BYTES = 1 << 20
MAX_MODEL_NAME_BYTES = 200  # bytes of UTF-8 (check_model_name)
MAX_FDS = 1  # file descriptors one message may carry
PAYLOAD_CHUNK = 1 << 20  # bytes read at a time
# the part of a segment the server maps: the input limit plus this much (runtime.client makes
# segments of at least 16 MiB, 4 MiB beyond the inputs, so that outputs fit after them)
SEGMENT_SLACK_BYTES = 16 << 20
_FD_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
TENSOR_ALIGNMENT = 64  # bytes between tensors in shared memory
_LEN = struct.Struct(">I")
_ENCODER = json.JSONEncoder(separators=(",", ":"))
# json's C encoder and scanner, called directly where Python has them: JSONEncoder.encode
# makes a new C encoder per call and json.loads goes through three Python frames and two
# regular expressions, half the ~5 µs each of a request's or reply's header. A header
# never holds a cycle (the C encoder is made without the cycle check).
_C_ENCODER = json.encoder.c_make_encoder and json.encoder.c_make_encoder(
    None, _ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)
_scan = json.JSONDecoder().scan_once
# the flags as ints: bitwise operations on socket's IntFlag members run Python code
_CTRUNC = int(socket.MSG_CTRUNC)
_DONTWAIT = int(socket.MSG_DONTWAIT)
# np.dtype(name) and dtype.name run Python code (microseconds each, several per call): both
# are looked up once per canonical numeric dtype, a bounded set
_DTYPES: dict[str, np.dtype] = {}
_NAMES: dict[np.dtype, str] = {}


class ProtocolError(Exception):
    """The peer sent something that is not a valid message."""


class HeaderTooLarge(ValueError):
    """A header to send exceeds :data:`MAX_HEADER_BYTES`: the peer would refuse it."""


ERROR_ECHO_CHARS = 400  # of an error message, when the whole would not fit a header


def check_model_name(name) -> str:
    """``name`` when it can name a model: a non-empty string of valid Unicode, without ``/``
    or NUL, not starting with a dot (the repository's folders ``NAME`` and ``.versions``),
    at most :data:`MAX_MODEL_NAME_BYTES` bytes of UTF-8 (a version folder
    ``NAME-<32 hex>`` must fit the 255 bytes of a file name).

    Raises:
        ValueError: which rule it breaks.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("a model name must be a non-empty string")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"model name {name[:80]!r} is not valid Unicode (a lone surrogate)") from None
    if "/" in name or "\x00" in name or name.startswith("."):
        raise ValueError(f"invalid model name {name[:80]!r}: no '/' or NUL, no leading '.'")
    if size > MAX_MODEL_NAME_BYTES:
        raise ValueError(f"model name of {size} bytes is over the limit of {MAX_MODEL_NAME_BYTES} bytes")
    return name


class _FrameClock:
    """The deadline of one frame: armed by its first byte, ``timeout_s`` later.

    Reads after the first byte do not block (``MSG_DONTWAIT``) and wait for more bytes only
    through :meth:`wait`, so a frame that is already whole in the socket buffer — the usual
    case — costs no timeout bookkeeping at all.
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.deadline: float | None = None

    def wait(self, sock: socket.socket) -> None:
        """Blocks until ``sock`` is readable.

        Raises:
            TimeoutError: the frame's deadline passed first.
        """
        remaining = self.deadline - time.monotonic()
        poller = select.poll()  # not select(): a busy server's descriptors exceed FD_SETSIZE
        poller.register(sock, select.POLLIN)
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise TimeoutError(f"the rest of the frame did not come within {self.timeout_s:g} s")


def _recv_exact(sock: socket.socket, n: int, fds: list[int] | None = None, clock: _FrameClock | None = None) -> bytearray:
    """``n`` bytes from ``sock``; with ``fds`` the descriptors that came with them are
    appended to it (without, the kernel discards any: a peer cannot leak them into us); with
    ``clock``, all of them by the frame's deadline once its first byte came.

    Raises:
        ConnectionError: the peer closed the connection.
        TimeoutError: the frame's deadline passed, or the socket's timeout.
        BlockingIOError: the socket's timeout in the kernel (``SO_RCVTIMEO``) ran out.
    """
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        flags = _DONTWAIT if clock is not None and clock.deadline is not None else 0
        try:
            if fds is None:
                k = sock.recv_into(view[got:], n - got, flags)
            else:
                k, ancillary, msg_flags, _ = sock.recvmsg_into([view[got:]], _FD_SPACE, flags)
                for level, kind, data in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.extend(array.array("i", data[:len(data) - len(data) % 4]))
                # the control buffer is rounded up to 8 bytes, so one more descriptor than
                # MAX_FDS can fit without truncation
                if msg_flags & _CTRUNC or len(fds) > MAX_FDS:
                    raise ProtocolError(f"a message may carry at most {MAX_FDS} file descriptor(s)")
        except BlockingIOError:
            if not flags:  # the socket's own timeout ran out in the kernel (SO_RCVTIMEO)
                raise
            clock.wait(sock)
            continue
        if k == 0:
            raise ConnectionError("peer closed the connection")
        if clock is not None and clock.deadline is None:
            clock.deadline = time.monotonic() + clock.timeout_s
        got += k
    return buf


def _encode(header: dict) -> str:
    """``header`` as compact JSON (ASCII)."""
    return "".join(_C_ENCODER(header, 0)) if _C_ENCODER is not None else _ENCODER.encode(header)


def _decode(text: str):
    """``json.loads(text)``.

    Raises:
        ValueError: ``text`` is not JSON.
        RecursionError: it nests too deeply.
    """
    try:
        value, end = _scan(text, 0)
        if end == len(text):
            return value
    except StopIteration:  # the scanner's way of saying that no value starts here
        pass
    return json.loads(text)  # whitespace around the value, or the error that names what is wrong


def send(sock: socket.socket, header: dict, payload: bytes | memoryview = b"", fds: tuple[int, ...] = ()) -> None:
    """Sends one message (header plus optional raw payload), with the file descriptors
    ``fds`` (at most :data:`MAX_FDS`) attached to its first bytes.

    Raises:
        HeaderTooLarge: the encoded header exceeds :data:`MAX_HEADER_BYTES` (nothing sent).
        OSError: the socket failed.
    """
    if payload:
        header = {**header, "payload": len(payload)}
    data = _encode(header).encode()
    if len(data) > MAX_HEADER_BYTES:
        raise HeaderTooLarge(f"a header of {len(data)} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes")
    message = _LEN.pack(len(data)) + data
    if fds:
        sent = sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        if sent < len(message):
            sock.sendall(message[sent:])
    else:
        sock.sendall(message)
    if payload:
        sock.sendall(payload)


def recv(sock: socket.socket, max_payload: int, fds: list[int] | None = None,
         frame_timeout_s: float | None = None) -> tuple[dict, bytes]:
    """Receives one message; with ``fds``, the descriptors that came with its first bytes
    are appended to it (the caller owns and closes them, also when this raises). With ``frame_timeout_s``, the
    whole rest of a message must arrive within that many seconds of its first byte (a peer
    that sends half a frame, or a byte now and then, cannot hold the reader forever); the
    wait for the first byte keeps the socket's own timeout. The socket must then be in
    blocking mode (no timeout of its own), as a server's connections are.

    Raises:
        ConnectionError: the peer closed the connection.
        TimeoutError: the rest of a frame did not come within ``frame_timeout_s``, or the
            socket's timeout ran out.
        BlockingIOError: the socket's timeout in the kernel (``SO_RCVTIMEO``) ran out.
        ProtocolError: oversized or malformed header, a payload over ``max_payload`` bytes,
            or more than :data:`MAX_FDS` descriptors.
    """
    clock = _FrameClock(frame_timeout_s) if frame_timeout_s is not None else None
    # descriptors ride on a message's first bytes (send): the rest is read without room for
    # any (recvmsg costs twice a recv_into), and the kernel closes those a peer sent later
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size, fds, clock))
    if n > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {n} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes")
    try:
        header = _decode(_recv_exact(sock, n, None, clock).decode("utf-8"))
    except ValueError as exc:  # not UTF-8, not JSON, an integer of more digits than Python converts
        raise ProtocolError(f"header is not valid JSON (UTF-8): {exc}") from None
    except RecursionError:
        raise ProtocolError("header nests JSON too deeply") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    size = header.get("payload", 0)
    if not is_int(size) or size < 0:
        raise ProtocolError(f"field 'payload' must be a non-negative integer, not {size!r}")
    if size > max_payload:
        raise ProtocolError(f"payload of {size} bytes exceeds the limit of {max_payload} bytes")
    if not size:
        return header, b""
    chunks = []  # memory grows as bytes arrive, not by the size a header claims
    for start in range(0, size, PAYLOAD_CHUNK):
        chunks.append(_recv_exact(sock, min(PAYLOAD_CHUNK, size - start), None, clock))
    return header, b"".join(chunks)


class Segment:
    """A shared-memory segment for tensors: a memfd mapped read-write, sealed so that it can
    never shrink (``F_SEAL_SHRINK``), which makes it safe for a peer to map.

    Attributes:
        id: the name requests use for it (the client's choice; unique per client).
        size: bytes.
        buf: the writable mapping.
        fd: the descriptor to pass to the server (-1 once the server side has mapped it).
    """

    def __init__(self, fd: int, size: int, segment_id: str):
        self.id, self.size, self.fd = segment_id, size, fd
        self._map = mmap.mmap(fd, size) if size else None
        self.buf = memoryview(self._map) if self._map is not None else memoryview(b"")

    @classmethod
    def create(cls, size: int) -> "Segment":
        """A new sealed segment of ``size`` bytes (zero-filled).

        Raises:
            OSError: no memfd (not Linux) or no memory.
        """
        fd = os.memfd_create("torpor-tensors", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            return cls(fd, size, uuid.uuid4().hex)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, segment_id: str, max_bytes: int) -> "Segment":
        """Maps at most the first ``max_bytes`` of a peer's segment from its descriptor
        (taking ownership of ``fd``, which is closed once mapped): a sparse memfd of
        terabytes costs its sender nothing and would exhaust this process's address space;
        tensors described past the mapped part are outside the segment. Its size is fixed
        from then on: a segment the peer grows later must be sent again.

        Raises:
            ProtocolError: ``fd`` is not a memfd sealed against shrinking.
        """
        try:
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                raise ProtocolError("the file descriptor sent is not a sealable shared-memory segment "
                                    "(create it with memfd_create(MFD_ALLOW_SEALING))") from None
            if not seals & fcntl.F_SEAL_SHRINK:
                raise ProtocolError("the shared-memory segment sent is not sealed against shrinking (F_SEAL_SHRINK)")
            segment = cls(fd, min(os.fstat(fd).st_size, max_bytes), segment_id)
        finally:
            os.close(fd)
        segment.fd = -1
        return segment

    def close(self) -> None:
        """Unmaps the segment and closes its descriptor. Views of :attr:`buf` still alive keep
        the mapping until they are gone."""
        try:
            self.buf.release()
            if self._map is not None:
                self._map.close()
        except BufferError:  # arrays still view it; the mapping goes with the last of them
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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


def is_int(value) -> bool:
    """Whether a decoded JSON value is an integer (``true`` and ``false`` are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def read(buf: memoryview | bytes, entries: list[dict], copy: bool) -> list[np.ndarray]:
    """Arrays described by ``entries`` in ``buf`` (views unless ``copy``).

    Raises:
        ProtocolError: an entry is malformed or points outside ``buf``.
    """
    out = []
    for e in entries:
        try:
            dtype = _dtype(e["dtype"])
            shape, offset, nbytes = e["shape"], e["offset"], e["nbytes"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"bad tensor description {e!r}: {exc}") from None
        if not isinstance(shape, list) or not all(is_int(d) for d in shape) or not is_int(offset) \
                or not is_int(nbytes):
            raise ProtocolError(f"bad tensor description {e!r}: shape must be a list of integers, offset and "
                                "nbytes integers")
        shape = tuple(shape)
        if any(d < 0 for d in shape) or nbytes != math.prod(shape) * dtype.itemsize:
            raise ProtocolError(f"tensor description {e!r}: nbytes does not match shape and dtype")
        if offset < 0 or offset + nbytes > len(buf):
            raise ProtocolError(f"tensor description {e!r} points outside the shared memory ({len(buf)} bytes)")
        a = np.frombuffer(buf, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset).reshape(shape)
        out.append(a.copy() if copy else a)
    return out
